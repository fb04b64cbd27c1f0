"""The distillation DAG across work pools: CPU stages on ``cpu`` workers, GPU stages on
``gpu`` workers.

The parent flow (``gridistill-pooled``) only orders calls. It runs the cheap dataset index
itself, then starts one *segment* per pool hop as a run of the ``gridistill-stage`` flow,
through the deployment for that pool (``run_deployment``)::

    parent:  index ─ [load]cpu ─ [embed]gpu ─ [select → grids]cpu ─ [enhance → refine]gpu
                     ─ [teacher → evaluate]gpu ─ report

A segment maps its stage tasks over a chunk of classes (``PoolOptions.classes_per_run``)
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
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

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
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from gridistill.config import CREDENTIAL_NAME, DistillConfig
from gridistill.runners import build_task_runner
from gridistill.stages import ArtifactRef, StoreSpec

SegmentName = Literal["load", "embed", "select-grids", "enhance", "evaluate"]
Pool = Literal["cpu", "gpu"]
# stage label ("load", "grids:ssdim", "evaluate") -> scope (class, or method for evaluate) -> ref
Refs = dict[str, dict[str, ArtifactRef]]


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

    segments: list[SegmentName]
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
    name: SegmentName
    pool: Pool
    per_class: bool  # False: needs every class at once (evaluate), so never chunked


SEGMENTS: tuple[Segment, ...] = (
    Segment("load", "cpu", True),
    Segment("embed", "gpu", True),
    Segment("select-grids", "cpu", True),
    Segment("enhance", "gpu", True),
    Segment("evaluate", "gpu", False),
)
GPU_STAGES = ("embed", "enhance", "refine", "teacher", "evaluate")


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
            f"this worker has no CUDA device, but GPU stages {GPU_STAGES} were asked to run on "
            f"device={requested!r}: start it on a CUDA worker of the gpu pool, or rerun with "
            "device='cpu' to run them on the CPU on purpose")
    return "cuda" if requested == "auto" else requested


def _with_storage(stage_task: Any, config: DistillConfig) -> Any:
    """The stage task, caching into the configured result storage (shared by all workers)."""
    if config.result_storage:
        return stage_task.with_options(result_storage=config.result_storage)
    return stage_task


@dataclass
class _SegmentRun:
    request: SegmentRequest
    device: str
    store: StoreSpec
    futures: dict[str, dict[str, PrefectFuture]]
    notes: list[str]
    embedder: str | None = None

    @property
    def config(self) -> DistillConfig:
        return self.request.config

    def ref(self, label: str, name: str) -> ArtifactRef | PrefectFuture:
        """A class's output of an earlier stage: from this run when it made it, else sent."""
        if label in self.futures:
            return self.futures[label][name]
        return self.request.upstream[label][name]

    def upstream(self, label: str, *also: ArtifactRef) -> list[list[Any]]:
        return [[self.ref(label, name), *also] for name in self.request.classes]

    def fan_out(self, label: str, stage_task: Any, params: BaseModel,
                upstream: list[list[Any]], stage: str) -> None:
        """Map ``stage_task`` over the segment's classes; force flags from the config."""
        classes = self.request.classes
        futures = _with_storage(stage_task, self.config).map(
            unmapped(self.store), classes, unmapped(params), upstream,
            self.config.forced(stage, classes))
        self.futures[label] = dict(zip(classes, futures, strict=True))


# Each segment body imports only its own stage modules: a segment run is a fresh process on
# a worker, and importing every stage (diffusers, timm, open_clip) would add ~15 s to each.
def _load(run: _SegmentRun) -> None:
    from tasks.ingest import LoadParams, load_class

    classes = run.request.classes
    run.fan_out("load", load_class, LoadParams(), [[run.request.dataset]] * len(classes), "load")


