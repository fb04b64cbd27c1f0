import numpy as np
import pytest
from PIL import Image

from tasks.grids import assemble_grid, center_crop_square, pil_to_tensor, tensor_to_pil


def test_cells_are_row_major_centre_crops():
    colours = [(i * 15, 255 - i * 15, (i * 40) % 256) for i in range(16)]
    images = [Image.new("RGB", (40 + i, 30), c) for i, c in enumerate(colours)]
    grid = np.asarray(assemble_grid(images, L=4, size=64))
    for index, colour in enumerate(colours):
        row, col = divmod(index, 4)
        cell = grid[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
        assert np.abs(cell.astype(int) - colour).max() <= 1


def test_center_crop_keeps_the_middle():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 0, 0), (10, 0, 20, 10))
    assert center_crop_square(image).getpixel((5, 5)) == (255, 0, 0)


def test_wrong_inputs_raise():
    with pytest.raises(ValueError, match="needs 4 images"):
        assemble_grid([Image.new("RGB", (8, 8))] * 3, L=2, size=16)
    with pytest.raises(ValueError, match="divisible"):
        assemble_grid([Image.new("RGB", (8, 8))] * 4, L=2, size=15)


def test_tensor_round_trip():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    tensor = pil_to_tensor([image])
    assert tensor.shape == (1, 3, 5, 7) and 0 <= tensor.min() and tensor.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)[0]), np.asarray(image))
