"""The distillation DAG.

    index ─┬─ per class: load → embed ─┬─ per method: select → grids → enhance ─┬─ evaluate
           │                            │                              [refine] ─┴─ evaluate
           ├─ [teacher, soft-label protocols] ──────────────────────────────────────┘
           └──────────────────────────────────────────────────────────────────────── report

Per-class stages are fanned out with ``.map``; each returns an ``ArtifactRef`` (a pointer
into the run root), never the data itself.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from gridistill.config import DistillConfig
from gridistill.stages import StoreSpec
from tasks.embed import EmbedParams, choose_embedder, embed_class
from tasks.enhance import EnhanceParams, enhance_class, load_enhancer
from tasks.evaluate import (
    EvalParams,
    check_imagenet_classes,
    evaluate_grids,
    teacher_params,
    teacher_summary,
    train_teacher_on_pool,
)
from tasks.grids import GridParams, assemble_class_grids
from tasks.ingest import IndexParams, LoadParams, index_dataset, load_class
from tasks.refine import RefineParams, imagenet_index, load_dit_for, refine_class
from tasks.report import skip_notes, write_report
from tasks.select import SelectParams, cells_per_side, select_class


def _each(futures: list[PrefectFuture]) -> list[list[PrefectFuture]]:
    """Each class's upstream list for the next mapped stage."""
    return [[future] for future in futures]


