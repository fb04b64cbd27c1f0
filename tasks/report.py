"""The run report: accuracy table, timings, contact sheets, warnings; as files and artifacts."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pandas as pd
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gridistill.stages import ArtifactRef, StoreSpec
from gridistill.storage import RunStore
from gridistill.tasks.grids import read_grid_images, write_png

# At ImageNet scale a sheet of every class would be 800 x 32,000 px: show the first 100.
CONTACT_SHEET_CLASSES = 100


def contact_sheet(images: Sequence[Image.Image], columns: int = 5, size: int = 160) -> Image.Image:
    """Tile images (one per class) into rows of ``columns`` thumbnails."""
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        sheet.paste(image.resize((size, size), Image.LANCZOS), (col * size, row * size))
    return sheet


def accuracy_plot(metrics: pd.DataFrame) -> bytes:
    """PNG: top-1 (mean ± std over seeds) against IPC, one series per method."""
    import matplotlib

    matplotlib.use("Agg")  # headless: workers have no display
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(5, 3.2), dpi=120)
    for method, rows in metrics.groupby("method", sort=False):
        rows = rows.sort_values("ipc")
        axes.errorbar(rows["ipc"], rows["top1_final_mean"], yerr=rows["top1_final_std"],
                      marker="o", capsize=4, label=method)
    axes.set(xlabel="images per class (IPC)", ylabel="top-1 (%), final epoch",
             title="Accuracy on real test images")
    axes.set_xscale("log")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def skip_notes(refs: Sequence[ArtifactRef]) -> list[str]:
    """One warning per stage artifact that skipped files (load: header checks and duplicates;
    embed: pixel data that failed to decode), pointing at its ``skipped.parquet``."""
    return [f"{ref.stage}[{ref.scope}]: skipped {ref.meta['skipped']} files "
            f"{ref.meta.get('skipped_by_reason', {})} (see {ref.folder}/skipped.parquet)"
            for ref in refs if ref.meta.get("skipped")]


def write_distilled_index(store: RunStore, method: str, grids: list[ArtifactRef],
                          labels: dict[str, int]) -> None:
    """``distilled/<method>.parquet``: the distilled set's files, for readers of the run root
    (``gridistill refine --input RUN_ROOT``) that should not know the stage layout."""
    rows = [(ref.scope, labels[ref.scope], f"{ref.folder}/{name}") for ref in grids
            for name in store.read_parquet(f"{ref.folder}/grids.parquet")["file"]]
    store.write_parquet(f"distilled/{method}.parquet",
                        pd.DataFrame(rows, columns=["class_name", "label", "file"]))


def storage_rows(store: RunStore, artifacts: dict[str, dict[str, list[ArtifactRef]]]
                 ) -> pd.DataFrame:
    """What is stored per method: the distilled set (grids) apart from derived artifacts."""
    rows = []
    for method, stages in artifacts.items():
        for stage, refs in stages.items():
            images = sum(len(store.read_parquet(f"{r.folder}/grids.parquet")) for r in refs)
            rows.append({
                "method": method, "artifact": stage,
                "kind": "distilled set" if stage == "grids" else "derived (cache, not counted)",
                "images": images, "resolution": refs[0].meta.get("resolution") if refs else None,
                "MB": round(sum(store.fs.du(store.path(r.folder)) for r in refs) / 1e6, 2)})
    return pd.DataFrame(rows)


def with_improvement_over_random(metrics: pd.DataFrame) -> pd.DataFrame:
    """Adds DD-Ranking's improvement over random (IOR, points of final top-1 over the
    ``random-real`` set of the same run) when that baseline was evaluated."""
    from gridistill.tasks.select import REAL_IMAGES

    baseline = metrics.loc[metrics["method"] == REAL_IMAGES, "top1_final_mean"]
    if baseline.empty:
        return metrics
    return metrics.assign(ior_vs_random_real=metrics["top1_final_mean"] - baseline.iloc[0])


def render_report(metrics: pd.DataFrame, timings: pd.DataFrame, storage: pd.DataFrame,
                  sheets: dict[str, str], notes: Sequence[str], summary: dict[str, Any]) -> str:
    """Markdown: setup, warnings, accuracy per method, contact sheets, storage, timings."""
    lines = ["# gridistill run report", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary.items()]
    if notes:
        lines += ["", "## Warnings", ""] + [f"> **{note}**" for note in notes]
    lines += ["", "## Accuracy on real test images", "",
              "Top-1 (%) of students trained from scratch on each distilled set, mean ± std "
              "over seeds. `final` is the last epoch; `best` the best evaluated epoch (peers "
              "such as RDED report best). The plot shows `final`.", ""]
    lines += [metrics.to_markdown(index=False, floatfmt=".2f"), "",
              "![accuracy vs IPC](accuracy.png)", ""]
    lines += [f"## Distilled grids (first grid of each class, at most {CONTACT_SHEET_CLASSES})",
              ""]
    lines += [f"**{method}**\n\n![{method}]({path})\n" for method, path in sheets.items()]
    lines += ["## Storage", "", "The distilled set is the grids at storage resolution; enhanced "
              "and refined grids are derived training inputs, cached but not counted.", "",
              storage.to_markdown(index=False), ""]
    stage_totals = (timings.groupby(["stage", "status"])["seconds"].agg(["count", "sum"])
                    .reset_index().rename(columns={"count": "tasks", "sum": "seconds"}))
    lines += ["## Stage timings", "", stage_totals.to_markdown(index=False, floatfmt=".2f"), ""]
    return "\n".join(lines)


@task(name="report", retries=2, retry_delay_seconds=[2, 10], persist_result=False)
def write_report(store: StoreSpec, dataset: ArtifactRef, evaluations: list[ArtifactRef],
                 artifacts: dict[str, dict[str, list[ArtifactRef]]],
                 timings: list[dict[str, Any]], notes: list[str], summary: dict[str, Any]) -> str:
    """Write report.md, metrics.parquet, timings.parquet and contact sheets at the run root,
    and publish the report and timing table as Prefect artifacts. Returns the report URL.

    ``artifacts`` is {method: {stage: per-class refs}} for the grids and derived stages."""
    run_store: RunStore = store.open()
    labels = {name: label for name, label, _ in dataset.meta["classes"]}
    metrics = with_improvement_over_random(
        pd.DataFrame([{"method": ref.scope, **ref.meta["metrics"]} for ref in evaluations]))
    timing_frame = pd.DataFrame(timings)
    sheets = {}
    for method, stages in artifacts.items():
        write_distilled_index(run_store, method, stages["grids"], labels)
        firsts = [read_grid_images(run_store, ref)[0]
                  for ref in stages["grids"][:CONTACT_SHEET_CLASSES]]
        sheets[method] = f"contact_sheet_{method}.png"
        write_png(run_store, sheets[method], contact_sheet(firsts))
    storage = storage_rows(run_store, artifacts)
    report = render_report(metrics, timing_frame, storage, sheets, notes, summary)
    run_store.write_parquet("metrics.parquet", metrics)
    run_store.write_bytes("accuracy.png", accuracy_plot(metrics))
    run_store.write_parquet("timings.parquet", timing_frame)
    run_store.write_text("report.md", report)
    create_table_artifact(key="gridistill-timings", table=timing_frame.to_dict("records"),
                          description="Per-class, per-stage timings (Cached = reused).")
    create_markdown_artifact(key="gridistill-report", markdown=report.replace(
        "](contact_sheet_", f"]({run_store.url('')}/contact_sheet_").replace(
        "](accuracy.png", f"]({run_store.url('')}/accuracy.png"),
        description=f"Run report; files under {run_store.url('')}")
    return run_store.url("report.md")
