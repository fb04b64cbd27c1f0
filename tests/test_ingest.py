import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gridistill.tasks.ingest import (
    decode_image,
    holdout_mask,
    list_samples,
    read_class_list,
    resolve_classes,
)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_list_image_folder_sorted_with_sizes(tiny_dataset):
    frame = list_samples(str(tiny_dataset["train"]))
    assert sorted(frame["class_name"].unique()) == ["alpha", "beta", "gamma"]
    assert len(frame) == 36 and (frame["size"] > 0).all()
    assert frame["path"].tolist() == sorted(frame["path"].tolist())


def test_manifest_resolves_relative_paths_and_drops_duplicates(tiny_dataset, tmp_path):
    rows = [("train/alpha/img_000.png", "alpha"), ("train/beta/img_001.png", "beta"),
            ("train/beta/img_001.png", "beta")]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.warns(UserWarning, match="duplicate"):
        frame = list_samples(str(tmp_path / "m.csv"))
    assert frame["path"].tolist() == [str(tmp_path / r[0]) for r in rows[:2]]
    assert frame["class_name"].tolist() == ["alpha", "beta"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ImageFolder"):
        list_samples(str(tmp_path / "nowhere"))


def test_class_order_follows_class_list_and_rejects_unknown(tmp_path):
    (tmp_path / "wnids.txt").write_text("n3 third\nn1 first\nn2\n")
    pairs = read_class_list(str(tmp_path / "wnids.txt"))
    classes = resolve_classes(["n1", "n2"], pairs)
    assert [(c.name, c.label, c.display_name) for c in classes] == [("n1", 1, "first"),
                                                                    ("n2", 2, "n2")]
    with pytest.raises(ValueError, match="not in the class list"):
        resolve_classes(["n1", "n9"], pairs)
    assert [c.name for c in resolve_classes(["b", "a"])] == ["a", "b"]  # sorted by default


def test_class_list_csv(tmp_path):
    (tmp_path / "classes.csv").write_text("label,wnid,name\n0,n1,tench\n1,n2,church\n")
    assert read_class_list(str(tmp_path / "classes.csv")) == [("n1", "tench"), ("n2", "church")]


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_unsafe_class_names_are_rejected(name):
    with pytest.raises(ValueError, match="invalid name"):
        resolve_classes([name])


def test_holdout_is_seeded_sized_and_order_independent():
    paths = [f"p{i}" for i in range(50)]
    mask = holdout_mask(paths, 0.2, seed=0, class_name="c")
    assert sum(mask) == 10
    shuffled = paths[::-1]
    held_out = [p for p, m in zip(paths, mask, strict=True) if m]
    shuffled_mask = holdout_mask(shuffled, 0.2, 0, "c")
    assert [p for p, m in zip(shuffled, shuffled_mask, strict=True) if m] == held_out[::-1]
    assert holdout_mask(paths, 0.2, seed=1, class_name="c") != mask


def test_decode_handles_modes_and_reports_bad_files():
    rgb = Image.new("RGB", (20, 10), (10, 200, 30))
    assert decode_image(_encode(rgb, "PNG")).image.getpixel((0, 0)) == (10, 200, 30)
    cmyk = decode_image(_encode(rgb.convert("CMYK"), "JPEG")).image
    assert cmyk.mode == "RGB" and abs(cmyk.getpixel((5, 5))[1] - 200) < 10
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(_encode(transparent, "PNG")).image.getpixel((0, 0)) == (255, 255, 255)
    palette = rgb.convert("P", palette=Image.ADAPTIVE)
    assert decode_image(_encode(palette, "PNG")).image.mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert decode_image(_encode(deep, "PNG")).image.getpixel((0, 0)) == (255, 255, 255)
    truncated = _encode(rgb, "JPEG")[:60]
    for data, reason in [(b"", "empty"), (b"not an image", "Unidentified"), (truncated, "")]:
        decoded = decode_image(data)
        assert decoded.image is None and reason in decoded.error


def test_load_stage_reads_headers_and_never_decodes_pixels(tiny_dataset, tmp_path, monkeypatch):
    from PIL import ImageFile

    from gridistill.stages import StoreSpec
    from gridistill.storage import RunStore
    from gridistill.tasks.index import IndexParams, index_dataset
    from gridistill.tasks.load import LoadParams, load_class

    def no_decode(self, *args, **kwargs):
        raise AssertionError("the load stage decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    store = StoreSpec(root=str(tmp_path / "run"))
    dataset = index_dataset.fn(store, IndexParams(data=str(tiny_dataset["train"]),
                                                  holdout_share=0))
    ref = load_class.fn(store, "gamma", LoadParams(), [dataset])
    images = RunStore(store.root).read_parquet(f"{ref.folder}/images.parquet")
    assert ref.meta["images"] == 12 and (images[["width", "height"]] == 32).all().all()
    assert images["sha256"].str.fullmatch("[0-9a-f]{64}").all()


def test_index_marks_the_train_and_test_splits(tiny_dataset, tmp_path):
    """A class's real training images are its train split (``split="train"``), what load reads;
    test images, given or held out, are ``split="test"``."""
    from gridistill.stages import StoreSpec
    from gridistill.storage import RunStore
    from gridistill.tasks.index import IndexParams, index_dataset

    store = StoreSpec(root=str(tmp_path / "run"))
    given = index_dataset.fn(store, IndexParams(data=str(tiny_dataset["train"]),
                                                test_data=str(tiny_dataset["test"])))
    assert given.meta["counts"] == {"train": 36, "test": 18}
    rows = RunStore(store.root).read_parquet(f"{given.folder}/classes/gamma.parquet")
    assert rows.groupby("split").size().to_dict() == {"train": 12, "test": 6}
    held_out = index_dataset.fn(store, IndexParams(data=str(tiny_dataset["train"])))
    assert set(held_out.meta["counts"]) == {"train", "test"}
    assert sum(held_out.meta["counts"].values()) == 36


def test_probe_reads_the_header_only():
    from gridistill.tasks.ingest import probe_image

    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    jpeg = _encode(Image.fromarray(noise), "JPEG")  # noise: most of the bytes are the scan
    assert probe_image(jpeg).size == (40, 30) and probe_image(jpeg).error is None
    truncated = probe_image(jpeg[:len(jpeg) // 2])  # header intact: caught at decode instead
    assert truncated.error is None and decode_image(jpeg[:len(jpeg) // 2]).error
    for data, reason in [(b"", "empty"), (b"not an image", "Unidentified")]:
        assert reason in probe_image(data).error
