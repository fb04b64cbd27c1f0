"""End to end with real parts on loopback: a Prefect server, `cpu` and `gpu` process work
pools with one worker each, the deployments from deployments/prefect.yaml, and the data, run
root and Prefect results on a moto S3 server. Each worker gets its own PREFECT_HOME, so
nothing can pass through a shared local disk."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
import yaml
from server_logs import server_log_problem

from gridistill.storage import RunStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
SCHEDULE_WAIT_SECONDS = 120
BIN = Path(sys.executable).parent
SECRET = "testing-secret-key"  # the moto fixture's throwaway AWS secret: must never be logged


@dataclass
class Stack:
    api_url: str
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, *command: str, **env: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen([str(BIN / command[0]), *command[1:]], cwd=REPO,
                                   env=self.env | env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def run(self, *command: str, timeout: float = 120) -> str:
        done = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"{command} failed:\n{tail}"
        return done.stdout

    def stop(self) -> None:
        # SIGINT first: a Prefect worker ignores SIGTERM for a while.
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(autouse=True, scope="module")
def _quiet_moto() -> None:
    # The in-process moto server logs every S3 request; keep the test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited; see its log"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy at {url} after {timeout}s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_endpoint) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("orchestration")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1", "GRIDISTILL_SOURCE_DIR": str(REPO),
            "PYTHONPATH": str(REPO)}
    stack = Stack(api_url, env, home)
    try:
        # The UI asks PREFECT_SERVER_API_PORT for its API, so it must match --port. A 5 s
        # scheduler loop (default 60 s) keeps the scheduling test's wait short.
        server = stack.start("server", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), PREFECT_HOME=str(home / "server"),
                             PREFECT_SERVER_API_PORT=str(port),
                             PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
        _wait_healthy(api_url, server)
        yield stack
    finally:
        stack.stop()
    # Every test that used the server fails with it: this teardown error names the module.
    problem = server_log_problem(home / "server.log")
    assert problem is None, f"the prefect server logged an error:\n{problem}"


@pytest.fixture(scope="module")
def deployed(stack: Stack, s3_endpoint) -> dict[str, str]:
    """Pools and the `gpu` limit; a worker per pool; deploy --all."""
    import s3fs

    bucket = f"s3://orchestration-{os.getpid()}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket)
    stack.run("python", "-m", "gridistill.deployments.setup", "--gpu-slots", "1")
    for pool in ("cpu", "gpu"):
        worker_home = stack.logs / f"worker-{pool}"
        stack.start(f"worker-{pool}", "prefect", "worker", "start", "--pool", pool,
                    "--type", "process", PREFECT_WORKER_QUERY_SECONDS="2",
                    PREFECT_HOME=str(worker_home),
                    PREFECT_LOCAL_STORAGE_PATH=str(worker_home / "results"))
    stack.run("prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
              "deployments/prefect.yaml", timeout=180)
    return {"bucket": bucket, "endpoint": s3_endpoint}


def _flow_runs_below(client, parent_id: UUID) -> list:
    """Every flow run started under ``parent_id`` (segments and their task subflows)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, frontier = [], [parent_id]
    while frontier:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
        children = [run for run in children if run.id not in {r.id for r in found}]
        found += children
        frontier = [run.id for run in children]
    return found


