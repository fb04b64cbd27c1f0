"""Tests for the SSDIM objective and solvers (tasks/ssdim.py), the selectors by name
(tasks/selectors.py) and the grid layout (tasks/grid_layout.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from tolerances import dot_gap

from gridistill.tasks import grid_layout, selectors
from gridistill.tasks import ssdim as solvers

WEIGHTS = {"alpha": 1.0, "beta": 0.6, "gamma": 0.3}


def clustered(num_images: int, dim: int, clusters: int, seed: int, spread: float = 0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, num_images)
    return centres[labels] + spread * rng.standard_normal((num_images, dim))


def direct_objective(embeddings, indices, alpha, beta, gamma, rank, eps):
    """F(S) straight from the formula: full float64 eigendecomposition of the M x M kernel."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    kernel = unit @ unit.T
    values, vectors = np.linalg.eigh(kernel)
    top = np.argsort(values)[::-1][:rank]
    energy = (vectors[:, top] ** 2 * values[top]).sum(axis=1)
    chosen = list(indices)
    coverage = kernel[:, chosen].max(axis=1).sum()
    logdet = np.linalg.slogdet(kernel[np.ix_(chosen, chosen)] + eps * np.eye(len(chosen)))[1]
    return alpha * coverage + beta * logdet + gamma * energy[chosen].sum()


# --- the objective ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_images, dim, rank", [(40, 8, 4), (30, 50, 32), (60, 16, 32)])
def test_objective_matches_direct_numpy(num_images, dim, rank):
    # Covers the d x d Gram path (M >= d), the M x M path (M < d) and rank >= d.
    embeddings = clustered(num_images, dim, clusters=4, seed=num_images)
    indices = [0, 3, 7, 11, 19, 23]
    expected = direct_objective(embeddings, indices, rank=rank, eps=1e-3, **WEIGHTS)
    got = solvers.ssdim_objective(embeddings, indices, rank=rank, **WEIGHTS)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_objective_ignores_row_scale():
    embeddings = clustered(30, 8, clusters=3, seed=1)
    scaled = embeddings * np.random.default_rng(2).uniform(0.1, 10.0, size=(30, 1))
    assert solvers.ssdim_objective(scaled, [1, 2, 5]) == pytest.approx(
        solvers.ssdim_objective(embeddings, [1, 2, 5]), rel=1e-6
    )


# --- solvers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_lazy_greedy_picks_what_plain_greedy_picks(seed):
    unit = solvers.normalise_embeddings(clustered(300, 32, clusters=8, seed=seed))
    kernel = solvers._Kernel(unit, dense=True)
    energy, _ = solvers._spectrum(unit, 32)
    objective = solvers._Objective(kernel, tuple(WEIGHTS.values()), energy, 1e-3)
    plain, _ = solvers._plain_greedy(objective, 40)
    lazy, _ = solvers._lazy_greedy(objective, 40)
    np.testing.assert_array_equal(lazy, plain)


def test_first_coverage_bounds_bound_the_gains_greedy_computes():
    # Includes antipodal pairs, where float32 cosines can dip just below the floor -1.
    embeddings = clustered(200, 64, clusters=4, seed=9).astype(np.float32)
    embeddings[100:] = -embeddings[:100]
    unit = solvers.normalise_embeddings(embeddings)
    state = solvers._GreedyState(solvers._Kernel(unit, dense=True), 5, 1e-3)
    gains = state.coverage.all_gains()
    bounds = solvers._first_coverage_bounds(unit)
    assert np.all(bounds >= gains)
    np.testing.assert_allclose(bounds, gains, atol=1e-2)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_swap_deltas_are_exact_changes_of_the_objective(k):
    embeddings = clustered(50, 12, clusters=5, seed=k)
    unit = solvers.normalise_embeddings(embeddings)
    energy, _ = solvers._spectrum(unit, 4)
    objective = solvers._Objective(
        solvers._Kernel(unit, dense=True), tuple(WEIGHTS.values()), energy, 1e-3)
    state = solvers._SwapState(objective, np.arange(k) * 3)
    rng = np.random.default_rng(k)
    for _ in range(4):  # also checks the in-place updates made by swap()
        candidates = np.setdiff1d(np.arange(50), state.selection)[::4]
        deltas = state.deltas(candidates)
        before = solvers.ssdim_objective(embeddings, state.selection, rank=4)
        for row, candidate in enumerate(candidates[:4]):
            for position in range(k):
                after = state.selection.copy()
                after[position] = candidate
                change = solvers.ssdim_objective(embeddings, after, rank=4) - before
                assert deltas[row, position] == pytest.approx(change, abs=1e-4)
        state.swap(int(rng.integers(k)), int(candidates[-1]))


