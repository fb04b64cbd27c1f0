"""The select stage: a class's IPC grids of selected images, written as ``selection.parquet``.

The selection itself is plain numpy elsewhere:
:func:`gridistill.tasks.grid_layout.select_grids` with a selector of
:mod:`gridistill.tasks.selectors` (SSDIM, :mod:`gridistill.tasks.ssdim`, or a baseline).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pandas as pd
from pydantic import BaseModel
from threadpoolctl import threadpool_limits

from gridistill.select_options import SsdimWeights
from gridistill.stages import ArtifactRef, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.grid_layout import select_grids
from gridistill.tasks.selectors import Selector, weighted_ssdim

# The field's random baseline (DD-Ranking's "rdm", the peers' "random"): IPC random photos per
# class, each stored and trained on as a photo (a 1 x 1 grid), not packed into a grid.
REAL_IMAGES = "random-real"
# The random baselines draw from the whole class, as the field's (and the paper's) do: a
# typical share is part of a selection method, not of the baseline it is compared with.
WHOLE_CLASS_METHODS = (REAL_IMAGES, "random")


def cells_per_side(method: str, grid_size: int) -> int:
    """The grid side ``method`` distils with: 1 for :data:`REAL_IMAGES`, else ``grid_size``."""
    return 1 if method == REAL_IMAGES else grid_size


class SelectParams(BaseModel):
    method: str = "ssdim"
    ipc: int = 1
    grid_size: int = 4
    grid_selection: str = "sequential"
    typical_share: float = 1.0
    seed: int = 0
    weights: SsdimWeights | None = None  # SSDIM's (None: the paper's); other methods: None


def selector_for(params: SelectParams) -> str | Selector:
    """The selector ``params`` names: SSDIM with its weights, random photos as ``random``."""
    if params.method == REAL_IMAGES:
        return "random"
    if params.method != "ssdim" or params.weights is None:
        return params.method
    weights = params.weights
    return partial(weighted_ssdim, (weights.coverage_weight, weights.logdet_weight,
                                    weights.spectral_weight))


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
    with threadpool_limits(1):
        grids = select_grids(selector_for(params), vectors, params.ipc, cells, seed=params.seed,
                             grid_selection=params.grid_selection,
                             typical_share=params.typical_share)
    # The load stage's sha256 travels with each pick, so grids can refuse a changed file.
    rows = [(g, c, int(table["image_id"].iat[i]), table["path"].iat[i], table["sha256"].iat[i])
            for g, members in enumerate(grids) for c, i in enumerate(members)]
    store.write_parquet(f"{folder}/selection.parquet", pd.DataFrame(
        rows, columns=["grid", "cell", "image_id", "path", "sha256"]))
    return {"method": params.method, "grid_selection": params.grid_selection,
            "typical_share": params.typical_share,
            "selected": len({i for members in grids for i in members.tolist()}),
            "filled": len(table) < params.ipc * cells}
