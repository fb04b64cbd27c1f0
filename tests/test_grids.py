import numpy as np
import pytest
from PIL import Image

from gridistill.tasks.grids import assemble_grid, center_crop_square, pil_to_tensor, tensor_to_pil


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


def test_a_file_changed_after_embedding_stops_grids_naming_it(tiny_dataset, tmp_path):
    """load hashes every file; a selected file whose bytes changed since then is refused by
    grids (not tiled from pixels its embedding never saw, nor failing on a None image)."""
    from gridistill.stages import StoreSpec
    from gridistill.storage import RunStore
    from gridistill.tasks.embed import EmbedParams, embed_class
    from gridistill.tasks.grids import ChangedFileError, GridParams, assemble_class_grids
    from gridistill.tasks.index import IndexParams, index_dataset
    from gridistill.tasks.load import LoadParams, load_class
    from gridistill.tasks.select import SelectParams, select_class
    from tests.conftest import make_image

    store = StoreSpec(root=str(tmp_path / "run"))
    dataset = index_dataset.fn(store, IndexParams(data=str(tiny_dataset["train"]),
                                                  holdout_share=0))
    loaded = load_class.fn(store, "alpha", LoadParams(), [dataset])
    embedded = embed_class.fn(store, "alpha", EmbedParams(embedder="pixels-pca", progress=False),
                              [loaded])
    selected = select_class.fn(store, "alpha", SelectParams(grid_size=2), [embedded])
    params = GridParams(grid_size=2, resolution=16)
    assert assemble_class_grids.fn(store, "alpha", params, [selected]).meta["grids"] == 1

    selection = RunStore(store.root).read_parquet(f"{selected.folder}/selection.parquet")
    changed = selection["path"].iat[2]
    make_image((0, 0, 0), seed=999).save(changed)  # still a valid image, other bytes
    with pytest.raises(ChangedFileError, match="changed after it was loaded") as refused:
        assemble_class_grids.fn(store, "alpha", params, [selected], force=True)
    assert changed in str(refused.value)