@pytest.mark.parametrize("seed", range(5))
def test_three_stage_is_never_below_plain_greedy(seed):
    embeddings = clustered(400, 48, clusters=10, seed=seed, spread=0.4 + 0.2 * seed)
    greedy = solvers.ssdim(embeddings, 50, solver="greedy")
    three_stage = solvers.ssdim(embeddings, 50, seed=seed)
    assert solvers.ssdim_objective(embeddings, three_stage) >= solvers.ssdim_objective(
        embeddings, greedy
    )


@pytest.mark.parametrize("seed", range(3))
def test_algorithm1_ends_where_no_single_swap_raises_the_objective(seed):
    """The paper's Algorithm 1 ends its local refinement only when no swap of a selected image
    for any other image raises F: checked by trying every swap."""
    embeddings = clustered(60, 12, clusters=5, seed=seed)
    chosen = solvers.ssdim(embeddings, 6, solver="algorithm1")
    assert len(set(chosen.tolist())) == 6
    value = solvers.ssdim_objective(embeddings, chosen)
    best_swap = max(
        solvers.ssdim_objective(embeddings, np.where(chosen == out, into, chosen))
        for out in chosen for into in np.setdiff1d(np.arange(60), chosen))
    assert best_swap <= value + 1e-4 * abs(value)


def test_algorithm1_asks_for_exact_coverage():
    with pytest.raises(ValueError, match="exact coverage"):
        solvers.ssdim(clustered(50, 8, clusters=3, seed=0), 5, solver="algorithm1",
                      coverage="knn")


