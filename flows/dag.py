"""The distillation DAG, written once, and what its two executors share.

    index ─┬─ per class: load → embed ─┬─ per method: select → grids → enhance ─┬─ evaluate
           │              │             │                              [refine] ─┴─ evaluate
           │              └─ [teacher, soft-label protocols] ──────────────────────────┤
           ├─ per class: test split, decoded at the students' resolution ──────────────┘
           └──────────────────────────────────────────────────────────────────────── report

:func:`build_dag` turns a config into a list of :class:`Node`: a stage with named inputs, the
work pool it runs on, and whether it runs once per class or once for the run. Two executors
run the list: ``flows/distill.py`` in one process, and ``flows/pooled.py`` hop by hop over the
work pools. Both hand nodes to :func:`submit`, which binds each node's task and parameters in
the process that runs it and gives every task its inputs, so a new stage is one entry in
:func:`build_dag`. Each task returns an ``ArtifactRef`` (a pointer into the run root), never
the data itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from prefect import unmapped
from prefect.futures import PrefectFuture
from pydantic import BaseModel

from gridistill.config import DistillConfig, Stage
from gridistill.stages import ArtifactRef, StoreSpec
from gridistill.tasks.index import class_names

if TYPE_CHECKING:
    from gridistill.tasks.embed import EmbedderChoice
    from gridistill.tasks.enhance import EnhanceParams
    from gridistill.tasks.refine import RefineParams
    from gridistill.tasks.teacher import TeacherParams

Pool = Literal["cpu", "gpu"]
# The input name of the dataset ref: a per-class node gets a copy holding only its class's row.
DATASET = "dataset"
# stage label ("load", "grids:ssdim", "evaluate") -> scope (class, or the run's scope) -> ref
Refs = dict[str, dict[str, ArtifactRef]]


class Setup:
    """What one process resolves before it starts any task: the device, and the models whose
    missing weights must stop the run before a class is touched. Each is resolved on first use,
    so a process that runs only CPU stages never loads one."""

    def __init__(self, config: DistillConfig, device: str) -> None:
        self.config, self.device = config, device
        self._embedder: EmbedderChoice | None = None
        self._enhancers: dict[str, EnhanceParams] = {}
        self._refine: RefineParams | None = None

    def embedder(self) -> EmbedderChoice:
        # Resolved where embed runs, because that is where the CLIP weights are.
        if self._embedder is None:
            from gridistill.tasks.embed import choose_embedder

            config = self.config
            self._embedder = choose_embedder(
                config.embedder, clip_model=config.clip_model,
                clip_pretrained=config.clip_pretrained, device=self.device,
                classifier_checkpoint=config.classifier_checkpoint)
        return self._embedder

    def enhancer(self, backend: str) -> EnhanceParams:
        if backend not in self._enhancers:
            from gridistill.tasks.enhance import EnhanceParams, load_enhancer

            config = self.config
            params = EnhanceParams(backend=backend, scale=config.enhance_scale, seed=config.seed,
                                   device=self.device, progress=config.progress)
            load_enhancer(params)
            self._enhancers[backend] = params
        return self._enhancers[backend]

    def refine(self) -> RefineParams:
        if self._refine is None:
            from gridistill.tasks.refine import RefineParams, load_dit_for

            config = self.config
            params = RefineParams(diver=config.diver, seed=config.seed, device=self.device,
                                  progress=config.progress)
            load_dit_for(params)
            self._refine = params
        return self._refine

    def load_models(self) -> None:
        """Resolve every model the config names, e.g. before any data is read."""
        self.embedder()
        for backend in self.config.enhance:
            self.enhancer(backend)
        if self.config.refine:
            self.refine()

    def notes(self) -> list[str]:
        """Report notes about what was resolved here."""
        if self._embedder is not None and self._embedder.fallback_reason:
            return [f"EMBEDDER FALLBACK: {self._embedder.fallback_reason}"]
        return []

    def embedder_summary(self) -> str | None:
        """The report's embedder line, when this process chose the embedder."""
        if self._embedder is None:
            return None
        return f"{self._embedder.name} (weights: {self._embedder.weights})"


# A node's stage task and its parameters, bound in the process that runs it (see Setup).
Bind = Callable[[Setup, ArtifactRef], tuple[Any, BaseModel]]


