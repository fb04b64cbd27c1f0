"""SSDIM: the objective and its solvers (Grid Distillation, CVPR 2026, Sec. 3.1).

SSDIM (Spectral-Submodular Image selection) picks the ``k`` images of a class that maximise

    F(S) = alpha * sum_{i in U} max_{j in S} K_ij          (coverage, facility location)
         + beta  * logdet(K_SS + eps * I)                   (diversity, DPP volume)
         + gamma * sum_{i in S} s_i                         (spectral energy)

with ``K = E E^T`` over the L2-normalised embedding rows ``E`` (``U`` = all ``M`` rows) and
``s_i = sum_{k <= r} lambda_k u_ik^2`` over the top-``r`` eigenpairs of ``K``.

Every function here L2-normalises the embedding rows itself, so callers may pass raw features.
The algorithms are plain numpy/scipy; torch is imported only when ``ssdim(..., device=...)``
asks for it (below). SSDIM solvers are chosen by name with ``ssdim(..., solver=...)``; the
baselines and the by-name registry of every method are in :mod:`gridistill.tasks.selectors`.

Large classes (``coverage="knn"``, the default from M = 20000): no ``M x M`` array is formed.
The spectrum is the exact truncated SVD of ``E`` (top-``r`` eigenvectors of the ``d x d`` Gram
``E^T E``, ``_spectrum``); the greedy's coverage gains are restricted to the exact
``n``-nearest-neighbour graph (``_NeighbourCoverage``; ``n = 48`` by default), its log-det gains
come from the incremental Cholesky with kernel rows of the selected images only, and the swap
passes score the exact ``F`` with kernel rows computed on demand. ``ssdim_objective`` evaluates
the exact ``F`` at any ``M`` in ``O(M k d)``.

Devices: ``device=None`` is numpy/BLAS. A torch device (``"cuda"``, or ``"cpu"`` for testing)
runs the ``O(M d)``-per-row work in torch there (``_Kernel``): the dense kernel or on-demand
kernel rows, the coverage-gain reductions of the lazy greedy and the kNN search (``topk``).
The per-step bookkeeping of the greedy (incremental Cholesky, ``O(M k)``), the swap passes'
reductions, the Frank-Wolfe iterations and the spectrum stay numpy on the host, fed with kernel
rows copied back from the device. One algorithm, two array backends for its kernel.

Threads: ``ssdim`` runs its spectrum and solvers on one BLAS thread (threadpoolctl); with the
torch backend on a shared CPU, ``torch.set_num_threads(1)`` is the caller's to set. Timings at
each size: ``benchmarks/selection.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

# ---------------------------------------------------------------------------------------------
# Inputs, kernel and spectrum
# ---------------------------------------------------------------------------------------------


def normalise_embeddings(embeddings: Any) -> np.ndarray:
    """Return the rows of ``embeddings`` scaled to unit L2 norm, as a float32 numpy array.

    ``embeddings``: anything ``np.asarray`` takes, or a torch tensor on any device (copied to
    the host). Raises ValueError for anything that is not a finite 2-D array without zero rows:
    such a row has no direction, so it has no place in a cosine kernel.
    """
    if type(embeddings).__module__.startswith("torch"):  # a tensor, without importing torch
        embeddings = embeddings.detach().cpu()
        if str(embeddings.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            embeddings = embeddings.float()
        embeddings = embeddings.numpy()
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(
            f"embeddings must be a 2-D array (images x features), got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"embeddings must be non-empty, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"embeddings must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"embeddings rows {bad_rows[:10].tolist()} contain NaN or inf")
    norms = np.linalg.norm(array, axis=1)
    zero_rows = np.flatnonzero(norms == 0)
    if zero_rows.size:
        raise ValueError(f"embeddings rows {zero_rows[:10].tolist()} are all zero")
    return (array / norms[:, None]).astype(np.float32)


def _check_k(k: int, num_images: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > num_images:
        raise ValueError(
            f"k={k} exceeds the {num_images} images available; "
            "use plan_selection() to pick how many to select and fill the rest"
        )
    return int(k)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _spectrum(unit_embeddings: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Spectral energies ``s`` and the rows' coordinates ``Z`` in the top-``rank`` eigenbasis.

    With ``E = U Sigma V^T`` the eigenvectors of ``K = E E^T`` are ``u_k = E v_k / sigma_k`` and
    ``lambda_k = sigma_k^2``, so ``s_i = sum_{k <= r} lambda_k u_ik^2 = sum_k (e_i . v_k)^2 =
    ||z_i||^2`` with ``Z = E V_r``: the energy of row ``i`` in the top ``r`` principal directions.
    ``V_r`` comes from the small ``d x d`` Gram ``E^T E`` (the exact truncated SVD of ``E``; or
    from ``K`` itself when ``M < d``), never from an ``M x M`` eigendecomposition, and only the
    wanted eigenvectors are computed (LAPACK ``syevr``), several times faster than a full
    ``eigh``. Computed in the precision of
    ``unit_embeddings``: the solver passes float32 (about 2x faster), the objective float64.
    Returned as float64.
    """
    num_images, dim = unit_embeddings.shape
    rank = min(_check_positive_int("rank", rank), num_images, dim)
    if dim <= num_images:
        _, vectors = scipy.linalg.eigh(
            unit_embeddings.T @ unit_embeddings, subset_by_index=[dim - rank, dim - 1],
            driver="evr", check_finite=False,
        )
        projections = (unit_embeddings @ vectors).astype(np.float64)
    else:
        values, vectors = scipy.linalg.eigh(
            unit_embeddings @ unit_embeddings.T,
            subset_by_index=[num_images - rank, num_images - 1], driver="evr", check_finite=False,
        )
        projections = vectors.astype(np.float64) * np.sqrt(np.clip(values, 0.0, None))
    return np.einsum("ij,ij->i", projections, projections), projections