def test_dense_and_on_demand_kernels_agree():
    # One M x M product against row blocks: entries agree to rounding, not bit for bit, so on
    # another BLAS a near-tie may pick another image of the same objective.
    embeddings = clustered(200, 16, clusters=6, seed=3)
    dense = solvers.ssdim(embeddings, 20, dense_kernel=True)
    on_demand = solvers.ssdim(embeddings, 20, dense_kernel=False)
    assert solvers.ssdim_objective(embeddings, on_demand) == pytest.approx(
        solvers.ssdim_objective(embeddings, dense), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_tiny_instances_reach_the_greedy_bound_of_the_optimum(seed):
    # F itself can be negative (each near-duplicate adds ~beta*log(eps)), so "F >= (1-1/e) F*"
    # would be meaningless. The guarantee is for G(S) = F(S) - c with c = -alpha*M +
    # beta*k*log(eps): G is the coverage floored at the smallest cosine -1 (sum_i (max_S K_ij
    # + 1) >= 0), plus beta*logdet(I + K_SS/eps) >= 0, plus the non-negative spectral sum. G is
    # monotone submodular with G({}) = 0 (test_select_properties.py checks both parts), so
    # greedy -- and SSDIM, which only improves on greedy -- gets G >= (1 - 1/e) max G
    # (Nemhauser, Wolsey & Fisher 1978).
    rng = np.random.default_rng(seed)
    num_images, k = int(rng.integers(6, 13)), int(rng.integers(2, 5))
    embeddings = clustered(num_images, 5, clusters=3, seed=seed, spread=0.1 + 0.3 * (seed % 3))
    offset = -WEIGHTS["alpha"] * num_images + WEIGHTS["beta"] * k * math.log(1e-3)
    optimum = max(
        solvers.ssdim_objective(embeddings, list(subset))
        for subset in itertools.combinations(range(num_images), k)
    )
    for solver in solvers.SSDIM_SOLVERS:
        value = solvers.ssdim_objective(embeddings, solvers.ssdim(embeddings, k, solver=solver))
        assert value - offset >= (1 - 1 / math.e) * (optimum - offset) - 1e-9


def test_same_seed_same_selection_for_every_method():
    embeddings = clustered(250, 24, clusters=6, seed=7)
    for method in selectors.SELECTION_METHODS:
        first = selectors.select(method, embeddings, 30, seed=11)
        again = selectors.select(method, embeddings, 30, seed=11)
        np.testing.assert_array_equal(first, again, err_msg=method)


@pytest.mark.parametrize("method", selectors.SELECTION_METHODS)
def test_every_method_returns_k_distinct_valid_indices(method):
    embeddings = clustered(120, 16, clusters=5, seed=2)
    chosen = selectors.select(method, embeddings, 25, seed=0)
    assert chosen.dtype == np.int64 and chosen.shape == (25,)
    assert np.unique(chosen).size == 25 and chosen.min() >= 0 and chosen.max() < 120


def test_single_objective_baselines_win_their_own_term():
    embeddings = clustered(300, 16, clusters=6, seed=5)
    random_pick = selectors.select("random", embeddings, 20, seed=0)

    def coverage(indices):
        return solvers.ssdim_objective(embeddings, indices, beta=0.0, gamma=0.0)

    def logdet(indices):
        return solvers.ssdim_objective(embeddings, indices, alpha=0.0, beta=1.0, gamma=0.0)

    assert coverage(selectors.select("facility", embeddings, 20)) > coverage(random_pick)
    assert logdet(selectors.select("logdet", embeddings, 20)) > logdet(random_pick)


# --- bad input --------------------------------------------------------------------------------


def _bad_embeddings():
    good = clustered(20, 4, clusters=2, seed=0)
    with_nan, with_inf, with_zero = good.copy(), good.copy(), good.copy()
    with_nan[3, 1] = np.nan
    with_inf[5, 0] = np.inf
    with_zero[7] = 0.0
    return {"nan row": with_nan, "inf row": with_inf, "zero row": with_zero,
            "1-D": good[:, 0], "3-D": good[None], "empty": np.zeros((0, 4))}


@pytest.mark.parametrize("name", list(_bad_embeddings()))
@pytest.mark.parametrize("call", ["ssdim", "select", "objective", "partition"])
def test_bad_embeddings_raise_value_error(name, call):
    embeddings = _bad_embeddings()[name]
    with pytest.raises(ValueError):
        if call == "ssdim":
            solvers.ssdim(embeddings, 2)
        elif call == "select":
            selectors.select("kcenter", embeddings, 2)
        elif call == "objective":
            solvers.ssdim_objective(embeddings, [0, 1])
        else:
            grid_layout.partition_into_grids(embeddings, np.arange(4), 2, 2)


@pytest.mark.parametrize("k", [0, -1, 21, 2.5, True])
def test_bad_k_raises_value_error(k):
    embeddings = clustered(20, 4, clusters=2, seed=0)
    with pytest.raises(ValueError, match="k"):
        solvers.ssdim(embeddings, k)
    with pytest.raises(ValueError, match="k"):
        selectors.select("random", embeddings, k)


def test_unknown_names_and_bad_indices_raise_value_error():
    embeddings = clustered(20, 4, clusters=2, seed=0)
    with pytest.raises(ValueError, match="method"):
        selectors.select("nope", embeddings, 3)
    with pytest.raises(ValueError, match="solver"):
        solvers.ssdim(embeddings, 3, solver="nope")
    with pytest.raises(ValueError, match=">= 0"):
        solvers.ssdim(embeddings, 3, beta=-0.1)
    for indices in ([], [0, 0], [0, 20], [-1, 2]):
        with pytest.raises(ValueError, match="indices"):
            solvers.ssdim_objective(embeddings, indices)


# --- grids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", grid_layout.GRID_STRATEGIES)
def test_partition_gives_disjoint_grids_of_the_right_size(strategy):
    embeddings = clustered(300, 16, clusters=6, seed=4)
    chosen = selectors.select("ssdim", embeddings, 3 * 16)
    grids = grid_layout.partition_into_grids(embeddings, chosen, 3, 16, strategy=strategy)
    assert [grid.size for grid in grids] == [16, 16, 16]
    assert sorted(np.concatenate(grids).tolist()) == sorted(chosen.tolist())
    again = grid_layout.partition_into_grids(embeddings, chosen, 3, 16, strategy=strategy)
    assert all(np.array_equal(a, b) for a, b in zip(grids, again, strict=True))


def test_logdet_partition_is_more_diverse_per_grid_than_contiguous_blocks():
    embeddings = clustered(400, 16, clusters=8, seed=6)
    chosen = selectors.select("ssdim", embeddings, 4 * 9)

    def summed_logdet(grids):
        return sum(solvers.ssdim_objective(embeddings, g, alpha=0.0, beta=1.0, gamma=0.0)
                   for g in grids)

    grids = grid_layout.partition_into_grids(embeddings, chosen, 4, 9)
    blocks = [np.sort(chosen)[i * 9 : (i + 1) * 9] for i in range(4)]
    assert summed_logdet(grids) >= summed_logdet(blocks)


def test_fewer_images_than_cells_warns_and_fills_without_duplicates_in_a_grid():
    embeddings = clustered(20, 8, clusters=3, seed=8)
    k, needs_fill = grid_layout.plan_selection(20, ipc=2, cells=16)
    assert (k, needs_fill) == (20, True)
    order = selectors.select("ssdim", embeddings, k)
    with pytest.warns(UserWarning, match="only 20 images for 32 grid cells"):
        filled = grid_layout.fill_by_cycling(order, 32)
    np.testing.assert_array_equal(filled[:20], order)
    np.testing.assert_array_equal(filled[20:], order[:12])
    grids = grid_layout.partition_into_grids(embeddings, filled, 2, 16)
    assert all(grid.size == 16 and np.unique(grid).size == 16 for grid in grids)


def test_plan_selection_when_there_are_enough_images():
    assert grid_layout.plan_selection(1300, ipc=10, cells=16) == (160, False)
    assert grid_layout.plan_selection(160, ipc=10, cells=16) == (160, False)
    with pytest.raises(ValueError):
        grid_layout.plan_selection(100, ipc=0, cells=16)


def test_fewer_images_than_one_grid_warns_and_still_fills():
    embeddings = clustered(5, 8, clusters=2, seed=9)
    k, needs_fill = grid_layout.plan_selection(5, ipc=1, cells=9)
    assert (k, needs_fill) == (5, True)
    with pytest.warns(UserWarning, match="only 5 images for 9 grid cells"):
        filled = grid_layout.fill_by_cycling(selectors.select("ssdim", embeddings, k), 9)
    with pytest.warns(UserWarning, match="every grid holds duplicates"):
        (grid,) = grid_layout.partition_into_grids(embeddings, filled, 1, 9)
    assert grid.size == 9 and set(grid.tolist()) == set(range(5))


# --- kNN coverage for many candidates ------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 5, 64])
def test_top_columns_are_the_exact_top_entries_of_each_row(count):
    rng = np.random.default_rng(count)
    rows = rng.standard_normal((30, 700)).astype(np.float32)
    rows[:, 100:110] = rows[:, :1]  # ties
    indices, values = solvers._top_columns(rows, count)
    expected = -np.sort(-rows, axis=1)[:, :count]
    np.testing.assert_array_equal(-np.sort(-values, axis=1), expected)
    np.testing.assert_array_equal(np.take_along_axis(rows, indices, axis=1), values)
    assert all(np.unique(row).size == count for row in indices)


@pytest.mark.parametrize("count", [1, 10, 150])
def test_neighbour_search_finds_the_exact_nearest_neighbours(count):
    unit = solvers.normalise_embeddings(clustered(150, 12, clusters=5, seed=4))
    indices, values = solvers._Kernel(unit, dense=False).neighbours(count)
    kernel = unit @ unit.T  # another product than the search's row blocks: equal to rounding
    gap = dot_gap(unit.shape[1])
    np.testing.assert_allclose(values, -np.sort(-kernel, axis=1)[:, :count], rtol=0, atol=gap)
    np.testing.assert_allclose(np.take_along_axis(kernel, indices, axis=1), values, rtol=0,
                               atol=gap)
    assert all(np.unique(row).size == count for row in indices)


@pytest.mark.parametrize("count", [20, 150])
def test_neighbour_gains_bound_the_exact_gains_and_equal_them_with_every_neighbour(count):
    unit = solvers.normalise_embeddings(clustered(150, 12, clusters=5, seed=4))
    kernel = solvers._Kernel(unit, dense=False)
    exact = solvers._GreedyState(kernel, 6, 1e-3)
    knn = solvers._GreedyState(
        kernel, 6, 1e-3, solvers._NeighbourCoverage(*kernel.neighbours(count))
    )
    gap = dot_gap(unit.shape[1])
    cosines = unit.astype(np.float64) @ unit.T.astype(np.float64)
    for index in (3, 77, 140, 12, 5):
        knn_gains, exact_gains = knn.coverage.all_gains(), exact.coverage.all_gains()
        # The two take their float32 kernel entries from differently shaped products, which
        # may differ by `gap` each: a gain is off by that per row it raises, plus one `gap` for
        # the float64 bookkeeping. (Seen: 2.53021330 against 2.53021318 on another CPU.)
        raised = (cosines > exact.coverage.best[:, None] - gap).sum(axis=0)
        tolerance = (raised + 1) * gap
        assert np.all(knn_gains <= exact_gains + tolerance)
        if count == 150:
            assert np.all(np.abs(knn_gains - exact_gains) <= tolerance)
        exact.add(index)
        knn.add(index)


def test_knn_greedy_with_every_neighbour_is_exact_greedy():
    # The same gains to rounding (previous test): a near-tie may pick another image of the
    # same objective on another BLAS.
    embeddings = clustered(150, 12, clusters=5, seed=4)
    knn = solvers.ssdim(embeddings, 15, solver="greedy", coverage="knn", neighbours=150)
    exact = solvers.ssdim(embeddings, 15, solver="greedy", coverage="exact")
    assert solvers.ssdim_objective(embeddings, knn) == pytest.approx(
        solvers.ssdim_objective(embeddings, exact), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_knn_selection_is_close_to_the_exact_solver(seed):
    embeddings = clustered(800, 32, clusters=25, seed=seed, spread=0.5 + 0.1 * seed)
    exact = solvers.ssdim_objective(embeddings, solvers.ssdim(embeddings, 60))
    knn = solvers.ssdim_objective(
        embeddings, solvers.ssdim(embeddings, 60, coverage="knn", neighbours=32)
    )
    facility = solvers.ssdim_objective(embeddings, selectors.select("facility", embeddings, 60))
    assert knn >= exact - 2e-3 * abs(exact)
    assert knn >= facility


def test_knn_path_allocates_nothing_of_size_m_squared():
    import tracemalloc

    num_images = 6000
    embeddings = clustered(num_images, 24, clusters=80, seed=6).astype(np.float32)
    tracemalloc.start()
    try:
        pick = solvers.ssdim(embeddings, 40, coverage="knn", neighbours=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.unique(pick).size == 40
    assert peak < num_images * num_images * 4 / 4  # a dense float32 kernel would be 144 MB


def test_coverage_defaults_to_knn_for_many_candidates(monkeypatch):
    chosen = []
    original = solvers._NeighbourCoverage.__init__

    def spy(self, neighbours, similarities):
        chosen.append(neighbours.shape)
        original(self, neighbours, similarities)

    monkeypatch.setattr(solvers._NeighbourCoverage, "__init__", spy)
    monkeypatch.setattr(solvers, "KNN_FROM_IMAGES", 100)
    embeddings = clustered(120, 8, clusters=4, seed=7)
    solvers.ssdim(embeddings, 10, neighbours=7)
    assert chosen == [(120, 7)]
    solvers.ssdim(clustered(99, 8, clusters=4, seed=7), 10)
    solvers.ssdim(embeddings, 10, dense_kernel=True)
    assert chosen == [(120, 7)]


@pytest.mark.parametrize(
    "options",
    [{"neighbours": 0}, {"neighbours": -3}, {"neighbours": 2.5}, {"neighbours": True},
     {"coverage": "sparse"}, {"coverage": "knn", "dense_kernel": True}],
)
def test_bad_coverage_options_raise_value_error(options):
    with pytest.raises(ValueError):
        solvers.ssdim(clustered(50, 8, clusters=3, seed=0), 5, **options)


# --- torch backend --------------------------------------------------------------------------------


def _same_objective_on(device: str) -> None:
    torch = pytest.importorskip("torch")
    embeddings = clustered(500, 24, clusters=12, seed=8).astype(np.float32)
    for options in ({}, {"coverage": "knn", "neighbours": 24}, {"dense_kernel": False},
                    {"solver": "greedy"}):
        reference = solvers.ssdim(embeddings, 40, **options)
        on_device = solvers.ssdim(
            torch.as_tensor(embeddings, device=device), 40, device=device, **options
        )
        assert on_device.dtype == np.int64
        assert solvers.ssdim_objective(embeddings, on_device) == pytest.approx(
            solvers.ssdim_objective(embeddings, reference), rel=1e-6
        )


def test_torch_cpu_backend_matches_numpy():
    _same_objective_on("cpu")


def test_torch_tensors_of_any_float_dtype_are_accepted():
    torch = pytest.importorskip("torch")
    embeddings = clustered(30, 6, clusters=3, seed=2)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        unit = solvers.normalise_embeddings(torch.tensor(embeddings, dtype=dtype))
        assert unit.dtype == np.float32 and unit.shape == (30, 6)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dense", [True, False])
def test_torch_kernel_computes_in_torch_and_returns_numpy(dense):
    torch = pytest.importorskip("torch")
    unit = solvers.normalise_embeddings(clustered(60, 8, clusters=3, seed=1))
    kernel = solvers._Kernel(unit, dense=dense, device="cpu")
    assert isinstance(kernel.source, torch.Tensor)
    rows, columns = np.array([4, 1]), np.array([0, 5, 9])
    np.testing.assert_allclose(kernel.rows(rows), unit[rows] @ unit.T, atol=1e-6)
    np.testing.assert_allclose(kernel.block(rows, columns), unit[rows] @ unit[columns].T,
                               atol=1e-6)
    best = np.full(60, 0.2, dtype=np.float32)
    np.testing.assert_allclose(  # torch's and numpy's BLAS: sums of 60 entries, each to rounding
        kernel.coverage_gains(rows, best),
        solvers._Kernel(unit, dense=dense).coverage_gains(rows, best), rtol=0,
        atol=60 * dot_gap(unit.shape[1]),
    )


def test_auto_device_is_cuda_when_present_and_numpy_otherwise():
    embeddings = clustered(200, 16, clusters=5, seed=3)
    picked = solvers.ssdim(embeddings, 20, device="auto")
    if not _cuda_available():
        np.testing.assert_array_equal(picked, solvers.ssdim(embeddings, 20))
    assert np.unique(picked).size == 20


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")
def test_cuda_backend_matches_numpy():
    _same_objective_on("cuda")


def test_ssdim_solves_on_one_blas_thread_whatever_the_caller_set(monkeypatch):
    """A notebook with two BLAS threads on a busy CPU: the large kernel product keeps them, the
    spectrum and the solver's many small calls run on one (spin-waiting threads cost 10-20x)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    seen: dict[str, list[set[int]]] = {"kernel": [], "spectrum": [], "solve": []}
    kernel_init, spectrum, rows = (solvers._Kernel.__init__, solvers._spectrum,
                                   solvers._Kernel.rows)

    def recording_init(self, *args, **kwargs):
        seen["kernel"].append(blas_threads())
        kernel_init(self, *args, **kwargs)

    def recording_spectrum(*args, **kwargs):
        seen["spectrum"].append(blas_threads())
        return spectrum(*args, **kwargs)

    def recording_rows(self, indices):
        seen["solve"].append(blas_threads())
        return rows(self, indices)

    monkeypatch.setattr(solvers._Kernel, "__init__", recording_init)
    monkeypatch.setattr(solvers, "_spectrum", recording_spectrum)
    monkeypatch.setattr(solvers._Kernel, "rows", recording_rows)
    embeddings = np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        solvers.ssdim(embeddings, 16)
        assert blas_threads() == {2}  # the caller's setting is back afterwards
    assert seen["kernel"] == [{2}]
    assert seen["spectrum"] == [{1}] and seen["solve"] and set().union(*seen["solve"]) == {1}


# --- pinned selections --------------------------------------------------------------------------

# What each method picked with tasks/select.py as of commit df73918, before it was split into
# tasks/ssdim.py, tasks/selectors.py and tasks/grid_layout.py: moving or restructuring the
# solvers must not change a pick. Another BLAS build rounds differently and may flip a near-tie,
# which is why the tests above compare objectives rather than indices.
PINNED = {
    "ssdim_fw": [94, 140, 82, 153, 221, 69, 155, 36, 190, 128, 95, 230],
    "ssdim_greedy": [94, 177, 82, 153, 221, 69, 155, 36, 190, 128, 95, 230],
    "ssdim_knn": [153, 104, 225, 101, 155, 170, 117, 15, 96, 123, 95, 230],
    "ssdim_ondemand": [94, 115, 82, 153, 117, 69, 155, 36, 190, 128, 95, 230],
    "select_ssdim": [94, 177, 82, 153, 221, 69, 155, 36, 190, 128],
    "select_random": [186, 149, 234, 68, 121, 154, 12, 110, 189, 5],
    "select_kcenter": [94, 99, 65, 26, 139, 51, 54, 146, 67, 171],
    "select_herding": [94, 99, 65, 158, 75, 119, 217, 192, 87, 193],
    "select_kmeans": [194, 153, 239, 36, 10, 41, 190, 64, 12, 123],
    "select_facility": [94, 177, 82, 153, 221, 155, 69, 36, 190, 86],
    "select_logdet": [0, 193, 104, 12, 66, 171, 105, 26, 144, 135],
    "grids_sequential": [[94, 177, 82, 153], [95, 23, 14, 36], [101, 167, 162, 63]],
    "grids_joint": [[94, 69, 95, 230], [115, 153, 155, 36], [82, 117, 190, 128]],
    "partition": [[0, 10, 24, 30, 32, 42], [2, 12, 16, 20, 36, 46], [4, 14, 18, 26, 34, 38],
                  [6, 8, 22, 28, 40, 44]],
}


def test_selections_for_a_seed_are_pinned():
    embeddings = np.random.default_rng(16).standard_normal((240, 24)).astype(np.float32)
    picked = {
        "ssdim_fw": solvers.ssdim(embeddings, 12, seed=3),
        "ssdim_greedy": solvers.ssdim(embeddings, 12, solver="greedy"),
        "ssdim_knn": solvers.ssdim(embeddings, 12, coverage="knn", neighbours=16, seed=1),
        "ssdim_ondemand": solvers.ssdim(embeddings, 12, dense_kernel=False, seed=2),
        **{f"select_{method}": selectors.select(method, embeddings, 10, seed=5)
           for method in selectors.SELECTION_METHODS},
        **{f"grids_{mode}": grid_layout.select_grids("ssdim", embeddings, 3, 4, seed=2,
                                                     grid_selection=mode)
           for mode in ("sequential", "joint")},
        "partition": grid_layout.partition_into_grids(embeddings, np.arange(0, 48, 2), 4, 6),
    }
    as_lists = {name: [np.asarray(g).tolist() for g in value] if isinstance(value, list)
                else value.tolist() for name, value in picked.items()}
    assert as_lists == PINNED