def _embed(run: _SegmentRun) -> None:
    from tasks.embed import EmbedParams, choose_embedder, embed_class

    config = run.config
    # Resolved here, on the GPU worker, because that is where the CLIP weights are.
    choice = choose_embedder(config.embedder, clip_model=config.clip_model,
                             clip_pretrained=config.clip_pretrained, device=run.device,
                             classifier_checkpoint=config.classifier_checkpoint)
    if choice.fallback_reason:
        run.notes.append(f"EMBEDDER FALLBACK: {choice.fallback_reason}")
    run.embedder = f"{choice.name} (weights: {choice.weights})"
    run.fan_out("embed", embed_class, EmbedParams(
        embedder=choice.name.split(":")[0], clip_model=config.clip_model,
        clip_pretrained=config.clip_pretrained, device=run.device, progress=config.progress,
        classifier_checkpoint=config.classifier_checkpoint,
    ), run.upstream("load"), "embed")


def _select_grids(run: _SegmentRun) -> None:
    from tasks.grids import GridParams, assemble_class_grids
    from tasks.select import SelectParams, cells_per_side, select_class

    config = run.config
    for method in config.methods:
        side = cells_per_side(method, config.grid_size)
        run.fan_out(f"select:{method}", select_class, SelectParams(
            method=method, ipc=config.ipc, grid_size=side,
            grid_selection=config.grid_selection, seed=config.seed,
        ), run.upstream("embed"), "select")
        selected = run.futures[f"select:{method}"]
        run.fan_out(f"grids:{method}", assemble_class_grids, GridParams(
            grid_size=side, resolution=config.grid_resolution,
        ), [[selected[name]] for name in run.request.classes], "grids")


def enhance_suffixes(config: DistillConfig) -> dict[str, str]:
    """Backend -> the suffix of its stage labels: none for one backend, ``[backend]`` for an
    ablation over several (the labels flows/distill.py uses)."""
    return {backend: "" if len(config.enhance) == 1 else f"[{backend}]"
            for backend in config.enhance}


def _enhance(run: _SegmentRun) -> None:
    from tasks.enhance import EnhanceParams, enhance_class, load_enhancer

    config = run.config
    enhancers = {backend: EnhanceParams(backend=backend, scale=config.enhance_scale,
                                        seed=config.seed, device=run.device,
                                        progress=config.progress)
                 for backend in config.enhance}
    # Missing weights stop the segment before any class is touched.
    for enhance in enhancers.values():
        load_enhancer(enhance)
    if config.refine:
        from tasks.refine import RefineParams, load_dit_for, refine_class

        refine = RefineParams(diver=config.diver, seed=config.seed, device=run.device,
                              progress=config.progress)
        load_dit_for(refine)
    for method in config.methods:
        for backend, suffix in enhance_suffixes(config).items():
            run.fan_out(f"enhance{suffix}:{method}", enhance_class, enhancers[backend],
                        run.upstream(f"grids:{method}", run.request.dataset), "enhance")
            if config.refine:
                enhanced = run.futures[f"enhance{suffix}:{method}"]
                run.fan_out(f"refine{suffix}:{method}", refine_class, refine,
                            [[enhanced[name]] for name in run.request.classes], "refine")


def trained_on(config: DistillConfig) -> dict[str, str]:
    """Evaluated set name -> the stage label whose grids it trains on (distill.py's order)."""
    names = {}
    for method in config.methods:
        for backend, suffix in enhance_suffixes(config).items():
            name = f"{method}+{backend}" if suffix else method
            names[name] = f"enhance{suffix}:{method}"
            if config.refine:
                names[f"{name}+diver"] = f"refine{suffix}:{method}"
    return names


