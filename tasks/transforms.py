"""Image transforms around training: the per-image training augmentation, the crop side and
working resolution it needs, the test-time resize + centre crop, and batch normalisation.

Images are uint8 (N, 3, H, W) tensors; training images may be grids larger than the student's
input size. Plain torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

from gridistill.tasks.augment import GridAwareCrop, Lighting
from gridistill.tasks.protocols import Protocol

if TYPE_CHECKING:
    from gridistill.tasks.teachers import Teacher

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
