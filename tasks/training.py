"""Evaluation harness: train a student from scratch on a (distilled) set, test it on real images.

A distilled set is worth what a model trained on it scores on real test images. The recipe is
a preset of :mod:`gridistill.tasks.protocols`; the student one of
:mod:`gridistill.tasks.students`. The same loop trains a teacher on the real training images.

Everything here is plain torch: no workflow framework, no file layout. Images come in as uint8
(N, 3, H, W) tensors; training images may be grids larger than the student's input size.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gridistill.tasks.augment import cutmix_batch
from gridistill.tasks.protocols import Protocol, get_protocol, lr_factor
from gridistill.tasks.students import build_student
from gridistill.tasks.teachers import Teacher, check_class_order
from gridistill.tasks.transforms import (
    _Normalizer,
    build_train_transform,
    prepare_test_images,
    training_crop_size,
)


# -- losses --------------------------------------------------------------------------------
def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """RDED's loss: ``KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T))`` (no T^2 factor)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labels_b: torch.Tensor,
                        lam: float) -> torch.Tensor:
    """IDC's CutMix loss: ``lam * CE(y) + (1 - lam) * CE(y_b)``."""
    return lam * F.cross_entropy(logits, labels) + (1.0 - lam) * F.cross_entropy(logits, labels_b)


# -- training ------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """Everything a run resolved from the preset and the caller's explicit arguments."""

    protocol: str
    student: str
    image_size: int
    grid_size: int | None
    epochs: int
    batch_size: int
    lr: float
    ipc: int
    seed: int
    device: str
    eval_epochs: list[int] = field(default_factory=list)


def _make_optimizer(protocol: Protocol, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=protocol.momentum,
                               weight_decay=protocol.weight_decay)
    # RDED's get_parameters: weight decay only on weight matrices / conv kernels.
    decay = [p for n, p in model.named_parameters() if "weight" in n and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if not ("weight" in n and p.ndim > 1)]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), weight_decay=protocol.weight_decay)


def _eval_epochs(protocol: Protocol, epochs: int) -> list[int]:
    every = max(1, round(epochs * protocol.eval_every_fraction))
    start = protocol.eval_after_fraction * epochs
    picked = [e for e in range(every - 1, epochs, every) if e >= start]
    return sorted(set(picked) | {epochs - 1})


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def evaluate_top1(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 500) -> float:
    """Top-1 accuracy in percent on already resized uint8 images (on the model's device)."""
    device = images_u8.device
    normalize = _Normalizer(device)
    was_training = model.training
    model.eval()
    correct = 0
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for i in range(0, len(images_u8), batch_size):
        batch = normalize(images_u8[i:i + batch_size]).contiguous(memory_format=memory_format)
        with _autocast(device):
            logits = model(batch)
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(images_u8)


# torch's augmentations (and randperm, rand) draw from the process-wide generator. The flow
# evaluates several methods at once in threads of one process; their draws would interleave and
# a seeded run would not repeat. A seeded run therefore holds the generator for itself.
_PROCESS_RNG = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for this block alone: other threads' seeded blocks wait, and
    the generators' previous state is restored afterwards."""
    with _PROCESS_RNG, torch.random.fork_rng(
            devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class TrainingSet(ABC):
    """Training images, served in batches: ``batches(batch_size)`` is one epoch of (uint8
    (B, 3, H, W) images, (B,) labels) pairs, in an order drawn from torch's generator (so a
    seeded run repeats). A batch may be shorter than ``batch_size``; ``len()`` is the number of
    images an epoch serves at most."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class InMemoryImages(TrainingSet):
    """A training set held as one uint8 tensor (a distilled set: a few grids per class), served
    from wherever it lies (put it on the training device once, before training)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The order lives on the CPU so that indexing never waits for the device.
        order = torch.randperm(len(self.images))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size].to(self.images.device, non_blocking=True)
            yield self.images[idx], self.labels[idx.to(self.labels.device, non_blocking=True)]


