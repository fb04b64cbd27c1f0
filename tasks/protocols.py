"""Training recipes, as named presets (:data:`PROTOCOLS`), from the peers' public code:


- ``rded``: RDED (Sun et al., CVPR 2024), ``LINs-lab/RDED`` ``validation/main.py``,
  ``validation/utils.py`` and ``argument.py``: teacher soft labels with KL at T=20 on CutMix
  batches, AdamW, a half-cosine LambdaLR stepped per epoch, Resize(8/7) + CenterCrop for tests.
- ``minimax``: Minimax diffusion (Gu et al., CVPR 2024), whose evaluation is IDC's
  (``snu-mllab/Efficient-Dataset-Condensation`` ``train.py``, ``argument.py``, ``data.py``):
  hard labels, SGD, MultiStepLR at [2E/3, 5E/6] with gamma 0.2, RRC(0.5-1) + flip +
  ColorJitter 0.4 + Lighting 0.1 + CutMix.
- ``cpu-small``: this repo's scaled-down protocol that finishes on a 2-core CPU.

A :class:`Protocol` fixes the labels, optimiser, lr schedule (:func:`lr_factor`), augmentation
and test-time resize; epochs and batch size come from per-IPC tables. Plain Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class Protocol:
    """One training recipe. Per-IPC tables are ((max_ipc, value), ...) in increasing max_ipc."""

    name: str
    labels: Literal["hard", "teacher"]
    optimizer: Literal["sgd", "adamw"]
    lr: float
    weight_decay: float
    momentum: float
    schedule: Literal["rded_half_cosine", "multistep", "cosine"]
    epochs_by_ipc: tuple[tuple[int, int], ...]
    batch_by_ipc: tuple[tuple[int, int], ...]
    image_size: int
    student: str
    crop_scale: tuple[float, float]
    milestones: tuple[tuple[int, int], ...] = ()  # (n, d): milestone at n * E // d (multistep)
    gamma: float = 1.0
    temperature: float = 1.0
    color_jitter: float = 0.0
    lighting_std: float = 0.0
    cutmix_beta: float = 0.0  # 0 disables CutMix
    cutmix_prob: float = 0.0
    val_resize_ratio: float = 1.0  # test: Resize(size * ratio) + CenterCrop(size)
    eval_every_fraction: float = 0.1  # evaluate every max(1, round(E * f)) epochs ...
    eval_after_fraction: float = 0.0  # ... once past this fraction of E (the last epoch always)
    lr_by_student: tuple[tuple[str, float], ...] = ()  # per-student lr, as RDED's argument.py
    p_align: float = 0.6
    # Soft labels: the teacher sees each training crop at this resolution, cut from the stored
    # image, and the student a downsample of that same crop (None: both at the student's).
    teacher_image_size: int | None = None

    def epochs_for(self, ipc: int) -> int:
        return _lookup(self.epochs_by_ipc, ipc, f"{self.name} epochs")

    def batch_for(self, ipc: int) -> int:
        return _lookup(self.batch_by_ipc, ipc, f"{self.name} batch size")

    def lr_for(self, student: str) -> float:
        return dict(self.lr_by_student).get(student, self.lr)


def _lookup(table: tuple[tuple[int, int], ...], ipc: int, what: str) -> int:
    for max_ipc, value in table:
        if ipc <= max_ipc:
            return value
    raise ValueError(f"no {what} for IPC {ipc} (table: {table}); pass it explicitly")


PROTOCOLS: dict[str, Protocol] = {
    "rded": Protocol(
        name="rded",
        labels="teacher",
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.01,
        momentum=0.0,
        schedule="rded_half_cosine",
        epochs_by_ipc=((10**9, 300),),
        # argument.py: 10 at IPC 1, 50 at IPC 10, 100 at IPC 50 (10 classes); capped at the
        # set size by train_and_evaluate.
        batch_by_ipc=((1, 10), (10, 50), (10**9, 100)),
        image_size=224,
        student="resnet18",
        # validation/main.py: RandomResizedCrop(scale=(1/factor, 1)) with the default factor 2.
        crop_scale=(0.5, 1.0),
        temperature=20.0,
        cutmix_beta=1.0,
        cutmix_prob=1.0,
        val_resize_ratio=8 / 7,
        eval_every_fraction=10 / 300,
        eval_after_fraction=0.8,
        # argument.py's per-student AdamW lr; vit_tiny takes its vit_b_16 value (RDED has no
        # ViT-Tiny).
        lr_by_student=(("efficientnet_b0", 2e-3), ("mobilenetv2", 2.5e-3), ("vit_tiny", 1e-4)),
    ),
    "minimax": Protocol(
        name="minimax",
        labels="hard",
        optimizer="sgd",
        lr=0.01,
        weight_decay=5e-4,
        momentum=0.9,
        schedule="multistep",
        # argument.py ipc_epoch(): IPC 1 -> 3000, <= 10 -> 2000, <= 50 -> 1500, ... (10 classes)
        epochs_by_ipc=((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500), (10**9, 300)),
        batch_by_ipc=((10**9, 64),),
        image_size=224,  # Minimax's argument.py default --size (its validation command keeps it)
        student="resnetap10",
        crop_scale=(0.5, 1.0),
        milestones=((2, 3), (5, 6)),
        gamma=0.2,
        color_jitter=0.4,
        lighting_std=0.1,
        cutmix_beta=1.0,
        cutmix_prob=1.0,  # IDC argument.py: mix_p defaults to 1.0 for ImageNet subsets
        val_resize_ratio=1.0,
        eval_every_fraction=0.01,
    ),
    "cpu-small": Protocol(
        name="cpu-small",
        labels="hard",
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.01,
        momentum=0.0,
        schedule="cosine",
        # Far longer than the first budgets (30 epochs at IPC 10 moved by 2-9 points per
        # doubling), and still short of convergence (benchmarks/distill_imagenette.md); IPC 1
        # stops at 300 so that the demo (3 sets x 3 seeds) stays under 5 min on 2 cores.
        epochs_by_ipc=((1, 300), (10, 240), (10**9, 60)),
        batch_by_ipc=((10**9, 16),),
        image_size=32,
        student="convnet_d3",
        crop_scale=(0.08, 1.0),  # torchvision's RandomResizedCrop default
        val_resize_ratio=8 / 7,
        eval_every_fraction=0.5,  # test midway and at the end
    ),
}
# cpu-small with RDED's labelling: the teacher's soft labels (KL) on every training crop. The
# packaged ImageNet teacher scores ~64 % on 64 px ImageNette photos and ~92 % at 128 px, so it
# looks at each crop at 128 px while the student learns from it at its own size. No CutMix and
# T = 1: at this CPU budget CutMix halved the student's accuracy and T = 4 cost 2 points
# (benchmarks/distill_imagenette.md).
PROTOCOLS["cpu-soft"] = replace(
    PROTOCOLS["cpu-small"], name="cpu-soft", labels="teacher", temperature=1.0,
    teacher_image_size=128)


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        known = ", ".join(PROTOCOLS)
        raise ValueError(f"unknown protocol {name!r}; choose one of {known}") from None


def lr_factor(protocol: Protocol, epoch: int, epochs: int) -> float:
    """Multiplier of the base lr during 0-based ``epoch`` of ``epochs`` (stepped per epoch).

    - ``rded_half_cosine``: RDED's LambdaLR ``0.5 * (1 + cos(pi * e / E / 2))``: 1 -> 0.5.
    - ``multistep``: IDC's MultiStepLR, x gamma at epochs 2E//3 and 5E//6 (integer division).
    - ``cosine``: ``0.5 * (1 + cos(pi * e / E))``: 1 -> 0.
    """
    if protocol.schedule == "rded_half_cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs / 2)) if epoch <= epochs else 0.0
    if protocol.schedule == "multistep":
        milestones = [n * epochs // d for n, d in protocol.milestones]
        return protocol.gamma ** sum(epoch >= m for m in milestones)
    if protocol.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown schedule {protocol.schedule!r}")