@dataclass(frozen=True)
class Node:
    """One task of the DAG, run with ``inputs`` (labels of earlier nodes, or :data:`DATASET`)
    on ``pool``, in the pool hop named ``hop`` (one segment run on the work pools); ``stage``
    is the config stage whose force flags it follows. Without a ``scope`` it runs once per
    class and reads each input's ref of that class; with one it runs once and reads every
    class's ref of each per-class input."""

    label: str
    stage: Stage
    pool: Pool
    hop: str
    inputs: tuple[str, ...]
    bind: Bind = field(compare=False)
    scope: str | None = None

    @property
    def per_class(self) -> bool:
        return self.scope is None


@dataclass(frozen=True)
class Dag:
    config: DistillConfig
    nodes: tuple[Node, ...]

    def per_class(self, label: str) -> bool:
        return any(node.per_class for node in self.nodes if node.label == label)


def enhance_suffixes(config: DistillConfig) -> dict[str, str]:
    """Backend -> the suffix of its stage labels: none for one backend, ``[backend]`` for an
    ablation over several."""
    return {backend: "" if len(config.enhance) == 1 else f"[{backend}]"
            for backend in config.enhance}


def evaluated_sets(config: DistillConfig) -> dict[str, tuple[str, str]]:
    """Evaluated set name -> (the stage label whose grids it trains on, its method)."""
    sets = {}
    for method in config.methods:
        for backend, suffix in enhance_suffixes(config).items():
            name = f"{method}+{backend}" if suffix else method
            sets[name] = (f"enhance{suffix}:{method}", method)
            if config.refine:
                sets[f"{name}+diver"] = (f"refine{suffix}:{method}", method)
    return sets


def uses_teacher(config: DistillConfig) -> bool:
    from gridistill.tasks.protocols import get_protocol

    return get_protocol(config.eval_protocol).labels == "teacher"


# Binders import their stage module when called: a segment run on a worker is a fresh process,
# and importing every stage (diffusers, timm, open_clip) would add ~15 s to each.
def _load(setup: Setup, dataset: ArtifactRef) -> tuple[Any, BaseModel]:
    from gridistill.tasks.load import LoadParams, load_class

    return load_class, LoadParams()


def _embed(setup: Setup, dataset: ArtifactRef) -> tuple[Any, BaseModel]:
    from gridistill.tasks.embed import EmbedParams, embed_class

    config = setup.config
    return embed_class, EmbedParams(
        embedder=setup.embedder().name.split(":")[0], clip_model=config.clip_model,
        clip_pretrained=config.clip_pretrained, device=setup.device, progress=config.progress,
        classifier_checkpoint=config.classifier_checkpoint)


def _select(setup: Setup, dataset: ArtifactRef, method: str) -> tuple[Any, BaseModel]:
    from gridistill.tasks.select import (
        WHOLE_CLASS_METHODS,
        SelectParams,
        cells_per_side,
        select_class,
    )

    config = setup.config
    return select_class, SelectParams(
        method=method, ipc=config.ipc, grid_size=cells_per_side(method, config.grid_size),
        grid_selection=config.grid_selection, seed=config.seed,
        typical_share=1.0 if method in WHOLE_CLASS_METHODS else config.typical_share,
        # Only SSDIM reads them: new weights re-select SSDIM's grids and no other method's.
        weights=config.ssdim if method == "ssdim" else None)


def _grids(setup: Setup, dataset: ArtifactRef, method: str) -> tuple[Any, BaseModel]:
    from gridistill.tasks.grids import GridParams, assemble_class_grids
    from gridistill.tasks.select import cells_per_side

    config = setup.config
    return assemble_class_grids, GridParams(grid_size=cells_per_side(method, config.grid_size),
                                            resolution=config.grid_resolution)


def _enhance(setup: Setup, dataset: ArtifactRef, backend: str) -> tuple[Any, BaseModel]:
    from gridistill.tasks.enhance import enhance_class

    return enhance_class, setup.enhancer(backend)


def _refine(setup: Setup, dataset: ArtifactRef) -> tuple[Any, BaseModel]:
    from gridistill.tasks.refine import refine_class

    return refine_class, setup.refine()


def _test_split(setup: Setup, dataset: ArtifactRef) -> tuple[Any, BaseModel]:
    from gridistill.tasks.test_split import TestSplitParams, decode_test_split, student_test_size

    config = setup.config
    return decode_test_split, TestSplitParams(
        size=student_test_size(config.eval_protocol, config.eval_image_size),
        device=setup.device)