def fit_student(
    model: nn.Module,
    train_set: TrainingSet,
    protocol: Protocol,
    settings: TrainSettings,
    teacher: Teacher | None = None,
    on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Train ``model`` in place; returns (per-epoch history, training images per second).

    Each epoch takes ``train_set.batches(settings.batch_size)``: an in-memory set (a distilled
    one) or a stream of files (the real training images); every batch moves to the device (a
    no-op for a set already there), is augmented per image, normalised, optionally CutMixed, and
    (``teacher`` given) labelled by one batched teacher forward pass on exactly the crops the
    student sees. ``on_epoch_end(epoch)`` may return extra history fields (the evaluation);
    its time is not counted as training time.
    """
    device = torch.device(settings.device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=memory_format).train()
    crop_size = training_crop_size(protocol, settings.image_size, teacher)
    transform = build_train_transform(protocol, crop_size, settings.grid_size)
    normalize = _Normalizer(device)
    optimizer = _make_optimizer(protocol, model, settings.lr)
    if (protocol.labels == "teacher") != (teacher is not None):
        raise ValueError(f"protocol {protocol.name!r} uses {protocol.labels} labels: a teacher "
                         "must be given exactly when the labels come from one")
    if teacher is not None:
        teacher.model.to(device, memory_format=memory_format).eval()

    history: list[dict[str, Any]] = []
    train_seconds, seen = 0.0, 0
    bar = tqdm(range(settings.epochs), desc=f"{protocol.name}/{settings.student}",
               disable=not progress, leave=False)
    for epoch in bar:
        factor = lr_factor(protocol, epoch, settings.epochs)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        start = time.perf_counter()
        loss_sum, batches = torch.zeros((), device=device), 0
        for images_u8, labels in train_set.batches(settings.batch_size):
            images_u8 = images_u8.to(device, non_blocking=True)
            batch_labels = labels.to(device, dtype=torch.long, non_blocking=True)
            batch = torch.stack([transform(image) for image in images_u8])
            batch = normalize(batch).contiguous(memory_format=memory_format)
            mixed = protocol.cutmix_beta > 0 and torch.rand(()).item() < protocol.cutmix_prob
            if mixed:
                batch, perm, lam = cutmix_batch(batch, protocol.cutmix_beta)
            student_batch = batch
            if crop_size != settings.image_size:
                student_batch = F.interpolate(batch, size=settings.image_size, mode="bilinear",
                                              antialias=True, align_corners=False)
            with _autocast(device):
                logits = model(student_batch)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher.model(batch)
                    loss = soft_label_kl(logits.float(), teacher_logits.float(),
                                         protocol.temperature)
                elif mixed:
                    loss = mixed_cross_entropy(logits.float(), batch_labels, batch_labels[perm],
                                               lam)
                else:
                    loss = F.cross_entropy(logits.float(), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()  # no .item() per step: it would sync with the device
            batches += 1
            seen += len(batch_labels)
        epoch_loss = loss_sum.item() / max(batches, 1)  # waits for the epoch's last step
        train_seconds += time.perf_counter() - start
        record: dict[str, Any] = {"epoch": epoch, "lr": settings.lr * factor, "loss": epoch_loss}
        if on_epoch_end is not None:
            record.update(on_epoch_end(epoch))
        history.append(record)
        bar.set_postfix({k: round(v, 3) for k, v in record.items() if k in ("loss", "top1")})
    return history, seen / max(train_seconds, 1e-9)


def train_and_evaluate(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    student: str | None = None,
    protocol: str = "cpu-small",
    grid_size: int | None = 4,
    image_size: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    ipc: int | None = None,
    teacher: Teacher | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train a fresh student on the (distilled) training set; report top-1 on the test set.

    Arguments left as None take the preset's value (``student``, ``image_size``, ``epochs`` and
    ``batch_size`` by IPC, the latter capped at the set size); explicit arguments always win
    (a ``batch_size`` larger than the set is an error). ``ipc`` defaults to
    ``len(train_images) // num_classes`` (a grid counts as one image). The ``rded`` protocol
    needs a ``teacher`` whose class names match ``class_names``.

    Returns ``top1_final`` and ``top1_best`` (percent; best over the evaluated epochs, which is
    what RDED reports), ``best_epoch``, ``epochs``, ``train_images_per_s``, ``history`` (one dict
    per epoch) and ``settings`` (everything resolved). Deterministic for a seed on CPU.
    """
    preset = get_protocol(protocol)
    if train_images.dtype != torch.uint8 or test_images.dtype != torch.uint8:
        raise TypeError("train_images and test_images must be uint8 (N, 3, H, W) tensors")
    if preset.labels == "teacher":
        if teacher is None:
            raise ValueError(f"protocol {protocol!r} needs a teacher: see load_teacher and "
                             "train_teacher")
        if class_names is None:
            raise ValueError("class_names is required to check the teacher's class order")
        check_class_order(teacher.class_names, class_names)
    elif teacher is not None:
        raise ValueError(f"protocol {protocol!r} trains on hard labels: it would ignore the "
                         "teacher; use a teacher-label protocol (rded) or drop the teacher")
    ipc = ipc if ipc is not None else max(1, len(train_images) // num_classes)
    student = student or preset.student
    image_size = image_size or preset.image_size
    epochs = epochs if epochs is not None else preset.epochs_for(ipc)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size is not None and batch_size > len(train_images):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_images)} training images")
    # The preset's batch is capped at the set size, as RDED's argument.py does.
    batch = batch_size if batch_size is not None else min(preset.batch_for(ipc), len(train_images))
    settings = TrainSettings(
        protocol=protocol, student=student, image_size=image_size, grid_size=grid_size,
        epochs=epochs, batch_size=batch, lr=preset.lr_for(student), ipc=ipc, seed=seed,
        device=device, eval_epochs=_eval_epochs(preset, epochs),
    )
    if teacher is not None and teacher.image_size not in (None, image_size):
        raise ValueError(f"teacher was trained at {teacher.image_size} px, student at {image_size}")

    dev = torch.device(device)
    with seeded(seed, dev):
        model = build_student(student, num_classes, image_size)
        test_u8 = prepare_test_images(test_images, image_size, preset.val_resize_ratio).to(dev)
        test_y = test_labels.to(dev, dtype=torch.long)
        eval_set = set(settings.eval_epochs)

        def evaluate(epoch: int) -> dict[str, float]:
            return {"top1": evaluate_top1(model, test_u8, test_y)} if epoch in eval_set else {}

        train_set = InMemoryImages(train_images.to(dev), train_labels.to(dev, dtype=torch.long))
        history, images_per_s = fit_student(model, train_set, preset, settings, teacher=teacher,
                                            on_epoch_end=evaluate, progress=progress)
    evaluated = [(h["top1"], h["epoch"]) for h in history if "top1" in h]
    best_top1, best_epoch = max(evaluated, key=lambda pair: (pair[0], -pair[1]))
    return {
        "top1_final": history[-1]["top1"],
        "top1_best": best_top1,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "train_images_per_s": images_per_s,
        "history": history,
        "settings": asdict(settings),
    }


