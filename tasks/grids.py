"""Grid assembly: L x L selected images tiled into one storage-resolution image."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel

from gridistill.stages import ArtifactRef, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.ingest import read_image


def center_crop_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def assemble_grid(images: Sequence[Image.Image], L: int, size: int) -> Image.Image:
    """Tile ``L*L`` images row-major into a ``size x size`` grid.

    Each cell is the image's centre square, resized (Lanczos, i.e. anti-aliased
    downsampling) to ``size / L`` pixels.
    """
    if len(images) != L * L:
        raise ValueError(f"a {L}x{L} grid needs {L * L} images, got {len(images)}")
    if size % L:
        raise ValueError(f"grid size {size} must be divisible by L={L}")
    cell = size // L
    grid = Image.new("RGB", (size, size))
    for index, image in enumerate(images):
        row, col = divmod(index, L)
        tile = center_crop_square(image.convert("RGB")).resize((cell, cell), Image.LANCZOS)
        grid.paste(tile, (col * cell, row * cell))
    return grid


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] from same-sized RGB images."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """The inverse of :func:`pil_to_tensor` (values are clamped and rounded)."""
    array = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


class ChangedFileError(ValueError):
    """A selected file whose bytes are no longer those the load stage hashed. A ValueError, so
    the stage is not retried: only a rerun from load (which re-embeds the file) can fix it."""


def read_unchanged_image(path: str, sha256: str,
                         storage_options: dict[str, Any] | None = None) -> Image.Image:
    """Decode ``path``, refusing it unless its bytes still hash to ``sha256`` (load's hash):
    a grid must show the image that was embedded and selected, not what the file holds now."""
    decoded = read_image(path, storage_options)
    if not decoded.sha256:  # not read at all: a storage failure, which a retry may get past
        raise OSError(f"{path}: cannot read the selected image ({decoded.error})")
    if decoded.sha256 != sha256:
        raise ChangedFileError(
            f"{path} changed after it was loaded and embedded (sha256 {decoded.sha256}, "
            f"loaded as {sha256}); rerun this class from the load stage (force_from='load')")
    if decoded.image is None:
        raise ValueError(f"{path}: cannot decode the selected image ({decoded.error})")
    return decoded.image


# -- Prefect task ----------------------------------------------------------------------------
class GridParams(BaseModel):
    grid_size: int = 4
    resolution: int = 224


@stage_task("grids")
def assemble_class_grids(store: RunStore, folder: str, scope: str, params: GridParams,
                         upstream: list[ArtifactRef]) -> dict[str, Any]:
    """Tile each selected group of L*L images into one PNG grid; index them in Parquet."""
    (selected,) = upstream
    selection = store.read_parquet(f"{selected.folder}/selection.parquet")
    grids = []
    for _, cells in selection.groupby("grid", sort=True):
        cells = cells.sort_values("cell")
        images = [read_unchanged_image(path, sha256, store.storage_options)
                  for path, sha256 in zip(cells["path"], cells["sha256"], strict=True)]
        grids.append(assemble_grid(images, params.grid_size, params.resolution))
    write_grid_images(store, folder, grids)
    return {"grids": len(grids), "resolution": params.resolution}


def write_grid_images(store: RunStore, folder: str, grids: Sequence[Image.Image]) -> None:
    """``grid_000.png``... plus the ``grids.parquet`` index that readers go through."""
    files = [f"grid_{index:03d}.png" for index in range(len(grids))]
    for name, image in zip(files, grids, strict=True):
        write_png(store, f"{folder}/{name}", image)
    store.write_parquet(f"{folder}/grids.parquet",
                        pd.DataFrame({"grid": range(len(files)), "file": files}))


def write_png(store: RunStore, key: str, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    store.write_bytes(key, buffer.getvalue())


def read_grid_images(store: RunStore, ref: ArtifactRef) -> list[Image.Image]:
    """The PNG grids of a ``grids`` or ``enhance`` artifact, in grid order."""
    index = store.read_parquet(f"{ref.folder}/grids.parquet").sort_values("grid")
    return [Image.open(io.BytesIO(store.read_bytes(f"{ref.folder}/{name}"))).convert("RGB")
            for name in index["file"]]
