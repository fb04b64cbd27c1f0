"""The distillation DAG (:mod:`gridistill.flows.dag`) across work pools: CPU stages on ``cpu``
workers, GPU stages on ``gpu`` workers.

The parent flow (``gridistill-pooled``) only orders calls. It runs the cheap dataset index
itself, then starts one *segment* per pool hop (the consecutive DAG nodes that
:func:`gridistill.flows.dag.build_dag` gives one hop name, see :func:`segments`) as a run of the
``gridistill-stage`` flow, through the deployment for that pool (``run_deployment``)::

    parent:  index ─ [load, test split]cpu ─ [embed]gpu ─ [select → grids]cpu
                     ─ [enhance → refine]gpu ─ [teacher → evaluate]gpu ─ report

A segment maps its nodes' tasks over a chunk of classes (``PoolOptions.classes_per_run``)
under the configured task runner; consecutive segments of one pool that need no chunking
share one run (:func:`plan_runs`). A run then writes what it produced (artifact refs, task states,
timings) to an *outbox* JSON in the run root. Every stage output is a content-keyed folder
in the run root (object storage), so a segment that died is simply started again, on any
worker, and continues from the committed folders; the parent reads the outbox, never a
worker's disk.

GPU segments refuse to start on a worker without CUDA unless the run says ``device="cpu"``,
and hold one slot of the global concurrency limit ``gpu`` while they run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from prefect import flow, task, unmapped
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from gridistill.config import CREDENTIAL_NAME, DistillConfig
from gridistill.flows.dag import (
    Dag,
    Node,
    Pool,
    Refs,
    Setup,
    build_dag,
    collect,
    index_and_check,
    report_run,
    submit,
)
from gridistill.runners import build_task_runner
from gridistill.stages import ArtifactRef, StoreSpec
from gridistill.tasks.index import class_names


class GPUUnavailableError(RuntimeError):
    """A GPU stage was sent to a worker without CUDA, and the run did not ask for the CPU."""


class PoolOptions(BaseModel):
    """How the parent spreads the stages over work pools."""

    cpu_deployment: str = Field("gridistill-stage/stage-cpu", description=(
        "Deployment (flow/deployment) that runs CPU segments on the cpu pool."))
    gpu_deployment: str = Field("gridistill-stage/stage-gpu", description=(
        "Deployment that runs GPU segments on the gpu pool."))
    classes_per_run: int | None = Field(None, ge=1, description=(
        "Classes per segment run: smaller spreads one stage over more workers. "
        "Default: all classes in one run per segment."))
    gpu_concurrency_limit: str = Field("gpu", description=(
        "Global concurrency limit a GPU segment holds one slot of (size it to the GPUs)."))
    poll_seconds: float = Field(2.0, gt=0, description="How often the parent polls a segment.")


class SegmentRequest(BaseModel):
    """Everything one segment run needs; sent as the stage flow's only parameter.

    ``segments`` are consecutive segments of one pool, run back to back in this one process
    (see :func:`plan_runs`)."""

    segments: list[str]
    config: DistillConfig
    dataset: ArtifactRef
    classes: list[str]
    upstream: Refs = Field(default_factory=dict)
    outbox: str  # key under the run root for this segment's SegmentOutput
    gpu_concurrency_limit: str = "gpu"


class SegmentOutput(BaseModel):
    refs: Refs = Field(default_factory=dict)
    timings: list[dict[str, Any]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    embedder: str | None = None


@dataclass(frozen=True)
class Segment:
    """A pool hop: consecutive DAG nodes of one hop name, on one pool, all per class or all
    once per run."""

    name: str
    pool: Pool
    per_class: bool  # False: needs every class at once (evaluate), so never chunked
    nodes: tuple[Node, ...]


def segments(dag: Dag) -> list[Segment]:
    """The DAG's pool hops, in order."""
    found = []
    for hop, group in itertools.groupby(dag.nodes, key=lambda node: node.hop):
        nodes = tuple(group)
        kinds = {(node.pool, node.per_class) for node in nodes}
        if len(kinds) != 1:
            raise ValueError(f"hop {hop!r} mixes pools or per-class and once-per-run nodes: "
                             f"{sorted(kinds)}")
        [(pool, per_class)] = kinds
        found.append(Segment(hop, pool, per_class, nodes))
    return found


