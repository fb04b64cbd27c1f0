"""Security: nothing is unpickled (tensors only through ``weights_only=True`` or safetensors,
no Prefect result persisted), the run root holds only data formats, and credentials never
reach logs, artifacts or reports."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import urllib.parse
from pathlib import Path

import pytest
import s3fs
from prefect import Flow, Task

from .conftest import flow_config

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("gridistill", "tasks", "flows", "deployments", "benchmarks")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve",
                    "marshal", "jsonpickle"}


def unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that can execute code from the data they load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [
                alias.name for alias in node.names]
            found += [f"line {node.lineno}: imports {n}" for n in names
                      if n and n.split(".")[0] in PICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "map_location" in keywords:
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"line {node.lineno}: {name} without weights_only=True")
        elif name.endswith(("read_pickle", "Unpickler")) or name.split(".")[0] in \
                PICKLING_MODULES:
            found.append(f"line {node.lineno}: {name}")
        elif name in ("np.load", "numpy.load"):
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"line {node.lineno}: {name} with allow_pickle")
    return found


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt')", "torch.load(f, map_location='cpu', weights_only=False)",
    "import pickle", "from cloudpickle import loads", "pd.read_pickle('x')",
    "np.load('a.npz', allow_pickle=True)", "joblib.load('m')",
])
def test_the_checker_catches_unsafe_loads(snippet):
    assert unsafe_loads(snippet)


def test_no_unsafe_load_in_the_source_tree():
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    problems = {str(p.relative_to(REPO)): unsafe_loads(p.read_text()) for p in files}
    assert {path: found for path, found in problems.items() if found} == {}
    calls = sum(p.read_text().count("torch.load(") for p in files)
    assert calls >= 4  # the checker did see the real loads, and passed them


def prefect_objects() -> dict[str, Task | Flow]:
    """Every task and flow the package defines, by qualified name (each module imported)."""
    import gridistill
    import gridistill.flows
    import gridistill.tasks

    found = {}
    for package in (gridistill, gridistill.tasks, gridistill.flows):
        for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            found |= {f"{info.name}.{name}": value for name, value in vars(module).items()
                      if isinstance(value, Task | Flow) and value.__module__ == info.name}
    return found


# Prefect pickles a persisted result by default and unpickles it to read it back (a cache hit,
# a retry, a UI view), so no task or flow persists one: the run root holds every artifact.
def test_no_task_or_flow_persists_a_result():
    objects = prefect_objects()
    stages = {"load", "test-split", "embed", "select", "grids", "enhance", "refine", "teacher",
              "evaluate"}
    assert stages < {value.name for value in objects.values() if isinstance(value, Task)}
    assert sum(isinstance(value, Flow) for value in objects.values()) >= 6
    assert {name for name, value in objects.items() if value.persist_result is not False} == set()


@pytest.mark.slow
def test_a_run_writes_no_prefect_result_even_when_prefect_persists_by_default(
        prefect_harness, tiny_dataset, tmp_path):
    from prefect import flow, task
    from prefect.settings import (
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    from gridistill.config import DistillConfig
    from gridistill.flows.distill import distill

    @task
    def probe_task() -> int:
        return 1

    @flow
    def probe_flow() -> int:
        return probe_task()

    def written(results: Path) -> list[Path]:
        return [path for path in results.rglob("*") if path.is_file()]

    results = tmp_path / "prefect-results"
    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
                             PREFECT_LOCAL_STORAGE_PATH: results}):
        probe_flow()
        assert written(results)  # these settings do make a plain task and flow persist
        for path in written(results):
            path.unlink()
        distill(DistillConfig(**flow_config(tiny_dataset["train"], tiny_dataset["test"],
                                            str(tmp_path / "run"))))
    assert (tmp_path / "run" / "report.md").exists()
    assert written(results) == []


CANARY = {"AWS_ACCESS_KEY_ID": "AKIAGRIDISTILLCANARY7",
          "AWS_SECRET_ACCESS_KEY": "gridistill/Canary+Secret/do-not-log-0123456789",
          "AWS_SESSION_TOKEN": "GRIDISTILLCANARYSESSIONTOKEN42"}


@pytest.mark.slow
def test_credentials_never_reach_logs_artifacts_reports_or_the_run_root(
        flows, s3_endpoint, tiny_dataset, tmp_path):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_DATABASE_CONNECTION_URL

    bucket = f"canary-{tmp_path.name[-8:].lower().replace('_', '-')}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key=CANARY["AWS_ACCESS_KEY_ID"],
                           secret=CANARY["AWS_SECRET_ACCESS_KEY"])
    fs.mkdir(bucket)
    config = flow_config(tiny_dataset["train"], tiny_dataset["test"], f"s3://{bucket}/run",
                         storage_options={"endpoint_url": s3_endpoint})
    log = tmp_path / "flow.log"
    env = {**CANARY, "AWS_DEFAULT_REGION": "us-east-1"}
    assert flows.run(config, log, env) == 0, log.read_text()[-3000:]

    secrets = [v.encode() for v in CANARY.values()]
    secrets += [urllib.parse.quote(v, safe="").encode() for v in CANARY.values()]
    database = Path(str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).split(":///", 1)[1])
    places: dict[str, bytes] = {"flow log": log.read_bytes()}
    places |= {str(p): p.read_bytes() for p in database.parent.glob(database.name + "*")}
    places |= {str(p): p.read_bytes() for p in Path(str(PREFECT_LOCAL_STORAGE_PATH.value()))
               .rglob("*") if p.is_file()}
    objects = fs.find(f"{bucket}/run")
    places |= {f"s3://{key}": fs.cat_file(key) for key in objects}
    assert any(b"gridistill-report" in blob for name, blob in places.items() if "db" in name)
    assert len(objects) > 30 and b"dataset" in places["flow log"]
    leaks = [(name, s[:8]) for name, blob in places.items() for s in secrets if s in blob]
    assert leaks == []

    # The run root holds data formats only: nothing there could be unpickled.
    magic = (b"PAR1", b"\x89PNG", b"{", b"# ")
    assert [key for key in objects if not places[f"s3://{key}"].startswith(magic)] == []