def stage_task_states(client, parent_id: UUID) -> Counter:
    """(task run name, state name) of every stage task run under the parent run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from gridistill.config import STAGES

    runs = _flow_runs_below(client, parent_id)
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
        id=FlowRunFilterId(any_=[run.id for run in runs])), limit=200)
    # Stage task runs are named "<stage>[<class or method>]" (see gridistill.stages).
    return Counter((run.name, run.state.name) for run in task_runs
                   if run.name.split("[", 1)[0] in STAGES)


def test_deployed_run_on_pools_then_ui_rerun_of_two_classes(stack, deployed, tiny_dataset):
    import s3fs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    bucket, endpoint = deployed["bucket"], deployed["endpoint"]
    options = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(**options)
    for split in ("train", "test"):
        fs.put(str(tiny_dataset[split]), f"{bucket}/data/{split}", recursive=True)
    config = dict(
        data=f"{bucket}/data/train", test_data=f"{bucket}/data/test", out=f"{bucket}/runs/tiny",
        storage_options=options, ipc=1, grid_size=2, grid_resolution=32,
        methods=["ssdim", "random"], embedder="pixels-pca", enhance=["bilinear"],
        enhance_scale=2, eval_image_size=16, eval_epochs=2, eval_seeds=1, progress=False,
        device="cpu", max_workers=2)
    pools = {"poll_seconds": 1}

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        started = time.perf_counter()
        first = run_deployment("gridistill-pooled/distill", as_subflow=False, poll_interval=2,
                               timeout=240, parameters={"config": config, "pools": pools})
        first_seconds = time.perf_counter() - started
        assert first.state.is_completed(), f"first run ended {first.state}"

        store = RunStore(config["out"], options)
        assert store.exists("report.md") and store.exists("metrics.parquet")
        for stage in ("load", "embed", "select", "grids", "enhance", "evaluate"):
            assert store.list(stage), f"no {stage} artifacts in S3"
        assert sorted(p.rsplit("/", 1)[-1] for p in store.list("grids")) == [
            "alpha", "beta", "gamma"]

        with get_client(sync_client=True) as client:
            states = stage_task_states(client, first.id)
            assert {state for _, state in states} == {"Completed"}
            # 3 classes x (load, embed) + 2 methods x 3 classes x (select, grids, enhance)
            # + 2 evaluations
            assert sum(states.values()) == 3 * 2 + 2 * 3 * 3 + 2

            started = time.perf_counter()
            rerun = run_deployment(
                "gridistill-pooled/distill", as_subflow=False, poll_interval=2, timeout=240,
                parameters={"config": config | {"force_from": "grids",
                                                 "force_classes": ["alpha", "beta"]},
                            "pools": pools})
            rerun_seconds = time.perf_counter() - started
            assert rerun.state.is_completed(), f"rerun ended {rerun.state}"
            states = stage_task_states(client, rerun.id)
            recomputed = Counter({key: n for key, n in states.items() if key[1] != "Cached"})
            assert recomputed == Counter({
                ("grids[alpha]", "Completed"): 2, ("grids[beta]", "Completed"): 2,
                ("enhance[alpha]", "Completed"): 2, ("enhance[beta]", "Completed"): 2,
                ("evaluate[ssdim]", "Completed"): 1, ("evaluate[random]", "Completed"): 1})
            assert sum(n for key, n in states.items() if key[1] == "Cached") == (
                3 * 2 + 2 * 3 + 2 * 1 * 2)  # load, embed; every select; gamma's grids, enhance

            # GPU stages ran on the gpu pool, CPU stages on the cpu pool, one run per pool hop.
            segment_runs = {run.name: run.work_pool_name for run in
                            _flow_runs_below(client, rerun.id) if run.deployment_id}
            assert segment_runs == {"load[0]": "cpu", "embed[0]": "gpu",
                                    "select-grids[0]": "cpu", "enhance+evaluate[0]": "gpu"}
            gpu_limit = client.read_global_concurrency_limit_by_name("gpu")
            assert gpu_limit.limit == 1 and gpu_limit.active_slots == 0  # slots given back

            progress = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["gridistill-progress"])))
            assert progress and max(a.data for a in progress) == 100.0
            published = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["gridistill-timings", "gridistill-run-root"])))
            assert {artifact.key for artifact in published} == {"gridistill-timings",
                                                                "gridistill-run-root"}
            run_ids = [first.id, rerun.id, *(r.id for r in _flow_runs_below(client, rerun.id))]
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=run_ids)))
            assert logs and not [log.message for log in logs if SECRET in log.message]

    timings = store.read_parquet("timings.parquet")
    assert set(timings["status"]) == {"Cached", "Completed"}
    # No flow or task persisted a result (Prefect would pickle it): the run root is the cache.
    assert [path for pool in ("cpu", "gpu") for path in
            (stack.logs / f"worker-{pool}" / "results").rglob("*") if path.is_file()] == []
    print(f"\nfirst run {first_seconds:.1f}s, UI-style rerun {rerun_seconds:.1f}s")


def test_weekly_deployment_gets_scheduled_runs_at_its_cron_times(stack, deployed):
    """The server's scheduler creates the weekly deployment's next runs at the times its cron
    gives. With SQLAlchemy 2.1 every scheduler loop failed and no run was ever created."""
    from cronsim import CronSim
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    [weekly] = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
                if d["name"] == "imagenet1k-weekly"]
    [schedule] = weekly["schedules"]
    with temporary_settings({PREFECT_API_URL: stack.api_url}), \
            get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("gridistill-pooled/imagenet1k-weekly")
        [deployed_schedule] = deployment.schedules
        assert deployed_schedule.active
        assert deployed_schedule.schedule.cron == schedule["cron"]
        runs_of_weekly = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(
            any_=[deployment.id]))
        deadline = time.monotonic() + SCHEDULE_WAIT_SECONDS
        while not (runs := client.read_flow_runs(flow_run_filter=runs_of_weekly)):
            assert time.monotonic() < deadline, (
                f"no scheduled run of imagenet1k-weekly {SCHEDULE_WAIT_SECONDS} s after deploy;"
                f" server log:\n{server_log_problem(stack.logs / 'server.log')}")
            time.sleep(2)
    assert {run.state.name for run in runs} == {"Scheduled"}
    assert all(run.auto_scheduled for run in runs)
    # The scheduler plans from its own clock, which started after the deployment was created.
    cron_times = CronSim(schedule["cron"],
                         deployment.created.astimezone(ZoneInfo(schedule["timezone"])))
    expected = [next(cron_times) for _ in runs]
    assert sorted(run.expected_start_time for run in runs) == expected