@flow(name="gridistill-distill", task_runner=ThreadPoolTaskRunner(max_workers=2))
def distill(config: DistillConfig) -> dict[str, Any]:
    """Distil ``config.data`` into ``config.ipc`` grids per class and evaluate them."""
    log = get_run_logger()
    store = StoreSpec(root=config.out, storage_options=config.storage_options)
    device = config.resolved_device()
    enhancers = {backend: EnhanceParams(backend=backend, scale=config.enhance_scale,
                                        seed=config.seed, device=device, progress=config.progress)
                 for backend in config.enhance}
    refine = RefineParams(diver=config.diver, seed=config.seed, device=device,
                          progress=config.progress)
    # Missing weights stop the run here, before any data is read.
    for enhance in enhancers.values():
        load_enhancer(enhance)
    if config.refine:
        load_dit_for(refine)
    embedder = choose_embedder(config.embedder, clip_model=config.clip_model,
                               clip_pretrained=config.clip_pretrained, device=device,
                               classifier_checkpoint=config.classifier_checkpoint)
    notes = [f"EMBEDDER FALLBACK: {embedder.fallback_reason}"] if embedder.fallback_reason else []
    teaching = teacher_params(config, device)

    dataset = index_dataset(store, IndexParams(
        data=config.data, test_data=config.test_data, class_list=config.class_list,
        holdout_share=config.holdout_share, seed=config.seed))
    classes = [name for name, _, _ in dataset.meta["classes"]]
    for name in classes if config.refine else ():
        imagenet_index(name)  # every class needs a DiT label before any GPU work
    if teaching is not None and teaching.test_image_size is not None:
        check_imagenet_classes(teaching.architecture, classes)  # before any data is read
    every = unmapped(store)
    # Per class, the dataset ref with only that class's row: Prefect walks every task's
    # parameters several times, so passing all classes to each task costs O(classes²).
    dataset_of = [dataset.model_copy(update={"meta": {"classes": [row]}})
                  for row in dataset.meta["classes"]]

    loaded = load_class.map(every, classes, unmapped(LoadParams()), [[d] for d in dataset_of],
                            config.forced("load", classes))
    embedded = embed_class.map(every, classes, unmapped(EmbedParams(
        embedder=embedder.name.split(":")[0], clip_model=config.clip_model,
        clip_pretrained=config.clip_pretrained, device=device, progress=config.progress,
        classifier_checkpoint=config.classifier_checkpoint,
    )), _each(loaded), config.forced("embed", classes))
    teacher = [train_teacher_on_pool.submit(
        store, "all", teaching, [dataset], any(config.forced("teacher", classes))
    )] if teaching is not None else []
    per_method: dict[str, dict[str, list[PrefectFuture]]] = {}
    evaluations: dict[str, PrefectFuture] = {}
    for method in config.methods:
        side = cells_per_side(method, config.grid_size)
        eval_params = EvalParams(
            student=config.eval_student, protocol=config.eval_protocol,
            grid_size=side if side > 1 else None, image_size=config.eval_image_size,
            epochs=config.eval_epochs, ipc=config.ipc, seeds=config.eval_seeds,
            seed=config.seed, num_classes=dataset.meta["num_classes"], device=device,
            progress=config.progress)
        selected = select_class.map(every, classes, unmapped(SelectParams(
            method=method, ipc=config.ipc, grid_size=side,
            grid_selection=config.grid_selection, seed=config.seed,
        )), _each(embedded), config.forced("select", classes))
        grids = assemble_class_grids.map(every, classes, unmapped(GridParams(
            grid_size=side, resolution=config.grid_resolution,
        )), _each(selected), config.forced("grids", classes))
        per_method[method] = {"select": selected, "grids": grids}
        trained_on: dict[str, list[PrefectFuture]] = {}
        for backend, enhance in enhancers.items():  # several backends: an ablation
            name, label = (method, "") if len(enhancers) == 1 else (f"{method}+{backend}",
                                                                     f"[{backend}]")
            enhanced = enhance_class.map(
                every, classes, unmapped(enhance),
                [[g, d] for g, d in zip(grids, dataset_of, strict=True)],
                config.forced("enhance", classes))
            per_method[method][f"enhance{label}"] = trained_on[name] = enhanced
            if config.refine:
                refined = refine_class.map(every, classes, unmapped(refine), _each(enhanced),
                                           config.forced("refine", classes))
                per_method[method][f"refine{label}"] = trained_on[f"{name}+diver"] = refined
        evaluations |= {name: evaluate_grids.submit(
            store, name, eval_params, [dataset, *teacher, *per_class],
            any(config.forced("evaluate", classes))) for name, per_class in trained_on.items()}

    notes += skip_notes([future.result() for future in [*loaded, *embedded]])
    if dataset.meta.get("ignored"):
        notes.append(f"dataset: ignored {dataset.meta['ignored']} entries that are not class "
                     f"images (see {dataset.folder}/ignored.parquet)")
    stages = {"load": loaded, "embed": embedded} | {
        f"{stage}:{method}": futures for method, by_stage in per_method.items()
        for stage, futures in by_stage.items()}
    timings = timing_rows(stages, classes) + timing_rows(
        {"evaluate": list(evaluations.values())}, list(evaluations))
    report_url = write_report(
        store, dataset, [future.result() for future in evaluations.values()],
        {method: {stage: [f.result() for f in futures] for stage, futures in by_stage.items()
                  if stage != "select"} for method, by_stage in per_method.items()},
        timings, notes, config.report_summary(f"{embedder.name} (weights: {embedder.weights})",
                                              with_teacher=bool(teacher))
        | ({"teacher": teacher_summary(teacher[0].result().meta)} if teacher else {}))
    log.info("report: %s", report_url)
    return {"report": report_url,
            "metrics": [f.result().meta["metrics"] | {"method": name}
                        for name, f in evaluations.items()]}


def timing_rows(futures: dict[str, list[PrefectFuture]], scopes: list[str]) -> list[dict[str, Any]]:
    """One row per task: stage, scope, Prefect state (Cached or Completed), compute seconds."""
    rows = []
    for stage, stage_futures in futures.items():
        for scope, future in zip(scopes, stage_futures, strict=True):
            seconds = future.result().seconds
            cached = future.state.name == "Cached"
            rows.append({"stage": stage, "scope": scope, "status": future.state.name,
                         "seconds": 0.0 if cached else round(seconds, 3)})
    return rows
