"""ImageNette benchmark of the ``cpu-small`` protocol: real images vs grids, IPC 1 and 10.

Distils ``public/train`` of ``../shared/data/imagenette`` with each method, trains a fresh
student on the distilled set with :func:`tasks.evaluate.train_and_evaluate` and tests it on
``public/test``. Run from the repository root::

    python -m benchmarks.distill_imagenette                 # full table: 24 runs, sized for
                                                            # <= 45 min on 2 cores
    python -m benchmarks.distill_imagenette --quick         # smoke run, ~2 min
    python -m benchmarks.distill_imagenette --speed-only    # harness vs bare PyTorch images/s

Methods (one distilled image per slot, ``IPC`` images per class at 224 px in every case):

- ``random-real``: IPC random real images per class;
- ``<selector>-grid``: IPC grids per class of L x L images chosen by ``tasks.select.select``
  (``random``, ``kcenter``, ``ssdim``, ...), split into grids by ``partition_into_grids`` and
  tiled by ``tasks.grids.assemble_grid``; trained with grid-aware cropping.

The distilled set and the student's initialisation both follow the seed. The table shows
mean +- sample std over seeds of the final and of the best (over the evaluated epochs) top-1.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tasks.evaluate import get_protocol, harness_overhead, summarize_seeds, train_and_evaluate

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
REAL_METHOD = "random-real"
FULL_METHOD = "full-real"  # the whole real train split: the upper baseline, independent of IPC


@dataclass(frozen=True)
class BenchmarkConfig:
    data: Path = DEFAULT_DATA
    methods: tuple[str, ...] = ("random-real", "random-grid", "kcenter-grid", "ssdim-grid")
    ipcs: tuple[int, ...] = (1, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    embedder: str = "auto"  # auto | clip | pixels-pca (tasks.embed.choose_embedder)
    grid_size: int = 4
    resolution: int = 224  # storage resolution of every distilled image
    student: str | None = None  # None: the protocol's (cpu-small: convnet_d3)
    image_size: int | None = None  # None: the protocol's (cpu-small: 64 px)
    epochs: int | None = None  # None: the protocol's, by IPC
    pool_per_class: int | None = None  # None: every train image is a candidate
    test_per_class: int | None = None  # None: the whole test split
    threads: int | None = None
    out: Path | None = None  # Parquet of one row per run
    speed: bool = True  # also measure harness vs bare-loop images/s


# --quick: the values it sets unless the flag is given explicitly.
QUICK = {"ipcs": (1,), "seeds": (0,), "pool_per_class": 40, "test_per_class": 20, "epochs": 8,
         "image_size": 32, "embedder": "pixels-pca"}


@dataclass
class Split:
    paths: list[Path]
    labels: list[int]


def read_splits(data: Path) -> tuple[list[str], Split, Split]:
    """Class names (in label order) and the train / test file lists from the manifest."""
    with open(data / "classes.csv", newline="") as handle:
        classes = sorted(csv.DictReader(handle), key=lambda row: int(row["label"]))
    names = [row["name"] for row in classes]
    train, test = Split([], []), Split([], [])
    with open(data / "manifest_public.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            split = {"public/train": train, "public/test": test}.get(row["split"])
            if split is not None:
                split.paths.append(data / row["path"])
                split.labels.append(int(row["label"]))
    return names, train, test


def subsample(split: Split, per_class: int | None, seed: int) -> Split:
    if per_class is None:
        return split
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    keep = np.concatenate([
        np.sort(rng.permutation(np.flatnonzero(labels == c))[:per_class]) for c in np.unique(labels)
    ])
    return Split([split.paths[i] for i in keep], [split.labels[i] for i in keep])


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # 242 ImageNette files are grayscale


def to_uint8_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8; square images are resized (Lanczos) when not at ``size``."""
    arrays = []
    for image in images:
        if image.size != (size, size):
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size),
                                                                          Image.LANCZOS)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def check_methods(methods: Sequence[str]) -> dict[str, str | None]:
    """Method name -> selector (None for real images); fails before any work if one is missing."""
    from tasks.select import SELECTION_METHODS

    selectors: dict[str, str | None] = {}
    for method in methods:
        if method in (REAL_METHOD, FULL_METHOD):
            selectors[method] = None
            continue
        if not method.endswith("-grid"):
            raise SystemExit(f"unknown method {method!r}: use {REAL_METHOD}, {FULL_METHOD} or "
                             "<selector>-grid")
        selector = method.removesuffix("-grid")
        if selector not in SELECTION_METHODS:
            raise SystemExit(
                f"method {method!r} needs selector {selector!r}, which tasks.select does not "
                f"offer (it has: {', '.join(SELECTION_METHODS)}); leave it out with --methods"
            )
        selectors[method] = selector
    return selectors


