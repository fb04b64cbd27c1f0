"""The teacher stage: the soft-label teacher of a run (a packaged ImageNet-1K classifier, one
trained on the real training images, or a given checkpoint), and its reader for the evaluate
stage."""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import fsspec
import pandas as pd
import torch
from pydantic import BaseModel

from gridistill.stages import ArtifactRef, NotInKey, WeightsInKey, stage_logger, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.embed import ImageFiles, default_num_workers, image_loader
from gridistill.tasks.index import class_names
from gridistill.tasks.teachers import (
    Teacher,
    check_class_order,
    imagenet_teacher,
    load_teacher,
    save_teacher,
)
from gridistill.tasks.test_split import _square_pixels, decode_images
from gridistill.tasks.training import TrainingSet, evaluate_top1, train_teacher


class TrainingFiles(TrainingSet):
    """The real training images (every class's train split) as a training set streamed from
    their files, never held whole.

    Each epoch reads the files in a new order (drawn from torch's generator, as an in-memory
    set's) through the embed stage's DataLoader: decode workers on CUDA, each file decoded and
    resized to its centre square at ``size`` px, one batch at a time, so memory is a few batches
    whatever the train split's size (ImageNet-1K's decoded would be hundreds of GB). The price is
    a decode of every file every epoch, as any ImageNet training pays. A file that fails to
    decode, or whose bytes differ from the load stage's ``sha256``, is skipped and reported
    once; ``len()`` counts the files load validated.
    """

    def __init__(self, store: RunStore, paths: Sequence[str], labels: Sequence[int],
                 sha256: Sequence[str], size: int, device: str = "cpu") -> None:
        self.paths, self.sha256 = list(paths), list(sha256)
        self.labels = torch.tensor([int(label) for label in labels], dtype=torch.long)
        self.size, self.storage_options = size, store.storage_options
        self.num_workers = default_num_workers(device)
        self.pin_memory = torch.device(device).type == "cuda"
        self.reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.paths))
        files = ImageFiles([self.paths[i] for i in order.tolist()],
                           functools.partial(_square_pixels, size=self.size),
                           self.storage_options, [self.sha256[i] for i in order.tolist()])
        failed: list[str] = []
        for batch in image_loader(files, batch_size=batch_size, num_workers=self.num_workers,
                                  pin_memory=self.pin_memory):
            failed += [files.paths[index] for index, _ in batch.failed]
            if batch.indices:
                yield batch.pixels, self.labels[order[batch.indices]]
        if len(failed) == len(files):
            raise ValueError(f"teacher training images: none of its {len(files)} images can be "
                             f"read (e.g. {failed[:3]})")
        if new := sorted(set(failed) - self.reported):
            self.reported.update(new)
            stage_logger().warning("teacher training images: skipped %d unreadable or changed "
                                   "images, e.g. %s", len(new), new[:3])


class TeacherParams(BaseModel):
    # An ImageNet-1K classifier of gridistill.models.IMAGENET_CLASSIFIERS (packaged weights, or
    # `checkpoint`), or a student architecture trained on the train split (or loaded from
    # `checkpoint`).
    architecture: str = "resnet18"
    checkpoint: Annotated[str | None, WeightsInKey] = None
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
def build_teacher(store: RunStore, folder: str, scope: str, params: TeacherParams,
                  upstream: list[ArtifactRef]) -> dict[str, Any]:
    """The soft-label teacher: the packaged ImageNet-1K classifier restricted to the dataset's
    WNIDs, or a network trained on the real training images by the same training loop, or the
    given checkpoint after checking its class order against the dataset's. It trains on the
    training images the load stage validated (``upstream``: the dataset, then every class's
    load ref), streamed from their files each epoch (:class:`TrainingFiles`).
    Its top-1 on the real test images is measured here, for the report."""
    dataset, *loaded = upstream
    names = class_names(dataset)
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
                train = pd.concat([store.read_parquet(f"{ref.folder}/images.parquet").assign(
                    label=labels_of[ref.scope]) for ref in loaded])
                files = TrainingFiles(store, train["path"].tolist(), train["label"].tolist(),
                                      train["sha256"].tolist(), params.image_size,
                                      params.device)
                teacher = train_teacher(
                    files, names, architecture=params.architecture,
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
        check_class_order(meta["class_names"], class_names(dataset))
        return imagenet_teacher(meta["architecture"], meta["class_names"], meta["checkpoint"],
                                device=device)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "teacher.safetensors"
        path.write_bytes(store.read_bytes(f"{ref.folder}/teacher.safetensors"))
        return load_teacher(path, class_names(dataset), device=device)
