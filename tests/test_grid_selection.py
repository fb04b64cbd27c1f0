"""Per-grid (sequential) and joint selection of a class's grids."""

import numpy as np
import pytest

from gridistill.tasks.grid_layout import partition_into_grids, select_grids
from gridistill.tasks.selectors import select


@pytest.fixture
def class_embeddings():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 24))
    return np.concatenate([c + 0.3 * rng.normal(size=(40, 24)) for c in centres])


@pytest.mark.parametrize("method", ["ssdim", "random", "kcenter"])
def test_sequential_grids_are_each_a_selection_from_what_is_left(class_embeddings, method):
    grids = select_grids(method, class_embeddings, 3, 16, seed=4, grid_selection="sequential")
    assert [len(g) for g in grids] == [16, 16, 16]
    assert len(np.unique(np.concatenate(grids))) == 48
    remaining = np.arange(len(class_embeddings))
    for index, grid in enumerate(grids):
        expected = remaining[select(method, class_embeddings[remaining], 16, seed=4 + index)]
        np.testing.assert_array_equal(grid, expected)
        remaining = np.setdiff1d(remaining, grid)


def test_joint_grids_are_one_selection_dealt_into_grids(class_embeddings):
    grids = select_grids("ssdim", class_embeddings, 3, 16, seed=1, grid_selection="joint")
    order = select("ssdim", class_embeddings, 48, seed=1)
    expected = partition_into_grids(class_embeddings, order, 3, 16)
    for grid, want in zip(grids, expected, strict=True):
        np.testing.assert_array_equal(grid, want)


def test_sequential_differs_from_joint(class_embeddings):
    sequential = select_grids("ssdim", class_embeddings, 3, 16, grid_selection="sequential")
    joint = select_grids("ssdim", class_embeddings, 3, 16, grid_selection="joint")
    assert {tuple(sorted(g)) for g in sequential} != {tuple(sorted(g)) for g in joint}


def test_a_callable_selector_is_used_as_given(class_embeddings):
    calls = []

    def first_k(unit, k, seed):
        calls.append((len(unit), k, seed))
        return np.arange(k)

    grids = select_grids(first_k, class_embeddings, 2, 4, seed=7)
    assert calls == [(200, 4, 7), (196, 4, 8)]
    np.testing.assert_array_equal(np.concatenate(grids), np.arange(8))


def test_a_small_class_fills_by_cycling_in_both_modes(class_embeddings):
    for mode in ("sequential", "joint"):
        with pytest.warns(UserWarning, match="repeated cyclically"):
            grids = select_grids("ssdim", class_embeddings[:20], 2, 16, grid_selection=mode)
        assert [len(g) for g in grids] == [16, 16]
        assert len(np.unique(np.concatenate(grids))) == 20


def test_unknown_names_are_refused(class_embeddings):
    with pytest.raises(ValueError, match="grid selection"):
        select_grids("ssdim", class_embeddings, 1, 4, grid_selection="greedy")
    with pytest.raises(ValueError, match="selection method"):
        select_grids("best", class_embeddings, 1, 4)
