"""Readers for distilled sets from any code base, and their class → ImageNet-1K mapping.

Every reader returns a :class:`DistilledSet`: float images in [0, 1] and one class index per
image. Formats: an ImageFolder, a gridistill run root, MTT/DATM tensors (``images_*.pt`` +
``labels_*.pt``) and ``.npz`` arrays. Tensors are loaded with ``torch.load(weights_only=True)``
and arrays with ``allow_pickle=False``: a distilled set from elsewhere is data, never code.

Tensor sets are usually stored mean/std-normalised (MTT, DATM, DC/DM code all normalise with
the dataset's statistics), so their readers need the normalisation spelled out; nothing is
guessed.
"""

from __future__ import annotations

import csv
import logging
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# Per-channel (mean, std) that dataset-distillation code bases normalise with (MTT's
# `utils.get_dataset`): ImageNet subsets and Tiny ImageNet use the ImageNet statistics.
# Normalization names its keys (for typed parameters); tests check they stay equal.
Normalization = Literal["imagenet", "cifar10", "cifar100", "none"]
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "none": None,  # already in [0, 1]
}

# ImageNet-1K indices of the 10-class subsets, in the class order of the MTT / GLaD / DATM
# `utils.Config` lists: tensor sets from those code bases use class i = list[i]. ImageWoof's
# order there is NOT the sorted-WNID order an ImageFolder of ImageWoof would have.
SubsetPreset = Literal["imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk",
                       "imageyellow", "imagenet-1k"]  # the keys below