def teacher_params(config: DistillConfig, device: str) -> TeacherParams | None:
    """The teacher stage's parameters for a run (None: its protocol uses hard labels)."""
    from gridistill.models import IMAGENET_CLASSIFIERS
    from gridistill.tasks.protocols import get_protocol
    from gridistill.tasks.teacher import TeacherParams

    protocol = get_protocol(config.eval_protocol)
    if protocol.labels != "teacher":
        return None
    image_size = config.eval_image_size or protocol.image_size
    imagenet = config.teacher in IMAGENET_CLASSIFIERS
    return TeacherParams(
        architecture=config.teacher,
        checkpoint=config.classifier_checkpoint if imagenet else config.teacher_checkpoint,
        image_size=image_size,
        test_image_size=(protocol.teacher_image_size or image_size) if imagenet else None,
        seed=config.seed, device=device, progress=config.progress)


def _teacher(setup: Setup, dataset: ArtifactRef) -> tuple[Any, BaseModel]:
    from gridistill.tasks.teacher import build_teacher

    return build_teacher, teacher_params(setup.config, setup.device)


def _evaluate(setup: Setup, dataset: ArtifactRef, method: str) -> tuple[Any, BaseModel]:
    from gridistill.tasks.evaluate import EvalParams, evaluate_grids
    from gridistill.tasks.select import cells_per_side

    config = setup.config
    side = cells_per_side(method, config.grid_size)
    return evaluate_grids, EvalParams(
        student=config.eval_student, protocol=config.eval_protocol,
        grid_size=side if side > 1 else None,  # one photo per image: no grid-aware crops
        image_size=config.eval_image_size, epochs=config.eval_epochs, ipc=config.ipc,
        seeds=config.eval_seeds, seed=config.seed, num_classes=dataset.meta["num_classes"],
        device=setup.device, progress=config.progress)


def build_dag(config: DistillConfig) -> Dag:
    """The run's nodes, in an order that respects every input and keeps each pool hop's
    nodes together."""
    # The test split is data, so only a rerun forced from load decodes it again.
    nodes = [Node("load", "load", "cpu", "load", (DATASET,), _load),
             Node("test-split", "load", "cpu", "load", (DATASET,), _test_split),
             Node("embed", "embed", "gpu", "embed", ("load",), _embed)]
    for method in config.methods:
        nodes += [Node(f"select:{method}", "select", "cpu", "select-grids", ("embed",),
                       partial(_select, method=method)),
                  Node(f"grids:{method}", "grids", "cpu", "select-grids", (f"select:{method}",),
                       partial(_grids, method=method))]
    for method in config.methods:
        for backend, suffix in enhance_suffixes(config).items():
            enhanced = f"enhance{suffix}:{method}"
            nodes.append(Node(enhanced, "enhance", "gpu", "enhance", (f"grids:{method}", DATASET),
                              partial(_enhance, backend=backend)))
            if config.refine:
                nodes.append(Node(f"refine{suffix}:{method}", "refine", "gpu", "enhance",
                                  (enhanced,), _refine))
    teacher = ("teacher",) if uses_teacher(config) else ()
    if teacher:
        nodes.append(Node("teacher", "teacher", "gpu", "evaluate", (DATASET, "load"),
                          _teacher, scope="all"))
    for name, (trained_on, method) in evaluated_sets(config).items():
        nodes.append(Node("evaluate", "evaluate", "gpu", "evaluate",
                          (DATASET, "test-split", *teacher, trained_on),
                          partial(_evaluate, method=method), scope=name))
    return Dag(config, tuple(nodes))


def class_refs(dataset: ArtifactRef, classes: Sequence[str]) -> dict[str, ArtifactRef]:
    """Per class, the dataset ref with only that class's row: Prefect walks every task's
    parameters several times, so passing all classes to each task costs O(classes²)."""
    rows = {row[0]: row for row in dataset.meta["classes"]}
    return {name: dataset.model_copy(update={"meta": {"classes": [rows[name]]}})
            for name in classes}


def index_and_check(config: DistillConfig, store: StoreSpec) -> ArtifactRef:
    """List the data (the index task), then refuse classes a later stage cannot serve, before
    any class's data is read."""
    from gridistill.tasks.index import IndexParams, index_dataset
    from gridistill.tasks.teachers import check_imagenet_classes

    dataset = index_dataset(store, IndexParams(
        data=config.data, test_data=config.test_data, class_list=config.class_list,
        holdout_share=config.holdout_share, seed=config.seed))
    classes = class_names(dataset)
    if config.refine:
        from gridistill.tasks.refine import imagenet_index

        for name in classes:
            imagenet_index(name)  # every class needs a DiT label before any GPU work
    teaching = teacher_params(config, "cpu")
    if teaching is not None and teaching.test_image_size is not None:
        check_imagenet_classes(teaching.architecture, classes)
    return dataset


