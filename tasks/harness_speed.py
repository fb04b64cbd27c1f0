"""How much the training harness costs: its training images/s against a bare PyTorch loop on the
same model, optimiser and batch size (the ImageNette benchmark's speed column). Plain torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from gridistill.tasks.protocols import get_protocol
from gridistill.tasks.students import build_student
from gridistill.tasks.training import (
    InMemoryImages,
    TrainSettings,
    _autocast,
    _make_optimizer,
    fit_student,
    seeded,
)


def bare_loop_images_per_s(
    student: str,
    num_classes: int,
    image_size: int,
    batch_size: int,
    steps: int,
    *,
    protocol: str = "cpu-small",
    device: str = "cpu",
    seed: int = 0,
) -> float:
    """Training images/s of a bare PyTorch loop (same model and optimiser, preloaded random
    normalised batches, no augmentation, no bookkeeping): the yardstick for the harness."""
    preset = get_protocol(protocol)
    dev = torch.device(device)
    # Same memory format and autocast as the harness, so only the harness's own work differs.
    memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    with seeded(seed, dev):
        model = build_student(student, num_classes, image_size)
        inputs = torch.randn(batch_size, 3, image_size, image_size, device=dev)
        targets = torch.randint(num_classes, (batch_size,), device=dev)
    model.to(dev, memory_format=memory_format).train()
    optimizer = _make_optimizer(preset, model, preset.lr_for(student))
    inputs = inputs.contiguous(memory_format=memory_format)
    start = time.perf_counter()
    for _ in range(steps):
        with _autocast(dev):
            loss = F.cross_entropy(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return steps * batch_size / (time.perf_counter() - start)


def harness_overhead(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    num_classes: int,
    student: str = "convnet_d3",
    protocol: str = "cpu-small",
    grid_size: int | None = 4,
    image_size: int = 64,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, float]:
    """Harness vs bare-loop training images/s on the same model and batch size.

    One harness epoch and a bare loop of as many steps alternate ``repeats`` times and the best
    of each is kept, so that load from other processes on a shared machine does not land on
    one side only. Hard labels; ``overhead_pct`` = bare / harness - 1, in percent.
    """
    preset = replace(get_protocol(protocol), labels="hard")
    batch = min(preset.batch_for(10**6), len(train_images))
    settings = TrainSettings(protocol=protocol, student=student, image_size=image_size,
                             grid_size=grid_size, epochs=1, batch_size=batch,
                             lr=preset.lr_for(student), ipc=1, seed=0, device=device)
    steps = math.ceil(len(train_images) / batch)
    harness, bare = [], []
    for repeat in range(repeats):
        with seeded(repeat, torch.device(device)):
            model = build_student(student, num_classes, image_size)
            train_set = InMemoryImages(train_images.to(device), train_labels.to(device))
            harness.append(fit_student(model, train_set, preset, settings, progress=False)[1])
        bare.append(bare_loop_images_per_s(student, num_classes, image_size, batch, steps,
                                           protocol=protocol, device=device, seed=repeat))
    best_harness, best_bare = max(harness), max(bare)
    return {"harness_images_per_s": best_harness, "bare_images_per_s": best_bare,
            "overhead_pct": 100.0 * (best_bare / best_harness - 1.0)}
