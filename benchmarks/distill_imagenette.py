"""ImageNette benchmark on a CPU: real images vs grids, IPC 1 and 10, hard and soft labels.

Distils ``public/train`` of ``../shared/data/imagenette`` with each method, trains a fresh
student on the distilled set with :func:`gridistill.tasks.training.train_and_evaluate` and
tests it on ``public/test``. Run from the repository root::

    python -m benchmarks.distill_imagenette                 # the goal rows (see the .md)
    python -m benchmarks.distill_imagenette --quick         # smoke run, ~2 min
    python -m benchmarks.distill_imagenette --speed-only    # harness vs bare PyTorch images/s

Methods (one distilled image per slot, ``IPC`` images per class at 224 px in every case):

- ``random-real``: IPC random real images per class; ``full-real``: the whole train split;
- ``<selector>-grid``: IPC grids per class of L x L images chosen by
  ``gridistill.tasks.grid_layout.select_grids`` with ``<selector>`` (``random``, ``kcenter``,
  ``herding``, ``ssdim``, ...), one grid after another from what is left of the class (the paper);
  ``<selector>-joint-grid``: all IPC x L x L images in one selection, dealt into grids;
- ``ssdim[a,b,c]-grid``: SSDIM with weights (alpha, beta, gamma) = (a, b, c), sequential
  (the paper's Table 6; ``ssdim[0,0,0]`` is random grids there and here);
- ``<grid method>@s``: that method on each class's most typical share ``s`` only
  (``select_grids(..., typical_share=s)``), e.g. ``ssdim-grid@0.5``.

Labels: ``hard`` trains with the ``cpu-small`` protocol, ``teacher`` with ``cpu-soft`` (soft
labels from the packaged ImageNet-1K EfficientNet-Lite0 on every training crop). Rows are
appended to ``--out`` as they finish and runs already there are skipped, so an interrupted
benchmark continues where it stopped. The table shows mean +- sample std over seeds of the
final and best top-1, and DD-Ranking's scores against random-real and full-real.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gridistill.tasks.harness_speed import harness_overhead
from gridistill.tasks.protocols import get_protocol
from gridistill.tasks.training import train_and_evaluate

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
REAL_METHOD = "random-real"
FULL_METHOD = "full-real"  # the whole real train split: the upper baseline, independent of IPC


LABELS = {"hard": "cpu-small", "teacher": "cpu-soft"}  # labels -> protocol
TEACHER = "efficientnet-lite0"


@dataclass(frozen=True)
class BenchmarkConfig:
    data: Path = DEFAULT_DATA
    methods: tuple[str, ...] = ("random-real", "random-grid", "ssdim-grid", "ssdim-joint-grid")
    ipcs: tuple[int, ...] = (10,)
    seeds: tuple[int, ...] = (0, 1, 2)
    embedders: tuple[str, ...] = ("efficientnet-lite0",)  # gridistill.tasks.embed.EMBEDDERS
    labels: tuple[str, ...] = ("hard",)  # keys of LABELS
    grid_size: int = 4
    resolution: int = 224  # storage resolution of every distilled image
    student: str | None = None  # None: the protocol's (cpu-small: convnet_d3)
    image_size: int | None = None  # None: the protocol's (cpu-small: 64 px)
    epochs: int | None = None  # None: the protocol's, by IPC
    train_per_class: int | None = None  # None: every train image is a candidate
    test_per_class: int | None = None  # None: the whole test split
    threads: int | None = None
    out: Path | None = None  # Parquet of one row per run
    speed: bool = True  # also measure harness vs bare-loop images/s


# --quick: the values it sets unless the flag is given explicitly.
QUICK = {"ipcs": (1,), "seeds": (0,), "train_per_class": 40, "test_per_class": 20, "epochs": 8,
         "image_size": 32, "embedders": ("pixels-pca",)}


@dataclass
class Split:
    paths: list[Path]
    labels: list[int]


def read_splits(data: Path) -> tuple[list[str], Split, Split]:
    """Class WNIDs (in label order) and the train / test file lists from the manifest."""
    with open(data / "classes.csv", newline="") as handle:
        classes = sorted(csv.DictReader(handle), key=lambda row: int(row["label"]))
    names = [row["wnid"] for row in classes]  # ImageNet WNIDs: what the teacher picks by
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


@dataclass(frozen=True)
class Method:
    """How one benchmark method distils a class."""

    name: str
    selector: Any = None  # gridistill.tasks.selectors selector name or callable; None: real images
    grid_selection: str = "sequential"
    uses_embeddings: bool = False  # False: the same set under every embedder
    typical_share: float = 1.0


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_method(name: str) -> Method:
    """A benchmark method by name (module docstring); fails before any work if unknown."""
    import functools

    from gridistill.tasks.selectors import SELECTION_METHODS, weighted_ssdim

    if name in (REAL_METHOD, FULL_METHOD):
        return Method(name)
    if "@" in name:
        base, share_text = name.rsplit("@", 1)
        method = parse_method(base)
        share = _number(share_text)
        if method.selector is None or share is None or not 0 < share <= 1:
            raise SystemExit(f"method {name!r}: use <grid method>@s with s in (0, 1]")
        # Which images are typical depends on the embedder, for random grids too.
        return replace(method, name=name, uses_embeddings=True, typical_share=share)
    if not name.endswith("-grid"):
        raise SystemExit(f"unknown method {name!r}: use {REAL_METHOD}, {FULL_METHOD}, "
                         "<selector>-grid, <selector>-joint-grid or ssdim[a,b,c]-grid")
    selector = name.removesuffix("-grid")
    grid_selection = "sequential"
    if selector.endswith("-joint"):
        selector, grid_selection = selector.removesuffix("-joint"), "joint"
    if selector.startswith("ssdim[") and selector.endswith("]"):
        weights = [_number(w) for w in selector[len("ssdim["):-1].split(",")]
        if len(weights) != 3 or None in weights:
            raise SystemExit(f"method {name!r}: use ssdim[a,b,c]-grid with three numbers")
        alpha, beta, gamma = weights
        if alpha == beta == gamma == 0:  # no objective: the paper's row is random grids
            return Method(name, "random", grid_selection)
        return Method(name, functools.partial(weighted_ssdim, (alpha, beta, gamma)),
                      grid_selection, True)
    if selector not in SELECTION_METHODS:
        raise SystemExit(
            f"method {name!r} needs selector {selector!r}, which gridistill.tasks.selectors "
            f"does not offer "
            f"(it has: {', '.join(SELECTION_METHODS)}); leave it out with --methods")
    return Method(name, selector, grid_selection, selector != "random")


CACHE = Path(__file__).resolve().parent / "cache"


def embed_train(
    train: Split, names: Sequence[str], embedder: str
) -> tuple[dict[int, np.ndarray], str]:
    """Per class: the embedding rows of that class's candidates (in train-split order).

    Kept in ``benchmarks/cache/`` under a key of the embedder, its weights and the file list,
    so that the one slow step on a CPU (EfficientNet-Lite0 at 224 px) runs once.
    """
    from gridistill.storage import content_key
    from gridistill.tasks.embed import choose_embedder

    choice = choose_embedder(embedder, clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    if choice.fallback_reason:
        print(f"!!! embedder fallback: {choice.fallback_reason}", file=sys.stderr)
    key = content_key(choice.name, choice.weights, [str(p) for p in train.paths])[:16]
    cached = CACHE / f"embeddings-{choice.name.replace('/', '_').replace(':', '_')}-{key}.npz"
    labels = np.asarray(train.labels)
    if cached.is_file():
        with np.load(cached) as stored:
            return {label: stored[str(label)] for label in range(len(names))}, choice.name
    embeddings = {}
    for label in range(len(names)):
        images = [load_rgb(train.paths[i]) for i in np.flatnonzero(labels == label)]
        embeddings[label] = choice.embed(images)
        print(f"# embedded {names[label]}: {len(images)} images", flush=True)
    CACHE.mkdir(exist_ok=True)
    np.savez(cached, **{str(label): vectors for label, vectors in embeddings.items()})
    return embeddings, choice.name


def distil(method: Method, train: Split, embeddings: dict[int, np.ndarray], ipc: int, seed: int,
           config: BenchmarkConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled set of one method: (IPC * classes, 3, R, R) uint8 images and labels
    (for ``full-real``: every train image)."""
    from gridistill.tasks.grid_layout import select_grids
    from gridistill.tasks.grids import assemble_grid
    from gridistill.tasks.selectors import select

    if method.name == FULL_METHOD:
        return (to_uint8_tensor([load_rgb(p) for p in train.paths], config.resolution),
                torch.tensor(train.labels))
    labels = np.asarray(train.labels)
    images, targets = [], []
    for label, class_embeddings in embeddings.items():
        class_paths = [train.paths[i] for i in np.flatnonzero(labels == label)]
        if method.selector is None:
            chosen = select("random", class_embeddings, ipc, seed=seed)
            images += [load_rgb(class_paths[i]) for i in chosen]
        else:
            for grid in select_grids(method.selector, class_embeddings, ipc,
                                     config.grid_size**2, seed=seed,
                                     grid_selection=method.grid_selection,
                                     typical_share=method.typical_share):
                cell_images = [load_rgb(class_paths[i]) for i in grid]
                images.append(assemble_grid(cell_images, config.grid_size, config.resolution))
        targets += [label] * ipc
    return to_uint8_tensor(images, config.resolution), torch.tensor(targets)


