"""Which selected images go into which grid: IPC grids of ``L x L`` images per class.

:func:`select_grids` picks a class's grids with a selector of :mod:`gridistill.tasks.selectors`,
one grid after another or as one selection dealt into grids (:func:`partition_into_grids`);
:func:`plan_selection` and :func:`fill_by_cycling` serve classes with fewer images than cells.
Plain numpy; the pixels of a grid are assembled in :mod:`gridistill.tasks.grids`.
"""

from __future__ import annotations

import warnings

import numpy as np

from gridistill.tasks.selectors import SELECTION_METHODS, SELECTORS, Selector
from gridistill.tasks.ssdim import IncrementalCholesky, normalise_embeddings


def plan_selection(num_images: int, ipc: int, cells: int) -> tuple[int, bool]:
    """How many images to select for ``ipc`` grids of ``cells`` images, and whether to fill.

    Returns ``(k, needs_fill)``: ``k = min(num_images, ipc * cells)``; ``needs_fill`` is True when
    the class has fewer images than cells, in which case ``fill_by_cycling`` completes the grids.
    """
    for name, value in (("num_images", num_images), ("ipc", ipc), ("cells", cells)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    wanted = ipc * cells
    return min(num_images, wanted), num_images < wanted


def fill_by_cycling(order: np.ndarray, total: int) -> np.ndarray:
    """Fallback for a class with fewer images than cells: repeat the selection order cyclically.

    The first ``len(order)`` entries are the selection itself, then it starts over, so the most
    representative images are the ones repeated. Warns, because the grids then hold duplicates.
    """
    order = np.asarray(order, dtype=np.int64)
    if total <= order.size:
        return order[:total]
    warnings.warn(
        f"only {order.size} images for {total} grid cells: the selection order is repeated "
        f"cyclically to fill {total - order.size} cells, so some grids hold duplicates",
        stacklevel=2,
    )
    return np.resize(order, total)


GRID_STRATEGIES: tuple[str, ...] = ("logdet", "round_robin")


def partition_into_grids(
    embeddings: np.ndarray,
    indices: np.ndarray,
    n_grids: int,
    cells: int,
    *,
    strategy: str = "logdet",
) -> list[np.ndarray]:
    """Split ``n_grids * cells`` selected indices into ``n_grids`` grids that are each diverse.

    Strategies, by name (which trains better is for the evaluation to measure):

    - ``"logdet"`` (default): greedy balanced assignment for the summed per-grid
      ``logdet(K_GG + eps I)``, eps = 1e-3: indices are taken in selection order (most
      representative first) and each goes to the grid, among those with a free cell, where it
      adds the most log-volume, i.e. has the largest Schur complement given the grid's members
      (incremental Cholesky per grid); ties go to the lowest grid number.
    - ``"round_robin"``: deal the selection order like cards, index ``t`` to grid ``t mod n``.

    Cells keep selection order within each grid, so the layout is deterministic.

    Repeated indices (the ``fill_by_cycling`` fallback) take neither strategy: grid ``g`` is then
    the ``g``-th run of ``cells`` consecutive indices. Runs of a cyclic order never repeat an
    image as long as the class has at least ``cells`` images; below that a grid must hold
    duplicates, and a warning says so.
    """
    if strategy not in GRID_STRATEGIES:
        raise ValueError(f"unknown grid strategy {strategy!r}; choose one of {GRID_STRATEGIES}")
    indices = np.asarray(indices, dtype=np.int64)
    if n_grids <= 0 or cells <= 0:
        raise ValueError(f"n_grids and cells must be positive, got {n_grids}, {cells}")
    if indices.ndim != 1 or indices.size != n_grids * cells:
        raise ValueError(
            f"need exactly n_grids * cells = {n_grids * cells} indices, got shape {indices.shape}"
        )
    unit = normalise_embeddings(embeddings).astype(np.float64)
    if indices.min() < 0 or indices.max() >= unit.shape[0]:
        raise ValueError(f"indices must lie in [0, {unit.shape[0]})")
    distinct = np.unique(indices).size
    if distinct < indices.size:
        if distinct < cells:
            warnings.warn(
                f"only {distinct} distinct images for grids of {cells} cells: "
                "every grid holds duplicates",
                stacklevel=2,
            )
        return [indices[grid * cells : (grid + 1) * cells] for grid in range(n_grids)]
    if strategy == "round_robin":
        return [indices[grid::n_grids] for grid in range(n_grids)]
    vectors = unit[indices]
    kernel = vectors @ vectors.T
    # Per grid, the Cholesky factor of its members extended to every position: its Schur
    # complements are what each position would add to that grid's log-volume.
    factors = [IncrementalCholesky(indices.size, cells, eps=1e-3) for _ in range(n_grids)]
    members: list[list[int]] = [[] for _ in range(n_grids)]
    for position in range(indices.size):
        open_grids = [grid for grid in range(n_grids) if len(members[grid]) < cells]
        grid = max(open_grids, key=lambda g: (factors[g].schur[position], -g))
        factors[grid].add(position, kernel[position])
        members[grid].append(position)
    return [indices[grid_members] for grid_members in members]


GRID_SELECTIONS: tuple[str, ...] = ("sequential", "joint")


def most_typical(unit_embeddings: np.ndarray, share: float, at_least: int) -> np.ndarray:
    """The rows of a class's most typical ``share`` (``round(share * M)`` of its ``M`` rows), by
    cosine to the class's mean direction, in row order; never fewer than ``at_least`` rows (nor
    more than the class has).

    ``share`` in (0, 1]; 1 keeps every row.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    num_images = unit_embeddings.shape[0]
    keep = min(num_images, max(at_least, round(share * num_images)))
    centroid = unit_embeddings.mean(axis=0)
    typicality = unit_embeddings @ (centroid / np.linalg.norm(centroid))
    return np.sort(np.argsort(-typicality, kind="stable")[:keep])


def select_grids(
    method: str | Selector,
    embeddings: np.ndarray,
    ipc: int,
    cells: int,
    *,
    seed: int = 0,
    grid_selection: str = "sequential",
    typical_share: float = 1.0,
) -> list[np.ndarray]:
    """``ipc`` grids of ``cells`` images of one class, as row indices of ``embeddings``.

    ``method`` is a name of :data:`SELECTORS` or a selector ``(unit_rows, k, seed) -> indices``.
    ``grid_selection``, by name:

    - ``"sequential"`` (the camera-ready paper): grid ``g`` is the selection of ``cells``
      images from those no earlier grid took (seed ``seed + g``), one grid after another, so
      each grid's objective (coverage, log-det) is over ``cells`` images and the class images
      left;
    - ``"joint"``: one selection of ``ipc * cells`` images, dealt into grids by
      :func:`partition_into_grids`.

    ``typical_share`` < 1 selects from the class's most typical share only
    (:func:`most_typical`; never fewer than ``ipc * cells`` images), so that the coverage and
    log-det terms cannot reach for the class's outliers; 1 (the paper) selects from all of it.

    A class with fewer than ``ipc * cells`` images takes the joint path in both modes: all of
    its images are selected and :func:`fill_by_cycling` repeats them (with a warning).
    """
    if grid_selection not in GRID_SELECTIONS:
        raise ValueError(f"unknown grid selection {grid_selection!r}; choose one of "
                         f"{GRID_SELECTIONS}")
    if isinstance(method, str):
        if method not in SELECTORS:
            raise ValueError(f"unknown selection method {method!r}; choose one of "
                             f"{SELECTION_METHODS}")
        selector = SELECTORS[method]
    else:
        selector = method
    unit = normalise_embeddings(embeddings)
    k, needs_fill = plan_selection(unit.shape[0], ipc, cells)
    candidates = most_typical(unit, typical_share, ipc * cells)
    if grid_selection == "joint" or needs_fill:
        order = candidates[np.asarray(selector(unit[candidates], k, seed), dtype=np.int64)]
        if needs_fill:
            order = fill_by_cycling(order, ipc * cells)
        return partition_into_grids(unit, order, ipc, cells)
    remaining = candidates
    grids = []
    for grid in range(ipc):
        chosen = np.asarray(selector(unit[remaining], cells, seed + grid), dtype=np.int64)
        grids.append(remaining[chosen])
        remaining = np.delete(remaining, chosen)
    return grids