def launch(stage_task: Any, store: StoreSpec, params: BaseModel, scopes: list[str],
           upstream: list[list[Any]], force: list[bool]) -> list[PrefectFuture]:
    """One task run per scope, with that scope's upstream refs (or futures) and force flag."""
    return stage_task.map(unmapped(store), scopes, unmapped(params), upstream, force)


def submit(dag: Dag, nodes: Sequence[Node], setup: Setup, store: StoreSpec,
           dataset: ArtifactRef, classes: list[str],
           upstream: Refs | None = None) -> dict[str, dict[str, PrefectFuture]]:
    """Start ``nodes`` for ``classes`` and return their futures by label and scope. An input
    comes from a node started here, else from ``upstream`` (refs made by an earlier run)."""
    # Bound first: a missing model stops the run before any of these tasks starts.
    bound = [node.bind(setup, dataset) for node in nodes]
    per_class_dataset = class_refs(dataset, classes)
    made: dict[str, dict[str, Any]] = {label: dict(refs) for label, refs in
                                       (upstream or {}).items()}
    started: dict[str, dict[str, PrefectFuture]] = {}
    config = setup.config
    for node, (stage_task, params) in zip(nodes, bound, strict=True):
        if node.per_class:
            scopes = classes
            inputs = [[per_class_dataset[name] if label == DATASET else made[label][name]
                       for label in node.inputs] for name in classes]
            force = config.forced(node.stage, classes)
        else:
            scopes = [node.scope]
            inputs = [[ref for label in node.inputs for ref in (
                [dataset] if label == DATASET else
                [made[label][name] for name in classes] if dag.per_class(label) else
                list(made[label].values()))]]
            force = [any(config.forced(node.stage, classes))]
        futures = dict(zip(scopes, launch(stage_task, store, params,
                                          scopes, inputs, force), strict=True))
        made.setdefault(node.label, {}).update(futures)
        started.setdefault(node.label, {}).update(futures)
    return started


def collect(futures: dict[str, dict[str, PrefectFuture]]) -> tuple[Refs, list[dict[str, Any]]]:
    """The refs of finished tasks, and one timing row per task: stage label, scope, Prefect
    state (Cached or Completed) and compute seconds."""
    refs: Refs = {}
    timings = []
    for label, per_scope in futures.items():
        refs[label] = {}
        for scope, future in per_scope.items():
            ref = refs[label][scope] = future.result()
            cached = future.state.name == "Cached"
            timings.append({"stage": label, "scope": scope, "status": future.state.name,
                            "seconds": 0.0 if cached else round(ref.seconds, 3)})
    return refs, timings


def per_method_artifacts(refs: Refs, methods: list[str],
                         classes: list[str]) -> dict[str, dict[str, list[ArtifactRef]]]:
    """{method: {stage: per-class refs}} of the grids and derived stages, for the report."""
    artifacts: dict[str, dict[str, list[ArtifactRef]]] = {method: {} for method in methods}
    for label, per_class in refs.items():
        stage, _, method = label.partition(":")
        if method in artifacts and stage != "select":
            artifacts[method][stage] = [per_class[name] for name in classes]
    return artifacts


def report_run(store: StoreSpec, config: DistillConfig, dataset: ArtifactRef, refs: Refs,
               timings: list[dict[str, Any]], notes: list[str], embedder: str,
               summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the run report from every node's refs; returns the flows' result (report URL,
    one metrics row per evaluated set)."""
    from gridistill.tasks.report import skip_notes, write_report
    from gridistill.tasks.teacher import teacher_summary

    notes = notes + skip_notes([ref for stage in ("load", "embed")
                                for ref in refs.get(stage, {}).values()])
    if dataset.meta.get("ignored"):
        notes.append(f"dataset: ignored {dataset.meta['ignored']} entries that are not class "
                     f"images (see {dataset.folder}/ignored.parquet)")
    evaluations = [refs["evaluate"][name] for name in evaluated_sets(config)]
    teacher = refs.get("teacher", {}).get("all")
    report_url = write_report(
        store, dataset, evaluations,
        per_method_artifacts(refs, config.methods, class_names(dataset)), timings, notes,
        config.report_summary(embedder, with_teacher=teacher is not None) | (summary or {})
        | ({"teacher": teacher_summary(teacher.meta)} if teacher else {}))
    return {"report": report_url,
            "metrics": [ref.meta["metrics"] | {"method": ref.scope} for ref in evaluations]}
