"""Deployments, containers and orchestration helpers, checked without a Docker engine or a
GPU: prefect.yaml against the flows' parameter schemas, the compose file and Dockerfiles by
parsing, the pool planning and GPU refusal as plain functions."""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
COMPOSE = REPO / "docker" / "docker-compose.yml"
DOCKERFILES = {kind: REPO / "docker" / f"Dockerfile.{kind}" for kind in ("cpu", "cuda")}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


# -- prefect.yaml ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_the_issue_deployments_exist_on_the_right_pools(deployments):
    assert {"imagenet1k-weekly", "subset-distill", "refine-existing", "evaluate",
            "stage-cpu", "stage-gpu", "distill"} <= set(deployments)
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools["stage-gpu"] == pools["refine-existing"] == "gpu"
    assert all(pools[name] == "cpu" for name in
               ["stage-cpu", "distill", "imagenet1k-weekly", "subset-distill", "evaluate"])
    [schedule] = deployments["imagenet1k-weekly"]["schedules"]
    assert len(schedule["cron"].split()) == 5 and schedule["timezone"] == "UTC"
    weekly = deployments["imagenet1k-weekly"]["parameters"]
    assert weekly["config"]["data"].endswith("imagenet/train")
    assert weekly["pools"]["gpu_deployment"] == "gridistill-stage/stage-gpu"
    assert deployments["evaluate"]["parameters"]["config"]["force_from"] == "evaluate"