def _evaluate(run: _SegmentRun) -> None:
    from tasks.evaluate import EvalParams, evaluate_grids, teacher_params, train_teacher_on_pool
    from tasks.select import cells_per_side

    config, request = run.config, run.request
    dataset = request.dataset
    teaching = teacher_params(config, run.device)
    # Soft-label protocols need a teacher (packaged, or trained on the pool); a GPU stage.
    teacher = [_with_storage(train_teacher_on_pool, config).submit(
        run.store, "all", teaching, [dataset], any(config.forced("teacher", request.classes)),
    )] if teaching is not None else []
    if teacher:
        run.futures["teacher"] = {"all": teacher[0]}
    force = any(config.forced("evaluate", request.classes))
    evaluations = {}
    for name, label in trained_on(config).items():
        side = cells_per_side(label.partition(":")[2], config.grid_size)
        evaluations[name] = _with_storage(evaluate_grids, config).submit(
            run.store, name, EvalParams(
                student=config.eval_student, protocol=config.eval_protocol,
                grid_size=side if side > 1 else None, image_size=config.eval_image_size,
                epochs=config.eval_epochs, ipc=config.ipc, seeds=config.eval_seeds,
                seed=config.seed, num_classes=dataset.meta["num_classes"], device=run.device,
                progress=config.progress,
            ), [dataset, *teacher, *(run.ref(label, name) for name in request.classes)],
            force)
    run.futures["evaluate"] = evaluations


SEGMENT_BODIES: dict[SegmentName, Callable[[_SegmentRun], None]] = {
    "load": _load, "embed": _embed, "select-grids": _select_grids, "enhance": _enhance,
    "evaluate": _evaluate,
}


@flow(name="gridistill-segment-tasks")
def _segment_tasks(request: SegmentRequest, device: str) -> SegmentOutput:
    """The segment's task fan-out; a subflow so that it runs under the configured runner."""
    config = request.config
    run = _SegmentRun(request, device, StoreSpec(root=config.out,
                                                 storage_options=config.storage_options), {}, [])
    for segment in request.segments:
        SEGMENT_BODIES[segment](run)
    output = SegmentOutput(notes=run.notes, embedder=run.embedder)
    for label, per_scope in run.futures.items():
        output.refs[label] = {}
        for scope, future in per_scope.items():
            ref = future.result()
            cached = future.state.name == "Cached"
            output.refs[label][scope] = ref
            output.timings.append({"stage": label, "scope": scope, "status": future.state.name,
                                   "seconds": 0.0 if cached else round(ref.seconds, 3)})
    return output


@flow(name="gridistill-stage")
def run_segment(request: SegmentRequest) -> str:
    """Run one segment of the DAG on this worker; returns the URL of its outbox."""
    log = get_run_logger()
    segment = next(s for s in SEGMENTS if s.name == request.segments[0])
    config = request.config
    use_credentials_block(config)
    device = segment_device(segment.pool, config.device)
    runner = build_task_runner(config.task_runner, max_workers=config.worker_count(),
                               address=config.task_runner_address)
    log.info("segments %s (%s pool) on %s: %d classes, run root %s", request.segments,
             segment.pool, device, len(request.classes), config.out)
    gpu_slot = (concurrency(request.gpu_concurrency_limit, occupy=1, strict=True)
                if segment.pool == "gpu" else contextlib.nullcontext())
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


def plan_runs(classes: list[str], classes_per_run: int | None) -> list[PlannedRun]:
    """The segment runs, in order. Per-class segments split the classes into chunks;
    consecutive segments of one pool that each fit in one run share it (a process start and
    the stage imports are paid once)."""
    chunks = chunked(classes, classes_per_run)
    planned: list[PlannedRun] = []
    for segment in SEGMENTS:
        segment_chunks = chunks if segment.per_class else [classes]
        previous = planned[-1] if planned else None
        if (previous and previous.segments[-1].pool == segment.pool
                and len(previous.chunks) == len(segment_chunks) == 1):
            planned[-1] = PlannedRun((*previous.segments, segment), previous.chunks)
        else:
            planned.append(PlannedRun((segment,), segment_chunks))
    return planned


