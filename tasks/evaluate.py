"""Evaluation harness: train a student from scratch on a (distilled) set, test it on real images.

A distilled set is worth what a model trained on it scores on real test images. The training
recipes are the peers' public code, as named presets (:data:`PROTOCOLS`):

- ``rded``: RDED (Sun et al., CVPR 2024), ``LINs-lab/RDED`` ``validation/main.py``,
  ``validation/utils.py`` and ``argument.py``: teacher soft labels with KL at T=20 on CutMix
  batches, AdamW, a half-cosine LambdaLR stepped per epoch, Resize(8/7) + CenterCrop for tests.
- ``minimax``: Minimax diffusion (Gu et al., CVPR 2024), whose evaluation is IDC's
  (``snu-mllab/Efficient-Dataset-Condensation`` ``train.py``, ``argument.py``, ``data.py``):
  hard labels, SGD, MultiStepLR at [2E/3, 5E/6] with gamma 0.2, RRC(0.5-1) + flip +
  ColorJitter 0.4 + Lighting 0.1 + CutMix.
- ``cpu-small``: this repo's scaled-down protocol that finishes on a 2-core CPU.

Everything here is plain torch: no workflow framework, no file layout. Images come in as uint8
(N, 3, H, W) tensors; training images may be grids larger than the student's input size.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from gridistill.tasks.augment import GridAwareCrop, Lighting, cutmix_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STUDENTS: tuple[str, ...] = (
    "convnet_d3",
    "convnet_d4",
    "convnet_d5",
    "convnet_d6",
    "resnet18",
    "resnet18_lowres",
    "resnetap10",
    "mobilenetv2",
    "efficientnet_b0",
    "vit_tiny",
)


# -- students ------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """The dataset-distillation ConvNet (DC/DM/IDC/RDED): ``depth`` x [conv3x3, instance norm,
    ReLU, avgpool 2], then one linear layer on the flattened features.

    Instance norm is ``GroupNorm(width, width, affine=True)``, as in that literature.
    """

    def __init__(self, depth: int, num_classes: int, image_size: int, width: int = 128) -> None:
        super().__init__()
        feature_side = image_size // (2**depth)  # AvgPool2d floors, as DC's ConvNet does
        if feature_side < 1:
            raise ValueError(f"ConvNetD{depth} halves the resolution {depth} times: image_size "
                             f"must be at least {2**depth}, got {image_size}")
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * feature_side * feature_side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class _BasicBlockAP(nn.Module):
    """ResNet basic block whose stride-2 downsampling is a 2x2 average pool after the first conv
    (and in the shortcut), as in IDC's ``models/resnet_ap.py``."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(channels, channels)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, bias=False),
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.GroupNorm(channels, channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(F.relu(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetAP10(nn.Module):
    """ResNetAP-10 with instance norm: the IDC / Minimax evaluation model.

    Every conv has stride 1; resolution drops only by average pooling. The stem depends on the
    input size as in IDC: <= 64 px a 3x3 conv, <= 128 px a 3x3 conv + avgpool 2, larger a 7x7
    conv + avgpool 4. Four stages of one block each, widths 64-128-256-512.
    """

    def __init__(self, num_classes: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        if image_size <= 64:
            stem: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
            stem_pool: nn.Module = nn.Identity()
        elif image_size <= 128:
            stem = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
            stem_pool = nn.AvgPool2d(2)
        else:
            stem = [nn.Conv2d(3, width, 7, padding=3, bias=False)]
            stem_pool = nn.AvgPool2d(4)
        self.stem = nn.Sequential(*stem, nn.GroupNorm(width, width), nn.ReLU(inplace=True),
                                  stem_pool)
        widths = (width, width * 2, width * 4, width * 8)
        blocks, in_channels = [], width
        for i, channels in enumerate(widths):
            blocks.append(_BasicBlockAP(in_channels, channels, stride=1 if i == 0 else 2))
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # IDC's init: N(0, sqrt(2 / (k*k*out_channels))).
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_student(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A randomly initialised student network by name (one of :data:`STUDENTS`).

    ``resnet18_lowres`` is timm's ResNet-18 with a 3x3 stride-1 stem and no max-pool (RDED's
    ``resnet18_modified``), for inputs of 64 px or less. ``vit_tiny`` uses 16 px patches from
    64 px up and 4 px patches below.
    """
    import timm

    if name.startswith("convnet_d") and name[len("convnet_d"):].isdigit():
        return ConvNet(int(name[len("convnet_d"):]), num_classes, image_size)
    if name == "resnetap10":
        return ResNetAP10(num_classes, image_size)
    if name in ("resnet18", "resnet18_lowres"):
        model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
        if name == "resnet18_lowres":
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model
    if name == "mobilenetv2":
        return timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes)
    if name == "efficientnet_b0":
        return timm.create_model("efficientnet_b0", pretrained=False, num_classes=num_classes)
    if name == "vit_tiny":
        patch = 16 if image_size >= 64 else 4
        if image_size % patch:
            raise ValueError(f"vit_tiny needs image_size divisible by {patch}, got {image_size}")
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                                 img_size=image_size, patch_size=patch)
    raise ValueError(f"unknown student {name!r}; choose one of {', '.join(STUDENTS)}")


# -- protocols -----------------------------------------------------------------------------
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


# -- augmentation --------------------------------------------------------------------------
def build_train_transform(protocol: Protocol, image_size: int, grid_size: int | None) -> v2.Compose:
    """The per-image training transform: uint8 (3, H, W) in, float (3, S, S) in [0, 1] out.

    Grids (``grid_size`` given) get :class:`GridAwareCrop` (whose random branch uses the
    preset's crop scale), single images RandomResizedCrop + flip. Colour augmentations follow
    on floats; normalisation is done per batch by the caller.
    """
    if grid_size is not None:
        crop: list[v2.Transform] = [
            GridAwareCrop(grid_size, protocol.p_align, image_size, scale=protocol.crop_scale)
        ]
    else:
        crop = [v2.RandomResizedCrop(image_size, scale=protocol.crop_scale, antialias=True),
                v2.RandomHorizontalFlip()]
    steps: list[v2.Transform] = [*crop, v2.ToDtype(torch.float32, scale=True)]
    if protocol.color_jitter:
        cj = protocol.color_jitter
        steps.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    if protocol.lighting_std:
        steps.append(Lighting(protocol.lighting_std))
    return v2.Compose(steps)


def training_crop_size(protocol: Protocol, image_size: int, teacher: Teacher | None) -> int:
    """The side training crops are cut at: the student's, or the teacher's when the protocol
    has the teacher see each crop at a higher resolution (the student gets it resized)."""
    if teacher is not None and protocol.teacher_image_size and teacher.image_size is None:
        return max(image_size, protocol.teacher_image_size)
    return image_size


def working_resolution(protocol: Protocol, crop_size: int, grid_size: int | None) -> int:
    """The side training images can be downscaled to once, before training, with every crop
    window still at least ``crop_size`` px wide: a grid's cell, and the narrowest random crop
    (smallest scale and aspect ratio). Cropping from it costs a fraction of cropping from
    enhanced grids (4x the storage resolution), and the crops lose no detail."""
    narrowest = math.sqrt(protocol.crop_scale[0] * 3 / 4)  # RandomResizedCrop's ratio (3/4, 4/3)
    return math.ceil(crop_size * max(grid_size or 1, 1 / narrowest))


def prepare_test_images(images: torch.Tensor, image_size: int, resize_ratio: float,
                        chunk: int = 256) -> torch.Tensor:
    """Resize(short side = round(size * ratio)) + CenterCrop(size), once, kept as uint8.

    At 224 px and ratio 8/7 this is RDED's Resize(256) + CenterCrop(224).
    """
    resize_to = round(image_size * resize_ratio)
    transform = v2.Compose([v2.Resize(resize_to, antialias=True), v2.CenterCrop(image_size)])
    return torch.cat([transform(images[i:i + chunk]) for i in range(0, len(images), chunk)])


class _Normalizer:
    def __init__(self, device: torch.device) -> None:
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype == torch.uint8:
            batch = batch.float().div_(255.0)
        return (batch - self.mean) / self.std


# -- teacher -------------------------------------------------------------------------------
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
    source: str = "trained on the pool"  # where its weights came from


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
            "class list with a wnid column), or train a teacher on the pool "
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


def fit_student(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    protocol: Protocol,
    settings: TrainSettings,
    teacher: Teacher | None = None,
    on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Train ``model`` in place; returns (per-epoch history, training images per second).

    The small training set is moved to the device once; each batch is augmented per image,
    normalised, optionally CutMixed, and (``teacher`` given) labelled by one batched teacher
    forward pass on exactly the crops the student sees. ``on_epoch_end(epoch)`` may return
    extra history fields (the evaluation); its time is not counted as training time.
    """
    device = torch.device(settings.device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=memory_format).train()
    images_u8 = train_images.to(device)
    labels = train_labels.to(device=device, dtype=torch.long)
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
        # The order lives on the CPU so that indexing never waits for the device.
        order = torch.randperm(len(images_u8))
        loss_sum, batches = torch.zeros((), device=device), 0
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            batch = torch.stack([transform(images_u8[j]) for j in idx.tolist()])
            batch = normalize(batch).contiguous(memory_format=memory_format)
            batch_labels = labels[idx.to(device, non_blocking=True)]
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
            seen += len(idx)
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

        history, images_per_s = fit_student(model, train_images, train_labels, preset, settings,
                                            teacher=teacher, on_epoch_end=evaluate,
                                            progress=progress)
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
    images: torch.Tensor,
    labels: torch.Tensor,
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
    """Train a teacher on the real training split with the same loop, hard labels.

    ``protocol`` supplies the optimiser, schedule and augmentation and must use hard labels;
    ``epochs`` and the batch size default to the protocol's values for a set of this many
    images per class. The class names are stored with the teacher (see :func:`save_teacher`).
    """
    preset = get_protocol(protocol)
    if preset.labels != "hard":
        raise ValueError(f"a teacher is trained with hard labels; {protocol!r} needs a "
                         "teacher itself")
    images_per_class = max(1, len(images) // len(class_names))
    settings = TrainSettings(
        protocol=protocol, student=architecture, image_size=image_size, grid_size=None,
        epochs=epochs if epochs is not None else preset.epochs_for(images_per_class),
        batch_size=min(preset.batch_for(images_per_class), len(images)),
        lr=preset.lr_for(architecture), ipc=images_per_class, seed=seed, device=device,
    )
    with seeded(seed, torch.device(device)):
        model = build_student(architecture, len(class_names), image_size)
        fit_student(model, images, labels, preset, settings, progress=progress)
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


# -- speed ---------------------------------------------------------------------------------
def bare_loop_images_per_s(
    student: str,
    num_classes: int,
    image_size: int,
    batch_size: int,
    steps: int,
    *,
    protocol: str = "cpu-small",
    device: str = "cpu",
    seed: int = 0,
) -> float:
    """Training images/s of a bare PyTorch loop (same model and optimiser, preloaded random
    normalised batches, no augmentation, no bookkeeping): the yardstick for the harness."""
    preset = get_protocol(protocol)
    dev = torch.device(device)
    # Same memory format and autocast as the harness, so only the harness's own work differs.
    memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    with seeded(seed, dev):
        model = build_student(student, num_classes, image_size)
        inputs = torch.randn(batch_size, 3, image_size, image_size, device=dev)
        targets = torch.randint(num_classes, (batch_size,), device=dev)
    model.to(dev, memory_format=memory_format).train()
    optimizer = _make_optimizer(preset, model, preset.lr_for(student))
    inputs = inputs.contiguous(memory_format=memory_format)
    start = time.perf_counter()
    for _ in range(steps):
        with _autocast(dev):
            loss = F.cross_entropy(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return steps * batch_size / (time.perf_counter() - start)


def harness_overhead(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    num_classes: int,
    student: str = "convnet_d3",
    protocol: str = "cpu-small",
    grid_size: int | None = 4,
    image_size: int = 64,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, float]:
    """Harness vs bare-loop training images/s on the same model and batch size.

    One harness epoch and a bare loop of as many steps alternate ``repeats`` times and the best
    of each is kept, so that load from other processes on a shared machine does not land on
    one side only. Hard labels; ``overhead_pct`` = bare / harness - 1, in percent.
    """
    preset = replace(get_protocol(protocol), labels="hard")
    batch = min(preset.batch_for(10**6), len(train_images))
    settings = TrainSettings(protocol=protocol, student=student, image_size=image_size,
                             grid_size=grid_size, epochs=1, batch_size=batch,
                             lr=preset.lr_for(student), ipc=1, seed=0, device=device)
    steps = math.ceil(len(train_images) / batch)
    harness, bare = [], []
    for repeat in range(repeats):
        with seeded(repeat, torch.device(device)):
            model = build_student(student, num_classes, image_size)
            harness.append(fit_student(model, train_images, train_labels, preset, settings,
                                       progress=False)[1])
        bare.append(bare_loop_images_per_s(student, num_classes, image_size, batch, steps,
                                           protocol=protocol, device=device, seed=repeat))
    best_harness, best_bare = max(harness), max(bare)
    return {"harness_images_per_s": best_harness, "bare_images_per_s": best_bare,
            "overhead_pct": 100.0 * (best_bare / best_harness - 1.0)}


# -- Prefect tasks (wiring owned by the flow; algorithms stay above this line) ---------------
import functools  # noqa: E402
import tempfile  # noqa: E402

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from gridistill.stages import ArtifactRef, NotInKey, stage_logger, stage_task  # noqa: E402
from gridistill.storage import RunStore  # noqa: E402


def _class_names(dataset: ArtifactRef) -> list[str]:
    return [name for name, _, _ in dataset.meta["classes"]]


def _to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8 of same-sized images."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])
                            ).permute(0, 3, 1, 2).contiguous()


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
        class_names=_class_names(dataset) if teacher else None, device=params.device,
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