def test_every_deployment_parameter_set_matches_its_flow_schema(deployments):
    """What the server checks on `prefect deploy` (enforce_parameter_schema), offline."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    for name, deployment in deployments.items():
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        schema = parameter_schema(flow).model_dump_for_openapi()
        validate(deployment.get("parameters", {}), schema, raise_on_error=True,
                 ignore_required=True)
        assert flow.name.startswith("gridistill-"), name


def test_ui_form_is_typed_for_reruns_and_presets(deployments):
    from prefect.utilities.callables import parameter_schema

    from gridistill.flows.pooled import distill_pooled
    from gridistill.flows.subset import subset_distill

    config = parameter_schema(distill_pooled).model_dump_for_openapi()["definitions"][
        "DistillConfig"]["properties"]
    force_from = next(option for option in config["force_from"]["anyOf"] if "enum" in option)
    assert "enhance" in force_from["enum"] and "evaluate" in force_from["enum"]
    assert config["force_classes"]["anyOf"][0]["type"] == "array"
    assert config["task_runner"]["enum"] == ["thread", "dask", "ray"]
    preset = parameter_schema(subset_distill).model_dump_for_openapi()["properties"]["preset"]
    assert preset["enum"] == ["imagenette", "imagewoof"]


def test_subset_preset_sets_data_and_run_root_only():
    from gridistill.config import DistillConfig
    from gridistill.flows.subset import subset_config

    config = subset_config("imagewoof", "s3://data/", "s3://runs",
                           DistillConfig(ipc=10, methods=["ssdim"], data="/elsewhere"))
    assert config.data == "s3://data/imagewoof2-320/train"
    assert config.test_data == "s3://data/imagewoof2-320/val"
    assert config.out == "s3://runs/imagewoof-ipc10"
    assert config.class_list is None and config.ipc == 10 and config.methods == ["ssdim"]


# -- docker ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_images_and_volumes(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "minio", "buckets", "setup",
                             "cpu-worker", "gpu-worker"}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
    assert services["cpu-worker"]["image"] == services["prefect-server"]["image"]
    assert services["prefect-server"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert services["gpu-worker"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert "--pool" in services["cpu-worker"]["command"]
    assert services["cpu-worker"]["command"][services["cpu-worker"]["command"].index("--pool")
                                             + 1] == "cpu"
    assert services["gpu-worker"]["command"][services["gpu-worker"]["command"].index("--pool")
                                             + 1] == "gpu"
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"][
        "PREFECT_API_DATABASE_CONNECTION_URL"]
    declared = set(compose["volumes"])
    used = {mount.split(":")[0] for service in services.values()
            for mount in service.get("volumes", [])}
    assert used == declared == {"postgres-data", "minio-data", "hf-cache"}


def test_compose_health_checks_and_start_order(compose):
    services = compose["services"]
    one_shot = {"buckets", "setup"}
    for name, service in services.items():
        if name not in one_shot:
            assert service["healthcheck"]["test"], f"{name} has no health check"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["setup"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    for worker in ("cpu-worker", "gpu-worker"):
        assert "--with-healthcheck" in services[worker]["command"]
        assert services[worker]["depends_on"]["setup"]["condition"] == \
            "service_completed_successfully"


def test_compose_reserves_a_gpu_for_the_gpu_worker_only(compose):
    services = compose["services"]
    [device] = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in services["cpu-worker"]


def test_compose_has_no_literal_secrets_and_binds_loopback(compose):
    for service in compose["services"].values():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), f"{key} must come from docker/.env"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:")


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfiles_pin_install_constraints_and_run_as_non_root(kind):
    steps = _instructions(DOCKERFILES[kind])
    [base] = [arg for op, arg in steps if op == "FROM"]
    assert ":" in base and "latest" not in base
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert installs and all("-c constraints.txt" in arg for arg in installs)
    # Flows run from the source directory, whose gridistill/ shadows an installed copy; only an
    # editable install maps tasks/, flows/ and deployments/ into it.
    assert all(" -e " in f" {arg} " for arg in installs)
    users = [arg.strip() for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [op for op, _ in steps][-1] == "CMD"
    assert (DOCKERFILES[kind].parent / f"{DOCKERFILES[kind].name}.dockerignore").exists()


def test_images_match_the_pinned_interpreter_and_torch():
    pins = constraints()
    [cpu_base] = [arg for op, arg in _instructions(DOCKERFILES["cpu"]) if op == "FROM"]
    assert cpu_base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}.")
    [cuda_base] = [arg for op, arg in _instructions(DOCKERFILES["cuda"]) if op == "FROM"]
    assert cuda_base.startswith(f"pytorch/pytorch:{pins['torch']}-cuda")


def test_optional_extras_are_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = constraints()
    for extra in ("dask", "ray"):
        for requirement in project["optional-dependencies"][extra]:
            name = re.split(r"[<>=\[ ;]", requirement)[0].lower().replace("_", "-")
            assert name in pins, f"{requirement} ({extra}) is not pinned in constraints.txt"


# -- orchestration helpers -------------------------------------------------------------------
def test_plan_shares_a_run_between_same_pool_segments_only_when_unchunked():
    from gridistill.config import DistillConfig
    from gridistill.flows.dag import build_dag
    from gridistill.flows.pooled import plan_runs

    dag = build_dag(DistillConfig(methods=["ssdim", "random"], enhance=["bilinear"]))
    whole = plan_runs(dag, ["a", "b", "c"], None)
    assert [(p.name, p.chunks) for p in whole] == [
        ("load", [["a", "b", "c"]]), ("embed", [["a", "b", "c"]]),
        ("select-grids", [["a", "b", "c"]]), ("enhance+evaluate", [["a", "b", "c"]])]
    split = plan_runs(dag, ["a", "b", "c"], 2)
    assert [p.name for p in split] == ["load", "embed", "select-grids", "enhance", "evaluate"]
    assert split[3].chunks == [["a", "b"], ["c"]] and split[4].chunks == [["a", "b", "c"]]
    assert {s.pool for p in split for s in p.segments if s.name in ("embed", "enhance",
                                                                    "evaluate")} == {"gpu"}


class _Finished:
    """A finished task's future, as the segment executor reads it."""

    def __init__(self, ref):
        self.ref, self.state = ref, type("State", (), {"name": "Completed"})()

    def result(self):
        return self.ref


