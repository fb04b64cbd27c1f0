"""The prepared device check: every CUDA path once, each step with its own timeout.

    benchmarks/gpu_check.sh OUT_DIR [--device cuda|cpu] [--tiny] [--wheels DIR|none]

Steps, each a child process with its own timeout (one that fails or hangs does not stop the
others), all inside one overall budget (default 450 s, so the check ends within 8 minutes):

1. ``install``: the wheels in ``--wheels`` (default ``.gpu_wheels``, fetched by
   ``benchmarks/fetch_gpu_wheels.sh``) into a scratch folder put first on ``PYTHONPATH``, offline
   and without dependency resolution, then one import of everything the later steps need;
2. ``pytest-gpu``: ``pytest -m gpu`` over the test files that hold gpu-marked tests;
3. ``selection``: ``benchmarks/selection.py`` at M = 1,300 and 5,000, the torch backend on
   ``--device`` next to the numpy (CPU) path;
4. ``embed``: ``benchmarks/embed.py``, ViT-B-32 at 224 px, decode in DataLoader workers and
   with ``torchvision.io.decode_jpeg`` on the device, over ImageNet-sized JPEGs made here;
5. ``enhance``: ``benchmarks/enhance.py``, SD-Turbo-size UNet, VAE and text encoder with random
   weights on 224 -> 896 grids (fp16 on CUDA);
6. ``refine``: ``benchmarks/refine.py``, DiT-XL/2-256 and its VAE with random weights (bf16 on
   CUDA) at batch 1, 8 and 32;
7. ``run``: ``gridistill run`` of the embedded demo end to end on ``--device``.

``--tiny`` runs the same steps and code paths with tiny models and sizes and few iterations:
the CPU dry run in ``tests/test_gpu_check.py`` (``--device cpu --tiny --wheels none``).

OUT_DIR receives ``summary.md`` (each step's status and wall time) and one ``<step>.log`` per
step (the benchmarks' tables are in their logs): 8 files, as many as the device tool brings back.
Scratch files (installed wheels, JPEGs, the Prefect home, the run root) go to ``--work``.
Exit status 0 when every step passed. Only the standard library is imported here: on the device
the packages the steps need exist only after the install step.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("install", "pytest-gpu", "selection", "embed", "enhance", "refine", "run")  # in order
DEMO_TRAIN = REPO / "gridistill" / "demo_data" / "imagenette-mini" / "train"
# What the device image lacks and the steps import (the image has torch, timm, transformers...),
# then the versions that the later steps' numbers belong to.
IMPORT_CHECK = (
    "import torch, diffusers, open_clip, prefect, pydantic, gridistill.cli, "
    "gridistill.flows.distill, gridistill.tasks.embed, gridistill.tasks.enhance, "
    "gridistill.tasks.refine, gridistill.tasks.select; print('imports ok:', *(f'{m.__name__} "
    "{m.__version__}' for m in (torch, diffusers, open_clip, prefect, pydantic)), 'CUDA:', "
    "torch.cuda.is_available() and torch.cuda.get_device_name())"
)


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: float  # seconds
    env: dict[str, str] | None = None  # added to the common environment


@dataclass
class Result:
    name: str
    status: str  # ok | failed (rc N) | timeout | not run (budget)
    seconds: float
    timeout: float | None = None
    log: str = "-"


def write_jpegs(root: Path, count: int, size: tuple[int, int]) -> None:
    """``count`` ImageNet-sized JPEGs (``size`` = width, height) in the demo's class folders:
    each of the demo's 112 px photos enlarged once, with grain so it decodes like a photo rather
    than flat areas, then hard links to those files up to ``count`` (each is still read, hashed
    and decoded on its own). The device has no ImageNet, and no room to carry some."""
    import numpy as np
    from PIL import Image

    sources = sorted(DEMO_TRAIN.glob("*/*.jpg"))
    grain = np.random.default_rng(0).normal(0, 6, (size[1], size[0], 3)).astype(np.float32)
    written: list[Path] = []
    for index in range(count):
        source = sources[index % len(sources)]
        folder = root / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"synthetic_{index:05d}.JPEG"
        if index < len(sources):
            pixels = np.asarray(Image.open(source).convert("RGB").resize(size, Image.BICUBIC))
            Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8)).save(path,
                                                                                  quality=90)
            written.append(path)
        else:
            os.link(written[index % len(sources)], path)


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps: real sizes on the device, or the same code paths at tiny sizes."""
    python, device, tiny = sys.executable, args.device, args.tiny
    cpu_threads = ["--threads", "1"] if device == "cpu" else []  # shared CPUs: no spin-waits
    install = [python, "-c", IMPORT_CHECK]
    if args.wheels != "none":
        wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
        pip = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--target", str(work / "site"),
               *wheels]
        install = ["sh", "-c", f"{shlex.join(pip)} && {shlex.join(install)}"]
    gpu_tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                       if "mark.gpu" in p.read_text())
    embed = (["--models", "gridistill-tiny-vit", "--images", "16", "--batch-size", "8",
              "--workers", "1", "--model-repeats", "1"] if tiny else
             ["--models", "ViT-B-32", "--images", "4096", "--batch-size", "256",
              "--workers", "12", "--model-repeats", "5"])
    enhance = (["--arch", "tiny", "--size", "32", "--tiles", "none,96", "--grids", "1",
                "--repeats", "1", "--batch-size", "2"] if tiny else
               ["--arch", "sd-turbo", "--size", "224", "--tiles", "none,512", "--grids", "2",
                "--repeats", "2", "--batch-size", "4"])
    refine = (["--model", "tiny", "--batch-sizes", "1,2", "--images", "2", "--t-f", "2"] if tiny
              else ["--model", "dit-xl-2-random", "--dtype", "bfloat16", "--batch-sizes",
                    "1,8,32", "--images", "32"])
    selection = ["--sizes", "300", "--repeats", "1"] if tiny else [
        "--sizes", "1300", "5000", "--repeats", "3"]
    run = ["--grid-resolution", "32", "--eval-image-size", "16", "--eval-epochs", "1",
           "--eval-seeds", "1", "--methods", "ssdim", "--max-workers", "2"] if tiny else []
    return [
        Step("install", install, 120),
        Step("pytest-gpu", [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            *gpu_tests], 120),
        # No --data folder with classes: the device has no Imagenette, so no real-image row.
        Step("selection", [python, "benchmarks/selection.py", "--device", device,
                           "--data", str(work / "no-imagenette"), *selection], 90,
             {"OPENBLAS_NUM_THREADS": "1"}),
        Step("embed", [python, "benchmarks/embed.py", "--device", device, "--data",
                       str(work / "jpegs"), "--device-decode", *embed, *cpu_threads], 120),
        Step("enhance", [python, "benchmarks/enhance.py", "--device", device, *enhance,
                         *cpu_threads], 150),
        Step("refine", [python, "-m", "benchmarks.refine", "--device", device, *refine,
                        *cpu_threads], 150),
        Step("run", [python, "-m", "gridistill.cli", "run", "--device", device, "--out",
                     str(work / "run"), "--no-progress", *run], 240),
    ]


