"""Fan-out at scale: a synthetic N-class dataset through every stage of the real flow.

    HF_HUB_OFFLINE=1 python benchmarks/fanout.py --classes 10 100 1000
    HF_HUB_OFFLINE=1 python benchmarks/fanout.py --classes 100 --workers 2 8 --variants baseline

Each row runs ``gridistill.flows.distill.distill`` (pixels-pca embedder, CPU, 2x2 grids at
32 px, one method, one evaluation epoch) in a fresh child process that shares one warm Prefect
home; the child starts the ephemeral Prefect server with a one-task warm-up flow first, so the
wall time is the flow alone, not the server's start. Printed per row:

- ``wall s``: the ``distill(config)`` call; ``task runs``: counted (5 per class + index,
  evaluate, report, and any whole-run stage the flow has);
- ``compute s``: the summed per-task compute seconds from the run root's ``timings.parquet``
  (what the stage bodies spent; the index and report tasks are not in it: they count as
  overhead here);
- ``overhead ms/run``: (wall - compute) / task runs. With W worker
  threads the compute of W tasks can overlap, so this can understate what Prefect adds;
- ``Prefect ms/run``: time inside task runs minus time in the stage bodies, summed over the
  worker threads, per task run: what Prefect itself spends around each stage;
- ``RSS MiB``: the flow process's resident memory before the flow, and its peak
  (``ru_maxrss``); the Prefect server is a separate process and is not counted.

``--attribute`` wraps Prefect's per-task-run steps (cache key, result persistence, state
changes and their events, parameter resolution, submission) with timers summed over threads,
and prints where the wall time of the task runs went. ``--variants`` prototypes changes to the
flow's task options inside this process (the flow module is not edited):

- ``baseline``: the flow as it is;
- ``quiet``: the stages' per-task INFO log lines are not sent to the Prefect API.

Three earlier prototypes were measured here and are now part of the flow (see docs/scale.md):
stage tasks carry no tags (Prefect 3.8 asks the API for a concurrency-slot lease on every
tagged task run), per-class tasks get a dataset ref holding only their own class, and stage
tasks have no Prefect cache key and persist no result (``no-persist``; the run root's commit
markers are the cache, and a reused stage still reports Cached).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RUN_LABEL = "task run, whole (summed over threads)"
BODY_LABEL = "stage body incl. run-root commit"
VARIANTS = ("baseline", "quiet")


# -- data ------------------------------------------------------------------------------------
def write_dataset(root: Path, classes: int, per_class: int, size: int = 16) -> Path:
    """``classes`` folders of ``per_class`` distinct seeded PNGs (idempotent: a marker file)."""
    marker = root / f".complete-{classes}x{per_class}"
    if marker.exists():
        return root
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"c{c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            noise = rng.normal(0, 40, (size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    marker.touch()
    return root


# -- attribution (child process) -------------------------------------------------------------
class Timers:
    """Seconds and calls per label, summed over threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self.seconds[label] += elapsed
                    self.calls[label] += 1

        setattr(owner, name, timed)

    def wrap_context(self, owner: Any, name: str, label: str) -> None:
        """Time entering and leaving a context manager (not the body it guards)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        @contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            started = time.perf_counter()
            with original(*args, **kwargs) as value:
                entered = time.perf_counter()
                try:
                    yield value
                finally:
                    left = time.perf_counter()
            with self._lock:
                self.seconds[label] += entered - started + time.perf_counter() - left
                self.calls[label] += 1

        setattr(owner, name, timed)


def attribute(timers: Timers) -> None:
    """Time the steps every task run takes (Prefect 3.8 sync task engine)."""
    import prefect.task_engine as engine
    import prefect.tasks
    from prefect.results import ResultStore

    runner = engine.SyncTaskRunEngine
    timers.wrap(prefect.tasks.Task, "map", "submit (.map, flow thread)")
    timers.wrap(prefect.tasks.Task, "submit", "submit (.submit, flow thread)")
    timers.wrap(runner, "compute_transaction_key", "cache key")
    timers.wrap(runner, "_resolve_parameters", "resolve upstream futures")
    timers.wrap(runner, "set_state", "state changes + events")
    timers.wrap_context(engine, "_concurrency", "tag concurrency slots (API)")
    timers.wrap_context(runner, "setup_run_context", "run context setup")
    timers.wrap_context(runner, "initialize_run", "task run creation + client")
    timers.wrap(ResultStore, "persist_result_record", "result persistence (write)")
    timers.wrap(ResultStore, "exists", "cache lookup (result exists?)")
    timers.wrap(ResultStore, "read", "cache lookup (result read)")


def apply_variant(variant: str) -> None:
    """Prototype proposed changes to the flow in this process ("a+b": both)."""
    import logging

    import gridistill.stages

    quiet = logging.getLogger("gridistill")
    for change in variant.split("+"):
        if change == "baseline":
            continue
        if change == "quiet":
            gridistill.stages.stage_logger = lambda: quiet  # a local logger: not sent to the API
        else:
            raise ValueError(f"unknown change {change!r} in {variant!r}; choose from {VARIANTS}")


class StageMemory:
    """RSS at the start and end of every stage body, and optional tracemalloc snapshots.

    Attributes the flow process's memory to stage waves: the RSS when a stage's first body
    starts and when its last body ends, and the high-water mark (``ru_maxrss``) then, which
    also catches a short peak inside the wave. With ``trace``, Python-level allocations (numpy
    included, torch not) are snapshotted when each stage's first body starts and after the
    flow, so the growth between two waves can be named by file and line.
    """

    def __init__(self, trace: bool) -> None:
        import psutil

        self.process, self.trace = psutil.Process(), trace
        self.first_start: dict[str, float] = {}
        self.last_end: dict[str, tuple[float, float]] = {}  # RSS and high-water mark
        self.snapshots: dict[str, Any] = {}
        self._lock = threading.Lock()

    def rss(self) -> float:
        return self.process.memory_info().rss / 2**20

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        with self._lock:
            if stage not in self.first_start:
                self.first_start[stage] = self.rss()
                if self.trace:
                    import tracemalloc

                    self.snapshots[stage] = tracemalloc.take_snapshot()
        try:
            yield
        finally:
            rss = self.rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            with self._lock:
                self.last_end[stage] = rss

    def wrap_stages(self, owner: Any, name: str) -> None:
        """Measure ``owner.name(stage, ...)``, e.g. ``gridistill.stages.run_stage``."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def measured(stage: str, *args: Any, **kwargs: Any) -> Any:
            with self.measure(stage):
                return original(stage, *args, **kwargs)

        setattr(owner, name, measured)

    def wrap_task(self, prefect_task: Any, stage: str) -> None:
        """Measure a task that is not a stage (the report) under the name ``stage``."""
        original = prefect_task.fn

        @functools.wraps(original)
        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.measure(stage):
                return original(*args, **kwargs)

        prefect_task.fn = measured

    def summary(self, top: int = 8) -> dict[str, Any]:
        """Per stage wave: RSS at its first start and last end, and the process's high-water
        mark at that end (MiB); Python-level growth between snapshots."""
        waves = {stage: [round(self.first_start[stage]),
                         *(round(v) for v in self.last_end.get(stage, (0, 0)))]
                 for stage in self.first_start}
        growth: dict[str, list[str]] = {}
        if self.trace:
            import tracemalloc

            self.snapshots["end"] = tracemalloc.take_snapshot()
            names = list(self.snapshots)
            for before, after in zip(names, names[1:], strict=False):
                stats = self.snapshots[after].compare_to(self.snapshots[before], "lineno")
                growth[f"{before}->{after}"] = [
                    f"{stat.size_diff / 2**20:+.1f} MiB "
                    f"{stat.traceback[0].filename.split('site-packages/')[-1]}"
                    f":{stat.traceback[0].lineno}" for stat in stats[:top]]
        return {"rss_by_stage_mib": waves, "python_growth": growth}


