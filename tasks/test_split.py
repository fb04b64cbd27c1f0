"""The test-split stage: every class's real test images decoded once, at the students' test
resolution, for every evaluation of the run; and the decoding helper other stages share."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel

from gridistill.stages import ArtifactRef, NotInKey, stage_logger, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.protocols import get_protocol


def _square_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) uint8: the image's centre square resized to ``size``."""
    from gridistill.tasks.grids import center_crop_square

    square = center_crop_square(image).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(square.convert("RGB"))).permute(2, 0, 1).contiguous()


def decode_images(store: RunStore, paths: Sequence[str], labels: Sequence[int], size: int,
                  what: str, *, sha256: Sequence[str] | None = None, device: str = "cpu",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images at ``size`` px as uint8, with their labels. Each file is decoded and resized in
    the embed stage's DataLoader (worker processes on CUDA), so only resized pixels are ever
    held. A file that fails to decode, or whose bytes differ from ``sha256``, is skipped."""
    from gridistill.tasks.embed import ImageFiles, default_num_workers, image_loader

    files = ImageFiles(paths, functools.partial(_square_pixels, size=size),
                       store.storage_options, sha256)
    kept, batches, failed = [], [], []
    for batch in image_loader(files, batch_size=64, num_workers=default_num_workers(device),
                              pin_memory=False):
        kept += batch.indices
        batches += [batch.pixels] if batch.indices else []
        failed += [paths[index] for index, _ in batch.failed]
    if failed:
        stage_logger().warning("%s: skipped %d unreadable images, e.g. %s", what, len(failed),
                               failed[:3])
    images = torch.cat(batches) if batches else torch.empty((0, 3, size, size),
                                                             dtype=torch.uint8)
    return images, torch.tensor([int(labels[index]) for index in kept], dtype=torch.long)


def student_test_size(protocol: str, image_size: int | None) -> int:
    """The side students' test images are decoded at: the protocol's resize before its centre
    crop (``image_size`` None: the protocol's)."""
    preset = get_protocol(protocol)
    return round((image_size or preset.image_size) * preset.val_resize_ratio)


class TestSplitParams(BaseModel):
    size: int  # px: student_test_size of the run's protocol and image size
    device: Annotated[str, NotInKey] = "cpu"  # only picks the number of decode workers


@stage_task("test-split")
def decode_test_split(store: RunStore, folder: str, scope: str, params: TestSplitParams,
                      upstream: list[ArtifactRef]) -> dict[str, Any]:
    """One class's real test images, decoded once at the students' test resolution; every
    evaluation of the run reads them from here instead of the original files."""
    (dataset,) = upstream
    rows = store.read_parquet(f"{dataset.folder}/classes/{scope}.parquet")
    rows = rows[rows["split"] == "test"]
    images, labels = decode_images(store, rows["path"].tolist(), rows["label"].tolist(),
                                   params.size, f"test split [{scope}]", device=params.device)
    # Parquet, as every run-root file is a data format: each row one image's raw pixels.
    store.write_parquet(f"{folder}/images.parquet", pd.DataFrame(
        {"label": labels.numpy(), "pixels": [image.numpy().tobytes() for image in images]}))
    return {"images": len(labels), "unreadable": len(rows) - len(labels), "size": params.size}


def read_test_split(store: RunStore, refs: Sequence[ArtifactRef], size: int,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class's decoded test images (``size`` px) and labels, in class order."""
    if wrong := sorted({ref.meta["size"] for ref in refs} - {size}):
        raise ValueError(f"test split decoded at {wrong} px, students are tested at {size} px")
    rows = pd.concat([store.read_parquet(f"{ref.folder}/images.parquet") for ref in refs])
    if rows.empty:
        raise ValueError("no readable test images")
    pixels = np.frombuffer(b"".join(rows["pixels"]), dtype=np.uint8)
    return (torch.from_numpy(pixels.reshape(len(rows), 3, size, size).copy()),
            torch.tensor(rows["label"].to_numpy(dtype=np.int64)))
