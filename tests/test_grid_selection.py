"""Per-grid (sequential) and joint selection of a class's grids."""

import numpy as np
import pytest

from gridistill.tasks.grid_layout import most_typical, partition_into_grids, select_grids
from gridistill.tasks.selectors import select
from gridistill.tasks.ssdim import normalise_embeddings


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


def select_params_from_cli(options: list[str], methods: list[str]):
    """``gridistill run OPTIONS --methods METHODS``: its config and each method's SelectParams,
    as the DAG's select nodes bind them."""
    from gridistill.cli import build_parser, config_from_args
    from gridistill.flows.dag import Setup, build_dag
    from gridistill.stages import ArtifactRef

    config = config_from_args(build_parser().parse_args(["run", *options, "--methods",
                                                         *methods]))
    dataset = ArtifactRef(stage="dataset", scope="all", key="k", folder="dataset/k",
                          meta={"classes": [], "num_classes": 10})
    nodes = {node.label: node for node in build_dag(config).nodes}
    setup = Setup(config, "cpu")
    return config, {method: nodes[f"select:{method}"].bind(setup, dataset)[1]
                    for method in methods}


def test_ssdim_weights_go_from_the_command_line_to_ssdims_selector_only(class_embeddings):
    """``gridistill run --coverage-weight 0 --logdet-weight 0 --spectral-weight 1``: the select
    node of SSDIM gets those weights and selects with them; other methods' nodes get none."""
    from gridistill.select_options import SsdimWeights
    from gridistill.tasks.select import selector_for
    from gridistill.tasks.ssdim import ssdim

    _, params = select_params_from_cli(
        ["--coverage-weight", "0", "--logdet-weight", "0", "--spectral-weight", "1"],
        ["ssdim", "herding"])
    ssdim_params, herding_params = params["ssdim"], params["herding"]
    assert ssdim_params.weights == SsdimWeights(coverage_weight=0, logdet_weight=0,
                                                spectral_weight=1)
    assert herding_params.weights is None and selector_for(herding_params) == "herding"
    spectral_only = select_grids(selector_for(ssdim_params), class_embeddings, 2, 16, seed=3)
    expected = select_grids(lambda unit, k, seed: ssdim(unit, k, alpha=0, beta=0, gamma=1,
                                                        seed=seed),
                            class_embeddings, 2, 16, seed=3)
    paper = select_grids("ssdim", class_embeddings, 2, 16, seed=3)
    np.testing.assert_array_equal(np.concatenate(spectral_only), np.concatenate(expected))
    assert not np.array_equal(np.concatenate(spectral_only), np.concatenate(paper))


def test_most_typical_keeps_the_rows_nearest_the_class_mean_direction():
    rng = np.random.default_rng(1)
    eye = np.eye(8)
    # Five groups of four rows at a growing angle from e0, leaning to +-e1 and +-e2 so that
    # each group cancels sideways: the mean direction is e0 and the first group is nearest it.
    angles = np.repeat(np.linspace(0.1, 1.4, 5), 4)
    sideways = np.tile([eye[1], -eye[1], eye[2], -eye[2]], (5, 1))
    rows = np.cos(angles)[:, None] * eye[0] + np.sin(angles)[:, None] * sideways
    order = rng.permutation(20)
    kept = most_typical(rows[order], 0.2, at_least=1)
    np.testing.assert_array_equal(np.sort(order[kept]), np.arange(4))
    assert np.all(np.diff(kept) > 0)  # in row order
    assert len(most_typical(rows, 0.25, at_least=8)) == 8
    assert len(most_typical(rows, 1.0, at_least=1)) == 20
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="share"):
            most_typical(rows, share, at_least=1)


@pytest.mark.parametrize("mode", ["sequential", "joint"])
def test_a_typical_share_selects_from_that_share_only(class_embeddings, mode):
    typical = most_typical(normalise_embeddings(class_embeddings),
                           0.5, at_least=48)
    grids = select_grids("ssdim", class_embeddings, 3, 16, seed=2, grid_selection=mode,
                         typical_share=0.5)
    chosen = np.concatenate(grids)
    assert len(np.unique(chosen)) == 48 and set(chosen) <= set(typical)
    within = select_grids("ssdim", class_embeddings[typical], 3, 16, seed=2,
                          grid_selection=mode)
    np.testing.assert_array_equal(chosen, typical[np.concatenate(within)])
    whole = select_grids("ssdim", class_embeddings, 3, 16, seed=2, grid_selection=mode,
                         typical_share=1.0)
    np.testing.assert_array_equal(np.concatenate(whole), np.concatenate(
        select_grids("ssdim", class_embeddings, 3, 16, seed=2, grid_selection=mode)))
    assert not set(np.concatenate(whole)) <= set(typical)


def test_the_typical_share_reaches_the_selection_methods_not_the_random_baselines():
    config, params = select_params_from_cli(["--typical-share", "0.5"],
                                            ["ssdim", "herding", "random", "random-real"])
    shares = {method: select.typical_share for method, select in params.items()}
    assert shares == {"ssdim": 0.5, "herding": 0.5, "random": 1.0, "random-real": 1.0}
    assert "most typical 50%" in config.report_summary("efficientnet-lite0", False)["grid"]
