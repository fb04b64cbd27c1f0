"""Hypothesis checks that the two set-function terms of SSDIM are monotone and submodular,
and that the kNN coverage gains on many candidates are lower bounds on the exact ones that shrink.

Both terms are evaluated through ``ssdim_objective`` (one term switched on at a time), so these
check the library's objective, not a re-implementation.

- Coverage ``sum_i max_{j in S} K_ij`` with the empty set at the floor ``-M`` (every cosine is
  >= -1): facility location on the non-negative similarities ``K + 1``.
- Log-det ``logdet(K_SS + eps I)`` is submodular but NOT monotone: adding ``j`` changes it by
  ``log(schur_j)`` with ``eps <= schur_j <= 1 + eps``, i.e. mostly negative. The monotone form is
  ``logdet(I + K_SS / eps) = logdet(K_SS + eps I) - |S| log(eps)``; for a fixed ``|S| = k`` the
  two differ by a constant, so maximising either is the same problem.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gridistill.tasks import ssdim as solvers

EPS = 1e-3


def coverage(embeddings: np.ndarray, subset: list[int]) -> float:
    if not subset:
        return -float(embeddings.shape[0])
    return solvers.ssdim_objective(embeddings, subset, alpha=1.0, beta=0.0, gamma=0.0)


def logdet(embeddings: np.ndarray, subset: list[int]) -> float:
    if not subset:
        return 0.0
    return solvers.ssdim_objective(embeddings, subset, alpha=0.0, beta=1.0, gamma=0.0, eps=EPS)


def monotone_logdet(embeddings: np.ndarray, subset: list[int]) -> float:
    return logdet(embeddings, subset) - len(subset) * math.log(EPS)


@st.composite
def instances(draw):
    """Random embeddings (sometimes with near-duplicates) and sets A within B, x outside B."""
    num_images = draw(st.integers(3, 10))
    dim = draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    embeddings = rng.standard_normal((num_images, dim))
    if draw(st.booleans()):  # near-duplicates stress the tiny Schur complements
        embeddings[1] = embeddings[0] + 1e-3 * rng.standard_normal(dim)
    order = rng.permutation(num_images).tolist()
    size_b = draw(st.integers(0, num_images - 1))
    size_a = draw(st.integers(0, size_b))
    bigger, extra = order[:size_b], order[size_b]
    return embeddings, sorted(bigger[:size_a]), sorted(bigger), extra


def gain(function, embeddings, subset, extra):
    return function(embeddings, subset + [extra]) - function(embeddings, subset)


@settings(max_examples=60, deadline=None)
@given(instances())
def test_coverage_is_monotone_and_submodular(instance):
    embeddings, smaller, bigger, extra = instance
    assert gain(coverage, embeddings, bigger, extra) >= -1e-9
    assert gain(coverage, embeddings, smaller, extra) >= gain(
        coverage, embeddings, bigger, extra) - 1e-9


@settings(max_examples=60, deadline=None)
@given(instances())
def test_logdet_is_submodular_and_its_eps_shifted_form_is_monotone(instance):
    embeddings, smaller, bigger, extra = instance
    assert gain(monotone_logdet, embeddings, bigger, extra) >= -1e-7
    assert gain(logdet, embeddings, smaller, extra) >= gain(
        logdet, embeddings, bigger, extra) - 1e-7
    # ...while the raw term never grows by more than log(1 + eps) per image.
    assert gain(logdet, embeddings, bigger, extra) <= math.log(1 + EPS) + 1e-7


def neighbour_gain(embeddings, subset: list[int], extra: int, count: int) -> float:
    """The kNN-restricted coverage gain of ``extra`` after ``subset`` (``_NeighbourCoverage``)."""
    unit = solvers.normalise_embeddings(embeddings)
    kernel = solvers._Kernel(unit, dense=False)
    surrogate = solvers._NeighbourCoverage(*kernel.neighbours(count))
    for index in subset:
        surrogate.add(kernel.rows(np.array([index]))[0])
    return float(surrogate.gains(np.array([extra]))[0])


@settings(max_examples=60, deadline=None)
@given(instances(), st.integers(1, 10))
def test_neighbour_coverage_gains_are_lower_bounds_that_shrink(instance, count):
    embeddings, smaller, bigger, extra = instance
    count = min(count, embeddings.shape[0])
    # float32 kernel entries against the float64 objective: tolerance well above their rounding
    assert neighbour_gain(embeddings, bigger, extra, count) <= gain(
        coverage, embeddings, bigger, extra) + 1e-5
    assert neighbour_gain(embeddings, smaller, extra, count) >= neighbour_gain(
        embeddings, bigger, extra, count) - 1e-9