def _needed(refs: Refs, segments: tuple[Segment, ...], config: DistillConfig,
            classes: list[str]) -> Refs:
    """The upstream refs a run reads, for its classes only (keeps parameters small). Labels
    not made yet are made inside the run itself."""
    reads = {"load": [], "embed": ["load"], "select-grids": ["embed"],
             "enhance": [f"grids:{m}" for m in config.methods],
             "evaluate": list(trained_on(config).values())}
    labels = [label for segment in segments for label in reads[segment.name] if label in refs]
    return {label: {name: refs[label][name] for name in classes} for label in labels}


# The parent only waits on segment runs, so threads are cheap; the cap bounds open API polls.
@flow(name="gridistill-pooled", task_runner=ThreadPoolTaskRunner(max_workers=32))
def distill_pooled(config: DistillConfig, pools: PoolOptions | None = None) -> dict[str, Any]:
    """Distil ``config.data`` with CPU stages on the cpu pool and GPU stages on the gpu pool."""
    # The parent imports only what it runs itself (a worker process per run pays for it).
    from tasks.ingest import IndexParams, index_dataset
    from tasks.report import skip_notes, write_report

    pools = pools or PoolOptions()
    log = get_run_logger()
    log.info("config: %s", redact(config.model_dump(mode="json")))
    use_credentials_block(config)
    store = StoreSpec(root=config.out, storage_options=config.storage_options)
    dataset = index_dataset(store, IndexParams(
        data=config.data, test_data=config.test_data, class_list=config.class_list,
        holdout_share=config.holdout_share, seed=config.seed))
    classes = [name for name, _, _ in dataset.meta["classes"]]
    if config.refine:
        from tasks.refine import imagenet_index

        for name in classes:
            imagenet_index(name)  # every class needs a DiT label before any GPU work
    from tasks.evaluate import check_imagenet_classes, teacher_params, teacher_summary

    teaching = teacher_params(config, "cpu")
    if teaching is not None and teaching.test_image_size is not None:
        check_imagenet_classes(teaching.architecture, classes)  # before any segment starts
    run_id = str(flow_run.get_id() or "local")
    plan = plan_runs(classes, pools.classes_per_run)
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
        names = [f"{planned.name}[{index}]" for index in range(len(planned.chunks))]
        requests = [SegmentRequest(
            segments=[segment.name for segment in planned.segments], config=config,
            dataset=dataset, classes=chunk, upstream=_needed(refs, planned.segments, config, chunk),
            outbox=f"orchestration/{run_id}/{planned.name}-{index:04d}.json",
            gpu_concurrency_limit=pools.gpu_concurrency_limit,
        ) for index, chunk in enumerate(planned.chunks)]
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
    run_store = store.open()
    notes += skip_notes([ref for stage in ("load", "embed")
                         for ref in refs.get(stage, {}).values()])
    evaluations = [refs["evaluate"][name] for name in trained_on(config)]
    report_url = write_report(
        store=store, dataset=dataset, evaluations=evaluations,
        artifacts=per_method_artifacts(refs, config.methods, classes), timings=timings,
        notes=notes, summary=config.report_summary(embedder, with_teacher="teacher" in refs) | {
            "classes": len(classes), "pools": f"{pools.cpu_deployment}, {pools.gpu_deployment}"}
        | ({"teacher": teacher_summary(refs["teacher"]["all"].meta)} if "teacher" in refs else {}))
    _publish_links(run_store.url(""), refs)
    log.info("report: %s", report_url)
    return {"report": report_url,
            "metrics": [refs["evaluate"][name].meta["metrics"] | {"method": name}
                        for name in trained_on(config)]}


def per_method_artifacts(refs: Refs, methods: list[str],
                         classes: list[str]) -> dict[str, dict[str, list[ArtifactRef]]]:
    """{method: {stage: per-class refs}} of the grids and derived stages, for the report."""
    artifacts: dict[str, dict[str, list[ArtifactRef]]] = {method: {} for method in methods}
    for label, per_class in refs.items():
        stage, _, method = label.partition(":")
        if method in artifacts and stage != "select":
            artifacts[method][stage] = [per_class[name] for name in classes]
    return artifacts


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