@pytest.mark.slow
def test_the_weekly_deployment_hands_each_per_class_task_only_its_class(deployments,
                                                                        monkeypatch):
    """With the weekly deployment's parameters and ImageNet's 1,000 classes, the parent plans
    the segment runs and writes their requests, each goes through JSON as it does to a
    worker, and the segment's own code binds and starts its tasks: every per-class task gets
    a dataset ref holding its own class's row only; teacher and evaluate get every row."""
    from types import SimpleNamespace

    import gridistill.tasks.embed
    import gridistill.tasks.enhance
    import gridistill.tasks.refine
    from gridistill.config import DistillConfig
    from gridistill.flows import dag as dag_module
    from gridistill.flows.dag import DATASET, build_dag
    from gridistill.flows.pooled import (
        PoolOptions,
        SegmentRequest,
        _segment_tasks,
        plan_runs,
        segment_requests,
    )
    from gridistill.stages import ArtifactRef

    weekly = deployments["imagenet1k-weekly"]["parameters"]
    config, pools = DistillConfig(**weekly["config"]), PoolOptions(**weekly["pools"])
    rows = [[f"n{index:08d}", index, f"class {index}"] for index in range(1000)]
    classes = [name for name, _, _ in rows]
    dataset = ArtifactRef(stage="dataset", scope="all", key="k", folder="dataset/k",
                          meta={"classes": rows, "num_classes": len(rows)})
    # Only the wiring is under test: no model is loaded, no task runs.
    monkeypatch.setattr(gridistill.tasks.enhance, "load_enhancer", lambda params: None)
    monkeypatch.setattr(gridistill.tasks.refine, "load_dit_for", lambda params: None)
    monkeypatch.setattr(gridistill.tasks.embed, "choose_embedder", lambda kind, **_:
                        SimpleNamespace(name="clip:ViT-B-32/laion2b_s34b_b79k", weights="hub",
                                        fallback_reason=None))
    started: list[tuple[str, str, list]] = []

    def launch(stage_task, store, params, scopes, upstream, force):
        started.extend(zip([stage_task.name] * len(scopes), scopes, upstream, strict=True))
        return [_Finished(ArtifactRef(stage=stage_task.name, scope=scope, folder="f",
                                      key=f"{stage_task.name}-{scope}")) for scope in scopes]

    monkeypatch.setattr(dag_module, "launch", launch)
    dag = build_dag(config)
    refs: dict = {}
    plan = plan_runs(dag, classes, pools.classes_per_run)
    assert [len(planned.chunks) for planned in plan] == [20, 20, 20, 20, 1]
    for planned in plan:
        for request in segment_requests(planned, dag, dataset, refs, "weekly", "gpu"):
            sent = SegmentRequest.model_validate(request.model_dump(mode="json"))
            for label, per_scope in _segment_tasks.fn(sent, "cuda").refs.items():
                refs.setdefault(label, {}).update(per_scope)

    readers = {node.label.partition(":")[0] for node in dag.nodes if DATASET in node.inputs}
    assert readers == {"load", "test-split", "enhance", "teacher", "evaluate"}
    row_of = {row[0]: row for row in rows}
    seen: dict[str, int] = {}
    for stage, scope, upstream in started:
        given = [ref for ref in upstream if isinstance(ref, ArtifactRef)
                 and ref.stage == "dataset"]
        assert len(given) == (stage in readers), (stage, scope)
        if given:  # a per-class task's scope is its class
            expected = [row_of[scope]] if scope in row_of else rows
            assert given[0].meta["classes"] == expected, (stage, scope)
            seen[stage] = seen.get(stage, 0) + 1
    assert seen == {"load": 1000, "test-split": 1000, "enhance": 1000, "teacher": 1,
                    "evaluate": 2}


def test_gpu_segments_refuse_a_worker_without_cuda_unless_asked_for_cpu(monkeypatch):
    import torch

    from gridistill.flows.pooled import GPUUnavailableError, segment_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert segment_device("cpu", "auto") == "cpu"
    assert segment_device("gpu", "cpu") == "cpu"
    for requested in ("auto", "cuda", "cuda:1"):
        with pytest.raises(GPUUnavailableError, match="device='cpu'"):
            segment_device("gpu", requested)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert segment_device("gpu", "auto") == "cuda"
    assert segment_device("gpu", "cuda:1") == "cuda:1"


def test_credentials_are_refused_as_parameters():
    from pydantic import ValidationError

    from gridistill.config import DistillConfig

    assert DistillConfig(storage_options={"endpoint_url": "http://minio:9000",
                                          "client_kwargs": {"region_name": "eu-west-1"}})
    with pytest.raises(ValidationError, match=r"\['secret', 'aws_session_token'\]"):
        DistillConfig(storage_options={"secret": "s", "client_kwargs": {
            "aws_session_token": "t"}})


def test_redact_masks_credentials_at_any_depth():
    from gridistill.flows.pooled import redact

    masked = redact({"storage_options": {"endpoint_url": "http://x", "key": "AKIA",
                                         "secret": "s", "client_kwargs": {"aws_session_token":
                                                                          "t"}},
                     "items": [{"password": "p"}], "keyword": "kept"})
    assert masked == {"storage_options": {"endpoint_url": "http://x", "key": "***",
                                          "secret": "***", "client_kwargs": {
                                              "aws_session_token": "***"}},
                      "items": [{"password": "***"}], "keyword": "kept"}


