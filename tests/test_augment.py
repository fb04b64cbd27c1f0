"""Grid-aware cropping (Grid Distillation, CVPR 2026), Lighting and CutMix."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from gridistill.tasks.augment import (
    GridAwareCrop,
    Lighting,
    cell_edges,
    cutmix_batch,
    sample_aligned_box,
    sample_crop_box,
    sample_random_resized_box,
)

grid_shapes = st.integers(1, 8).flatmap(
    lambda L: st.tuples(st.just(L), st.integers(L, 300), st.integers(L, 300))
)


@settings(max_examples=200, deadline=None)
@given(shape=grid_shapes, seed=st.integers(0, 2**31 - 1))
def test_aligned_crops_start_and_end_on_cell_boundaries(shape, seed):
    L, h, w = shape
    box = sample_aligned_box(h, w, L, torch.Generator().manual_seed(seed))
    rows, cols = cell_edges(h, L), cell_edges(w, L)
    assert box.aligned
    assert box.top in rows and box.top + box.height in rows
    assert box.left in cols and box.left + box.width in cols
    # same number of cells on both sides: the window keeps the cells' aspect ratio
    assert rows.index(box.top + box.height) - rows.index(box.top) == \
        cols.index(box.left + box.width) - cols.index(box.left)


@settings(max_examples=100, deadline=None)
@given(shape=grid_shapes, seed=st.integers(0, 2**31 - 1),
       p_align=st.sampled_from([0.0, 0.3, 0.6, 1.0]))
def test_every_crop_lies_inside_the_image(shape, seed, p_align):
    L, h, w = shape
    box = sample_crop_box(h, w, L, p_align, torch.Generator().manual_seed(seed))
    assert 0 <= box.top and box.top + box.height <= h and box.height > 0
    assert 0 <= box.left and box.left + box.width <= w and box.width > 0


def test_cell_edges_tile_sides_not_divisible_by_L():
    assert cell_edges(10, 3) == [0, 3, 6, 10]
    assert cell_edges(7, 7) == list(range(8))
    with pytest.raises(ValueError):
        cell_edges(2, 3)


@pytest.mark.parametrize("p_align", [0.0, 0.25, 0.6, 1.0])
def test_aligned_share_matches_p_align(p_align):
    generator = torch.Generator().manual_seed(1)
    draws = 4000
    aligned = sum(sample_crop_box(96, 160, 4, p_align, generator).aligned for _ in range(draws))
    # 4 binomial standard deviations (p=0.5 worst case: 0.032 at 4000 draws)
    tolerance = 4 * math.sqrt(max(p_align * (1 - p_align), 1e-12) / draws)
    assert abs(aligned / draws - p_align) <= tolerance + 1e-12


def test_every_aligned_window_is_equally_likely():
    generator = torch.Generator().manual_seed(2)
    L, draws = 3, 7000
    counts: dict[tuple[int, int, int], int] = {}
    for _ in range(draws):
        box = sample_aligned_box(30, 60, L, generator)
        key = (box.top, box.left, box.height)
        counts[key] = counts.get(key, 0) + 1
    windows = sum((L - k + 1) ** 2 for k in range(1, L + 1))  # 9 + 4 + 1 = 14
    assert len(counts) == windows
    expected = draws / windows
    assert all(abs(n - expected) < 5 * math.sqrt(expected) for n in counts.values())


def test_random_branch_matches_scale_bounds():
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        box = sample_random_resized_box(100, 120, (0.5, 1.0), (3 / 4, 4 / 3), generator)
        area = box.height * box.width / (100 * 120)
        assert not box.aligned
        assert 0.45 <= area <= 1.0  # rounding of the sides may dip slightly below 0.5


def _coloured_grid(L: int, h: int, w: int) -> torch.Tensor:
    """A uint8 grid whose cell (r, c) is a solid colour unique to that cell."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    rows, cols = cell_edges(h, L), cell_edges(w, L)
    for r in range(L):
        for c in range(L):
            image[0, rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = 10 + 20 * r
            image[1, rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = 10 + 20 * c
    return image


@pytest.mark.parametrize("L,h,w", [(4, 64, 64), (3, 45, 90), (5, 50, 35), (1, 20, 30)])
def test_transform_output_and_single_cell_content(L, h, w):
    grid = _coloured_grid(L, h, w)
    rows, cols = cell_edges(h, L), cell_edges(w, L)
    transform = GridAwareCrop(L, p_align=1.0, size=16, generator=torch.Generator().manual_seed(3))
    single_cells = 0
    for _ in range(60):
        out = transform(grid)
        box = transform.last_box
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
        assert box is not None and box.aligned
        r, c = rows.index(box.top), cols.index(box.left)
        if rows.index(box.top + box.height) - r == 1:
            # one whole cell: its solid colour, nothing bleeds in from the neighbours
            single_cells += 1
            assert torch.all(out[0] == 10 + 20 * r) and torch.all(out[1] == 10 + 20 * c)
    assert single_cells > 0


def test_transform_in_compose_on_tv_tensor_image_and_float():
    image = tv_tensors.Image(torch.rand(3, 40, 60))
    pipeline = v2.Compose([GridAwareCrop(4, 0.6, size=24), v2.ToDtype(torch.float32)])
    out = pipeline(image)
    assert isinstance(out, tv_tensors.Image) and out.shape == (3, 24, 24)


def test_flip_happens_about_half_the_time():
    image = torch.arange(16, dtype=torch.float32).view(1, 4, 4).expand(3, 4, 4).contiguous()
    transform = GridAwareCrop(1, p_align=1.0, size=4, generator=torch.Generator().manual_seed(0))
    flipped = sum(bool(transform(image)[0, 0, 0] == 3) for _ in range(400))
    assert 150 < flipped < 250


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        GridAwareCrop(0)
    with pytest.raises(ValueError):
        GridAwareCrop(4, p_align=1.5)


def test_lighting_adds_one_colour_offset_per_image():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    out = Lighting(0.1)(image)
    offset = out - image
    assert torch.allclose(offset, offset[:, :1, :1].expand_as(offset), atol=1e-6)
    assert offset.abs().max() > 0
    assert torch.equal(Lighting(0.0)(image), image)
    with pytest.raises(TypeError):
        Lighting(0.1)(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_cutmix_lam_is_the_kept_area():
    torch.manual_seed(0)
    images = torch.stack([torch.full((1, 16, 16), float(i)) for i in range(8)])
    for _ in range(20):
        mixed, perm, lam = cutmix_batch(images, beta=1.0)
        kept = (mixed == images).float().mean(dim=(1, 2, 3))
        pasted_from_self = perm == torch.arange(8)
        assert torch.allclose(kept[~pasted_from_self], torch.tensor(lam), atol=1e-6)