@contextmanager
def rss_sampler(interval: float = 0.5) -> Iterator[list[tuple[float, float]]]:
    """(seconds, RSS MiB) of this process every ``interval`` seconds."""
    import psutil

    process, samples, stop = psutil.Process(), [], threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not stop.wait(interval):
            samples.append((time.perf_counter() - started, process.memory_info().rss / 2**20))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One flow run; returns the row as a dict (printed as JSON for the parent)."""
    import pandas as pd
    import psutil
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from gridistill.config import DistillConfig

    @task
    def noop() -> int:
        return 1

    @flow
    def warm_up() -> int:
        return noop()

    warm_up()  # starts the ephemeral server: not part of the measured wall time
    timers = Timers()
    import prefect.task_engine

    import gridistill.stages

    timers.wrap(prefect.task_engine, "run_task_sync", RUN_LABEL)  # counts every task run
    timers.wrap(gridistill.stages, "run_stage", BODY_LABEL)
    if args.trace_memory:
        import tracemalloc

        tracemalloc.start()
    memory = StageMemory(trace=args.trace_memory)
    memory.wrap_stages(gridistill.stages, "run_stage")
    if args.attribute:
        attribute(timers)
    apply_variant(args.variant)
    import gridistill.flows.distill as flow_module

    memory.wrap_task(flow_module.write_report, "report")

    config = DistillConfig(
        data=args.data, out=args.out, ipc=1, grid_size=2, grid_resolution=32,
        methods=["random"], embedder="pixels-pca", enhance_scale=1,
        eval_image_size=16, eval_epochs=1, progress=False, device="cpu",
    )
    run = flow_module.distill.with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=args.workers))
    rss_before = psutil.Process().memory_info().rss / 2**20
    cpu_before = time.process_time()
    with rss_sampler() as samples:
        started = time.perf_counter()
        run(config)
        wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    timings = pd.read_parquet(Path(args.out) / "timings.parquet")
    task_runs = timers.calls[RUN_LABEL]
    compute = float(timings["seconds"].sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # RSS at 10 %, 50 % and 90 % of the run: flat if per-class state is not accumulating.
    marks = {f"rss@{p}%": round(next((m for t, m in samples if t >= wall * p / 100), peak), 0)
             for p in (10, 50, 90)}
    return {
        "classes": args.classes, "workers": args.workers, "variant": args.variant,
        "task_runs": task_runs, "wall_s": round(wall, 2), "tasks_per_s": round(task_runs / wall, 2),
        "compute_s": round(compute, 2), "process_cpu_s": round(cpu, 2),
        "overhead_ms_per_run": round(1000 * (wall - compute) / task_runs, 1),
        "prefect_ms_per_run": round(
            1000 * (timers.seconds[RUN_LABEL] - timers.seconds[BODY_LABEL]) / task_runs, 1),
        "rss_before_mib": round(rss_before, 0), "rss_peak_mib": round(peak, 0), **marks,
        "statuses": timings["status"].value_counts().to_dict(),
        "compute_by_stage": timings.groupby(timings["stage"].str.split(":").str[0])["seconds"]
        .sum().round(2).to_dict(),
        "attribution_s": {k: round(v, 2) for k, v in timers.seconds.items()},
        "attribution_calls": dict(timers.calls),
        **memory.summary(),
    }


# -- parent ----------------------------------------------------------------------------------
def run_child(classes: int, workers: int, variant: str, data: Path, home: Path, out: Path,
              attribute_steps: bool, timeout: float, trace_memory: bool = False,
              malloc_arenas: int | None = None) -> dict[str, Any]:
    env = os.environ | {
        "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(home),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(out / "prefect-results"),
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, __file__, "--child", "--classes", str(classes), "--workers",
               str(workers), "--variants", variant, "--data", str(data), "--out",
               str(out / "run")]
    if attribute_steps:
        command.append("--attribute")
    if trace_memory:
        command.append("--trace-memory")
    if malloc_arenas:
        env["MALLOC_ARENA_MAX"] = str(malloc_arenas)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[dict[str, Any]]) -> str:
    header = ("| classes | workers | variant | task runs | wall s | task runs/s | compute s | "
              "overhead ms/run | Prefect ms/run | RSS before MiB | RSS peak MiB | "
              "RSS @10/50/90 % | load avg |")
    lines = [header, "|---:|---:|---|" + "---:|" * 10]
    for r in rows:
        lines.append(
            f"| {r['classes']} | {r['workers']} | {r['variant']} | {r['task_runs']} | "
            f"{r['wall_s']:.1f} | {r['tasks_per_s']:.2f} | {r['compute_s']:.1f} | "
            f"{r['overhead_ms_per_run']:.0f} | {r['prefect_ms_per_run']:.0f} | "
            f"{r['rss_before_mib']:.0f} | "
            f"{r['rss_peak_mib']:.0f} | {r['rss@10%']:.0f}/{r['rss@50%']:.0f}/"
            f"{r['rss@90%']:.0f} | {r['load']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--per-class", type=int, default=50, help="images per class")
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="thread-pool sizes of the flow's task runner")
    parser.add_argument("--variants", nargs="+", default=["baseline"],
                        help=f"flow changes to prototype, joined by '+': {', '.join(VARIANTS)}")
    parser.add_argument("--attribute", action="store_true",
                        help="time Prefect's per-task-run steps (adds a little overhead)")
    parser.add_argument("--trace-memory", action="store_true",
                        help="tracemalloc snapshots at each stage wave (slows the run)")
    parser.add_argument("--malloc-arenas", type=int, default=None,
                        help="MALLOC_ARENA_MAX for the child (glibc per-thread arenas)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per row")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keeps generated data between invocations (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.classes, args.workers, args.variant = args.classes[0], args.workers[0], \
            args.variants[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gridistill-fanout-"))
    home = work / "prefect-home"
    print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{args.per_class} images/class, work dir {work}")
    rows = []
    for classes in args.classes:
        started = time.perf_counter()
        data = write_dataset(work / f"data-{classes}", classes, args.per_class)
        print(f"# data for {classes} classes ready in {time.perf_counter() - started:.0f}s",
              flush=True)
        for workers in args.workers:
            for variant in args.variants:
                with tempfile.TemporaryDirectory(dir=work) as out:
                    row = run_child(classes, workers, variant, data, home, Path(out),
                                    args.attribute, args.timeout, args.trace_memory,
                                    args.malloc_arenas)
                row["load"] = load_average()
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
