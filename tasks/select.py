"""The select stage: a class's IPC grids of selected images, written as ``selection.parquet``.

The selection itself is plain numpy elsewhere:
:func:`gridistill.tasks.grid_layout.select_grids` with a selector of
:mod:`gridistill.tasks.selectors` (SSDIM, :mod:`gridistill.tasks.ssdim`, or a baseline).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import BaseModel
from threadpoolctl import threadpool_limits

from gridistill.stages import ArtifactRef, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.grid_layout import select_grids

# The field's random baseline (DD-Ranking's "rdm", the peers' "random"): IPC random photos per
# class, each stored and trained on as a photo (a 1 x 1 grid), not packed into a grid.
REAL_IMAGES = "random-real"


def cells_per_side(method: str, grid_size: int) -> int:
    """The grid side ``method`` distils with: 1 for :data:`REAL_IMAGES`, else ``grid_size``."""
    return 1 if method == REAL_IMAGES else grid_size


class SelectParams(BaseModel):
    method: str = "ssdim"
    ipc: int = 1
    grid_size: int = 4
    grid_selection: str = "sequential"
    seed: int = 0


@stage_task("select")
def select_class(store: RunStore, folder: str, scope: str, params: SelectParams,
                 upstream: list[ArtifactRef]) -> dict[str, Any]:
    """Select IPC grids of L² images of one class (:func:`select_grids`)."""
    # Here, not at the top: gridistill.tasks.embed imports torch, which selecting never needs.
    from gridistill.tasks.embed import read_embeddings

    (embedded,) = upstream
    table, vectors = read_embeddings(store, embedded)
    cells = params.grid_size**2
    # Classes already run in parallel: extra BLAS threads only wait for busy cores (10x slower).
    selector = "random" if params.method == REAL_IMAGES else params.method
    with threadpool_limits(1):
        grids = select_grids(selector, vectors, params.ipc, cells, seed=params.seed,
                             grid_selection=params.grid_selection)
    # The load stage's sha256 travels with each pick, so grids can refuse a changed file.
    rows = [(g, c, int(table["image_id"].iat[i]), table["path"].iat[i], table["sha256"].iat[i])
            for g, members in enumerate(grids) for c, i in enumerate(members)]
    store.write_parquet(f"{folder}/selection.parquet", pd.DataFrame(
        rows, columns=["grid", "cell", "image_id", "path", "sha256"]))
    return {"method": params.method, "grid_selection": params.grid_selection,
            "selected": len({i for members in grids for i in members.tolist()}),
            "filled": len(table) < params.ipc * cells}