# -- secrets never reach a log ---------------------------------------------------------------
def redact(value: Any) -> Any:
    """``value`` with every mapping entry whose name looks like a credential masked."""
    if isinstance(value, dict):
        return {k: "***" if CREDENTIAL_NAME.search(str(k)) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def use_credentials_block(config: DistillConfig) -> None:
    """Export the run's AWS credentials block into this process's environment, where s3fs
    (and pyarrow) find them; they never become a parameter or a log line."""
    if not config.aws_credentials_block:
        return
    values = Secret.load(config.aws_credentials_block).get()
    for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        if values.get(name):
            os.environ[name.upper()] = values[name]


# -- the segment (child) flow ----------------------------------------------------------------
def segment_device(pool: Pool, requested: str) -> str:
    """The torch device a segment runs on; a GPU segment without CUDA only runs if asked to."""
    if pool == "cpu" or requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise GPUUnavailableError(
            f"this worker has no CUDA device, but its GPU stages were asked to run on "
            f"device={requested!r}: start it on a CUDA worker of the gpu pool, or rerun with "
            "device='cpu' to run them on the CPU on purpose")
    return "cuda" if requested == "auto" else requested


def _requested(request: SegmentRequest) -> tuple[Dag, list[Segment]]:
    dag = build_dag(request.config)
    return dag, [segment for segment in segments(dag) if segment.name in request.segments]


# No flow or task persists its result, as Prefect would pickle it (see gridistill/stages.py):
# a parent reads a segment's refs from its outbox in the run root instead.
@flow(name="gridistill-segment-tasks", persist_result=False)
def _segment_tasks(request: SegmentRequest, device: str) -> SegmentOutput:
    """The segment's task fan-out; a subflow so that it runs under the configured runner."""
    config = request.config
    dag, requested = _requested(request)
    setup = Setup(config, device)
    futures = submit(dag, [node for segment in requested for node in segment.nodes], setup,
                     StoreSpec(root=config.out, storage_options=config.storage_options),
                     request.dataset, request.classes, request.upstream)
    refs, timings = collect(futures)
    return SegmentOutput(refs=refs, timings=timings, notes=setup.notes(),
                         embedder=setup.embedder_summary())


@flow(name="gridistill-stage", persist_result=False)
def run_segment(request: SegmentRequest) -> str:
    """Run one segment of the DAG on this worker; returns the URL of its outbox."""
    log = get_run_logger()
    config = request.config
    pool = _requested(request)[1][0].pool
    use_credentials_block(config)
    device = segment_device(pool, config.device)
    runner = build_task_runner(config.task_runner, max_workers=config.worker_count(),
                               address=config.task_runner_address)
    log.info("segments %s (%s pool) on %s: %d classes, run root %s", request.segments,
             pool, device, len(request.classes), config.out)
    gpu_slot = (concurrency(request.gpu_concurrency_limit, occupy=1, strict=True)
                if pool == "gpu" else contextlib.nullcontext())
    with gpu_slot:
        output = _segment_tasks.with_options(task_runner=runner)(request, device)
    run_store = StoreSpec(root=config.out, storage_options=config.storage_options).open()
    run_store.write_json(request.outbox, output.model_dump(mode="json"))
    return run_store.url(request.outbox)


# -- the parent flow -------------------------------------------------------------------------
@task(name="segment", task_run_name="{name}", cache_policy=NO_CACHE,
      persist_result=False, retries=1, retry_delay_seconds=5)
def start_segment(request: SegmentRequest, name: str, deployment: str,
                  poll_seconds: float) -> SegmentOutput:
    """Run a segment through its pool's deployment and read its outbox from the run root.

    A retry starts a fresh run (possibly on another worker) that reuses every class the
    failed one committed.
    """
    child = run_deployment(deployment, parameters={"request": request.model_dump(mode="json")},
                           flow_run_name=name, poll_interval=poll_seconds)
    if child.state is None or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise RuntimeError(f"segment run {name} ({child.name}, "
                           f"({child.id}) ended {state}; see its logs")
    config = request.config
    run_store = StoreSpec(root=config.out, storage_options=config.storage_options).open()
    return SegmentOutput.model_validate(run_store.read_json(request.outbox))


def chunked(classes: list[str], size: int | None) -> list[list[str]]:
    size = size or len(classes)
    return [classes[start:start + size] for start in range(0, len(classes), size)]


@dataclass(frozen=True)
class PlannedRun:
    segments: tuple[Segment, ...]
    chunks: list[list[str]]  # one segment run per chunk of classes, in parallel

    @property
    def name(self) -> str:
        return "+".join(segment.name for segment in self.segments)


def plan_runs(dag: Dag, classes: list[str], classes_per_run: int | None) -> list[PlannedRun]:
    """The segment runs, in order. Per-class segments split the classes into chunks;
    consecutive segments of one pool that each fit in one run share it (a process start and
    the stage imports are paid once)."""
    chunks = chunked(classes, classes_per_run)
    planned: list[PlannedRun] = []
    for segment in segments(dag):
        segment_chunks = chunks if segment.per_class else [classes]
        previous = planned[-1] if planned else None
        if (previous and previous.segments[-1].pool == segment.pool
                and len(previous.chunks) == len(segment_chunks) == 1):
            planned[-1] = PlannedRun((*previous.segments, segment), previous.chunks)
        else:
            planned.append(PlannedRun((segment,), segment_chunks))
    return planned


def segment_requests(planned: PlannedRun, dag: Dag, dataset: ArtifactRef, refs: Refs,
                     run_id: str, gpu_concurrency_limit: str) -> list[SegmentRequest]:
    """One request per chunk of ``planned``, each carrying only the upstream refs its nodes
    read, for its own classes (keeps parameters small). Labels the run makes itself are not
    sent."""
    made = {node.label for segment in planned.segments for node in segment.nodes}
    labels = dict.fromkeys(label for segment in planned.segments for node in segment.nodes
                           for label in node.inputs if label in refs and label not in made)
    return [SegmentRequest(
        segments=[segment.name for segment in planned.segments], config=dag.config,
        dataset=dataset, classes=chunk, upstream={
            label: {name: refs[label][name] for name in chunk} if dag.per_class(label)
            else refs[label] for label in labels},
        outbox=f"orchestration/{run_id}/{planned.name}-{index:04d}.json",
        gpu_concurrency_limit=gpu_concurrency_limit,
    ) for index, chunk in enumerate(planned.chunks)]


# The parent only waits on segment runs, so threads are cheap; the cap bounds open API polls.
@flow(name="gridistill-pooled", task_runner=ThreadPoolTaskRunner(max_workers=32),
      persist_result=False)
def distill_pooled(config: DistillConfig, pools: PoolOptions | None = None) -> dict[str, Any]:
    """Distil ``config.data`` with CPU stages on the cpu pool and GPU stages on the gpu pool."""
    pools = pools or PoolOptions()
    log = get_run_logger()
    log.info("config: %s", redact(config.model_dump(mode="json")))
    use_credentials_block(config)
    store = StoreSpec(root=config.out, storage_options=config.storage_options)
    dataset = index_and_check(config, store)
    classes = class_names(dataset)
    dag = build_dag(config)
    run_id = str(flow_run.get_id() or "local")
    plan = plan_runs(dag, classes, pools.classes_per_run)
    total_runs = sum(len(planned.chunks) for planned in plan)
    progress = create_progress_artifact(
        0.0, key="gridistill-progress",
        description=f"Segment runs done of {total_runs} ({len(classes)} classes: "
                    + " → ".join(f"{p.name} ×{len(p.chunks)}" for p in plan) + ")")
    refs: Refs = {}
    timings: list[dict[str, Any]] = []
    notes: list[str] = []
    embedder = config.embedder
    done = 0
    for planned in plan:
        requests = segment_requests(planned, dag, dataset, refs, run_id,
                                    pools.gpu_concurrency_limit)
        names = [f"{planned.name}[{index}]" for index in range(len(requests))]
        pool = planned.segments[0].pool
        deployment = pools.gpu_deployment if pool == "gpu" else pools.cpu_deployment
        futures = start_segment.map(requests, names, unmapped(deployment),
                                    unmapped(pools.poll_seconds))
        for future in futures:
            output: SegmentOutput = future.result()
            for label, per_scope in output.refs.items():
                refs.setdefault(label, {}).update(per_scope)
            timings += output.timings
            notes += [note for note in output.notes if note not in notes]
            embedder = output.embedder or embedder
            done += 1
            update_progress_artifact(progress, 100.0 * done / total_runs)
    result = report_run(store, config, dataset, refs, timings, notes, embedder, {
        "classes": len(classes), "pools": f"{pools.cpu_deployment}, {pools.gpu_deployment}"})
    _publish_links(store.open().url(""), refs)
    log.info("report: %s", result["report"])
    return result


def _stage_folders(root_url: str, refs: Refs) -> Iterator[tuple[str, str, str]]:
    for label, per_scope in refs.items():
        for scope, ref in per_scope.items():
            yield label, scope, f"{root_url}/{ref.folder}"


def _publish_links(root_url: str, refs: Refs) -> None:
    """Artifacts pointing at the run root: the report, and every stage folder."""
    create_link_artifact(key="gridistill-report-link",
                         link=f"{root_url}/report.md", link_text="report.md",
                         description=f"Run root: {root_url}")
    rows = [f"| {label} | {scope} | `{url}` |" for label, scope, url in
            _stage_folders(root_url, refs)]
    create_markdown_artifact(
        key="gridistill-run-root",
        markdown="\n".join(["| stage | scope | folder |", "|---|---|---|", *rows]),
        description=f"Stage artifacts under {root_url}")
