"""Input discovery and validation: ImageFolder trees or manifests, on any fsspec URL (plain
functions; the index and load stages are :mod:`gridistill.tasks.index` and
:mod:`gridistill.tasks.load`).

Class order is the sorted folder order unless a class-list file is given (e.g. ImageNet
WNIDs). Teachers and class-conditional generators index classes by that order, so it is
fixed once, here, and carried as integer labels everywhere after.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from PIL import Image

from gridistill.storage import validate_key_part

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".csv", ".parquet")
# Refuse absurd images before decoding them (PIL's own bomb check is a warning at 89 MP).
Image.MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class ClassInfo:
    name: str  # folder name / manifest label, e.g. a WNID; used in storage keys
    label: int  # index in the class order
    display_name: str  # human-readable, used in prompts and reports


def read_class_list(url: str,
                    storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(name, display name) pairs from a class-list file.

    Accepted: a text file with one name per line (``n01440764`` or ``n01440764 tench``), or a
    CSV with a ``wnid`` or ``name`` column (and optionally a human-readable ``name`` column).
    """
    with fsspec.open(url, "rt", **(storage_options or {})) as f:
        text = f.read()
    if url.endswith(".csv"):
        frame = pd.read_csv(io.StringIO(text), dtype=str)
        key = "wnid" if "wnid" in frame.columns else frame.columns[0]
        names = frame[key].tolist()
        display = frame["name"].tolist() if "name" in frame.columns and key != "name" else names
        return list(zip(names, display, strict=True))
    pairs = []
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            pairs.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    return pairs


@dataclass(frozen=True)
class Listing:
    """What a data location holds: the samples, and every entry that is not one, with why."""

    samples: pd.DataFrame  # path, class_name, size
    ignored: list[tuple[str, str]]  # (path or manifest row, reason)


