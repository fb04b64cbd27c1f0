"""Benchmark: SSDIM's three-stage solver against plain greedy and the baselines.

Prints one markdown table: size, method, seconds (median wall clock of the timed runs), CPU
seconds (median), F (the exact SSDIM objective), F / F(plain greedy) and the wall-clock speed-up
over plain greedy measured in the same run; ``--large`` adds a second one (below).

Inputs:
- clustered synthetic embeddings (Gaussian clusters, L2-normalised by the selectors) at several
  sizes, including M=1300 d=512 k=160 (ImageNet class, IPC 10, L=4) and M=5000;
- real image features from one Imagenette class: 32x32 RGB pixels, flattened, centred and
  reduced by PCA to 256 dimensions per class. No CLIP weights exist offline here, so these
  stand in for CLIP embeddings: real, but much less semantic.

Usage: OPENBLAS_NUM_THREADS=1 python benchmarks/selection.py [--repeats 5] [--data PATH]
       [--device cpu|cuda] [--sizes 300 1300 5000] [--large [--reference]]
Plain greedy takes O(k M^2); at M >= 5000 it is timed once (marked in the table). On a shared
CPU, single-threaded BLAS is faster and far steadier: OpenBLAS threads spin-wait for a core.

``--device``: adds a row per input for ``ssdim(..., device=...)`` (the torch backend), with
``torch.set_num_threads(1)``: two torch threads on this shared 2-core CPU were 4x slower.
``--large``: a second table for candidate sets where plain greedy is out of reach, M=20000 and 50000
(d=512, k=160), each method timed once: SSDIM with kNN coverage (the default there) against
cheap baselines, F relative to the best reference row of the same input. ``--reference`` adds
the exact-coverage three-stage solver and facility location at M=20000 (~1.5 minutes more).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from gridistill.tasks import selectors
from gridistill.tasks import ssdim as solvers

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/imagenette/public/train"
# Synthetic inputs: candidate count M -> (dimension d, subset size k, seed).
SYNTHETIC = {300: (128, 40, 0), 1300: (512, 160, 1), 5000: (512, 160, 2)}


def clustered_embeddings(num_images: int, dim: int, seed: int) -> np.ndarray:
    """Gaussian clusters of uneven size, like the modes of one class in CLIP space."""
    rng = np.random.default_rng(seed)
    clusters = max(4, num_images // 60)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.choice(clusters, size=num_images, p=rng.dirichlet(np.ones(clusters)))
    spread = rng.uniform(0.4, 0.9, size=(num_images, 1))
    return (centres[labels] + spread * rng.standard_normal((num_images, dim))).astype(np.float32)


def imagenette_pixel_features(class_dir: Path, side: int = 32, dim: int = 256) -> np.ndarray:
    """Flattened ``side x side`` RGB pixels of every image in ``class_dir``, PCA to ``dim``."""
    paths = sorted(class_dir.glob("*.JPEG"))
    if not paths:
        raise FileNotFoundError(f"no .JPEG images in {class_dir}")
    pixels = np.stack([
        np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR),
                   dtype=np.float32).ravel() / 255.0
        for path in paths
    ])
    centred = pixels - pixels.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return (centred @ components[:dim].T).astype(np.float32)


def seconds(call: Callable[[], np.ndarray], repeats: int) -> tuple[float, float, np.ndarray]:
    """Median wall-clock and median process CPU seconds of ``repeats`` calls, and the result.

    On a shared machine the wall clock includes time the process waited for a core; the CPU
    time is close to what a quiet machine would show for single-threaded BLAS.
    """
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = call()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu), result


def benchmark(
    name: str, embeddings: np.ndarray, k: int, repeats: int, device: str | None
) -> list[str]:
    num_images, dim = embeddings.shape
    greedy_repeats = 1 if num_images >= 5000 else repeats
    greedy_time, greedy_cpu, greedy_pick = seconds(
        lambda: solvers.ssdim(embeddings, k, solver="greedy"), greedy_repeats
    )
    greedy_value = solvers.ssdim_objective(embeddings, greedy_pick)
    size = f"{name} M={num_images} d={dim} k={k}"
    runs = f" ({greedy_repeats} run)" if greedy_repeats != repeats else ""
    rows = [f"| {size} | greedy (plain){runs} | {greedy_time:.3f} | {greedy_cpu:.3f} "
            f"| {greedy_value:.2f} | 1.0000 | 1.0 |"]
    methods: dict[str, Callable[[], np.ndarray]] = {
        "ssdim (fw, three-stage)": lambda: solvers.ssdim(embeddings, k),
        "ssdim (fw, knn n=48)": lambda: solvers.ssdim(embeddings, k, coverage="knn"),
    }
    if device:
        methods[f"ssdim (fw, torch {device})"] = (
            lambda: solvers.ssdim(embeddings, k, device=device))
    methods.update({
        method: (lambda m=method: selectors.select(m, embeddings, k, seed=0))
        for method in selectors.SELECTION_METHODS if method != "ssdim"
    })
    for method, call in methods.items():
        elapsed, cpu, pick = seconds(call, repeats)
        value = solvers.ssdim_objective(embeddings, pick)
        rows.append(f"| {size} | {method} | {elapsed:.3f} | {cpu:.3f} | {value:.2f} "
                    f"| {value / greedy_value:.4f} | {greedy_time / elapsed:.1f} |")
    return rows


def benchmark_large(
    name: str, embeddings: np.ndarray, k: int, reference: bool, device: str | None
) -> list[str]:
    """One timed run per method; F relative to the best of the reference methods' F."""
    num_images, dim = embeddings.shape
    methods: dict[str, Callable[[], np.ndarray]] = {
        "ssdim (fw, knn n=48; default)": lambda: solvers.ssdim(embeddings, k),
    }
    if device:
        methods[f"ssdim (fw, knn, torch {device})"] = (
            lambda: solvers.ssdim(embeddings, k, device=device))
    baselines = ["random", "kcenter"] + (["facility"] if reference else [])
    methods.update({
        method: (lambda m=method: selectors.select(m, embeddings, k, seed=0))
        for method in baselines
    })
    references = list(baselines)
    if reference:
        methods["ssdim (fw, exact coverage)"] = (
            lambda: solvers.ssdim(embeddings, k, coverage="exact"))
        references.append("ssdim (fw, exact coverage)")
    results = {}
    for method, call in methods.items():
        elapsed, cpu, pick = seconds(call, 1)
        results[method] = (elapsed, cpu, solvers.ssdim_objective(embeddings, pick))
    best_reference = max(references, key=lambda method: results[method][2])
    reference_value = results[best_reference][2]
    size = f"{name} M={num_images} d={dim} k={k}"
    return [f"| {size} | {method} | {elapsed:.1f} | {cpu:.1f} | {value:.2f} "
            f"| {value / reference_value:.4f} | {best_reference} |"
            for method, (elapsed, cpu, value) in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="Imagenette train folder (one sub-folder per class)")
    parser.add_argument("--device", default=None,
                        help="also time ssdim with the torch backend on this device")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SYNTHETIC),
                        choices=list(SYNTHETIC), help="synthetic candidate counts M to run")
    parser.add_argument("--large", action="store_true",
                        help="add the M=20000 and 50000 table (a few minutes)")
    parser.add_argument("--reference", action="store_true",
                        help="with --large: exact-coverage SSDIM and facility at M=20000 (slow)")
    args = parser.parse_args()
    if args.device:
        import torch  # imported before timing; one thread, as OPENBLAS_NUM_THREADS=1 for numpy

        torch.set_num_threads(1)

    inputs = [("synthetic", clustered_embeddings(size, dim, seed=seed), k)
              for size, (dim, k, seed) in SYNTHETIC.items() if size in args.sizes]
    class_dirs = sorted(path for path in args.data.glob("*") if path.is_dir())
    if class_dirs:
        inputs.append((f"imagenette/{class_dirs[0].name} pixels+PCA",
                       imagenette_pixel_features(class_dirs[0]), 160))
    else:
        print(f"(no Imagenette classes under {args.data}: real-image row skipped)")

    print(f"# {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}, repeats={args.repeats}")
    print("| size | method | seconds (wall) | CPU s | F | F/F_greedy | speed-up vs greedy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, embeddings, k in inputs:
        for row in benchmark(name, embeddings, k, args.repeats, args.device):
            print(row, flush=True)
    if not args.large:
        return
    print(f"\n# many candidates, one run each, load average {os.getloadavg()[0]:.1f}")
    print("| size | method | seconds (wall) | CPU s | F | F/F_ref | ref (best of) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for num_images, seed in ((20_000, 3), (50_000, 4)):
        embeddings = clustered_embeddings(num_images, 512, seed=seed)
        rows = benchmark_large("synthetic", embeddings, 160,
                               args.reference and num_images == 20_000, args.device)
        for row in rows:
            print(row, flush=True)


if __name__ == "__main__":
    main()