SUBSET_PRESETS: dict[str, tuple[int, ...]] = {
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    "imagefruit": (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
    "imagemeow": (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    "imagesquawk": (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    "imageyellow": (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
    "imagenet-1k": tuple(range(1000)),
}

WNID_PATTERN = re.compile(r"^n\d{8}$")


class DistilledSetError(ValueError):
    """The input set or its class mapping cannot be read as given (the message says why)."""


@dataclass
class DistilledSet:
    images: torch.Tensor  # float32 (N, 3, H, W) in [0, 1]
    class_indices: torch.Tensor  # long (N,), 0..num_classes-1
    class_names: list[str] | None  # class index -> name (ImageFolder folder names), if known
    source: str

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.class_indices.max()) + 1 if len(self.class_indices) else 0


# -- pixel conversions -----------------------------------------------------------------------
def denormalize(images: torch.Tensor, normalization: str | None) -> torch.Tensor:
    """Undo mean/std normalisation by preset name and clamp to [0, 1].

    ``None`` means the caller did not say, which is an error for float tensors: a wrong guess
    would shift every colour silently.
    """
    if normalization is None:
        raise DistilledSetError(
            "tensor sets are usually mean/std-normalised; say how this one is: normalization="
            f"{sorted(NORMALIZATIONS)} ('none' = already in [0, 1]). ZCA-whitened sets (MTT "
            "--zca) cannot be inverted without their ZCA matrix and are not supported.")
    if normalization not in NORMALIZATIONS:
        raise DistilledSetError(
            f"unknown normalization {normalization!r}; choose from {sorted(NORMALIZATIONS)}")
    images = images.float()
    stats = NORMALIZATIONS[normalization]
    if stats is not None:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
        images = images * std + mean
    low, high = float(images.min()), float(images.max())
    # Distilled pixels overshoot [0, 1] a little; far outside means a wrong normalisation.
    if low < -0.5 or high > 1.5:
        logger.warning("after normalization=%r the pixels span [%.2f, %.2f], far outside "
                       "[0, 1]: is the normalisation right?", normalization, low, high)
    return images.clamp(0.0, 1.0)


def _hard_labels(labels: torch.Tensor, what: str) -> torch.Tensor:
    """Class indices from hard labels (N,) or soft labels/logits (N, C) (DATM, SRe2L)."""
    if labels.ndim == 2 and labels.is_floating_point():
        logger.info("%s holds soft labels %s: using their argmax as the class", what,
                    tuple(labels.shape))
        labels = labels.argmax(dim=1)
    if labels.ndim != 1 or (labels.is_floating_point()
                            and not torch.equal(labels, labels.round())):
        raise DistilledSetError(f"{what}: expected (N,) class indices or (N, C) soft labels, "
                                f"got {labels.dtype} {tuple(labels.shape)}")
    return labels.long()


def _check_pairs(images: torch.Tensor, labels: torch.Tensor, source: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DistilledSetError(f"{source}: expected RGB images (N, 3, H, W), "
                                f"got {tuple(images.shape)}")
    if len(images) != len(labels):
        raise DistilledSetError(f"{source}: {len(images)} images but {len(labels)} labels")


# -- readers ---------------------------------------------------------------------------------
def read_image_folder(root: str | Path) -> DistilledSet:
    """``root/<class>/<image>``; classes in sorted folder-name order (torchvision's ImageFolder).

    All images must share one size (refinement resizes them back to it).
    """
    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    pixels, labels, sizes = [], [], set()
    for class_index, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
            sizes.add(array.shape[:2])
            pixels.append(array)
            labels.append(class_index)
    if not pixels:
        raise DistilledSetError(f"{root}: no images found in <class>/<image> sub-folders")
    if len(sizes) > 1:
        raise DistilledSetError(f"{root}: images have different sizes {sorted(sizes)}; "
                                "resize them to one size first")
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    return DistilledSet(images=images, class_indices=torch.tensor(labels),
                        class_names=[p.name for p in class_dirs], source=str(root))


def read_run_root(root: str | Path, method: str | None = None) -> DistilledSet:
    """The distilled set (the grids at storage resolution) of a gridistill run root.

    The run's report writes ``distilled/<method>.parquet`` (class_name, label, file) for each
    selection method; ``method`` picks one and may be left out when the run has only one.
    """
    import pandas as pd

    root = Path(root)
    indexes = {p.stem: p for p in sorted((root / "distilled").glob("*.parquet"))}
    if not indexes:
        raise DistilledSetError(f"{root}: no distilled/<method>.parquet: not a finished run root")
    if method is None and len(indexes) > 1:
        raise DistilledSetError(f"{root} holds several distilled sets; pick one with --method: "
                                f"{sorted(indexes)}")
    chosen = method or next(iter(indexes))
    if chosen not in indexes:
        raise DistilledSetError(f"{root}: no distilled set {chosen!r}; have {sorted(indexes)}")
    index = pd.read_parquet(indexes[chosen])
    pixels = []
    for file in index["file"]:
        with Image.open(root / file) as image:
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    names = index.drop_duplicates("label").sort_values("label")["class_name"].tolist()
    labels = index["label"].map({label: i for i, label in enumerate(sorted(set(index["label"])))})
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    return DistilledSet(images=images, class_indices=torch.tensor(labels.to_numpy()),
                        class_names=names, source=f"{root} ({chosen})")


def _matching_labels_file(images_path: Path) -> Path:
    """``images_best.pt`` → ``labels_best.pt`` (MTT/DATM save them side by side)."""
    if not images_path.name.startswith("images_"):
        raise DistilledSetError(f"{images_path}: expected an MTT/DATM file named images_*.pt; "
                                "pass the labels file explicitly")
    return images_path.with_name("labels_" + images_path.name[len("images_"):])


def _pick_images_file(directory: Path) -> Path:
    candidates = sorted(directory.glob("images_*.pt"))
    best = directory / "images_best.pt"
    if best.is_file():
        return best
    if len(candidates) == 1:
        return candidates[0]
    raise DistilledSetError(f"{directory}: {len(candidates)} images_*.pt files and no "
                            f"images_best.pt; pass one file: {[p.name for p in candidates]}")


def read_mtt_tensors(path: str | Path, *, normalization: str | None,
                     labels_path: str | Path | None = None) -> DistilledSet:
    """MTT/DATM tensors: ``images_<tag>.pt`` (N, 3, H, W) and ``labels_<tag>.pt``.

    ``path`` is an images file or a directory (``images_best.pt`` or its only ``images_*.pt``).
    Loaded with ``torch.load(weights_only=True)`` only. ``normalization`` names the mean/std
    the images were normalised with (:data:`NORMALIZATIONS`); it is required.
    """
    path = Path(path)
    images_path = _pick_images_file(path) if path.is_dir() else path
    labels_path = Path(labels_path) if labels_path else _matching_labels_file(images_path)
    for required in (images_path, labels_path):
        if not required.is_file():
            raise DistilledSetError(f"{required}: no such file")
    images = torch.load(images_path, map_location="cpu", weights_only=True)
    labels = torch.load(labels_path, map_location="cpu", weights_only=True)
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
        raise DistilledSetError(f"{images_path}, {labels_path}: expected one tensor per file")
    labels = _hard_labels(labels.detach(), str(labels_path))
    _check_pairs(images, labels, str(images_path))
    return DistilledSet(images=denormalize(images.detach(), normalization), class_indices=labels,
                        class_names=None, source=str(images_path))


NPZ_IMAGE_KEYS = ("images", "x", "data", "image_syn", "x_syn")
NPZ_LABEL_KEYS = ("labels", "y", "targets", "label_syn", "y_syn")


def _npz_key(archive: np.lib.npyio.NpzFile, given: str | None, candidates: Sequence[str],
             path: Path) -> str:
    keys = [given] if given is not None else candidates
    for key in keys:
        if key in archive.files:
            return key
    raise DistilledSetError(f"{path}: none of {list(keys)} among its arrays {archive.files}; "
                            "name the key explicitly")


def read_npz(path: str | Path, *, normalization: str | None, images_key: str | None = None,
             labels_key: str | None = None) -> DistilledSet:
    """An ``.npz`` with images (N, 3, H, W) or (N, H, W, 3) and labels (N,) or (N, C).

    uint8 images are raw pixels (``normalization`` must be None or ``'none'``); float images
    need their ``normalization`` named, as for :func:`read_mtt_tensors`.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as archive:
        images = archive[_npz_key(archive, images_key, NPZ_IMAGE_KEYS, path)]
        labels = archive[_npz_key(archive, labels_key, NPZ_LABEL_KEYS, path)]
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.transpose(0, 3, 1, 2)  # NHWC (as most numpy image code writes) → NCHW
    if images.dtype == np.uint8:
        if normalization not in (None, "none"):
            raise DistilledSetError(f"{path}: uint8 images are raw pixels; "
                                    f"normalization={normalization!r} does not apply")
        pixels = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    else:
        pixels = denormalize(torch.from_numpy(np.ascontiguousarray(images)), normalization)
    label_tensor = _hard_labels(torch.from_numpy(np.asarray(labels)), str(path))
    _check_pairs(pixels, label_tensor, str(path))
    return DistilledSet(images=pixels, class_indices=label_tensor, class_names=None,
                        source=str(path))


InputKind = Literal["auto", "image-folder", "run-root", "mtt", "npz"]
INPUT_KINDS: tuple[InputKind, ...] = typing.get_args(InputKind)


def detect_kind(path: str | Path) -> str:
    """The reader for ``path``: npz file, MTT file/directory, run root (has distilled/),
    folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "npz"
        if path.suffix == ".pt":
            return "mtt"
        raise DistilledSetError(f"{path}: a file input must be .npz or an MTT images_*.pt")
    if not path.is_dir():
        raise DistilledSetError(f"{path}: no such file or directory")
    if any(path.glob("images_*.pt")):
        return "mtt"
    if (path / "distilled").is_dir():
        return "run-root"
    return "image-folder"


def read_distilled_set(path: str | Path, *, kind: str = "auto", normalization: str | None = None,
                       labels_path: str | Path | None = None,
                       method: str | None = None) -> DistilledSet:
    """Read any supported distilled set (see :data:`INPUT_KINDS` and :func:`detect_kind`)."""
    if kind not in INPUT_KINDS:
        raise DistilledSetError(f"unknown input kind {kind!r}; choose from {INPUT_KINDS}")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "npz":
        return read_npz(path, normalization=normalization)
    if kind == "mtt":
        return read_mtt_tensors(path, normalization=normalization, labels_path=labels_path)
    if kind == "run-root":
        return read_run_root(path, method)
    return read_image_folder(path)


# -- class index → ImageNet-1K label --------------------------------------------------------
def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K WNIDs in sorted order: position = the 0..999 class index that
    ImageNet-1K models (DiT included) use. timm ships the list."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def read_wnid_list(path: str | Path) -> list[str]:
    """One WNID per line (line i = class i), or a CSV with a ``wnid`` column in class order."""
    path = Path(path)
    if not path.is_file():
        raise DistilledSetError(f"{path}: no such WNID list file")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "wnid" not in rows[0]:
            raise DistilledSetError(f"{path}: a CSV class list needs a 'wnid' column")
        wnids = [row["wnid"].strip() for row in rows]
    else:
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [w for w in wnids if not WNID_PATTERN.match(w)]
    if bad:
        raise DistilledSetError(f"{path}: not WNIDs (nXXXXXXXX): {bad[:5]}")
    return wnids


def preset_wnids(preset: str) -> list[str]:
    if preset not in SUBSET_PRESETS:
        raise DistilledSetError(f"unknown class preset {preset!r}; choose from "
                                f"{sorted(SUBSET_PRESETS)}")
    all_wnids = imagenet_wnids()
    return [all_wnids[index] for index in SUBSET_PRESETS[preset]]


def imagenet_labels_for_classes(num_classes: int, class_names: Sequence[str] | None = None, *,
                                wnids: Sequence[str] | None = None) -> torch.Tensor:
    """(num_classes,) long: ImageNet-1K index of each class index of a distilled set.

    - Class names that are all WNIDs (an ImageFolder of ImageNet data) map by name; a given
      ``wnids`` list must then contain them all (a consistency check, not a reordering).
    - Otherwise ``wnids`` (a WNID list file or a preset's list) gives class i = ``wnids[i]``;
      class names that are all integers are read as those indices.
    """
    all_wnids = imagenet_wnids()
    index_of = {wnid: index for index, wnid in enumerate(all_wnids)}
    unknown = [w for w in (wnids or []) if w not in index_of]
    if unknown:
        raise DistilledSetError(f"not ImageNet-1K WNIDs: {unknown[:5]}")
    names = list(class_names) if class_names is not None else None
    if names and all(name in index_of for name in names):
        missing = sorted(set(names) - set(wnids)) if wnids is not None else []
        if missing:
            raise DistilledSetError(f"class folders {missing} are not in the given WNID list "
                                    "or preset: wrong preset?")
        return torch.tensor([index_of[name] for name in names])
    if wnids is None:
        raise DistilledSetError(
            "cannot map classes to ImageNet-1K labels: give a WNID list or a class preset "
            f"(--wnids FILE or --classes-preset {{{','.join(sorted(SUBSET_PRESETS))}}}), or "
            "name the ImageFolder's class folders by WNID")
    if names is None:
        positions = list(range(num_classes))
    elif all(name.isdigit() for name in names):
        positions = [int(name) for name in names]
    else:
        raise DistilledSetError(
            f"class folders {names[:5]}... are neither WNIDs nor class indices, so their order "
            "cannot be matched to the WNID list; rename them to WNIDs or to 0..C-1")
    if max(positions, default=-1) >= len(wnids):
        raise DistilledSetError(f"class index {max(positions)} but only {len(wnids)} WNIDs given")
    return torch.tensor([index_of[wnids[p]] for p in positions])