def run_step(step: Step, env: dict[str, str], log: Path, timeout: float) -> tuple[str, float]:
    """Run ``step`` with its output in ``log``; its own process group, so a timeout also ends
    the processes it started (DataLoader workers, Prefect's temporary server)."""
    started = time.perf_counter()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(step.argv)}\n")
        out.flush()
        process = subprocess.Popen(step.argv, cwd=REPO, env=env | (step.env or {}), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (rc {code})"
        except subprocess.TimeoutExpired:
            status = "timeout"
        try:
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of a finished step too
        except ProcessLookupError:
            pass
        process.wait()
    return status, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for summary.md and the step logs")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU dry run")
    parser.add_argument("--wheels", default=str(REPO / ".gpu_wheels"),
                        help="folder of wheels to install first, or 'none' (a full venv)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder, left in place (default: a new temporary one)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for all steps together; later steps get what is left")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=None,
                        help="run only these steps (a rerun on a warm device: with the same "
                        "--work, install can be left out)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in plan(args, work) if args.steps is None or s.name in args.steps]
    started = time.perf_counter()
    deadline = started + args.budget
    python_path = [str(work / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(p for p in python_path if p),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    header = (f"# gpu_check: --device {args.device}{' --tiny' if args.tiny else ''}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {platform.node()}, "
              f"Python {platform.python_version()}, {os.cpu_count()} CPUs")
    results: list[Result] = []

    def write_summary() -> str:
        """After every step, so a check cut short still leaves its summary so far."""
        lines = [
            header, "",
            "| step | status | seconds | timeout (s) | log |",
            "|---|---|---:|---:|---|",
            *(f"| {r.name} | {r.status} | {r.seconds:.1f} | "
              f"{'-' if r.timeout is None else f'{r.timeout:.0f}'} | {r.log} |"
              for r in results),
            "", f"Total {time.perf_counter() - started:.1f} s of the {args.budget:.0f} s budget.",
        ]
        text = "\n".join(lines) + "\n"
        (args.out / "summary.md").write_text(text)
        return text

    if any(s.name == "embed" for s in steps):  # its input; a failure shows in the embed step
        step_started = time.perf_counter()
        try:
            write_jpegs(work / "jpegs", 16 if args.tiny else 4096, (500, 375))
            status = "ok"
        except Exception as error:  # reported in the summary; the steps go on
            status = f"failed ({type(error).__name__}: {error})"
        results.append(Result("make JPEGs", status, time.perf_counter() - step_started))
        write_summary()

    for step in steps:
        left = deadline - time.perf_counter()
        if left < 5:
            results.append(Result(step.name, "not run (budget)", 0.0))
            continue
        timeout = min(step.timeout, left)
        log = f"{step.name}.log"
        status, seconds = run_step(step, env, args.out / log, timeout)
        results.append(Result(step.name, status, seconds, timeout, log))
        print(f"{step.name}: {status} in {seconds:.1f} s", flush=True)
        write_summary()

    print(write_summary(), end="")
    return 0 if all(r.status == "ok" for r in results) else 1

if __name__ == "__main__":
    sys.exit(main())