# -- task runners ----------------------------------------------------------------------------
def test_task_runner_choices(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    from gridistill.runners import MissingExtraError, build_task_runner

    runner = build_task_runner("thread", max_workers=3)
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3
    with pytest.raises(ValueError, match="no address"):
        build_task_runner("thread", max_workers=1, address="tcp://x:8786")

    from prefect_dask import DaskTaskRunner

    remote = build_task_runner("dask", max_workers=2, address="tcp://scheduler:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://scheduler:8786"
    local = build_task_runner("dask", max_workers=2)
    assert local.cluster_kwargs["n_workers"] == 2

    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if the extra were missing
    with pytest.raises(MissingExtraError, match=r"gridistill\[ray\]"):
        build_task_runner("ray", max_workers=2)


@pytest.mark.slow
def test_dask_local_cluster_runs_the_class_fan_out(prefect_harness):
    from prefect import flow, task

    from gridistill.runners import build_task_runner

    @task
    def square(x: int) -> int:
        return x * x

    @flow
    def fan_out(values: list[int]) -> list[int]:
        return [future.result() for future in square.map(values)]

    runner = build_task_runner("dask", max_workers=1)
    assert fan_out.with_options(task_runner=runner)([1, 2, 3]) == [1, 4, 9]


@pytest.mark.slow
def test_ray_local_instance_runs_the_flow_as_the_thread_runner_does(prefect_harness,
                                                                    tiny_dataset, tmp_path):
    """`--task-runner ray` without an address: the class fan-out runs in the worker processes
    of a local Ray instance and gives the thread runner's outputs (same machine, same inputs,
    one torch thread per task either way: bit for bit)."""
    from reliability.conftest import committed_files
    from test_flow import tiny_config

    from gridistill.cli import run_distill

    metrics = {}
    for runner in ("thread", "ray"):
        config = tiny_config(tiny_dataset, str(tmp_path / runner), task_runner=runner,
                             max_workers=2)
        metrics[runner] = [(row["method"], row["top1_final_mean"])
                           for row in run_distill(config)["metrics"]]
    stages = ("dataset", "load", "embed", "select", "grids", "enhance")
    on_threads, on_ray = (committed_files(tmp_path / r, stages) for r in ("thread", "ray"))
    assert on_ray.keys() == on_threads.keys() and len(on_ray) > 3 * len(stages)
    assert [path for path in on_ray if on_ray[path] != on_threads[path]] == []
    assert metrics["ray"] == metrics["thread"]


# -- refine-existing -------------------------------------------------------------------------
@pytest.mark.slow
def test_refine_existing_moves_a_set_from_s3_to_s3(prefect_harness, s3_bucket, tmp_path,
                                                   monkeypatch):
    import s3fs
    import torch
    from PIL import Image
    from test_refine import tiny_dit_parts  # the same tiny DiT the refine tests use

    from gridistill.flows.pooled import GPUUnavailableError
    from gridistill.flows.refine_existing import RefineRequest, refine_existing

    bucket, options = s3_bucket
    for part, saved in zip(("transformer", "vae", "scheduler"), tiny_dit_parts(), strict=True):
        saved.save_pretrained(tmp_path / "dit" / part)
    for wnid in ("n01440764", "n02102040"):
        (tmp_path / "in" / wnid).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "in" / wnid / "a.png")
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(tmp_path / "in"), f"{bucket}/distilled", recursive=True)
    request = RefineRequest(input=f"{bucket}/distilled", out=f"{bucket}/refined",
                            diver={"dit": str(tmp_path / "dit"), "vae": str(tmp_path / "dit"),
                                   "num_steps": 4, "t_f": 2, "t_h": 3, "t_l": 2},
                            storage_options=options)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GPUUnavailableError):
        refine_existing(request)  # device="auto" on a worker without CUDA
    assert refine_existing(request.model_copy(update={"device": "cpu"})) == f"{bucket}/refined"
    written = sorted(path.split("/refined/", 1)[1] for path in fs.find(f"{bucket}/refined"))
    assert written == ["classes.csv", "n01440764/00000.png", "n02102040/00001.png"]
    with pytest.raises(FileExistsError):
        refine_existing(request.model_copy(update={"device": "cpu"}))


def test_credentials_block_is_loaded_into_the_environment(prefect_harness, monkeypatch):
    from gridistill.config import DistillConfig
    from gridistill.deployments.setup import save_aws_credentials_block
    from gridistill.flows.pooled import use_credentials_block

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env")
    use_credentials_block(DistillConfig())  # no block named: the environment stays as it is
    assert os.environ["AWS_ACCESS_KEY_ID"] == "from-env"
    save_aws_credentials_block("gridistill-test-aws", "block-key-id", "block-secret")
    use_credentials_block(DistillConfig(aws_credentials_block="gridistill-test-aws"))
    assert os.environ["AWS_ACCESS_KEY_ID"] == "block-key-id"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "block-secret"