def scan_samples(url: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """All image samples of an ImageFolder tree or a manifest, as ``path, class_name, size``,
    plus what was left out: non-image files, files outside class folders, empty class folders,
    incomplete or duplicate manifest rows.

    A manifest is a CSV/Parquet with ``path,label`` columns; relative paths are resolved
    against the manifest's folder. Paths are returned as full URLs for ``fsspec.open``.
    """
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    if root.endswith(MANIFEST_EXTENSIONS):
        return _read_manifest(fs, root, protocol)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no ImageFolder directory or manifest at {url!r}")
    rows, ignored = [], []
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            ignored.append((protocol + entry["name"], "not inside a class folder"))
            continue
        class_name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        found = 0
        for item in sorted(fs.find(entry["name"], detail=True).values(), key=lambda e: e["name"]):
            if item["name"].lower().endswith(IMAGE_EXTENSIONS):
                rows.append((protocol + item["name"], class_name, int(item.get("size") or 0)))
                found += 1
            else:
                ignored.append((protocol + item["name"], "not an image file name (extension)"))
        if not found:
            ignored.append((protocol + entry["name"],
                            f"class folder {class_name!r} has no image files: not a class"))
    if not rows:
        raise ValueError(f"no images found under {url!r} (expected <root>/<class>/<image>)")
    return Listing(pd.DataFrame(rows, columns=["path", "class_name", "size"]), ignored)


def list_samples(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The samples of :func:`scan_samples`; warns about what it left out."""
    listing = scan_samples(url, storage_options)
    if listing.ignored:
        warnings.warn(f"{url!r}: ignored {len(listing.ignored)} entries, e.g. "
                      f"{listing.ignored[:3]}", stacklevel=2)
    return listing.samples


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, protocol: str) -> Listing:
    with fs.open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".csv"):
        # keep_default_na=False: a class named "NA" or "null" is a class, not a missing value.
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    else:
        frame = pd.read_parquet(io.BytesIO(raw))
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"manifest {path!r} lacks column(s) {sorted(missing)}")
    frame = frame[["path", "label"]]
    blank = frame.apply(lambda column: column.astype(str).str.strip() == "")
    incomplete = (frame.isna() | blank).any(axis=1).to_numpy()
    ignored = [(f"{path} row {i + 1}", "missing path or label") for i in np.flatnonzero(incomplete)]
    frame = frame[~incomplete].astype(str)
    labels_per_path = frame.groupby("path")["label"].nunique()
    conflicting = labels_per_path.index[labels_per_path > 1].tolist()
    if conflicting:
        raise ValueError(f"manifest {path!r}: {len(conflicting)} path(s) listed under different "
                         f"labels, e.g. {conflicting[:5]}")
    duplicates = frame.duplicated("path")
    ignored += [(p, "duplicate manifest row") for p in frame["path"][duplicates]]
    frame = frame[~duplicates]
    base = path.rsplit("/", 1)[0]
    resolved = [p if "://" in p or p.startswith("/") else f"{base}/{p}" for p in frame["path"]]
    resolved = [p if "://" in p else protocol + p for p in resolved]
    return Listing(pd.DataFrame({"path": resolved, "class_name": frame["label"].tolist(),
                                 "size": 0}), ignored)


def resolve_classes(found: Iterable[str], class_list: Sequence[tuple[str, str]] | None = None,
                    display_names: dict[str, str] | None = None) -> list[ClassInfo]:
    """The class order: the class list's order if given, else sorted names.

    With a class list, labels are positions in that list (so a subset of ImageNet keeps its
    ImageNet indices) and an unknown class in the data is an error.
    """
    found = sorted(set(found))
    for name in found:
        validate_key_part(name)
    if class_list is None:
        names = display_names or {}
        return [ClassInfo(n, i, names.get(n, n)) for i, n in enumerate(found)]
    order = {name: (i, display) for i, (name, display) in enumerate(class_list)}
    unknown = [n for n in found if n not in order]
    if unknown:
        raise ValueError(f"classes not in the class list: {unknown[:10]}")
    return sorted((ClassInfo(n, *order[n]) for n in found), key=lambda c: c.label)


def holdout_mask(paths: Sequence[str], share: float, seed: int, class_name: str) -> list[bool]:
    """A fixed, seeded choice of ``share`` of a class's images to hold out for testing."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"holdout share must be in [0, 1), got {share}")
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    # Seed from the class name too, so classes do not share one permutation pattern.
    rng = random.Random(f"{seed}:{class_name}")
    rng.shuffle(order)
    n_test = int(round(share * len(paths)))
    test = set(order[:n_test])
    return [i in test for i in range(len(paths))]


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image | None  # RGB, or None when unreadable
    sha256: str
    error: str | None


@dataclass(frozen=True)
class ImageHeader:
    sha256: str
    size: tuple[int, int] | None  # (width, height) as the header states it; None when unreadable
    error: str | None


def _size_error(image: Image.Image) -> str | None:
    # PIL raises past twice MAX_IMAGE_PIXELS and only warns below; refuse both, from the
    # header, before decoding (a warnings filter would be process-global, not per thread).
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        return f"decompression bomb or huge image: {image.width}x{image.height} pixels"
    return None


def probe_image(data: bytes) -> ImageHeader:
    """Hash the bytes and parse the header only: format, size, the pixel limit. No pixel is
    decoded, so this costs a read and a hash, not a decode. A file that passes can still fail
    :func:`decode_image` (truncated or corrupt pixel data); that shows where the pixels are
    decoded once, in the embed stage. Problems are reported, never raised."""
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageHeader(digest, None, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return ImageHeader(digest, image.size, _size_error(image))
    except Exception as exc:  # a corrupt header can trip any plugin's parser: report it
        return ImageHeader(digest, None, f"{type(exc).__name__}: {exc}")


def decode_image(data: bytes) -> DecodedImage:
    """Decode bytes to an RGB image; problems are reported, never raised."""
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return DecodedImage(None, digest, "empty file")
    try:
        image = Image.open(io.BytesIO(data))
        too_large = _size_error(image)
        if too_large:
            return DecodedImage(None, digest, too_large)
        image.load()
        transparent = image.mode == "P" and "transparency" in image.info
        if image.mode in ("RGBA", "LA", "PA") or transparent:
            # Composite onto white so transparent regions do not turn black.
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        if image.mode.startswith("I"):  # 16/32-bit greyscale: scale to 8 bits, do not clip
            pixels = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((pixels * 255.0 / max(pixels.max(), 1.0)).astype(np.uint8))
        return DecodedImage(image.convert("RGB"), digest, None)
    except Exception as exc:  # a corrupt file can trip any decoder error: report, never raise
        return DecodedImage(None, digest, f"{type(exc).__name__}: {exc}")


def read_bytes(path: str, storage_options: dict[str, Any] | None = None) -> bytes | str:
    """The bytes of one file from any fsspec URL, or why there are none (a missing file)."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        return f"missing file: {exc}"


def read_image(path: str, storage_options: dict[str, Any] | None = None) -> DecodedImage:
    """Read and decode one image from any fsspec URL."""
    data = read_bytes(path, storage_options)
    return DecodedImage(None, "", data) if isinstance(data, str) else decode_image(data)
