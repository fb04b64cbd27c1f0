"""Selection methods behind one interface, chosen by name: SSDIM and its baselines.

A :data:`Selector` takes L2-normalised embedding rows, ``k`` and a seed and returns ``k``
distinct row indices in selection order. :data:`SELECTORS` names every method (SSDIM at the
paper's settings, then the baselines it is compared with: random, k-center, herding, k-means
medoids, facility location, log-det); :func:`select` runs one by name on raw embeddings. The
SSDIM objective and solvers themselves are in :mod:`gridistill.tasks.ssdim`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# The single-term baselines are the SSDIM objective with two weights at zero, solved by SSDIM's
# own lazy greedy: one implementation of the gains, so they cannot drift apart.
from gridistill.tasks.ssdim import (
    KNN_FROM_IMAGES,
    _check_k,
    _Kernel,
    _lazy_greedy,
    _Objective,
    normalise_embeddings,
    ssdim,
)

# Each selector takes L2-normalised rows, k (already checked) and a seed, and returns indices in
# selection order. A selector that is deterministic says so and ignores the seed.
Selector = Callable[[np.ndarray, int, int], np.ndarray]


def select_ssdim(unit_embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """SSDIM with the paper's settings: alpha=1, beta=0.6, gamma=0.3, r=32, eps=1e-3.

    Grid Distillation (CVPR 2026), Sec. 3.1; the objective is in the module docstring and the
    solver in ``gridistill.tasks.ssdim._three_stage``.
    """
    return ssdim(unit_embeddings, k, seed=seed)


def weighted_ssdim(weights: tuple[float, float, float], unit_embeddings: np.ndarray, k: int,
                   seed: int) -> np.ndarray:
    """SSDIM with weights ``(alpha, beta, gamma)`` (the paper's Table 6 ablates them); bind
    them with ``functools.partial`` to get a selector."""
    alpha, beta, gamma = weights
    return ssdim(unit_embeddings, k, alpha=alpha, beta=beta, gamma=gamma, seed=seed)


def select_random(unit_embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Uniform sampling without replacement, ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).choice(unit_embeddings.shape[0], size=k, replace=False)


def select_kcenter(unit_embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-center greedy: ``min_S max_i min_{j in S} ||e_i - e_j||`` (2-approximation).

    Gonzalez, "Clustering to minimize the maximum intercluster distance", TCS 1985; used for
    data selection by Sener & Savarese, "Active Learning for Convolutional Neural Networks: A
    Core-Set Approach", ICLR 2018. Starts from the image closest to the class mean, then adds
    the image farthest from the selection; on unit vectors ``||e_i - e_j||^2 = 2 - 2 K_ij``, so
    that is the lowest best cosine. ``O(M d k)``, no kernel matrix. Deterministic.
    """
    mean = unit_embeddings.mean(axis=0)
    order = [int(np.argmax(unit_embeddings @ mean))]
    best_cosine = unit_embeddings @ unit_embeddings[order[0]]
    for _ in range(k - 1):
        best_cosine[order] = np.inf  # selected images are at distance 0 already
        farthest = int(np.argmin(best_cosine))
        order.append(farthest)
        np.maximum(best_cosine, unit_embeddings @ unit_embeddings[farthest], out=best_cosine)
    return np.array(order, dtype=np.int64)


def select_herding(unit_embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Herding: each step adds the image that brings the selection's mean closest to the class
    mean, ``argmin_j ||mu - (sum_{i in S} e_i + e_j) / (|S| + 1)||``.

    Welling, "Herding Dynamical Weights to Learn", ICML 2009; the exemplar rule of Rebuffi et
    al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017. Expanding the
    square, that is ``argmax_j e_j . ((|S| + 1) mu - sum_S e_i)``. ``O(M d k)``. Deterministic.
    """
    mean = unit_embeddings.astype(np.float64).mean(axis=0)
    selected_sum = np.zeros_like(mean)
    available = np.ones(unit_embeddings.shape[0], dtype=bool)
    order = []
    for step in range(k):
        score = unit_embeddings @ ((step + 1) * mean - selected_sum)
        score[~available] = -np.inf
        chosen = int(np.argmax(score))
        order.append(chosen)
        available[chosen] = False
        selected_sum += unit_embeddings[chosen]
    return np.array(order, dtype=np.int64)


def select_kmeans(
    unit_embeddings: np.ndarray, k: int, seed: int, iterations: int = 10
) -> np.ndarray:
    """k-means medoids: the image nearest to each k-means centre.

    Lloyd's algorithm (Lloyd, "Least squares quantization in PCM", 1982) from a k-means++
    start (Arthur & Vassilvitskii, SODA 2007), ``iterations`` rounds, seeded by ``seed``. Each
    cluster's medoid is its member nearest to the centre; an empty cluster is replaced by the
    image farthest from every centre. Ordered by cluster size, largest first.
    """
    rng = np.random.default_rng(seed)
    points = unit_embeddings.astype(np.float64)
    squared_norms = np.einsum("ij,ij->i", points, points)
    centres = np.empty((k, points.shape[1]))
    centres[0] = points[rng.integers(points.shape[0])]
    nearest = np.sum((points - centres[0]) ** 2, axis=1)
    for index in range(1, k):
        probabilities = nearest / nearest.sum() if nearest.sum() > 0 else None
        centres[index] = points[rng.choice(points.shape[0], p=probabilities)]
        np.minimum(nearest, np.sum((points - centres[index]) ** 2, axis=1), out=nearest)
    for _ in range(iterations):
        distances = squared_norms[:, None] - 2.0 * points @ centres.T + np.sum(centres**2, axis=1)
        labels = distances.argmin(axis=1)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, points)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if not filled.all():
            # Re-seed empty clusters at the images worst served by any centre.
            worst = np.argsort(-distances.min(axis=1))[: int((~filled).sum())]
            centres[~filled] = points[worst]
    distances = squared_norms[:, None] - 2.0 * points @ centres.T + np.sum(centres**2, axis=1)
    labels = distances.argmin(axis=1)
    medoids, sizes = [], []
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        if members.size:
            medoids.append(int(members[np.argmin(distances[members, cluster])]))
            sizes.append(members.size)
    order = [medoids[i] for i in np.argsort(-np.array(sizes), kind="stable")]
    if len(order) < k:  # fewer non-empty clusters than k: add the worst-served images
        taken = np.zeros(points.shape[0], dtype=bool)
        taken[order] = True
        worst_first = np.argsort(-distances.min(axis=1), kind="stable")
        order += [int(i) for i in worst_first[~taken[worst_first]][: k - len(order)]]
    return np.array(order, dtype=np.int64)


def select_facility(unit_embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Facility location alone, ``max_S sum_{i in U} max_{j in S} K_ij``, by lazy greedy.

    Cornuejols, Fisher & Nemhauser, "Location of Bank Accounts to Optimize Float", Management
    Science 1977; greedy is within ``1 - 1/e`` (Nemhauser, Wolsey & Fisher 1978); lazy
    evaluation after Minoux 1978. The SSDIM objective with ``beta = gamma = 0``. Deterministic.
    """
    kernel = _Kernel(unit_embeddings, dense=unit_embeddings.shape[0] < KNN_FROM_IMAGES)
    energy = np.zeros(kernel.size)
    return _lazy_greedy(_Objective(kernel, (1.0, 0.0, 0.0), energy, eps=1e-3), k)[0]


def select_logdet(unit_embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Log-det alone (DPP MAP), ``max_S logdet(K_SS + eps I)``, eps = 1e-3, by greedy.

    Kulesza & Taskar, "Determinantal Point Processes for Machine Learning", 2012; the fast
    greedy MAP of Chen, Zhang & Zhou, NeurIPS 2018 (incremental Cholesky, ``O(M k^2)``, kernel
    rows on demand, no ``M x M`` matrix). The SSDIM objective with ``alpha = gamma = 0``.
    Deterministic.
    """
    kernel = _Kernel(unit_embeddings, dense=False)
    energy = np.zeros(kernel.size)
    return _lazy_greedy(_Objective(kernel, (0.0, 1.0, 0.0), energy, eps=1e-3), k)[0]


SELECTORS: dict[str, Selector] = {
    "ssdim": select_ssdim,
    "random": select_random,
    "kcenter": select_kcenter,
    "herding": select_herding,
    "kmeans": select_kmeans,
    "facility": select_facility,
    "logdet": select_logdet,
}
SELECTION_METHODS: tuple[str, ...] = tuple(SELECTORS)


def select(method: str, embeddings: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Select ``k`` of the ``M`` embedding rows with the method named ``method``.

    Returns distinct row indices (int64), in the method's selection order.
    """
    if method not in SELECTORS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {SELECTION_METHODS}")
    unit = normalise_embeddings(embeddings)
    k = _check_k(k, unit.shape[0])
    return np.asarray(SELECTORS[method](unit, k, seed), dtype=np.int64)