def dd_ranking_scores(syn: float, random_real: float, full_hard: float, syn_hard: float
                      ) -> dict[str, float]:
    """DD-Ranking's label-robust score (Li et al., 2025) from top-1 in percent.

    IOR (improvement over random) = syn - random-real under the same labels; HLR (hard-label
    recovery) = full-real - syn, both with hard labels; LRS = (e^a - e^-1) / (e - e^-1) with
    a = (IOR - HLR) / 2 on accuracies as fractions, reported in percent like the accuracies.
    """
    ior, hlr = syn - random_real, full_hard - syn_hard
    alpha = 0.5 * (ior - hlr) / 100.0
    lrs = (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))
    return {"ior": ior, "hlr": hlr, "lrs": 100.0 * lrs}


GROUP = ["labels", "embedder", "method", "ipc", "epochs"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (labels, embedder, method, IPC, epochs): mean +- std over seeds, and the
    DD-Ranking scores where random-real (same labels, IPC, epochs) and full-real (hard) ran."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    summary = (frame.groupby(GROUP, sort=False)
               .agg(final=("top1_final", "mean"), final_std=("top1_final", "std"),
                    best=("top1_best", "mean"), best_std=("top1_best", "std"),
                    seeds=("seed", "count"), speed=("train_images_per_s", "mean"))
               .reset_index().fillna({"final_std": 0.0, "best_std": 0.0}))
    means = {tuple(row[g] for g in GROUP): row["final"] for _, row in summary.iterrows()}
    full = summary[(summary["method"] == FULL_METHOD) & (summary["labels"] == "hard")]
    lines = ["| labels | embedder | method | IPC | epochs | top-1 final (%) | top-1 best (%) | "
             "seeds | IOR | HLR | LRS | train img/s |", "|" + "---|" * 12]
    for _, row in summary.iterrows():
        random_real = means.get((row["labels"], "-", REAL_METHOD, row["ipc"], row["epochs"]))
        syn_hard = means.get(("hard", row["embedder"], row["method"], row["ipc"], row["epochs"]))
        scores = "|  |"
        if (random_real is not None and syn_hard is not None and len(full)
                and row["method"] not in (REAL_METHOD, FULL_METHOD)):
            s = dd_ranking_scores(row["final"], random_real, float(full["final"].iloc[0]),
                                  syn_hard)
            scores = f"{s['ior']:+.1f} | {s['hlr']:.1f} | {s['lrs']:.1f}"
        ipc = "all" if row["method"] == FULL_METHOD else row["ipc"]
        lines.append(
            f"| {row['labels']} | {row['embedder']} | {row['method']} | {ipc} | {row['epochs']} "
            f"| {row['final']:.1f} ± {row['final_std']:.1f} | {row['best']:.1f} ± "
            f"{row['best_std']:.1f} | {row['seeds']} | {scores} | {row['speed']:.0f} |")
    return "\n".join(lines)