def embed_pool(
    pool: Split, names: Sequence[str], embedder: str
) -> tuple[dict[int, np.ndarray], str]:
    """Per class: the embedding rows of that class's candidates (in pool order)."""
    from tasks.embed import choose_embedder

    choice = choose_embedder(embedder, clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    if choice.fallback_reason:
        print(f"!!! embedder fallback: {choice.fallback_reason}", file=sys.stderr)
    labels = np.asarray(pool.labels)
    embeddings = {}
    for label in range(len(names)):
        images = [load_rgb(pool.paths[i]) for i in np.flatnonzero(labels == label)]
        embeddings[label] = choice.embed(images)
    return embeddings, choice.name


def distil(method: str, selector: str | None, pool: Split, embeddings: dict[int, np.ndarray],
           ipc: int, seed: int, config: BenchmarkConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled set of one method: (IPC * classes, 3, R, R) uint8 images and labels
    (for ``full-real``: every pool image)."""
    from tasks.grids import assemble_grid
    from tasks.select import fill_by_cycling, partition_into_grids, plan_selection, select

    if method == FULL_METHOD:
        return (to_uint8_tensor([load_rgb(p) for p in pool.paths], config.resolution),
                torch.tensor(pool.labels))
    labels = np.asarray(pool.labels)
    images, targets = [], []
    for label, class_embeddings in embeddings.items():
        class_paths = [pool.paths[i] for i in np.flatnonzero(labels == label)]
        if selector is None:
            chosen = select("random", class_embeddings, ipc, seed=seed)
            images += [load_rgb(class_paths[i]) for i in chosen]
        else:
            cells = config.grid_size**2
            k, needs_fill = plan_selection(len(class_paths), ipc, cells)
            chosen = select(selector, class_embeddings, k, seed=seed)
            if needs_fill:
                chosen = fill_by_cycling(chosen, ipc * cells)
            for grid in partition_into_grids(class_embeddings, chosen, ipc, cells):
                cell_images = [load_rgb(class_paths[i]) for i in grid]
                images.append(assemble_grid(cell_images, config.grid_size, config.resolution))
        targets += [label] * ipc
    return to_uint8_tensor(images, config.resolution), torch.tensor(targets)


def format_table(rows: list[dict[str, Any]], methods: Sequence[str], ipcs: Sequence[int]) -> str:
    lines = ["| method | IPC | top-1 final (%) | top-1 best (%) | seeds | train img/s |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        for ipc in ipcs:
            runs = [r for r in rows if r["method"] == method and r["ipc"] == ipc]
            if not runs:
                continue
            s = summarize_seeds(runs)
            speed = float(np.mean([r["train_images_per_s"] for r in runs]))
            lines.append(
                f"| {method} | {ipc} | {s['top1_final_mean']:.1f} ± {s['top1_final_std']:.1f} | "
                f"{s['top1_best_mean']:.1f} ± {s['top1_best_std']:.1f} | {len(runs)} | "
                f"{speed:.0f} |"
            )
    return "\n".join(lines)


def run(config: BenchmarkConfig, speed_only: bool = False) -> list[dict[str, Any]]:
    if config.threads:
        torch.set_num_threads(config.threads)
    protocol = get_protocol("cpu-small")
    student = config.student or protocol.student
    image_size = config.image_size or protocol.image_size
    selectors = check_methods(config.methods)
    names, train, test = read_splits(config.data)
    pool = subsample(train, config.pool_per_class, seed=0)
    test = subsample(test, config.test_per_class, seed=0)
    print(f"# ImageNette cpu-small benchmark: {len(pool.paths)} candidates, "
          f"{len(test.paths)} test images, student {student} at {image_size} px, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")

    started = time.perf_counter()
    embeddings, embedder_name = embed_pool(pool, names, config.embedder)
    print(f"# embedder: {embedder_name} ({time.perf_counter() - started:.0f} s)")

    if not speed_only:
        test_images = to_uint8_tensor([load_rgb(p) for p in test.paths], config.resolution)
        test_labels = torch.tensor(test.labels)
    rows: list[dict[str, Any]] = []
    for ipc in () if speed_only else config.ipcs:
        for method, selector in selectors.items():
            if method == FULL_METHOD and ipc != config.ipcs[0]:
                continue  # independent of IPC: trained once
            for seed in config.seeds:
                train_images, train_labels = distil(method, selector, pool, embeddings, ipc, seed,
                                                    config)
                result = train_and_evaluate(
                    train_images, train_labels, test_images, test_labels,
                    num_classes=len(names), student=student, protocol="cpu-small",
                    grid_size=None if selector is None else config.grid_size,
                    image_size=image_size, epochs=config.epochs, seed=seed, progress=False,
                )
                rows.append({"method": method, "ipc": ipc, "seed": seed, "embedder": embedder_name,
                             "top1_final": result["top1_final"], "top1_best": result["top1_best"],
                             "best_epoch": result["best_epoch"], "epochs": result["epochs"],
                             "train_images_per_s": result["train_images_per_s"],
                             "elapsed_s": time.perf_counter() - started})
                print(f"{method:>14} IPC {ipc:>2} seed {seed}: final {result['top1_final']:.1f} "
                      f"best {result['top1_best']:.1f} ({rows[-1]['elapsed_s']:.0f} s)",
                      flush=True)

    if rows:
        print()
        print(format_table(rows, list(selectors), config.ipcs))
        if config.out is not None:
            import pandas as pd

            pd.DataFrame(rows).to_parquet(config.out)
            print(f"\n# runs written to {config.out}")

    if config.speed or speed_only:
        # Time the first grid method when there is one: grids are what this repo distils.
        method = next((m for m, s in selectors.items() if s is not None), REAL_METHOD)
        selector = selectors.get(method)
        ipc = max(config.ipcs)
        images, labels = distil(method, selector, pool, embeddings, ipc, 0, config)
        speed = harness_overhead(images, labels, num_classes=len(names), student=student,
                                 grid_size=None if selector is None else config.grid_size,
                                 image_size=image_size)
        print(f"\n# speed ({student}, {image_size} px, {len(images)} images of "
              f"{method} IPC {ipc}, best of 3 alternating runs): "
              f"harness {speed['harness_images_per_s']:.1f} img/s, bare PyTorch loop "
              f"{speed['bare_images_per_s']:.1f} img/s, overhead {speed['overhead_pct']:+.1f} %")
    print(f"# total {time.perf_counter() - started:.0f} s")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchmarkConfig, bool]:
    defaults = BenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--ipcs", nargs="+", type=int)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--embedder", choices=("auto", "clip", "pixels-pca"))
    parser.add_argument("--grid-size", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--student")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--pool-per-class", type=int)
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-speed", dest="speed", action="store_false", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~2 min): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                        + "; flags given explicitly still win")
    parser.add_argument("--speed-only", action="store_true",
                        help="only measure harness vs bare-loop training images/s")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(BenchmarkConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(given, list) else given
        elif args.quick and f.name in QUICK:
            values[f.name] = QUICK[f.name]
        else:
            values[f.name] = getattr(defaults, f.name)
    return BenchmarkConfig(**values), args.speed_only


def main(argv: Sequence[str] | None = None) -> int:
    # Without this a missing CLIP checkpoint makes the hub client retry for minutes; an
    # explicit HF_HUB_OFFLINE=0 in the environment still wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config, speed_only = parse_args(argv)
    print("# config:", {k: str(v) for k, v in asdict(config).items()})
    run(config, speed_only=speed_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