def train_teacher(
    train_set: TrainingSet,
    class_names: Sequence[str],
    *,
    architecture: str = "resnet18",
    image_size: int = 224,
    protocol: str = "cpu-small",
    epochs: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Teacher:
    """Train a teacher on the real training split (``train_set``: in memory, or streamed
    from its files) with the same loop, hard labels.

    ``protocol`` supplies the optimiser, schedule and augmentation and must use hard labels;
    ``epochs`` and the batch size default to the protocol's values for a set of this many
    images per class. The class names are stored with the teacher (see :func:`save_teacher`).
    """
    preset = get_protocol(protocol)
    if preset.labels != "hard":
        raise ValueError(f"a teacher is trained with hard labels; {protocol!r} needs a "
                         "teacher itself")
    images_per_class = max(1, len(train_set) // len(class_names))
    settings = TrainSettings(
        protocol=protocol, student=architecture, image_size=image_size, grid_size=None,
        epochs=epochs if epochs is not None else preset.epochs_for(images_per_class),
        batch_size=min(preset.batch_for(images_per_class), len(train_set)),
        lr=preset.lr_for(architecture), ipc=images_per_class, seed=seed, device=device,
    )
    with seeded(seed, torch.device(device)):
        model = build_student(architecture, len(class_names), image_size)
        fit_student(model, train_set, preset, settings, progress=progress)
    return Teacher(model.eval(), architecture, tuple(class_names), image_size)


# -- reporting -----------------------------------------------------------------------------
def summarize_seeds(runs: Sequence[dict[str, Any]],
                    keys: Sequence[str] = ("top1_final", "top1_best")) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for one run) of each key over seed runs."""
    if not runs:
        raise ValueError("no runs to summarise")
    summary: dict[str, float] = {"n_seeds": float(len(runs))}
    for key in keys:
        values = [float(run[key]) for run in runs]
        summary[f"{key}_mean"] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def train_and_evaluate_seeds(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`train_and_evaluate` once per seed: ``{"runs": [...], **summarize_seeds(runs)}``."""
    runs = [train_and_evaluate(train_images, train_labels, test_images, test_labels, seed=seed,
                               **kwargs) for seed in seeds]
    return {"runs": runs, **summarize_seeds(runs)}
