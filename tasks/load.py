"""The load stage: validate one class's training images from their bytes and headers, and
list every file skipped and why (also for the embed stage, which decodes them)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import BaseModel
from tqdm.auto import tqdm

from gridistill.stages import ArtifactRef, stage_logger, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.ingest import ImageHeader, probe_image, read_bytes


def record_skipped(store: RunStore, folder: str, stage: str, scope: str,
                   skipped: list[tuple[str, str]], total: int) -> dict[str, int]:
    """Write ``<folder>/skipped.parquet`` (path, reason), warn when it is not empty and return
    the count per reason category (the text before the first colon)."""
    frame = pd.DataFrame(skipped, columns=["path", "reason"], dtype=str)
    store.write_parquet(f"{folder}/skipped.parquet", frame)
    by_reason = frame["reason"].str.split(":").str[0].value_counts().to_dict()
    if skipped:
        stage_logger().warning("%s[%s]: skipped %d of %d images %s (listed in %s)", stage, scope,
                               len(skipped), total, by_reason,
                               store.url(f"{folder}/skipped.parquet"))
    return by_reason


def no_usable_images(store: RunStore, folder: str, scope: str, skipped: int,
                     by_reason: dict[str, int]) -> ValueError:
    return ValueError(f"class {scope!r} has no usable images: {skipped} skipped {by_reason}; "
                      f"see {store.url(f'{folder}/skipped.parquet')}")


class LoadParams(BaseModel):
    min_side: int = 8  # images smaller than this are skipped (they would be mostly upsampling)


@stage_task("load")
def load_class(store: RunStore, folder: str, scope: str, params: LoadParams,
               upstream: list[ArtifactRef]) -> dict[str, Any]:
    """Validate one class's training images (its train split) from their bytes and headers;
    report every skipped file and why. Pixels are not decoded here: at ImageNet scale a decode
    costs more than the read, and the embed stage decodes every image anyway (and lists those
    that fail there)."""
    (dataset,) = upstream
    rows = store.read_parquet(f"{dataset.folder}/classes/{scope}.parquet")
    rows = rows[rows["split"] == "train"]
    kept, skipped, seen = [], [], {}
    for path in tqdm(rows["path"], desc=f"load {scope}", unit="img", leave=False):
        data = read_bytes(path, store.storage_options)
        header = ImageHeader("", None, data) if isinstance(data, str) else probe_image(data)
        reason = header.error
        if reason is None and min(header.size) < params.min_side:
            reason = f"too small: {header.size}, under {params.min_side}px"
        if reason is None and header.sha256 in seen:
            reason = f"exact duplicate: same bytes as {seen[header.sha256]}"
        if reason is not None:
            skipped.append((path, reason))
            continue
        seen[header.sha256] = path
        kept.append((len(kept), path, header.sha256, *header.size))
    # Written first, so that a class with nothing usable still leaves its reasons to read.
    by_reason = record_skipped(store, folder, "load", scope, skipped, len(rows))
    if not kept:
        raise no_usable_images(store, folder, scope, len(skipped), by_reason)
    store.write_parquet(f"{folder}/images.parquet", pd.DataFrame(
        kept, columns=["image_id", "path", "sha256", "width", "height"]))
    return {"images": len(kept), "skipped": len(skipped), "skipped_by_reason": by_reason}
