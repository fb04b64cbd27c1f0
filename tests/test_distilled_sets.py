"""Readers for distilled sets from other code bases, and the class → ImageNet-1K mapping."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gridistill.distilled_sets import (
    DistilledSetError,
    detect_kind,
    imagenet_labels_for_classes,
    imagenet_wnids,
    preset_wnids,
    read_distilled_set,
    read_image_folder,
    read_mtt_tensors,
    read_npz,
    read_run_root,
    read_wnid_list,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_mtt_tensors_round_trip_with_their_normalisation(tmp_path, pixels) -> None:
    # As MTT's distill.py saves them: normalised images (a leaf that required grad) and labels.
    images = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).requires_grad_(True)
    torch.save(images, tmp_path / "images_best.pt")
    torch.save(torch.tensor([0, 0, 1, 1, 2]), tmp_path / "labels_best.pt")
    for path in (tmp_path, tmp_path / "images_best.pt"):
        distilled = read_mtt_tensors(path, normalization="imagenet")
        torch.testing.assert_close(distilled.images, pixels)
        assert distilled.class_indices.tolist() == [0, 0, 1, 1, 2]
        assert distilled.num_classes == 3
    assert detect_kind(tmp_path) == "mtt"


def test_mtt_soft_labels_become_their_argmax(tmp_path, pixels) -> None:
    torch.save(pixels, tmp_path / "images_100.pt")
    torch.save(torch.eye(5)[[4, 3, 2, 1, 0]] * 3.0, tmp_path / "labels_100.pt")
    distilled = read_mtt_tensors(tmp_path / "images_100.pt", normalization="none")
    assert distilled.class_indices.tolist() == [4, 3, 2, 1, 0]


def test_mtt_normalisation_must_be_named(tmp_path, pixels) -> None:
    torch.save(pixels, tmp_path / "images_best.pt")
    torch.save(torch.zeros(5, dtype=torch.long), tmp_path / "labels_best.pt")
    with pytest.raises(DistilledSetError, match="normalization"):
        read_mtt_tensors(tmp_path, normalization=None)


class NotATensor:
    """Anything a pickle can carry; weights_only loading must refuse it."""


def test_mtt_files_are_loaded_weights_only(tmp_path) -> None:
    torch.save(NotATensor(), tmp_path / "images_best.pt")
    torch.save(torch.zeros(1, dtype=torch.long), tmp_path / "labels_best.pt")
    with pytest.raises(pickle.UnpicklingError):
        read_mtt_tensors(tmp_path, normalization="none")


def test_npz_uint8_nhwc_and_float_nchw(tmp_path, pixels) -> None:
    raw = (pixels * 255).round().byte().permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "set.npz", x=raw, y=np.array([0, 1, 2, 3, 4]))
    distilled = read_npz(tmp_path / "set.npz", normalization=None)
    torch.testing.assert_close(distilled.images, pixels, atol=1 / 255, rtol=0)
    assert distilled.class_indices.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DistilledSetError, match="raw pixels"):
        read_npz(tmp_path / "set.npz", normalization="imagenet")

    normalised = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).numpy()
    np.savez(tmp_path / "float.npz", images=normalised, labels=np.zeros(5, dtype=np.int64))
    distilled = read_distilled_set(tmp_path / "float.npz", normalization="imagenet")
    torch.testing.assert_close(distilled.images, pixels)


def write_image_folder(root, classes: dict[str, int], size=(12, 10)) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, (i * 40, 100, 200)).save(root / name / f"{i}.png")


def test_image_folder_classes_in_sorted_folder_order(tmp_path) -> None:
    write_image_folder(tmp_path, {"n02102040": 2, "n01440764": 1})
    distilled = read_image_folder(tmp_path)
    assert distilled.class_names == ["n01440764", "n02102040"]
    assert distilled.class_indices.tolist() == [0, 1, 1]
    assert distilled.images.shape == (3, 3, 10, 12)
    assert torch.allclose(distilled.images[2, :, 0, 0], torch.tensor([40, 100, 200]) / 255)
    assert detect_kind(tmp_path) == "image-folder"


def test_image_folder_refuses_mixed_sizes(tmp_path) -> None:
    write_image_folder(tmp_path / "set", {"a": 1})
    Image.new("RGB", (5, 5)).save(tmp_path / "set" / "a" / "small.png")
    with pytest.raises(DistilledSetError, match="different sizes"):
        read_image_folder(tmp_path / "set")


def test_run_root_reads_the_distilled_set_index(tmp_path) -> None:
    import pandas as pd

    write_image_folder(tmp_path / "grids", {"n01440764": 2, "n02102040": 1})
    rows = [("n02102040", 1, "grids/n02102040/0.png"), ("n01440764", 0, "grids/n01440764/1.png"),
            ("n01440764", 0, "grids/n01440764/0.png")]
    (tmp_path / "distilled").mkdir()
    frame = pd.DataFrame(rows, columns=["class_name", "label", "file"])
    frame.to_parquet(tmp_path / "distilled" / "ssdim.parquet")
    assert detect_kind(tmp_path) == "run-root"
    distilled = read_run_root(tmp_path)
    assert distilled.class_names == ["n01440764", "n02102040"]
    assert distilled.class_indices.tolist() == [1, 0, 0] and len(distilled.images) == 3
    frame.to_parquet(tmp_path / "distilled" / "random.parquet")
    with pytest.raises(DistilledSetError, match="several distilled sets"):
        read_run_root(tmp_path)
    assert read_run_root(tmp_path, "random").source.endswith("(random)")


def test_imagenet_wnids_come_sorted_from_timm() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    assert wnids[0] == "n01440764"  # tench


def test_imagenette_preset_maps_class_index_to_imagenet_label() -> None:
    labels = imagenet_labels_for_classes(10, wnids=preset_wnids("imagenette"))
    assert labels.tolist() == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert preset_wnids("imagenette")[-1] == "n03888257"  # parachute


def test_imagewoof_folder_maps_by_name_not_by_preset_order() -> None:
    # An ImageWoof ImageFolder sorts by WNID; the DD code bases' ImageWoof order differs.
    folders = sorted(preset_wnids("imagewoof"))
    labels = imagenet_labels_for_classes(10, folders, wnids=preset_wnids("imagewoof"))
    assert labels.tolist() == sorted([193, 182, 258, 162, 155, 167, 159, 273, 207, 229])
    with pytest.raises(DistilledSetError, match="wrong preset"):
        imagenet_labels_for_classes(10, folders, wnids=preset_wnids("imagenette"))


def test_wnid_list_file_and_numeric_class_folders(tmp_path) -> None:
    (tmp_path / "wnids.txt").write_text("n02102040\nn01440764\n\n")
    wnids = read_wnid_list(tmp_path / "wnids.txt")
    assert imagenet_labels_for_classes(2, ["1", "0"], wnids=wnids).tolist() == [0, 217]
    with pytest.raises(DistilledSetError, match="neither WNIDs nor class indices"):
        imagenet_labels_for_classes(2, ["dog", "fish"], wnids=wnids)
    with pytest.raises(DistilledSetError, match="--classes-preset"):
        imagenet_labels_for_classes(2)
