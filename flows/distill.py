"""The distillation DAG: index → per class (load → embed → select → grids → enhance) →
evaluate per method → report. Tasks are fanned out over classes with ``.map``."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from gridistill.config import DistillConfig
from gridistill.stages import ArtifactRef, StoreSpec
from tasks.embed import EmbedParams, choose_embedder, embed_class
from tasks.enhance import EnhanceParams, enhance_class
from tasks.evaluate import EvalParams, evaluate_grids
from tasks.grids import GridParams, assemble_class_grids
from tasks.ingest import IndexParams, LoadParams, index_dataset, load_class
from tasks.report import write_report
from tasks.select import SelectParams, select_class


def _chain(futures: list[PrefectFuture]) -> list[list[PrefectFuture]]:
    """Each class's upstream list for the next mapped stage."""
    return [[future] for future in futures]


@flow(name="gridistill-distill", task_runner=ThreadPoolTaskRunner(max_workers=2))
def distill(config: DistillConfig) -> dict[str, Any]:
    """Distil ``config.data`` into ``config.ipc`` grids per class and evaluate them."""
    log = get_run_logger()
    store = StoreSpec(root=config.out, storage_options=config.storage_options)
    device = config.resolved_device()
    dataset = index_dataset(store, IndexParams(
        data=config.data, test_data=config.test_data, class_list=config.class_list,
        holdout_share=config.holdout_share, seed=config.seed))
    classes = [name for name, _, _ in dataset.meta["classes"]]
    embedder = choose_embedder(config.embedder, clip_model=config.clip_model,
                               clip_pretrained=config.clip_pretrained, device=device)
    notes = [f"EMBEDDER FALLBACK: {embedder.fallback_reason}"] if embedder.fallback_reason else []

    loaded = load_class.map(unmapped(store), classes, unmapped(LoadParams()),
                            [[dataset]] * len(classes))
    embedded = embed_class.map(unmapped(store), classes, unmapped(EmbedParams(
        embedder=embedder.name.split(":")[0], clip_model=config.clip_model,
        clip_pretrained=config.clip_pretrained, device=device, progress=config.progress,
    )), _chain(loaded))
    stage_futures = {"load": loaded, "embed": embedded}
    evaluations, grids_by_method = [], {}
    for method in config.methods:
        selected = select_class.map(unmapped(store), classes, unmapped(SelectParams(
            method=method, ipc=config.ipc, grid_size=config.grid_size, seed=config.seed,
        )), _chain(embedded))
        grids = assemble_class_grids.map(unmapped(store), classes, unmapped(GridParams(
            grid_size=config.grid_size, resolution=config.grid_resolution,
        )), _chain(selected))
        enhanced = enhance_class.map(unmapped(store), classes, unmapped(EnhanceParams(
            backend=config.enhance, scale=config.enhance_scale, seed=config.seed, device=device,
            progress=config.progress,
        )), [[future, dataset] for future in grids])
        evaluations.append(evaluate_grids.submit(store, method, EvalParams(
            student=config.eval_student, protocol=config.eval_protocol, grid_size=config.grid_size,
            image_size=config.eval_image_size, epochs=config.eval_epochs, ipc=config.ipc,
            seed=config.seed,
            num_classes=dataset.meta["num_classes"], device=device, progress=config.progress,
        ), [dataset, *enhanced]))
        stage_futures |= {f"select:{method}": selected, f"grids:{method}": grids,
                          f"enhance:{method}": enhanced}
        grids_by_method[method] = grids

    evaluated = [future.result() for future in evaluations]
    timings = timing_rows(stage_futures, classes) + timing_rows({"evaluate": evaluations},
                                                                config.methods)
    report_url = write_report(
        store, evaluated, {m: [f.result() for f in fs] for m, fs in grids_by_method.items()},
        timings, notes, summary={
            "data": config.data, "test data": config.test_data or "held out from data",
            "classes": len(classes), "ipc": config.ipc, "grid": f"{config.grid_size}x"
            f"{config.grid_size} at {config.grid_resolution}px", "embedder": embedder.name,
            "enhance": f"{config.enhance} x{config.enhance_scale}",
            "student": f"{config.eval_student}, {config.eval_protocol} protocol",
            "run root": config.out})
    log.info("report: %s", report_url)
    return {"report": report_url, "metrics": [e.meta["metrics"] | {"method": e.scope}
                                              for e in evaluated]}


def timing_rows(futures: dict[str, list[PrefectFuture]], scopes: list[str]) -> list[dict[str, Any]]:
    """One row per task: stage, scope, Prefect state (Cached or Completed), compute seconds."""
    rows = []
    for stage, stage_futures in futures.items():
        for scope, future in zip(scopes, stage_futures, strict=True):
            ref: ArtifactRef = future.result()
            cached = future.state.name == "Cached"
            rows.append({"stage": stage, "scope": scope, "status": future.state.name,
                         "seconds": 0.0 if cached else round(ref.seconds, 3)})
    return rows
