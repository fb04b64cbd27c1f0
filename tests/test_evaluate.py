"""Evaluation harness: students, protocol wiring (loss, schedule, augmentation), teacher checks,
and tiny end-to-end runs that must actually learn."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from gridistill.tasks.augment import GridAwareCrop, Lighting
from gridistill.tasks.harness_speed import harness_overhead
from gridistill.tasks.protocols import PROTOCOLS, get_protocol, lr_factor
from gridistill.tasks.students import STUDENTS, build_student
from gridistill.tasks.teachers import (
    ClassOrderMismatchError,
    Teacher,
    check_class_order,
    load_teacher,
    save_teacher,
)
from gridistill.tasks.training import (
    InMemoryImages,
    TrainingSet,
    mixed_cross_entropy,
    soft_label_kl,
    summarize_seeds,
    train_and_evaluate,
    train_and_evaluate_seeds,
    train_teacher,
)
from gridistill.tasks.transforms import build_train_transform, prepare_test_images

COLOURS = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 40, 220], [210, 210, 40]])


def solid_colour_set(per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy solid-colour images, one colour per class: trivially separable, not constant."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for label, colour in enumerate(COLOURS):
        noise = torch.randn(per_class, 3, size, size, generator=generator) * 25
        images.append((colour.view(1, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8))
        labels += [label] * per_class
    return torch.cat(images), torch.tensor(labels)


# -- students ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STUDENTS)
def test_every_student_builds_and_classifies(name):
    model = build_student(name, num_classes=7, image_size=64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_convnet_d3_is_the_dd_convnet():
    model = build_student("convnet_d3", 10, 64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    pools = [m for m in model.modules() if isinstance(m, nn.AvgPool2d)]
    assert [c.out_channels for c in convs] == [128] * 3
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert len(norms) == 3
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert len(pools) == 3
    assert model.classifier.in_features == 128 * 8 * 8
    with pytest.raises(ValueError):
        build_student("convnet_d6", 10, 32)  # 32 px cannot be halved six times


def test_resnetap10_downsamples_only_by_average_pooling():
    model = build_student("resnetap10", 10, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 1 + 4 * 2  # stem + 4 blocks
    norms = [n for n in model.modules() if isinstance(n, nn.GroupNorm)]
    assert all(n.num_groups == n.num_channels for n in norms)
    assert model.fc.in_features == 512


def test_lowres_resnet18_keeps_resolution_in_the_stem():
    model = build_student("resnet18_lowres", 10, 32)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    with pytest.raises(ValueError, match="unknown student"):
        build_student("resnet19", 10, 32)


# -- protocol wiring -----------------------------------------------------------------------
def test_presets_carry_the_public_settings():
    rded, minimax, small = PROTOCOLS["rded"], PROTOCOLS["minimax"], PROTOCOLS["cpu-small"]
    assert (rded.labels, rded.optimizer) == ("teacher", "adamw")
    assert (rded.lr, rded.weight_decay) == (1e-3, 0.01)
    assert rded.temperature == 20 and rded.cutmix_beta == 1.0 and rded.cutmix_prob == 1.0
    assert rded.epochs_for(10) == 300 and rded.batch_for(10) == 50 and rded.batch_for(50) == 100
    assert rded.val_resize_ratio == 8 / 7
    assert (minimax.labels, minimax.optimizer) == ("hard", "sgd")
    assert (minimax.lr, minimax.momentum) == (0.01, 0.9)
    assert minimax.weight_decay == 5e-4 and minimax.batch_for(10) == 64 and minimax.gamma == 0.2
    assert minimax.epochs_for(1) == 3000 and minimax.epochs_for(10) == 2000
    assert minimax.epochs_for(50) == 1500
    assert minimax.crop_scale == (0.5, 1.0) and minimax.color_jitter == 0.4
    assert minimax.lighting_std == 0.1
    assert small.labels == "hard" and small.image_size <= 128
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("nope")
    with pytest.raises(dataclasses_frozen_error()):
        rded.lr = 0.1  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_rded_half_cosine_schedule_values():
    rded = PROTOCOLS["rded"]
    assert lr_factor(rded, 0, 300) == 1.0
    assert lr_factor(rded, 150, 300) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(rded, 300, 300) == pytest.approx(0.5)
    assert lr_factor(rded, 301, 300) == 0.0


def test_minimax_multistep_schedule_values():
    minimax = PROTOCOLS["minimax"]
    # IDC: MultiStepLR(milestones=[2E//3, 5E//6], gamma=0.2) stepped once per epoch
    assert lr_factor(minimax, 0, 2000) == 1.0
    assert lr_factor(minimax, 1332, 2000) == 1.0
    assert lr_factor(minimax, 1333, 2000) == pytest.approx(0.2)
    assert lr_factor(minimax, 1665, 2000) == pytest.approx(0.2)
    assert lr_factor(minimax, 1666, 2000) == pytest.approx(0.04)


def test_cpu_small_cosine_schedule_values():
    small = PROTOCOLS["cpu-small"]
    assert lr_factor(small, 0, 40) == 1.0
    assert lr_factor(small, 20, 40) == pytest.approx(0.5)


def test_soft_label_kl_on_known_logits():
    temperature = 20.0
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0]])  # softmax(t/T) = [3/4, 1/4]
    student = torch.zeros(1, 2)  # softmax(s/T) = [1/2, 1/2]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert soft_label_kl(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert soft_label_kl(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-7)


def test_mixed_cross_entropy_weights_the_two_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    a, b = torch.tensor([0]), torch.tensor([2])
    ce = nn.functional.cross_entropy
    assert mixed_cross_entropy(logits, a, b, 1.0).item() == pytest.approx(ce(logits, a).item())
    assert mixed_cross_entropy(logits, a, b, 0.25).item() == pytest.approx(
        0.25 * ce(logits, a).item() + 0.75 * ce(logits, b).item())


def test_augmentation_composition_per_preset():
    minimax = [type(t) for t in build_train_transform(PROTOCOLS["minimax"], 32, None).transforms]
    assert minimax == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.ColorJitter,
                       Lighting]
    rrc = build_train_transform(PROTOCOLS["minimax"], 32, None).transforms[0]
    assert rrc.scale == (0.5, 1.0)
    rded_grid = build_train_transform(PROTOCOLS["rded"], 32, 4).transforms
    assert [type(t) for t in rded_grid] == [GridAwareCrop, v2.ToDtype]
    assert rded_grid[0].p_align == 0.6 and rded_grid[0].L == 4 and rded_grid[0].size == 32
    grid = torch.zeros(3, 60, 90, dtype=torch.uint8)
    out = build_train_transform(PROTOCOLS["minimax"], 24, 3)(grid)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_test_images_use_rded_resize_then_center_crop():
    images = torch.zeros(2, 3, 300, 400, dtype=torch.uint8)
    images[..., 150, 200] = 255
    out = prepare_test_images(images, 224, 8 / 7)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.uint8


# -- teacher -------------------------------------------------------------------------------
def test_class_order_check():
    check_class_order(["a", "b", "c"], ["a", "b", "c"])
    with pytest.raises(ClassOrderMismatchError, match="different order"):
        check_class_order(["b", "a", "c"], ["a", "b", "c"])
    with pytest.raises(ClassOrderMismatchError, match="not the dataset's"):
        check_class_order(["a", "b"], ["a", "b", "c"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_teacher_round_trip_and_class_order_on_load(tmp_path, suffix):
    torch.manual_seed(0)
    names = ("tench", "church", "parachute")
    teacher = Teacher(build_student("convnet_d3", 3, 16).eval(), "convnet_d3", names, 16)
    path = tmp_path / f"teacher{suffix}"
    save_teacher(teacher, path)
    loaded = load_teacher(path, list(names))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded.model(x), teacher.model(x))
    with pytest.raises(ClassOrderMismatchError):
        load_teacher(path, ["church", "tench", "parachute"])


def test_rded_refuses_a_teacher_with_another_class_order():
    images, labels = solid_colour_set(1, 16, seed=0)
    teacher = Teacher(build_student("convnet_d3", 4, 16), "convnet_d3", ("a", "b", "c", "d"), 16)
    with pytest.raises(ClassOrderMismatchError):
        train_and_evaluate(images, labels, images, labels, num_classes=4, protocol="rded",
                           image_size=16, epochs=1, teacher=teacher,
                           class_names=["b", "a", "c", "d"], progress=False)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_and_evaluate(images, labels, images, labels, num_classes=4, protocol="rded",
                           image_size=16, epochs=1, progress=False)
    with pytest.raises(ValueError, match="ignore the teacher"):
        train_and_evaluate(images, labels, images, labels, num_classes=4, protocol="cpu-small",
                           image_size=16, epochs=1, teacher=teacher, progress=False)


# -- end to end ----------------------------------------------------------------------------
def test_cpu_small_learns_solid_colours_from_grids_and_is_deterministic():
    train_x, train_y = solid_colour_set(2, 32, seed=0)  # "grids" of 2x2 cells, 32 px
    test_x, test_y = solid_colour_set(15, 24, seed=1)
    kwargs = dict(num_classes=4, grid_size=2, image_size=16, epochs=12, seed=3, progress=False)
    result = train_and_evaluate(train_x, train_y, test_x, test_y, **kwargs)
    assert result["top1_final"] >= 90.0  # chance is 25 %
    assert result["top1_best"] >= result["top1_final"]
    assert result["epochs"] == 12 and len(result["history"]) == 12
    assert result["train_images_per_s"] > 0
    assert result["settings"]["student"] == "convnet_d3" and result["settings"]["batch_size"] == 8
    again = train_and_evaluate(train_x, train_y, test_x, test_y, **kwargs)
    assert again["history"] == result["history"]


def test_evaluations_in_parallel_threads_give_their_sequential_results():
    """The flow evaluates several methods at once in one process's threads; torch's
    augmentations draw from the process-wide generator, so a seeded run must not share it."""
    from concurrent.futures import ThreadPoolExecutor

    test_x, test_y = solid_colour_set(5, 16, seed=1)
    sets = [solid_colour_set(2, 32, seed=seed) for seed in (0, 7)]
    kwargs = dict(num_classes=4, grid_size=2, image_size=16, epochs=6, seed=3, progress=False)

    def run(train: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
        return train_and_evaluate(*train, test_x, test_y, **kwargs)["history"]

    sequential = [run(train) for train in sets]
    with ThreadPoolExecutor(2) as pool:
        parallel = list(pool.map(run, sets * 2))
    assert parallel == sequential * 2


def test_minimax_protocol_learns_with_cutmix_and_colour_augmentation():
    train_x, train_y = solid_colour_set(4, 16, seed=0)
    test_x, test_y = solid_colour_set(10, 16, seed=1)
    result = train_and_evaluate(train_x, train_y, test_x, test_y, num_classes=4, protocol="minimax",
                                student="convnet_d3", grid_size=None, image_size=16, epochs=15,
                                progress=False)
    assert result["settings"]["batch_size"] == 16  # 64 capped at the set size
    assert result["top1_best"] >= 75.0


def test_rded_protocol_distils_a_teacher_into_a_student():
    names = ["red", "green", "blue", "yellow"]
    real_x, real_y = solid_colour_set(6, 16, seed=2)
    teacher = train_teacher(InMemoryImages(real_x, real_y), names, architecture="convnet_d3",
                            image_size=16, epochs=6, progress=False)
    train_x, train_y = solid_colour_set(1, 32, seed=0)
    test_x, test_y = solid_colour_set(10, 16, seed=1)
    result = train_and_evaluate(train_x, train_y, test_x, test_y, num_classes=4, protocol="rded",
                                student="convnet_d3", grid_size=2, image_size=16, epochs=15,
                                teacher=teacher, class_names=names, progress=False)
    assert result["settings"]["lr"] == 1e-3 and result["settings"]["batch_size"] == 4
    assert result["top1_best"] >= 75.0


def test_rded_student_follows_the_teacher_not_the_hard_labels():
    names = ["red", "green", "blue", "yellow"]
    real_x, real_y = solid_colour_set(6, 16, seed=2)
    # A teacher that learned a shifted labelling: the student must inherit the shift.
    shifted = train_teacher(InMemoryImages(real_x, (real_y + 1) % 4), names,
                            architecture="convnet_d3", image_size=16, epochs=6, progress=False)
    train_x, train_y = solid_colour_set(1, 32, seed=0)
    test_x, test_y = solid_colour_set(10, 16, seed=1)
    result = train_and_evaluate(train_x, train_y, test_x, test_y, num_classes=4, protocol="rded",
                                student="convnet_d3", grid_size=2, image_size=16, epochs=15,
                                teacher=shifted, class_names=names, progress=False)
    assert result["top1_best"] <= 25.0


def test_summarize_seeds_mean_and_sample_std():
    runs = [{"top1_final": 10.0, "top1_best": 12.0}, {"top1_final": 20.0, "top1_best": 22.0},
            {"top1_final": 30.0, "top1_best": 32.0}]
    summary = summarize_seeds(runs)
    assert summary["top1_final_mean"] == 20.0 and summary["top1_final_std"] == 10.0
    assert summary["top1_best_mean"] == 22.0 and summary["n_seeds"] == 3
    assert summarize_seeds(runs[:1])["top1_best_std"] == 0.0


def test_seeds_helper_runs_each_seed_and_summarises():
    train_x, train_y = solid_colour_set(1, 16, seed=0)
    result = train_and_evaluate_seeds(train_x, train_y, train_x, train_y, seeds=(0, 1),
                                      num_classes=4, grid_size=None, image_size=16, epochs=2,
                                      progress=False)
    assert [run["settings"]["seed"] for run in result["runs"]] == [0, 1]
    assert result["n_seeds"] == 2 and "top1_best_std" in result


def test_harness_overhead_reports_both_speeds():
    images, labels = solid_colour_set(4, 32, seed=0)
    speeds = harness_overhead(images, labels, num_classes=4, image_size=16, repeats=1)
    assert speeds["harness_images_per_s"] > 0 and speeds["bare_images_per_s"] > 0
    assert math.isfinite(speeds["overhead_pct"])


@pytest.mark.parametrize(("protocol", "crop_size", "grid_size"),
                         [("cpu-small", 32, 4), ("cpu-small", 32, None), ("rded", 224, 4),
                          ("cpu-soft", 128, 4)])
def test_working_resolution_keeps_every_crop_at_least_crop_size(protocol: str, crop_size: int,
                                                                grid_size: int | None) -> None:
    from gridistill.tasks.augment import sample_crop_box
    from gridistill.tasks.transforms import working_resolution

    preset = get_protocol(protocol)
    side = working_resolution(preset, crop_size, grid_size)
    generator = torch.Generator().manual_seed(0)
    narrowest = min(
        min(box.height, box.width)
        for box in (sample_crop_box(side, side, grid_size or 1,
                                    preset.p_align if grid_size else 0.0, generator,
                                    scale=preset.crop_scale) for _ in range(4000)))
    assert narrowest >= crop_size - 1  # the crop window's side is rounded to whole pixels


def test_the_teacher_stage_streams_the_train_split_a_batch_at_a_time(tiny_dataset, tmp_path,
                                                                     monkeypatch):
    """The training images are read from their files through the DataLoader, each epoch, and
    never held whole: when fit_student takes a batch, at most that batch has been decoded
    beyond what it already consumed (no decode workers on CPU, so no prefetch). A file changed
    since load is skipped."""
    import gridistill.tasks.teacher as stage
    import gridistill.tasks.training as training
    from gridistill.stages import ArtifactRef
    from gridistill.storage import RunStore

    store = RunStore(str(tmp_path / "run"))
    names = sorted(path.name for path in tiny_dataset["train"].iterdir())
    files = {name: sorted(str(p) for p in (tiny_dataset["train"] / name).iterdir())
             for name in names}
    test = [(str(p), label) for label, name in enumerate(names)
            for p in sorted((tiny_dataset["test"] / name).iterdir())]
    store.write_parquet("dataset/test.parquet", pd.DataFrame(test, columns=["path", "label"]))
    dataset = ArtifactRef(stage="index", scope="all", key="k", folder="dataset", meta={
        "classes": [[name, label, len(files[name])] for label, name in enumerate(names)]})
    loaded = []
    for name in names:
        sha = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in files[name]]
        if name == names[0]:
            sha[0] = "0" * 64  # changed since the load stage: refused
        store.write_parquet(f"load/{name}/images.parquet",
                            pd.DataFrame({"path": files[name], "sha256": sha}))
        loaded.append(ArtifactRef(stage="load", scope=name, key="k", folder=f"load/{name}"))
    train_size = sum(len(paths) for paths in files.values()) - 1

    counts = {"decoded": 0, "served": 0}
    held, sets, shapes = [], [], set()
    square_pixels = stage._square_pixels

    def counted(image, size):
        counts["decoded"] += 1
        return square_pixels(image, size)

    class Watched(TrainingSet):
        def __init__(self, inner: TrainingSet) -> None:
            self.inner = inner

        def __len__(self) -> int:
            return len(self.inner)

        def batches(self, batch_size: int):
            for images, labels in self.inner.batches(batch_size):
                held.append(counts["decoded"] - counts["served"])
                shapes.add((images.dtype, tuple(images.shape[1:])))
                counts["served"] += len(labels)
                yield images, labels

    fit_student = training.fit_student

    def watched_fit(model, train_set, *args, **kwargs):
        sets.append(train_set)
        return fit_student(model, Watched(train_set), *args, **kwargs)

    monkeypatch.setattr(stage, "_square_pixels", counted)
    monkeypatch.setattr(training, "fit_student", watched_fit)
    params = stage.TeacherParams(architecture="convnet_d3", image_size=16, epochs=2,
                                 progress=False)
    meta = stage.build_teacher.fn.compute(store, "teacher/all/k", "all", params,
                                          [dataset, *loaded])
    [train_set] = sets
    assert isinstance(train_set, stage.TrainingFiles) and len(train_set) == train_size + 1
    batch = get_protocol("cpu-small").batch_for(12)
    assert len(held) == 2 * math.ceil(train_size / batch)
    assert 0 < max(held) <= batch  # the old in-memory set: every image before batch one
    assert counts == {"decoded": 2 * train_size, "served": 2 * train_size}  # re-read per epoch
    assert shapes == {(torch.uint8, (3, 16, 16))}
    assert train_set.reported == {files[names[0]][0]}
    assert store.exists("teacher/all/k/teacher.safetensors") and meta["test_image_size"] == 16


def test_teacher_training_images_with_none_readable_are_an_error(tmp_path):
    from gridistill.storage import RunStore
    from gridistill.tasks.teacher import TrainingFiles

    train_set = TrainingFiles(RunStore(str(tmp_path)), [str(tmp_path / "gone.png")] * 2, [0, 1],
                              ["0" * 64] * 2, size=16)
    with pytest.raises(ValueError, match="none of its 2 images"):
        list(train_set.batches(4))