def run(config: BenchmarkConfig, speed_only: bool = False) -> list[dict[str, Any]]:
    import pandas as pd

    from gridistill.tasks.teachers import imagenet_teacher

    if config.threads:
        torch.set_num_threads(config.threads)
    protocol = get_protocol("cpu-small")
    student = config.student or protocol.student
    image_size = config.image_size or protocol.image_size
    methods = [parse_method(name) for name in config.methods]
    unknown_labels = set(config.labels) - set(LABELS)
    if unknown_labels:
        raise SystemExit(f"unknown labels {sorted(unknown_labels)}; choose from {list(LABELS)}")
    names, train, test = read_splits(config.data)
    train = subsample(train, config.train_per_class, seed=0)
    test = subsample(test, config.test_per_class, seed=0)
    print(f"# ImageNette CPU benchmark: {len(train.paths)} candidates, "
          f"{len(test.paths)} test images, student {student} at {image_size} px, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")

    started = time.perf_counter()
    embedded = {}
    for embedder in config.embedders:
        embedded[embedder] = embed_train(train, names, embedder)
        print(f"# embedder: {embedded[embedder][1]} ({time.perf_counter() - started:.0f} s)")
    rows: list[dict[str, Any]] = []
    if config.out is not None and config.out.is_file():
        rows = pd.read_parquet(config.out).to_dict("records")
        print(f"# {len(rows)} runs already in {config.out}: skipped")
    done = {tuple(row[k] for k in (*GROUP, "seed")) for row in rows}

    if not speed_only:
        test_images = to_uint8_tensor([load_rgb(p) for p in test.paths], config.resolution)
        test_labels = torch.tensor(test.labels)
    for labels in () if speed_only else config.labels:
        teacher = imagenet_teacher(TEACHER, names) if labels == "teacher" else None
        for ipc in config.ipcs:
            for method in methods:
                if method.name == FULL_METHOD and (ipc != config.ipcs[0] or labels != "hard"):
                    continue  # independent of IPC, the upper bound of hard labels: once
                for embedder in config.embedders if method.uses_embeddings else ("-",):
                    embeddings = embedded[config.embedders[0] if embedder == "-" else embedder][0]
                    for seed in config.seeds:
                        epochs = config.epochs or get_protocol(LABELS[labels]).epochs_for(ipc)
                        key = (labels, embedder, method.name, ipc, epochs, seed)
                        if key in done:
                            continue
                        train_images, train_labels = distil(method, train, embeddings, ipc, seed,
                                                            config)
                        result = train_and_evaluate(
                            train_images, train_labels, test_images, test_labels,
                            num_classes=len(names), student=student, protocol=LABELS[labels],
                            grid_size=None if method.selector is None else config.grid_size,
                            image_size=image_size, epochs=epochs, seed=seed, teacher=teacher,
                            class_names=names if teacher else None, progress=False,
                        )
                        rows.append(dict(zip((*GROUP, "seed"), key, strict=True)) | {
                            "top1_final": result["top1_final"], "top1_best": result["top1_best"],
                            "best_epoch": result["best_epoch"],
                            "train_images_per_s": result["train_images_per_s"],
                            "elapsed_s": time.perf_counter() - started})
                        print(f"{labels:>7} {embedder:>18} {method.name:>18} IPC {ipc:>2} "
                              f"E {epochs} seed {seed}: final {result['top1_final']:.1f} best "
                              f"{result['top1_best']:.1f} ({rows[-1]['elapsed_s']:.0f} s)",
                              flush=True)
                        if config.out is not None:
                            pd.DataFrame(rows).to_parquet(config.out)

    if rows:
        print()
        print(format_table(rows))

    if config.speed or speed_only:
        # Time the first grid method when there is one: grids are what this repo distils.
        method = next((m for m in methods if m.selector is not None), parse_method(REAL_METHOD))
        ipc = max(config.ipcs)
        images, labels = distil(method, train, next(iter(embedded.values()))[0], ipc, 0, config)
        speed = harness_overhead(images, labels, num_classes=len(names), student=student,
                                 grid_size=None if method.selector is None else config.grid_size,
                                 image_size=image_size)
        print(f"\n# speed ({student}, {image_size} px, {len(images)} images of "
              f"{method.name} IPC {ipc}, best of 3 alternating runs): "
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
    parser.add_argument("--embedders", nargs="+",
                        choices=("auto", "clip", "efficientnet-lite0", "pixels-pca"))
    parser.add_argument("--labels", nargs="+", choices=tuple(LABELS))
    parser.add_argument("--grid-size", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--student")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train-per-class", type=int,
                        help="train images per class, the candidates (default: all)")
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