def spectral_energy(embeddings: np.ndarray, rank: int = 32) -> np.ndarray:
    """``s_i = sum_{k <= rank} lambda_k u_ik^2`` over the top eigenpairs of ``K = E E^T``."""
    return _spectrum(normalise_embeddings(embeddings).astype(np.float64), rank)[0]


def _torch() -> Any:
    """The torch module, imported only when a torch device is asked for (the numpy path never
    pays for, or needs, the import)."""
    import torch

    return torch


# Largest temporary of kernel rows, in elements (16 MB of float32): kernel rows are computed in
# blocks of ``_BLOCK_ELEMENTS // M`` rows, so no temporary grows with ``M^2``.
_BLOCK_ELEMENTS = 1 << 22


def _row_block(num_images: int, most: int = 256) -> int:
    return max(1, min(most, _BLOCK_ELEMENTS // num_images))


class _Kernel:
    """Rows of ``K = E E^T`` (``K`` is symmetric, so rows are columns), as float32.

    Either one dense float32 ``M x M`` matrix (the only ``M x M`` array SSDIM allocates), or
    computed on demand from ``E`` (``dense=False``), for classes too large for a dense kernel: then
    memory is ``O(M d)`` plus ``O(M)`` per requested row, and every value is the same kernel
    entry, so the objective is unchanged.

    ``device``: None computes with numpy; a torch device (``"cuda"``, ``"cpu"``) keeps ``E`` (and
    the dense matrix) there and runs the ``O(M d)``-per-row work on it: kernel rows, the
    coverage-gain reductions and the neighbour search. Every method returns host numpy arrays, so
    the solvers' ``O(M k)`` and ``k x k`` bookkeeping is the same code for both.
    """

    def __init__(self, unit_embeddings: np.ndarray, dense: bool, device: str | None = None):
        self.embeddings = unit_embeddings
        self.size = unit_embeddings.shape[0]
        self.device = device
        if device is None:
            self.xp, self.source = np, unit_embeddings
        else:
            self.xp = _torch()
            self.source = self.xp.as_tensor(unit_embeddings, device=device)
        self.matrix = self.source @ self.source.T if dense else None

    def _native(self, array: np.ndarray) -> Any:
        return array if self.device is None else self.xp.as_tensor(array, device=self.device)

    def _host(self, array: Any) -> np.ndarray:
        return array if self.device is None else array.cpu().numpy()

    def _native_rows(self, indices: np.ndarray) -> Any:
        indices = self._native(np.asarray(indices, dtype=np.int64))
        if self.matrix is not None:
            return self.matrix[indices]
        return self.source[indices] @ self.source.T

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """``K[indices]``: a fresh float32 array of shape ``(len(indices), M)``."""
        return self._host(self._native_rows(indices))

    def block(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """``K[rows][:, columns]`` without forming whole rows."""
        rows, columns = self._native(rows), self._native(columns)
        if self.matrix is not None:
            return self._host(self.matrix[rows[:, None], columns])
        return self._host(self.source[rows] @ self.source[columns].T)

    def coverage_gains(self, candidates: np.ndarray, best: np.ndarray) -> np.ndarray:
        """``sum_i max(K_ic, best_i) - sum_i best_i`` per candidate ``c``, in float64.

        Each sum is accumulated in float64 so the difference keeps its precision. One row per
        candidate, reduced along the row: a candidate's gain does not depend on which others are
        evaluated with it, so lazy and plain greedy see bit-identical gains.
        """
        rows = self._native_rows(candidates)
        self.xp.maximum(rows, self._native(best), out=rows)
        return self._host(rows.sum(axis=1, dtype=self.xp.float64)) - best.sum(dtype=np.float64)

    def neighbours(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``count`` columns of every row of ``K`` (the row itself included) and their
        kernel values, most similar first: ``(M, count)`` int64 and float32 arrays.

        Kernel rows are computed ``_row_block`` at a time, so memory is ``O(M count)`` plus one
        block (16 MB). numpy selects with ``_top_columns``, torch with ``topk``. The ``O(M^2 d)``
        product dominates. Computing only the tiles on and above the diagonal halves it, but
        taking the top of the transposed tiles then costs about what that saves
        (``benchmarks/selection.md``), so whole rows are computed.
        """
        indices = np.empty((self.size, count), dtype=np.int64)
        values = np.empty((self.size, count), dtype=np.float32)
        step = _row_block(self.size)
        for start in range(0, self.size, step):
            rows = slice(start, min(self.size, start + step))
            block = self.source[rows] @ self.source.T
            if self.device is None:
                indices[rows], values[rows] = _top_columns(block, count)
            else:
                top_values, top_indices = self.xp.topk(block, count, dim=1)
                indices[rows], values[rows] = self._host(top_indices), self._host(top_values)
        order = np.argsort(-values, axis=1, kind="stable")
        return np.take_along_axis(indices, order, axis=1), np.take_along_axis(values, order, axis=1)


def _top_columns(rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``count`` columns per row of ``rows`` and their values (in no fixed order).

    ``np.argpartition`` along whole rows costs more than the matrix product that made them.
    Instead, split each row into ``stride`` interleaved groups (columns ``c, c + stride, ...``)
    and take the group maxima, an elementwise maximum of contiguous slices. Every entry among the
    row's top ``count`` lies in a group whose maximum is at least the ``count``-th largest value,
    and at most ``count`` groups have such a maximum, so the top ``count`` groups by maximum hold
    the row's top ``count``: one small ``argpartition`` over the group maxima, one over those
    groups' ``count * per_group`` entries.
    """
    num_rows, width = rows.shape
    per_group = max(1, min(32, width // (4 * count)))  # at least 4 * count groups per row
    padding = (-width) % per_group
    if padding:
        rows = np.pad(rows, ((0, 0), (0, padding)), constant_values=-np.inf)
    stride = rows.shape[1] // per_group
    group_maxima = rows.reshape(num_rows, per_group, stride).max(axis=1)
    top_groups = np.argpartition(group_maxima, -count, axis=1)[:, -count:]
    columns = (top_groups[:, :, None] + stride * np.arange(per_group)).reshape(num_rows, -1)
    values = np.take_along_axis(rows, columns, axis=1)
    keep = np.argpartition(values, -count, axis=1)[:, -count:]
    return np.take_along_axis(columns, keep, axis=1), np.take_along_axis(values, keep, axis=1)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def _check_indices(indices: Sequence[int] | np.ndarray, num_images: int) -> np.ndarray:
    index_array = np.asarray(indices)
    if index_array.ndim != 1 or index_array.size == 0:
        raise ValueError("indices must be a non-empty 1-D sequence")
    if not np.issubdtype(index_array.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {index_array.dtype}")
    if index_array.min() < 0 or index_array.max() >= num_images:
        raise ValueError(f"indices must lie in [0, {num_images}), got {index_array.tolist()[:10]}")
    if np.unique(index_array).size != index_array.size:
        raise ValueError("indices must be distinct")
    return index_array.astype(np.int64)


def ssdim_terms(
    embeddings: np.ndarray,
    indices: Sequence[int] | np.ndarray,
    *,
    rank: int = 32,
    eps: float = 1e-3,
) -> dict[str, float]:
    """The three terms of ``F(S)`` for the images ``indices``, unweighted: ``coverage``
    (``sum_i max_{j in S} K_ij``), ``logdet`` (of ``K_SS + eps I``) and ``spectral``
    (``sum_{i in S} s_i``).

    Computed directly in float64 from the normalised rows: ``max`` over ``K[:, S]``, ``slogdet``
    of ``K_SS + eps I`` and the spectral energies, in ``O(M |S| d + M d^2)`` time, with no
    ``M x M`` matrix unless ``M < d``.
    """
    unit = normalise_embeddings(embeddings).astype(np.float64)
    selected = _check_indices(indices, unit.shape[0])
    kernel_columns = unit @ unit[selected].T
    sign, logdet = np.linalg.slogdet(kernel_columns[selected] + eps * np.eye(selected.size))
    if sign <= 0:
        raise ValueError("K_SS + eps I is not positive definite; eps must be positive")
    return {"coverage": float(kernel_columns.max(axis=1).sum()), "logdet": float(logdet),
            "spectral": float(_spectrum(unit, rank)[0][selected].sum())}


def ssdim_objective(
    embeddings: np.ndarray,
    indices: Sequence[int] | np.ndarray,
    *,
    alpha: float = 1.0,
    beta: float = 0.6,
    gamma: float = 0.3,
    rank: int = 32,
    eps: float = 1e-3,
) -> float:
    """The exact SSDIM objective ``F(S)`` (module docstring) of the images ``indices``: the
    weighted sum of :func:`ssdim_terms`. Can be negative: each near-duplicate in ``S`` adds
    about ``beta * log(eps)``.
    """
    terms = ssdim_terms(embeddings, indices, rank=rank, eps=eps)
    return alpha * terms["coverage"] + beta * terms["logdet"] + gamma * terms["spectral"]


# ---------------------------------------------------------------------------------------------
# Greedy: exact gains, incremental Cholesky, lazy evaluation
# ---------------------------------------------------------------------------------------------

Weights = tuple[float, float, float]  # (alpha, beta, gamma)


@dataclass(frozen=True, eq=False)
class _Objective:
    """One instance of ``F``, as every solver below takes it: the kernel ``K`` it is over, its
    weights ``(alpha, beta, gamma)``, the spectral energies ``s`` and the log-det's ``eps``.

    ``eq=False``: comparing would compare arrays; an instance is only ever passed along.
    """

    kernel: _Kernel
    weights: Weights
    energy: np.ndarray
    eps: float


class IncrementalCholesky:
    """The Cholesky factor of ``K_SS + eps I`` extended to all rows, grown one image at a time.

    Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process to Improve
    Recommendation Diversity", NeurIPS 2018: row ``t`` of ``factor`` is
    ``(K[j_t] - factor[:t]^T factor[:t, j_t]) / sqrt(schur[j_t])`` and
    ``schur_i = 1 + eps - ||factor[:, i]||^2`` is the Schur complement of ``i`` given ``S``, so
    the log-det gain ``log(schur_i)`` of every candidate is known after each step, with no
    inverse or determinant per candidate, and only the added images' kernel rows are needed.
    Used by the greedy (``_GreedyState``) and by the per-grid partition
    (``gridistill.tasks.grid_layout.partition_into_grids``).
    """

    def __init__(self, size: int, capacity: int, eps: float):
        self.factor = np.zeros((capacity, size))
        self.schur = np.full(size, 1.0 + eps)
        self.count = 0

    def add(self, index: int, row: np.ndarray) -> None:
        """Add image ``index``, whose kernel row (over all ``size`` images) is ``row``."""
        step = self.count
        direction = row - self.factor[:step].T @ self.factor[:step, index]
        # An image not yet added has schur >= eps > 0; the floor only keeps rounding from
        # taking the square root of a non-positive number.
        direction /= math.sqrt(max(self.schur[index], 1e-300))
        self.factor[step] = direction
        self.schur -= direction**2
        self.count += 1


class _ExactCoverage:
    """Coverage over every row: ``best_i = max_{j in S} K_ij``, starting from the floor ``-1``
    (the smallest cosine). That leaves ``F`` unchanged for any non-empty ``S`` and makes the
    coverage gain of ``j`` simply ``sum_i max(K_ij - best_i, 0)``, ``O(M)`` per candidate."""

    def __init__(self, kernel: _Kernel):
        self.kernel = kernel
        self.best = np.full(kernel.size, -1.0, dtype=np.float32)

    def gains(self, candidates: np.ndarray) -> np.ndarray:
        return self.kernel.coverage_gains(candidates, self.best)

    def all_gains(self) -> np.ndarray:
        """Gains of every image, ``_row_block`` kernel rows at a time (bounded temporaries)."""
        step = _row_block(self.kernel.size, most=128)
        return np.concatenate([self.gains(np.arange(start, min(start + step, self.kernel.size)))
                               for start in range(0, self.kernel.size, step)])

    def add(self, row: np.ndarray) -> None:
        np.maximum(self.best, row, out=self.best)


class _NeighbourCoverage:
    """Coverage gains restricted to the kNN graph, over the exact current coverage.

    ``N(i)`` holds the ``n`` images most similar to ``i`` (``i`` itself included). The coverage
    state is exact, ``best_i = max_{j in S} K_ij`` over every row (floor ``-1``, as in
    ``_ExactCoverage``): the greedy computes each selected image's full kernel row anyway, for
    the Cholesky update. Only the gains are approximated: the gain of ``j`` counts the rows that
    have ``j`` among their neighbours, ``sum_{i : j in N(i)} max(K_ij - best_i, 0)``, and drops
    the rows farther away (their terms are ``>= 0``, so this is a lower bound on the exact gain,
    and equal to it when ``n = M``). Those dropped terms are small once a row is covered by
    something near; they matter for rows no selected image is near, whose ``best_i`` is then
    the exact (low) similarity to the nearest selected image, not a guess. The gains shrink as
    ``S`` grows, as exact coverage gains do.

    Gains are kept current: adding ``j`` raises ``best_i`` on some rows, and only their
    neighbours' gains change, ``O(n)`` per raised row. Memory is ``O(M n)``; nothing is
    ``M x M``.
    """

    def __init__(self, neighbours: np.ndarray, similarities: np.ndarray):
        self.neighbours, self.similarities = neighbours, similarities.astype(np.float64)
        self.best = np.full(neighbours.shape[0], -1.0, dtype=np.float32)
        self.gain = np.bincount(
            neighbours.ravel(), (self.similarities + 1.0).ravel(), minlength=neighbours.shape[0]
        )

    def gains(self, candidates: np.ndarray) -> np.ndarray:
        return self.gain[candidates]

    def all_gains(self) -> np.ndarray:
        return self.gain.copy()

    def add(self, row: np.ndarray) -> None:
        raised = np.flatnonzero(row > self.best)
        old, new = self.best[raised].astype(np.float64), row[raised].astype(np.float64)
        similarities = self.similarities[raised]
        change = (np.maximum(similarities - new[:, None], 0.0)
                  - np.maximum(similarities - old[:, None], 0.0))
        self.gain += np.bincount(
            self.neighbours[raised].ravel(), change.ravel(), minlength=self.gain.size
        )
        self.best[raised] = row[raised]


Coverage = _ExactCoverage | _NeighbourCoverage


class _GreedyState:
    """What exact marginal gains of ``F`` (or of its kNN surrogate) need, updated in
    ``O(M |S|)`` per added image.

    Coverage gains come from ``coverage`` (``_ExactCoverage`` or ``_NeighbourCoverage``), log-det
    gains ``log(schur_i)`` from ``IncrementalCholesky``. Only the selected images' kernel rows
    are computed.
    """

    def __init__(self, kernel: _Kernel, k: int, eps: float, coverage: Coverage | None = None):
        self.kernel = kernel
        self.coverage = _ExactCoverage(kernel) if coverage is None else coverage
        self.cholesky = IncrementalCholesky(kernel.size, k, eps)
        self.is_selected = np.zeros(kernel.size, dtype=bool)
        self.order: list[int] = []

    def logdet_gains(self) -> np.ndarray:
        # Rounding can push the Schur complement of an already-selected row to <= 0.
        return np.log(np.maximum(self.cholesky.schur, 1e-300))

    def add(self, index: int) -> None:
        row = self.kernel.rows(np.array([index]))[0]
        self.cholesky.add(index, row)
        self.coverage.add(row)
        self.is_selected[index] = True
        self.order.append(index)


def _first_coverage_bounds(unit_embeddings: np.ndarray) -> np.ndarray:
    """Upper bounds on the first coverage gains, ``sum_i max(K_ij, -1) + M``, in ``O(M d)``.

    Every cosine is at least -1, so the gain is ``sum_i K_ij + M = e_j . (sum_i e_i) + M``,
    computed in float64. The float32 kernel entries the greedy uses differ from the exact ones
    by at most ``d * 2^-24`` each (dot products of unit vectors); the bound adds twice that per
    row, so it stays an upper bound on the gains the greedy computes.
    """
    num_images, dim = unit_embeddings.shape
    exact = unit_embeddings.astype(np.float64) @ unit_embeddings.sum(axis=0, dtype=np.float64)
    return exact + num_images * (1.0 + dim * 2.0**-23)


def _plain_greedy(
    objective: _Objective, k: int, coverage: Coverage | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Textbook greedy: every step evaluates the gain of every remaining image.

    With exact coverage (default) that is ``O(k M^2)``, the reference; with
    ``_NeighbourCoverage`` all gains are kept current, so a step is ``O(M k)``. Returns the
    selection order and the gains of the unselected images at the last step (upper bounds on
    their current gains, by submodularity; ``-inf`` for the selected).
    """
    alpha, beta, gamma = objective.weights
    energy = objective.energy
    state = _GreedyState(objective.kernel, k, objective.eps, coverage)
    for _ in range(k):
        gains = alpha * state.coverage.all_gains() + beta * state.logdet_gains() + gamma * energy
        gains[state.is_selected] = -np.inf
        state.add(int(np.argmax(gains)))
    gains[state.order[-1]] = -np.inf
    return np.array(state.order, dtype=np.int64), gains


def _lazy_greedy(
    objective: _Objective, k: int, first_batch: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy with lazy evaluation (Minoux 1978) that picks what plain greedy picks.

    Only the coverage gain is expensive (``O(M)`` per candidate). It can only shrink as ``S``
    grows (submodularity), so a stale value is an upper bound. The log-det gain is exact and
    current for every candidate (incremental Cholesky) and the spectral gain is constant. Each
    step refreshes the coverage gain of the candidates with the highest bound, ``first_batch``
    of them and twice as many each round after, until the best refreshed gain is at least every
    remaining bound: that candidate has the largest exact gain. Only an exact tie can make the
    choice differ from plain greedy's. The first bounds cost ``O(M d)``
    (``_first_coverage_bounds``), so no step touches all ``M^2`` kernel entries. Why doubling
    rounds: most steps settle within the first few candidates and a few need hundreds; at
    M=1300 this refreshes 35% fewer rows than fixed rounds of 32, and takes ~25% less time.

    Returns the selection order and the final upper bounds on every image's gain.
    """
    alpha, beta, gamma = objective.weights
    kernel, energy = objective.kernel, objective.energy
    state = _GreedyState(kernel, k, objective.eps)
    if alpha == 0:  # no coverage term: every gain is exact and current, greedy needs no bounds
        for _ in range(k):
            gain = beta * state.logdet_gains() + gamma * energy
            gain[state.is_selected] = -np.inf
            state.add(int(np.argmax(gain)))
        coverage_bound = np.zeros(kernel.size)
    else:
        coverage_bound = _first_coverage_bounds(kernel.embeddings)
    spectral_gain = gamma * energy
    for _ in range(k - len(state.order)):
        fixed_gain = beta * state.logdet_gains() + spectral_gain
        stale_bound = alpha * coverage_bound + fixed_gain
        stale_bound[state.is_selected] = -np.inf
        best_index, best_gain, count = -1, -np.inf, first_batch
        while best_index < 0 or best_gain < stale_bound.max():
            count = min(count, kernel.size - len(state.order))
            to_refresh = np.argpartition(stale_bound, -count)[-count:]
            count *= 2
            to_refresh = to_refresh[np.isfinite(stale_bound[to_refresh])]
            coverage_bound[to_refresh] = state.coverage.gains(to_refresh)
            exact_gain = alpha * coverage_bound[to_refresh] + fixed_gain[to_refresh]
            stale_bound[to_refresh] = -np.inf
            top = int(np.argmax(exact_gain))
            if exact_gain[top] > best_gain:
                best_index, best_gain = int(to_refresh[top]), float(exact_gain[top])
        state.add(best_index)
    bound = alpha * coverage_bound + beta * state.logdet_gains() + gamma * energy
    bound[state.is_selected] = -np.inf
    return np.array(state.order, dtype=np.int64), bound


# ---------------------------------------------------------------------------------------------
# Swap passes: local search on the exact objective
# ---------------------------------------------------------------------------------------------


class _SwapState:
    """Exact change of ``F`` for swapping any selected image for a candidate.

    For candidates ``c`` (rows of ``K``) and every position ``s`` of the selection at once:

    - coverage: with ``best_i``/``second_i`` the two largest ``K_ij`` over ``S`` and ``owner_i``
      the position of the arg-max, ``sum_i max(best_i, K_ic) - best_i`` plus, over the rows
      owned by ``s``, ``max(second_i, K_ic) - max(best_i, K_ic)``;
    - log-det: with ``A = K_SS + eps I``, ``y = A^{-1} K_Sc`` and ``schur = 1 + eps - K_cS y``,
      ``log(schur) + log((A^{-1})_ss + y_s^2 / schur)``: add ``c`` (Schur complement), then
      remove ``s`` (``det`` of a principal minor is ``det`` times the inverse's diagonal entry);
    - spectral: ``s_c - s_s``.
    """

    def __init__(self, objective: _Objective, selection: np.ndarray):
        self.kernel, self.weights = objective.kernel, objective.weights
        self.energy, self.eps = objective.energy, objective.eps
        self.selection = selection.copy()
        self.recompute()

    def recompute(self) -> None:
        """Coverage bookkeeping and ``A^{-1}`` from scratch (``swap`` updates them in place)."""
        k = self.selection.size
        selected_rows = self.kernel.rows(self.selection)  # k x M
        self.owner, self.best, self.runner_up, self.second = _top_two(selected_rows.T)
        gram = selected_rows[:, self.selection].astype(np.float64) + self.eps * np.eye(k)
        self.inverse = scipy.linalg.cho_solve(
            scipy.linalg.cho_factor(gram, check_finite=False), np.eye(k), check_finite=False
        )
        self._index_owners()

    def _index_owners(self) -> None:
        # Rows grouped by owner, for per-owner sums by np.add.reduceat (which needs non-empty
        # groups: a selected image can own no row when a duplicate of it owns them all).
        self.rows_by_owner = np.argsort(self.owner, kind="stable")
        rows_per_owner = np.bincount(self.owner, minlength=self.selection.size)
        self.owning_positions = np.flatnonzero(rows_per_owner)
        self.group_starts = (np.cumsum(rows_per_owner) - rows_per_owner)[self.owning_positions]

    def deltas(self, candidates: np.ndarray) -> np.ndarray:
        """``delta[c, s]``: the exact change of ``F`` for putting ``candidates[c]`` at ``s``."""
        alpha, beta, gamma = self.weights
        rows = self.kernel.rows(candidates)  # B x M, float32
        raised = np.maximum(rows, self.best)
        lost = np.maximum(rows, self.second) - raised  # <= 0, nonzero only where c < best
        coverage = np.zeros((candidates.size, self.selection.size))
        coverage[:, self.owning_positions] = np.add.reduceat(
            lost[:, self.rows_by_owner], self.group_starts, axis=1, dtype=np.float64
        )
        coverage += (
            raised.sum(axis=1, dtype=np.float64) - self.best.sum(dtype=np.float64)
        )[:, None]
        cross = rows[:, self.selection].astype(np.float64)  # B x k
        solved = cross @ self.inverse
        schur = np.maximum(1.0 + self.eps - np.einsum("ij,ij->i", cross, solved), 1e-300)
        logdet = np.log(schur)[:, None] + np.log(
            np.maximum(np.diag(self.inverse)[None, :] + solved**2 / schur[:, None], 1e-300)
        )
        spectral = self.energy[candidates][:, None] - self.energy[self.selection][None, :]
        return alpha * coverage + beta * logdet + gamma * spectral

    def swap(self, position: int, candidate: int) -> None:
        """Put ``candidate`` at ``position``; ``O(M log M + k^2)``, no new factorisation."""
        row = self.kernel.rows(np.array([candidate]))[0]
        # A^{-1} without the leaving image: B - b b^T / b_s (row and column s become zero) ...
        inverse = self.inverse
        leaving = inverse[:, position].copy()
        inverse -= np.outer(leaving, leaving) / leaving[position]
        inverse[position, :] = inverse[:, position] = 0.0
        # ... then bordered with the entering one (block inverse with its Schur complement).
        self.selection[position] = candidate
        cross = row[self.selection].astype(np.float64)
        cross[position] = 0.0
        solved = inverse @ cross
        schur = 1.0 + self.eps - cross @ solved
        inverse += np.outer(solved, solved) / schur
        inverse[position, :] = inverse[:, position] = -solved / schur
        inverse[position, position] = 1.0 / schur
        # Rows whose best or runner-up left are recomputed; the others only meet the newcomer.
        stale = (self.owner == position) | (self.runner_up == position)
        fresh = ~stale
        beats_best = fresh & (row > self.best)
        beats_second = fresh & ~beats_best & (row > self.second)
        self.runner_up[beats_best], self.second[beats_best] = (
            self.owner[beats_best], self.best[beats_best])
        self.owner[beats_best], self.best[beats_best] = position, row[beats_best]
        self.runner_up[beats_second], self.second[beats_second] = position, row[beats_second]
        stale_rows = np.flatnonzero(stale)
        (self.owner[stale_rows], self.best[stale_rows], self.runner_up[stale_rows],
         self.second[stale_rows]) = _top_two(self.kernel.block(stale_rows, self.selection))
        self._index_owners()


def _top_two(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``block`` (rows x selected): arg-max, max, runner-up position and value.

    With a single column the runner-up is the coverage floor: value -1, position -1 (none).
    """
    rows = np.arange(block.shape[0])
    owner = block.argmax(axis=1)
    best = block[rows, owner]
    if block.shape[1] == 1:
        return owner, best, np.full(rows.size, -1), np.full(rows.size, -1.0, dtype=np.float32)
    masked = block.copy()
    masked[rows, owner] = -np.inf
    runner_up = masked.argmax(axis=1)
    return owner, best, runner_up, masked[rows, runner_up]


def _swap_passes(
    objective: _Objective,
    selection: np.ndarray,
    swap_in: np.ndarray,
    min_gain: float,
    max_passes: int = 50,
    recheck: int = 16,
) -> np.ndarray:
    """1-swap local search of ``selection``, trying the images of ``swap_in`` in its places,
    pass after pass while F improves.

    A pass scores every (candidate, position) pair exactly (``_SwapState.deltas``), then walks
    the improving candidates from the most promising down, ``recheck`` at a time, re-scoring
    them against the current selection (earlier swaps in the pass change the gains) and
    applying the best swap among them. Only
    swaps that raise ``F`` by more than ``min_gain`` are applied, so rounding cannot cycle and the
    result is never worse than ``selection``. The swapped-in image takes the replaced image's
    position in the selection order.
    """
    state = _SwapState(objective, selection)
    block = _row_block(objective.kernel.size)
    for pass_number in range(max_passes):
        if pass_number:
            state.recompute()  # drop the rounding the in-place swaps accumulated
        candidates = swap_in[~np.isin(swap_in, state.selection)]
        if candidates.size == 0:
            break
        best_delta = np.concatenate(
            [state.deltas(candidates[start : start + block]).max(axis=1)
             for start in range(0, candidates.size, block)]
        )
        by_promise = np.argsort(-best_delta, kind="stable")
        promising = candidates[by_promise][best_delta[by_promise] > min_gain]
        swapped = False
        while promising.size:
            # Re-score the next few against the current selection and apply the best swap; the
            # rest of the chunk is re-scored after it, so every applied swap is exact.
            chunk = promising[:recheck]
            delta = state.deltas(chunk)
            row, position = np.unravel_index(int(np.argmax(delta)), delta.shape)
            if delta[row, position] > min_gain:
                state.swap(int(position), int(chunk[row]))
                promising = np.delete(promising, row)
                swapped = True
            else:
                promising = promising[recheck:]
        if not swapped:
            break
    return state.selection


# ---------------------------------------------------------------------------------------------
# Frank-Wolfe on a continuous relaxation
# ---------------------------------------------------------------------------------------------


def _logdet_gradient(projections: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """Gradient in ``x`` of ``logdet(eps I_r + Z^T diag(x) Z)``, ``Z`` = ``projections``: each
    row's leverage ``z_i^T (eps I + Z^T diag(x) Z)^-1 z_i``."""
    design = eps * np.eye(projections.shape[1]) + projections.T @ (x[:, None] * projections)
    leverage = scipy.linalg.cho_solve(
        scipy.linalg.cho_factor(design, check_finite=False), projections.T, check_finite=False,
    )
    return np.einsum("ij,ji->i", projections, leverage)


def _step_to_top_k(x: np.ndarray, gradient: np.ndarray, k: int, step: int) -> None:
    """One Frank-Wolfe step in place on ``{x in [0, 1]^M, sum x = k}``: towards the indicator
    of the ``k`` largest gradient entries (the linear maximiser), step ``2 / (step + 2)``."""
    vertex = np.zeros(x.size)
    vertex[np.argpartition(-gradient, k - 1)[:k]] = 1.0
    x += 2.0 / (step + 2.0) * (vertex - x)


def _frank_wolfe(
    objective: _Objective,
    projections: np.ndarray,
    k: int,
    rng: np.random.Generator,
    iterations: tuple[int, int] = (6, 3),
    anchors: int = 128,
    temperature: float = 0.05,
) -> np.ndarray:
    """Fractional solution ``x`` in ``{x in [0, 1]^M, sum x = k}`` of a concave relaxation of F.

    The relaxation (concave, so Frank-Wolfe with step ``2 / (t + 2)`` converges):

    - coverage, a soft maximum over the selection, on ``anchors`` rows of ``U`` drawn with
      ``rng`` and scaled by ``M / anchors``:
      ``(M / A) sum_{a} tau * log(sum_j x_j exp((K_aj - 1) / tau))``; at a 0/1 vector it is
      within ``tau * log k`` of ``sum_a max_{j in S} K_aj - 1``;
    - diversity, the log-det concave extension in the top-``r`` spectral coordinates
      ``Z = E V_r`` (those that define ``s``): ``logdet(eps I_r + Z^T diag(x) Z)``, which at a 0/1
      vector equals ``logdet(eps I + Z_S Z_S^T)`` up to a constant (Sylvester);
    - spectral energy ``gamma * s^T x``, linear, hence exact.

    Stage 1 runs ``iterations[0]`` steps on coverage and diversity; stage 2, the spectral
    regularisation, adds the ``gamma * s^T x`` term and continues ``iterations[1]`` steps from the
    stage-1 fractional solution. Each step's linear maximisation over the capped simplex is the
    indicator of the top-``k`` gradient entries. Cost per step: ``O(M (A + r^2))``.
    """
    alpha, beta, gamma = objective.weights
    energy, eps = objective.energy, objective.eps
    size = projections.shape[0]
    anchor_rows = np.sort(rng.choice(size, size=min(size, anchors), replace=False))
    affinity = np.exp((objective.kernel.rows(anchor_rows).astype(np.float64) - 1.0) / temperature)
    coverage_scale = alpha * temperature * size / anchor_rows.size
    x = np.full(size, k / size)
    for step in range(sum(iterations)):
        gradient = coverage_scale * ((1.0 / (affinity @ x)) @ affinity)
        gradient += beta * _logdet_gradient(projections, x, eps)
        if step >= iterations[0]:
            gradient += gamma * energy
        _step_to_top_k(x, gradient, k, step)
    return x


# ---------------------------------------------------------------------------------------------
# SSDIM
# ---------------------------------------------------------------------------------------------

SSDIM_SOLVERS: tuple[str, ...] = ("fw", "greedy", "algorithm1")


COVERAGES: tuple[str, ...] = ("exact", "knn")
# From this many images on, ``ssdim`` defaults to kNN coverage: a dense float32 kernel would
# take 1.6 GB and exact greedy rows O(M^2 d) time (131 s at M=20000, d=512, k=160).
KNN_FROM_IMAGES = 20_000


def _three_stage(
    objective: _Objective,
    projections: np.ndarray,
    k: int,
    seed: int,
    coverage: _NeighbourCoverage | None = None,
) -> np.ndarray:
    """Frank-Wolfe relaxation, spectral regularisation, greedy refinement (paper Sec. 3.1).

    1-2. ``_frank_wolfe`` gives a fractional solution ``x``.
    3. Greedy refinement: lazy greedy with exact gains over all images (the same choices as
       plain greedy), then 1-swap passes on the exact objective whose swap-in candidates are the
       relaxation's support, the ``k`` images with the largest ``x``, plus the ``k / 2``
       unselected images with the largest final greedy gain bound (greedy's near misses).

    Why start the refinement from greedy rather than from a rounding of ``x``: swaps never lower
    ``F``, so ``F(result) >= F(plain greedy)`` holds by construction, which a rounding of the
    relaxation cannot promise; the relaxation's job is to point the swaps at the images worth
    trying, so they search ``1.5 k`` images instead of all ``M`` (most of the gain of swaps
    against all ``M``, in a fraction of the time: ``benchmarks/selection.py``).

    With ``coverage`` (the kNN surrogate) the greedy of step 3 is plain greedy on the surrogate
    (all its gains are current, ``O(M k)`` a step); the swap passes still score the exact
    objective, with kernel rows computed on demand (``O(M d)`` per candidate, never ``M x M``),
    so they repair part of what the surrogate misses. The guarantee against exact plain greedy
    then no longer holds by construction.
    """
    kernel = objective.kernel
    fractional = _frank_wolfe(objective, projections, k, np.random.default_rng(seed))
    if coverage is None:
        greedy_order, gain_bound = _lazy_greedy(objective, k)
    else:
        greedy_order, gain_bound = _plain_greedy(objective, k, coverage)
    near_misses = max(1, min(k // 2, kernel.size - k))
    swap_in = np.union1d(
        np.argpartition(-fractional, k - 1)[:k],
        np.argpartition(-gain_bound, near_misses - 1)[:near_misses],
    )
    return _swap_passes(objective, greedy_order, swap_in, _min_swap_gain(objective, k))


def _min_swap_gain(objective: _Objective, k: int) -> float:
    # F is at most alpha*M + gamma*k (+ a tiny log-det): 1e-6 of that is far above the rounding
    # of float32 kernel entries summed over M rows, and far below any swap worth making.
    alpha, beta, gamma = objective.weights
    return 1e-6 * (abs(alpha) * objective.kernel.size + abs(gamma) * k + abs(beta) * k + 1.0)


def _algorithm1(
    objective: _Objective,
    projections: np.ndarray,
    k: int,
    iterations: int = 50,
) -> np.ndarray:
    """The camera-ready paper's Algorithm 1, as written: Frank-Wolfe on ``p in [0, 1]^M``,
    ``sum p = k``, from the uniform start, with the gradient
    ``alpha K p + beta * (log-det gradient) + gamma s`` and step ``2 / (t + 2)``; rounding to the
    ``k`` largest ``p``; then 1-swap local search on the exact ``F`` against every image until
    no swap raises it.

    The coverage gradient ``K p`` is the gradient of ``p^T K p / 2``, a density score (each
    image's summed similarity to the fractional selection), not of the facility-location term
    itself, so the rounded start favours typical images; the swaps then climb ``F`` from
    there. The log-det gradient is that of ``logdet(eps I_r + Z^T diag(p) Z)`` in the top-``r``
    spectral coordinates ``Z`` (as in :func:`_frank_wolfe`). ``K p = E (E^T p)``: no kernel
    matrix is formed for it.
    """
    alpha, beta, gamma = objective.weights
    embeddings = objective.kernel.embeddings.astype(np.float64)
    size = projections.shape[0]
    x = np.full(size, k / size)
    for step in range(iterations):
        gradient = alpha * (embeddings @ (embeddings.T @ x)) + gamma * objective.energy
        if beta:
            gradient += beta * _logdet_gradient(projections, x, objective.eps)
        _step_to_top_k(x, gradient, k, step)
    rounded = np.argsort(-x, kind="stable")[:k]
    return _swap_passes(objective, rounded, np.arange(size), _min_swap_gain(objective, k))


def ssdim(
    embeddings: Any,
    k: int,
    *,
    alpha: float = 1.0,
    beta: float = 0.6,
    gamma: float = 0.3,
    rank: int = 32,
    eps: float = 1e-3,
    seed: int = 0,
    solver: str = "fw",
    dense_kernel: bool | None = None,
    coverage: str | None = None,
    neighbours: int = 48,
    device: str | None = None,
) -> np.ndarray:
    """Select ``k`` images maximising the SSDIM objective; indices in selection order.

    Solvers, by name:

    - ``"fw"`` (default): the three-stage solver (``_three_stage``); with exact coverage its
      ``F`` is never below plain greedy's.
    - ``"greedy"``: plain greedy, the gain of every image at every step (``O(k M^2)`` with
      exact coverage); kept as the reference.
    - ``"algorithm1"``: the camera-ready paper's Algorithm 1 as written (``_algorithm1``):
      Frank-Wolfe with the linear coverage gradient ``K p``, rounding, then swaps against all
      ``M`` images (``O(M k)`` kernel rows a pass); exact coverage only.

    ``coverage``: ``"exact"`` (default below ``KNN_FROM_IMAGES`` = 20000 images) uses every
    ``K_ij``; ``"knn"`` (default from 20000 on) builds the exact ``neighbours``-nearest-neighbour
    graph of the rows (blockwise, ``O(M^2 d)`` time, ``O(M n)`` memory) and the greedy counts
    a candidate's coverage gain only over the rows that have it among their neighbours
    (``_NeighbourCoverage``: a lower bound on the exact gain, over the exact coverage state);
    no ``M x M`` array is formed, and the swap passes still score the exact ``F``. With kNN
    coverage the three-stage result is not guaranteed to reach plain greedy's ``F``.
    ``neighbours`` (``n``, default 48, clamped to ``M``; 32-64 is the useful range): more
    neighbours count more of each gain and make the graph slower to build; ``n = M`` is exact
    coverage.

    ``dense_kernel`` (exact coverage only): hold ``K`` as one float32 ``M x M`` matrix (default
    below 20000 images; ``True`` also makes ``coverage=None`` mean exact), or compute kernel
    rows from ``E`` on demand (same values, ``O(M d)`` memory). kNN coverage always computes
    rows on demand; asking it for a dense kernel is a ValueError.

    ``device``: None computes with numpy/BLAS on the CPU; a torch device (``"cuda"``, ``"cpu"``)
    runs the kernel rows, coverage-gain reductions and neighbour search with torch there (see
    ``_Kernel``); the rest is the same numpy code. ``"auto"``: ``"cuda"`` when torch sees a
    CUDA device, else None. ``embeddings`` may be a numpy array or a
    torch tensor (on any device).

    ``seed`` draws the relaxation's coverage anchors; the same seed gives the same selection.

    Threads: the spectrum and the solvers run on one BLAS thread (threadpoolctl) whatever the
    caller's setting, so a call is as fast on a shared CPU as on an idle one; the dense kernel
    and the kNN graph use the caller's BLAS threads.
    """
    if solver not in SSDIM_SOLVERS:
        raise ValueError(f"unknown SSDIM solver {solver!r}; choose one of {SSDIM_SOLVERS}")
    if coverage not in (None, *COVERAGES):
        raise ValueError(f"unknown coverage {coverage!r}; choose one of {COVERAGES} or None")
    neighbours = _check_positive_int("neighbours", neighbours)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if min(alpha, beta, gamma) < 0:
        # Negative weights break submodularity, which the lazy bounds rely on.
        raise ValueError(f"alpha, beta, gamma must be >= 0, got {alpha}, {beta}, {gamma}")
    unit = normalise_embeddings(embeddings)
    num_images = unit.shape[0]
    k = _check_k(k, num_images)
    if coverage is None:  # an explicit dense kernel keeps the exact coverage it was asked for
        coverage = "knn" if num_images >= KNN_FROM_IMAGES and not dense_kernel else "exact"
    if coverage == "knn" and dense_kernel:
        raise ValueError("kNN coverage never forms the dense kernel; leave dense_kernel unset")
    if coverage == "knn" and solver == "algorithm1":
        raise ValueError("solver 'algorithm1' needs exact coverage; pass coverage='exact'")
    if dense_kernel is None:
        dense_kernel = coverage == "exact" and num_images < KNN_FROM_IMAGES
    if device == "auto":
        device = "cuda" if _torch().cuda.is_available() else None
    # The two large products (the dense kernel, the kNN graph) use the caller's BLAS threads.
    kernel = _Kernel(unit, dense=dense_kernel, device=device)
    weights = (float(alpha), float(beta), float(gamma))
    surrogate = None
    if coverage == "knn":
        surrogate = _NeighbourCoverage(*kernel.neighbours(min(neighbours, num_images)))
    # The spectrum's d x d eigensolver and the solvers make thousands of small BLAS calls that
    # a thread pool only slows: on a shared CPU its threads spin-wait for busy cores (10-20x
    # slower, benchmarks/selection.md). They run on one thread whatever the caller's setting.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        energy, projections = _spectrum(unit, rank)
        objective = _Objective(kernel, weights, energy, eps)
        if solver == "greedy":
            return _plain_greedy(objective, k, surrogate)[0]
        if solver == "algorithm1":
            return _algorithm1(objective, projections, k)
        return _three_stage(objective, projections, k, seed, surrogate)
