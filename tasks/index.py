"""The index stage: list the data once, fix the class order and the test split, and write one
manifest per class (``dataset/<key>/``). The listing itself is :mod:`gridistill.tasks.ingest`."""

from __future__ import annotations

import pandas as pd
from prefect import task
from pydantic import BaseModel

from gridistill.stages import ArtifactRef, StoreSpec, stage_logger
from gridistill.storage import content_key
from gridistill.tasks.ingest import holdout_mask, read_class_list, resolve_classes, scan_samples


def class_names(dataset: ArtifactRef) -> list[str]:
    """The class names of the index's dataset ref, in label order."""
    return [name for name, _, _ in dataset.meta["classes"]]


class IndexParams(BaseModel):
    data: str
    test_data: str | None = None
    class_list: str | None = None
    holdout_share: float = 0.2
    seed: int = 0


@task(name="index-dataset", retries=2, retry_delay_seconds=[2, 10], persist_result=False)
def index_dataset(store: StoreSpec, params: IndexParams) -> ArtifactRef:
    """List the data once, fix the class order and the test split; write per-class manifests.

    Always runs (listing is what detects changed data); its key is the listing's content, so
    an unchanged dataset maps to the same folder and every later stage stays cached.
    """
    log = stage_logger()
    options = store.storage_options
    listing = scan_samples(params.data, options)
    train, ignored = listing.samples, listing.ignored
    pairs = read_class_list(params.class_list, options) if params.class_list else None
    classes = resolve_classes(train["class_name"], pairs)
    labels = {c.name: c.label for c in classes}
    if params.test_data:
        test_listing = scan_samples(params.test_data, options)
        test, ignored = test_listing.samples, ignored + test_listing.ignored
        unknown = sorted(set(test["class_name"]) - set(labels))
        if unknown:
            raise ValueError(f"test classes not among the training classes: {unknown[:10]}")
        frame = pd.concat([train.assign(split="train"), test.assign(split="test")])
    else:
        frame = train.assign(split="train")
        for name, rows in frame.groupby("class_name"):
            mask = holdout_mask(rows["path"].tolist(), params.holdout_share, params.seed, name)
            frame.loc[rows.index[mask], "split"] = "test"
    frame = frame.assign(label=frame["class_name"].map(labels)).reset_index(drop=True)
    class_rows = [[c.name, c.label, c.display_name] for c in classes]
    key = content_key(frame[["path", "size", "class_name", "split"]].values.tolist(), class_rows,
                      ignored)
    folder = f"dataset/{key}"
    run_store = store.open()
    if not run_store.is_committed(folder):
        for name, rows in frame.groupby("class_name"):
            run_store.write_parquet(f"{folder}/classes/{name}.parquet", rows)
        run_store.write_parquet(f"{folder}/test.parquet", frame[frame["split"] == "test"])
        run_store.write_parquet(f"{folder}/ignored.parquet",
                                pd.DataFrame(ignored, columns=["path", "reason"], dtype=str))
        run_store.commit(folder, {"key": key, "classes": class_rows, "params": params.model_dump()})
    counts = frame.groupby("split").size().to_dict()
    log.info("dataset %s: %d classes, %s images (%s)", key, len(classes), counts, params.data)
    if ignored:
        log.warning("dataset %s: ignored %d entries that are not samples (listed in %s), e.g. %s",
                    key, len(ignored), run_store.url(f"{folder}/ignored.parquet"), ignored[:5])
    return ArtifactRef(stage="dataset", scope="all", key=key, folder=folder,
                       meta={"classes": class_rows, "counts": counts, "ignored": len(ignored),
                             "num_classes": len(pairs) if pairs else len(classes)})
