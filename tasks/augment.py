"""Training-time augmentation for distilled sets: grid-aware cropping, Lighting and CutMix.

Grid-aware cropping is from Grid Distillation (CVPR 2026, Sec. "Grid-aware Cropping"): a grid
image of L x L cells is cropped with probability ``p_align`` on cell boundaries (so a crop keeps
whole cells, i.e. whole source images) and otherwise by an ordinary random resized crop (so the
student also sees the perturbations it would see on real data).

Randomness: :class:`GridAwareCrop` and the ``sample_*`` functions draw from an explicit
``torch.Generator`` when given one; they, :class:`Lighting` and :func:`cutmix_batch` use torch's
global generator otherwise, so ``torch.manual_seed`` makes a training run repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# ImageNet RGB PCA, as used by the Lighting augmentation of IDC / Minimax (originally from
# fb.resnet.torch). Eigenvalues are for pixel values in [0, 1].
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


@dataclass(frozen=True)
class CropBox:
    """A crop window in pixels; ``aligned`` says whether it was an on-grid (cell-aligned) crop."""

    top: int
    left: int
    height: int
    width: int
    aligned: bool


def cell_edges(length: int, cells: int) -> list[int]:
    """Pixel offsets of the ``cells + 1`` cell boundaries along a side of ``length`` pixels.

    ``i * length // cells`` so that sides not divisible by ``cells`` still tile exactly (cells
    differ by at most one pixel) and the last edge is the image border.
    """
    if cells < 1:
        raise ValueError(f"a grid needs at least one cell per side, got {cells}")
    if length < cells:
        raise ValueError(f"a side of {length} px cannot hold {cells} cells")
    return [i * length // cells for i in range(cells + 1)]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high_exclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high_exclusive, (), generator=generator).item())


def sample_random_resized_box(
    h: int,
    w: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> CropBox:
    """torchvision's RandomResizedCrop window (10 tries, then a central crop), seedable."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= w and 0 < crop_h <= h:
            top = _randint(h - crop_h + 1, generator)
            left = _randint(w - crop_w + 1, generator)
            return CropBox(top, left, crop_h, crop_w, aligned=False)
    in_ratio = w / h
    if in_ratio < min(ratio):
        crop_w, crop_h = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = h, int(round(h * max(ratio)))
    else:
        crop_w, crop_h = w, h
    return CropBox((h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w, aligned=False)


def sample_aligned_box(h: int, w: int, L: int, generator: torch.Generator | None = None) -> CropBox:
    """A window of k x k cells (1 <= k <= L) whose corners lie on cell boundaries.

    Every such window is equally likely, so k is drawn with weight (L - k + 1)^2, the number of
    k x k windows: for L = 4, 16 of the 30 windows (53 %) are single cells, i.e. single source
    images like the test images, and 1 of 30 is the whole grid. The window has as many cells
    on both sides so that the square resize keeps the cells' aspect ratio.
    """
    rows, cols = cell_edges(h, L), cell_edges(w, L)
    window = _randint(sum((L - k + 1) ** 2 for k in range(1, L + 1)), generator)
    k = 1
    while window >= (L - k + 1) ** 2:
        window -= (L - k + 1) ** 2
        k += 1
    r, c = divmod(window, L - k + 1)
    return CropBox(rows[r], cols[c], rows[r + k] - rows[r], cols[c + k] - cols[c], aligned=True)


def sample_crop_box(
    h: int,
    w: int,
    L: int,
    p_align: float = 0.6,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """The grid-aware crop window for an h x w grid of L x L cells.

    With probability ``p_align`` a cell-aligned window (:func:`sample_aligned_box`), otherwise a
    random resized crop window (:func:`sample_random_resized_box`).
    """
    if not 0.0 <= p_align <= 1.0:
        raise ValueError(f"p_align must be a probability, got {p_align}")
    if torch.rand((), generator=generator).item() < p_align:
        return sample_aligned_box(h, w, L, generator)
    return sample_random_resized_box(h, w, scale, ratio, generator)


class GridAwareCrop(v2.Transform):
    """Grid-aware crop, resize to ``size`` x ``size``, then a random horizontal flip.

    Works on (..., C, H, W) tensors, ``tv_tensors.Image`` and PIL images, inside ``v2.Compose``.
    ``last_box`` holds the window of the most recent call (for tests and debugging).
    """

    def __init__(
        self,
        L: int,
        p_align: float = 0.6,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        antialias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if L < 1:
            raise ValueError(f"L must be >= 1, got {L}")
        if not 0.0 <= p_align <= 1.0:
            raise ValueError(f"p_align must be a probability, got {p_align}")
        self.L, self.p_align, self.size = L, p_align, size
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), flip_p
        self.antialias = antialias
        self.generator = generator
        self.last_box: CropBox | None = None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        box = sample_crop_box(h, w, self.L, self.p_align, self.generator, self.scale, self.ratio)
        self.last_box = box
        flip = torch.rand((), generator=self.generator).item() < self.flip_p
        return {"box": box, "flip": flip}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        box: CropBox = params["box"]
        out = self._call_kernel(
            F.resized_crop, inpt, box.top, box.left, box.height, box.width,
            size=[self.size, self.size], antialias=self.antialias,
        )
        if params["flip"]:
            out = self._call_kernel(F.horizontal_flip, out)
        return out

    def extra_repr(self) -> str:
        return f"L={self.L}, p_align={self.p_align}, size={self.size}, scale={self.scale}"


class Lighting(v2.Transform):
    """AlexNet-style PCA lighting noise on a float (C, H, W) image in [0, 1] (IDC / Minimax).

    Adds ``eigvec @ (alpha * eigval)`` to every pixel, alpha ~ N(0, alphastd) per image.
    Placed after the dtype conversion and before normalisation, as in IDC's ``transform_imagenet``.
    """

    _transformed_types = (torch.Tensor,)

    def __init__(
        self,
        alphastd: float = 0.1,
        eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC,
    ) -> None:
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"alpha": torch.randn(3) * self.alphastd}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if self.alphastd == 0:
            return inpt
        if not inpt.is_floating_point():
            raise TypeError("Lighting expects a float image in [0, 1]: put ToDtype(scale=True) "
                            "before it")
        alpha = params["alpha"].to(inpt.device)
        rgb = self.eigvec.to(inpt.device) @ (alpha * self.eigval.to(inpt.device))
        return inpt + rgb.to(inpt.dtype).view(3, 1, 1)


def cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """CutMix's box (Yun et al. 2019): area ratio ``1 - lam``, centre uniform, clipped to the image.

    Returns (top, bottom, left, right).
    """
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = _randint(h, None), _randint(w, None)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return top, bottom, left, right


def cutmix_batch(
    images: torch.Tensor, beta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste a box from a permuted copy of the batch into each image (global torch RNG).

    Returns (mixed images, permutation, lam) where ``lam`` is the area share of the original
    image after clipping, so a hard-label loss is ``lam * CE(y) + (1 - lam) * CE(y[perm])``.
    """
    lam = float(torch.distributions.Beta(beta, beta).sample().item())
    n, _, h, w = images.shape
    perm = torch.randperm(n).to(images.device)
    top, bottom, left, right = cutmix_box(h, w, lam)
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    return mixed, perm, lam
