"""The evaluate stage: students trained from scratch on one method's grids, one per seed, and
tested on the run's decoded real test images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel

from gridistill.stages import ArtifactRef, NotInKey, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.index import class_names
from gridistill.tasks.protocols import get_protocol
from gridistill.tasks.teacher import read_teacher
from gridistill.tasks.test_split import _square_pixels, read_test_split, student_test_size
from gridistill.tasks.training import train_and_evaluate_seeds
from gridistill.tasks.transforms import training_crop_size, working_resolution


def _to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8 of same-sized images."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])
                            ).permute(0, 3, 1, 2).contiguous()



class EvalParams(BaseModel):
    student: str = "convnet_d3"
    protocol: str = "cpu-small"
    grid_size: int | None = 4
    image_size: int | None = None  # None: the protocol's
    epochs: int | None = None  # None: the protocol's, by IPC
    ipc: int = 1
    seeds: int = 3
    seed: int = 0
    num_classes: int
    device: Annotated[str, NotInKey] = "cpu"
    progress: Annotated[bool, NotInKey] = True


@stage_task("evaluate")
def evaluate_grids(store: RunStore, folder: str, scope: str, params: EvalParams,
                   upstream: list[ArtifactRef]) -> dict[str, Any]:
    """Train students from scratch on one method's grids (one per seed); test on real images.

    ``upstream`` is the dataset, every class's decoded test split, optionally the teacher (for
    soft-label protocols), then the per-class grid artifacts.
    """
    from gridistill.tasks.grids import read_grid_images

    dataset, *rest = upstream
    teachers = [ref for ref in rest if ref.stage == "teacher"]
    tests = [ref for ref in rest if ref.stage == "test-split"]
    per_class = [ref for ref in rest if ref.stage not in ("teacher", "test-split")]
    labels = {name: label for name, label, _ in dataset.meta["classes"]}
    grids, grid_labels = [], []
    for ref in per_class:
        images = read_grid_images(store, ref)
        grids += images
        grid_labels += [labels[ref.scope]] * len(images)
    # Decoded at the protocol's resize size; its CenterCrop does the rest.
    test_images, test_labels = read_test_split(
        store, tests, student_test_size(params.protocol, params.image_size))
    teacher = read_teacher(store, teachers[0], dataset, params.device) if teachers else None
    protocol = get_protocol(params.protocol)
    crop_size = training_crop_size(protocol, params.image_size or protocol.image_size, teacher)
    working = working_resolution(protocol, crop_size, params.grid_size)
    if max(grids[0].size) > working:  # e.g. enhanced grids: crop from a copy no larger than needed
        train_images = torch.stack([_square_pixels(grid, working) for grid in grids])
    else:
        train_images = _to_uint8(grids)
    result = train_and_evaluate_seeds(
        train_images, torch.tensor(grid_labels), test_images, test_labels,
        seeds=[params.seed + i for i in range(params.seeds)], num_classes=params.num_classes,
        student=params.student, protocol=params.protocol, grid_size=params.grid_size,
        image_size=params.image_size, epochs=params.epochs, ipc=params.ipc, teacher=teacher,
        class_names=class_names(dataset) if teacher else None, device=params.device,
        progress=params.progress)
    history = pd.DataFrame([dict(row, seed=run_seed) for run_seed, run in
                            zip(range(params.seed, params.seed + params.seeds), result["runs"],
                                strict=True) for row in run["history"]])
    store.write_parquet(f"{folder}/history.parquet", history)
    metrics = {"student": params.student, "protocol": params.protocol, "ipc": params.ipc,
               "seeds": params.seeds, "train_grids": len(grids), "test_images": len(test_labels),
               **{k: round(v, 2) for k, v in result.items() if k.startswith("top1_")}}
    store.write_parquet(f"{folder}/metrics.parquet", pd.DataFrame([metrics]))
    return {"metrics": metrics}
