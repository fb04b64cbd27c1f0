"""Soft-label teachers: a packaged ImageNet-1K classifier restricted to the dataset's classes, or
a student architecture trained on the train split; saving and loading one, and the class-order
checks that keep its logits aligned with the dataset's labels. Plain torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gridistill.tasks.students import build_student
from gridistill.tasks.transforms import IMAGENET_MEAN, IMAGENET_STD


class ClassOrderMismatchError(ValueError):
    """A teacher's classes are not the dataset's classes in the same order."""


@dataclass
class Teacher:
    """Logits of the dataset's classes, in its order, for a batch normalised as the harness
    normalises (ImageNet mean/std)."""

    model: nn.Module
    architecture: str
    class_names: tuple[str, ...]
    image_size: int | None  # None: any input size (the packaged ImageNet classifiers)
    source: str = "trained on the train split"  # where its weights came from


class ImageNetSubsetTeacher(nn.Module):
    """An ImageNet-1K classifier's logits restricted to the dataset's classes, in their order.

    ``class_indices[c]`` is the ImageNet-1K index of the dataset's class ``c``. Inputs arrive
    normalised with ImageNet mean/std (as every batch of the harness) and are mapped back to
    [0, 1] for the classifier's own convention.
    """

    def __init__(self, classifier: Any, class_indices: Sequence[int]) -> None:
        super().__init__()
        self.classifier = classifier
        self.net = classifier.model  # registered, so .to() and .eval() reach it
        self.register_buffer("class_indices", torch.tensor(list(class_indices)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch * self.std + self.mean
        return self.classifier.logits(pixels)[:, self.class_indices]


def check_imagenet_classes(teacher: str, class_names: Sequence[str]) -> None:
    """Raise, naming them, when classes are not ImageNet-1K WNIDs (a packaged teacher's
    logits are picked by WNID)."""
    from gridistill.distilled_sets import imagenet_wnids

    known = set(imagenet_wnids())
    unknown = [name for name in class_names if name not in known]
    if unknown:
        raise ValueError(
            f"teacher {teacher!r} labels ImageNet-1K classes, but {len(unknown)} class(es) are "
            f"not ImageNet WNIDs: {unknown[:10]}. Name the class folders by WNID (or give a "
            "class list with a wnid column), or train a teacher on the training images "
            "(--teacher resnet18).")


def imagenet_teacher(name: str, class_names: Sequence[str], checkpoint: str | None = None,
                     device: str = "cpu") -> Teacher:
    """A packaged ImageNet-1K classifier (``gridistill.models``) as the teacher of a dataset
    whose classes are ImageNet WNIDs; raises, naming them, for classes that are not."""
    from gridistill.distilled_sets import imagenet_wnids
    from gridistill.models import cached_model, load_imagenet_classifier

    wnids = imagenet_wnids()
    check_imagenet_classes(name, class_names)
    classifier = cached_model(load_imagenet_classifier, name, checkpoint, device=device)
    model = ImageNetSubsetTeacher(classifier, [wnids.index(c) for c in class_names])
    return Teacher(model.to(device).eval(), name, tuple(class_names), None, classifier.source)


def check_class_order(teacher_classes: Sequence[str], dataset_classes: Sequence[str]) -> None:
    """Raise :class:`ClassOrderMismatchError` unless both lists are identical, in order.

    A teacher trained with a different class order gives confidently wrong soft labels and a
    near-chance student with no error (RDED issues #9/#10), so this is checked up front.
    """
    teacher_classes, dataset_classes = list(teacher_classes), list(dataset_classes)
    if teacher_classes == dataset_classes:
        return
    if sorted(teacher_classes) == sorted(dataset_classes):
        moved = [f"{i}: teacher {t!r} vs dataset {d!r}"
                 for i, (t, d) in enumerate(zip(teacher_classes, dataset_classes, strict=True))
                 if t != d]
        raise ClassOrderMismatchError(
            "the teacher has the dataset's classes in a different order; first differences: "
            + "; ".join(moved[:3]) + ". Retrain the teacher or reorder its classifier rows."
        )
    only_teacher = sorted(set(teacher_classes) - set(dataset_classes))[:5]
    only_dataset = sorted(set(dataset_classes) - set(teacher_classes))[:5]
    raise ClassOrderMismatchError(
        f"the teacher's classes ({len(teacher_classes)}) are not the dataset's "
        f"({len(dataset_classes)}): only in the teacher {only_teacher}, "
        f"only in the dataset {only_dataset}"
    )


def save_teacher(teacher: Teacher, path: str | Path) -> None:
    """Save as safetensors (``.safetensors``, metadata in the header) or a plain torch dict."""
    path = Path(path)
    meta = {"architecture": teacher.architecture, "image_size": teacher.image_size,
            "class_names": list(teacher.class_names)}
    state = {k: v.detach().cpu().contiguous() for k, v in teacher.model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"gridistill_teacher": json.dumps(meta)})
    else:
        torch.save({**meta, "state_dict": state}, path)


def load_teacher(path: str | Path, dataset_classes: Sequence[str], device: str = "cpu") -> Teacher:
    """Load a teacher saved by :func:`save_teacher` and check its class order.

    Only safe formats are read: safetensors, or ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get("gridistill_teacher")
        if header is None:
            raise ValueError(f"{path} has no 'gridistill_teacher' metadata (class names, model)")
        meta, state = json.loads(header), load_file(str(path))
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"architecture", "image_size", "class_names", "state_dict"} - set(checkpoint)
        if missing:
            raise ValueError(f"{path} is not a gridistill teacher checkpoint: "
                             f"missing {sorted(missing)}")
        meta, state = checkpoint, checkpoint["state_dict"]
    check_class_order(meta["class_names"], dataset_classes)
    model = build_student(meta["architecture"], len(meta["class_names"]), int(meta["image_size"]))
    model.load_state_dict(state)
    model.to(device).eval()
    return Teacher(model, meta["architecture"], tuple(meta["class_names"]), int(meta["image_size"]))
