"""Benchmark: what each selector's ImageNette grids hold, before any student is trained.

For every class of the cached EfficientNet-Lite0 embeddings (``benchmarks/cache``, written by
``benchmarks/distill_imagenette.py``), IPC grids of L x L images are selected one grid after
another, as the benchmark's ``<selector>-grid`` methods do, or at once (``-joint``). Printed
per method, averaged over the classes: seconds per class, the SSDIM objective of the first
grid (the paper's weights) and each of its terms, and of all ``IPC x L^2`` selected images:
the mean cosine to the class centroid (how typical they are), the mean cosine of each to its
nearest other selected image (how redundant they are), the mean over the class of each
image's largest cosine to a selected one (how well they cover the class), the same over the
class's most typical half (the images ``@0.5`` selects from), and how many the
default solver (``ssdim``, ``solver="fw"``, one grid after another) also selects. ``@s``: from
each class's most typical share ``s`` only (``select_grids(..., typical_share=s)``).

Usage: python benchmarks/selected_sets.py [--ipc 10] [--grid-size 4] [--cache PATH]
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np

from gridistill.tasks.grid_layout import most_typical, select_grids
from gridistill.tasks.selectors import weighted_ssdim
from gridistill.tasks.ssdim import normalise_embeddings, ssdim, ssdim_objective, ssdim_terms

CACHE = Path(__file__).resolve().parent / "cache"


def methods() -> dict[str, tuple[object, str, float]]:
    """Name: (selector, grid selection, typical share)."""
    sequential = {
        "random": "random",
        "ssdim (fw, default)": "ssdim",
        "ssdim algorithm1": lambda unit, k, seed: ssdim(unit, k, seed=seed, solver="algorithm1"),
        "coverage only [1,0,0]": "facility",
        "log-det only [0,1,0]": "logdet",
        "spectral only [0,0,1]": partial(weighted_ssdim, (0.0, 0.0, 1.0)),
        "herding": "herding",
        "kcenter": "kcenter",
    }
    return {
        **{name: (selector, "sequential", 1.0) for name, selector in sequential.items()},
        "ssdim-joint": ("ssdim", "joint", 1.0),
        "facility-joint": ("facility", "joint", 1.0),
        "kmeans-joint": ("kmeans", "joint", 1.0),
        **{f"{name} @{share:g}": (name, "sequential", share)
           for share in (0.5, 0.3) for name in ("random", "ssdim")},
        **{f"{name}-joint @0.5": (name, "joint", 0.5) for name in ("ssdim", "facility", "kmeans")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--grid-size", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=None,
                        help="embeddings .npz (default: the Lite0 file in benchmarks/cache)")
    args = parser.parse_args()
    path = args.cache or next(iter(sorted(CACHE.glob("embeddings-efficientnet-lite0-*.npz"))),
                              None)
    if path is None:
        raise SystemExit("no cached Lite0 embeddings: run benchmarks/distill_imagenette.py first")
    classes = np.load(path)
    cells = args.grid_size**2
    rows: dict[str, list[list[float]]] = {name: [] for name in methods()}
    for name in classes.files:
        unit = normalise_embeddings(classes[name])
        kernel = unit.astype(np.float64) @ unit.T.astype(np.float64)
        centroid = unit.mean(axis=0) / np.linalg.norm(unit.mean(axis=0))
        typical_half = most_typical(unit, 0.5, args.ipc * cells)
        chosen = {}
        for method, (selector, grid_selection, share) in methods().items():
            started = time.perf_counter()
            grids = select_grids(selector, unit, args.ipc, cells, seed=0,
                                 grid_selection=grid_selection, typical_share=share)
            seconds = time.perf_counter() - started
            selected = chosen[method] = np.concatenate(grids)
            among = kernel[np.ix_(selected, selected)]
            np.fill_diagonal(among, -np.inf)
            terms = ssdim_terms(unit, grids[0])
            rows[method].append([seconds, ssdim_objective(unit, grids[0]), terms["coverage"],
                                 terms["logdet"], terms["spectral"],
                                 float((unit[selected] @ centroid).mean()),
                                 float(among.max(axis=1).mean()),
                                 float(kernel[:, selected].max(axis=1).mean()),
                                 float(kernel[typical_half][:, selected].max(axis=1).mean())])
        for method in methods():
            shared = np.intersect1d(chosen[method], chosen["ssdim (fw, default)"]).size
            rows[method][-1].append(shared)
    print(f"# {path.name}: {len(classes.files)} classes, IPC {args.ipc}, {cells} images a grid,"
          f" grids one after another unless -joint; means over the classes")
    print("| method | s / class | F (grid 1) | coverage | log-det | spectral | centroid cos |"
          " nearest selected cos | class coverage | typical-half coverage |"
          f" shared with ssdim (of {args.ipc * cells}) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, values in rows.items():
        mean = np.mean(values, axis=0)
        print(f"| {method} | {mean[0]:.2f} | {mean[1]:.1f} | {mean[2]:.1f} | {mean[3]:.1f} | "
              f"{mean[4]:.2f} | {mean[5]:.3f} | {mean[6]:.3f} | {mean[7]:.3f} | {mean[8]:.3f} | "
              f"{mean[9]:.0f} |")


if __name__ == "__main__":
    main()
