"""The teacher stage: the soft-label teacher of a run (a packaged ImageNet-1K classifier, one
trained on the real pool, or a given checkpoint), and its reader for the evaluate stage."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import fsspec
import pandas as pd
from pydantic import BaseModel

from gridistill.stages import ArtifactRef, NotInKey, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.teachers import (
    Teacher,
    check_class_order,
    imagenet_teacher,
    load_teacher,
    save_teacher,
)
from gridistill.tasks.test_split import decode_images
from gridistill.tasks.training import evaluate_top1, train_teacher


def _class_names(dataset: ArtifactRef) -> list[str]:
    return [name for name, _, _ in dataset.meta["classes"]]



class TeacherParams(BaseModel):
    # An ImageNet-1K classifier of gridistill.models.IMAGENET_CLASSIFIERS (packaged weights, or
    # `checkpoint`), or a student architecture trained on the pool (or loaded from `checkpoint`).
    architecture: str = "resnet18"
    checkpoint: str | None = None
    protocol: str = "cpu-small"  # a hard-label preset trains the teacher
    image_size: int = 64
    test_image_size: int | None = None  # where its top-1 is measured (None: image_size)
    epochs: int | None = None
    seed: int = 0
    device: Annotated[str, NotInKey] = "cpu"
    progress: Annotated[bool, NotInKey] = True


def _is_imagenet_classifier(architecture: str) -> bool:
    from gridistill.models import IMAGENET_CLASSIFIERS

    return architecture in IMAGENET_CLASSIFIERS


def teacher_summary(meta: dict[str, Any]) -> str:
    """The report's teacher line from the teacher stage's metadata."""
    return (f"{meta['architecture']} ({meta['weights']}), top-1 {meta['top1']:.2f} % on the "
            f"real test images at {meta['test_image_size']} px")


@stage_task("teacher")
def train_teacher_on_pool(store: RunStore, folder: str, scope: str, params: TeacherParams,
                          upstream: list[ArtifactRef]) -> dict[str, Any]:
    """The soft-label teacher: the packaged ImageNet-1K classifier restricted to the dataset's
    WNIDs, or a network trained on the real pool by the same training loop, or the given
    checkpoint after checking its class order against the dataset's. It trains on the pool
    images the load stage validated (``upstream``: the dataset, then every class's load ref).
    Its top-1 on the real test images is measured here, for the report."""
    dataset, *loaded = upstream
    names = _class_names(dataset)
    with tempfile.TemporaryDirectory() as scratch:
        if _is_imagenet_classifier(params.architecture):
            teacher = imagenet_teacher(params.architecture, names, params.checkpoint,
                                       device=params.device)
            store.write_bytes(f"{folder}/teacher.json", json.dumps({
                "architecture": params.architecture, "checkpoint": params.checkpoint,
                "class_names": names}).encode())
        else:
            if params.checkpoint:
                given = Path(scratch) / f"given{Path(params.checkpoint).suffix}"
                with fsspec.open(params.checkpoint, "rb", **store.storage_options) as f:
                    given.write_bytes(f.read())
                teacher = load_teacher(given, names)
            else:
                labels_of = {name: label for name, label, _ in dataset.meta["classes"]}
                pool = pd.concat([store.read_parquet(f"{ref.folder}/images.parquet").assign(
                    label=labels_of[ref.scope]) for ref in loaded])
                images, labels = decode_images(
                    store, pool["path"].tolist(), pool["label"].tolist(), params.image_size,
                    "teacher pool", sha256=pool["sha256"].tolist(), device=params.device)
                teacher = train_teacher(
                    images, labels, names, architecture=params.architecture,
                    image_size=params.image_size, protocol=params.protocol,
                    epochs=params.epochs, seed=params.seed, device=params.device,
                    progress=params.progress)
            path = Path(scratch) / "teacher.safetensors"
            save_teacher(teacher, path)
            store.write_bytes(f"{folder}/teacher.safetensors", path.read_bytes())
    size = params.test_image_size or params.image_size
    test = store.read_parquet(f"{dataset.folder}/test.parquet")
    test_images, test_labels = decode_images(store, test["path"].tolist(),
                                             test["label"].tolist(), size, "test split",
                                             device=params.device)
    if not len(test_labels):
        raise ValueError(f"no readable test images ({len(test)} unreadable)")
    top1 = evaluate_top1(teacher.model.to(params.device), test_images.to(params.device),
                         test_labels.to(params.device))
    return {"architecture": teacher.architecture, "checkpoint": params.checkpoint,
            "weights": teacher.source, "top1": round(top1, 2), "test_image_size": size}


def read_teacher(store: RunStore, ref: ArtifactRef, dataset: ArtifactRef, device: str) -> Teacher:
    """The teacher of ``ref``, its class order checked against the dataset's."""
    if store.exists(f"{ref.folder}/teacher.json"):
        meta = json.loads(store.read_bytes(f"{ref.folder}/teacher.json"))
        check_class_order(meta["class_names"], _class_names(dataset))
        return imagenet_teacher(meta["architecture"], meta["class_names"], meta["checkpoint"],
                                device=device)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "teacher.safetensors"
        path.write_bytes(store.read_bytes(f"{ref.folder}/teacher.safetensors"))
        return load_teacher(path, _class_names(dataset), device=device)
