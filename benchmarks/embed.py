"""Embedding throughput in images/s: decode alone, the model alone, and end to end.

    HF_HUB_OFFLINE=1 python benchmarks/embed.py                          # CPU: tiny + ViT-B-32
    HF_HUB_OFFLINE=1 python benchmarks/embed.py --device cuda --images 4096 --batch-size 256

Images are real JPEGs (ImageNette, full-size ImageNet files), taken round-robin over classes.
Models are open_clip image towers with random weights built from config (random weights do
the same arithmetic as trained ones): ``tiny`` is a 2-layer, 64-wide ViT/32 registered with
``open_clip.add_model_config``; ``ViT-B-32`` is the real architecture (87.8 M vision params).

- **decode**: read + sha256 + decode + open_clip's eval preprocessing (resize 224 bicubic,
  centre crop, normalise) in ``--workers`` DataLoader worker processes (0: in this process),
  through the embed stage's own Dataset and loader (``gridistill.tasks.embed.ImageFiles``).
  On CUDA (or
  with ``--device-decode``) also ``torchvision.io.decode_jpeg`` on the device (nvJPEG, batched)
  with resize/crop there, alone and end to end.
- **model**: a preprocessed batch already on the device through ``encode_image``, repeated.
- **end to end**: files -> DataLoader -> device -> ``encode_image`` -> L2-normalised float16
  embeddings on the host, i.e. what the embed stage has to produce.

Everything runs the embed stage's functions (``gridistill.tasks.embed``: ``prepare_model``,
``clip_features``, ``image_loader``) under ``torch.inference_mode``; on CUDA the model runs in
``--dtype`` (bfloat16 by default, float16 possible) autocast with channels_last inputs and
weights, pinned host memory and non-blocking copies. Seconds are wall clock after one warm-up
batch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing.forkserver
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from gridistill.tasks.embed import (  # noqa: E402
    ImageFiles,
    Transform,
    clip_features,
    image_loader,
    prepare_model,
    to_device,
    worker_context,
)

DEFAULT_DATA = "/work/shared/data/imagenette/public/train"
TINY_NAME = "gridistill-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                   "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 1},
}


def register_tiny_config() -> None:
    folder = Path(tempfile.mkdtemp(prefix="gridistill-openclip-"))
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)


def list_jpegs(root: str, count: int) -> list[str]:
    """``count`` JPEG paths, round-robin over the class folders (sorted, reproducible)."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir())
    per_class = [sorted(str(f) for f in folder.iterdir()
                        if f.suffix.lower() in (".jpg", ".jpeg")) for folder in folders]
    paths = [files[i] for i in range(max(map(len, per_class))) for files in per_class
             if i < len(files)]
    if len(paths) < count:
        raise ValueError(f"{root} has {len(paths)} JPEGs, fewer than --images {count}")
    return paths[:count]


def loader(paths: list[str], preprocess: Transform, batch_size: int, workers: int,
           device: torch.device) -> DataLoader:
    return image_loader(ImageFiles(paths, preprocess), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, device: torch.device) -> tuple[torch.nn.Module, Transform]:
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return prepare_model(model, device), preprocess


def embed_batch(model: torch.nn.Module, batch: torch.Tensor, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """L2-normalised float16 embeddings of one preprocessed batch (still on the device)."""
    return clip_features(model, batch, device, dtype).half()


def timed(fn: Callable[[], int], device: torch.device) -> float:
    """Images per second of ``fn`` (which returns how many images it processed)."""
    synchronize(device)
    started = time.perf_counter()
    images = fn()
    synchronize(device)
    return images / (time.perf_counter() - started)


def decode_rate(paths: list[str], preprocess: Transform, batch_size: int, workers: int,
                device: torch.device) -> float:
    def run() -> int:
        count = 0
        for batch in loader(paths, preprocess, batch_size, workers, device):
            pixels = batch.pixels.to(device, non_blocking=True)
            count += len(pixels)
        return count

    return timed(run, device)


def device_decoded(paths: list[str], batch_size: int, device: torch.device,
                   ) -> Iterator[torch.Tensor]:
    """Batches decoded by ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG, batched, on
    CUDA), resized, cropped and normalised there; file reads on the host."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    for start in range(0, len(paths), batch_size):
        data = [read_file(p) for p in paths[start:start + batch_size]]
        images = decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
        images = [F.center_crop(F.resize(im, [224], antialias=True), [224, 224])
                  for im in images]
        yield (torch.stack(images).float() / 255 - mean) / std


def device_decode_rate(paths: list[str], batch_size: int, device: torch.device) -> float:
    return timed(lambda: sum(len(b) for b in device_decoded(paths, batch_size, device)), device)


def model_rate(model: torch.nn.Module, batch: torch.Tensor, device: torch.device,
               dtype: torch.dtype, repeats: int) -> float:
    embed_batch(model, batch, device, dtype)  # warm-up (kernels, autocast caches)

    def run() -> int:
        for _ in range(repeats):
            embed_batch(model, batch, device, dtype)
        return repeats * len(batch)

    return timed(run, device)


def end_to_end_rate(model: torch.nn.Module, batches: Callable[[], Iterable[torch.Tensor]],
                    device: torch.device, dtype: torch.dtype) -> tuple[float, np.ndarray]:
    embeddings: list[np.ndarray] = []

    def run() -> int:
        for pixels in batches():
            embeddings.append(embed_batch(model, pixels, device, dtype).cpu().numpy())
        return sum(len(e) for e in embeddings)

    rate = timed(run, device)
    return rate, np.concatenate(embeddings)


def check_unit_vectors(name: str, vectors: np.ndarray, count: int) -> None:
    norms = np.linalg.norm(vectors.astype(np.float32), axis=1)
    if vectors.shape[0] != count or not np.allclose(norms, 1.0, atol=1e-2):
        raise AssertionError(f"{name}: {vectors.shape} embeddings, norms {norms.min()}-"
                             f"{norms.max()}: not one unit vector per image")


def measure(name: str, paths: list[str], args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype) -> list[dict[str, Any]]:
    model, preprocess = build_model(name, device)
    params = sum(p.numel() for p in model.visual.parameters()) / 1e6
    setting = dict(model=f"{name} ({params:.1f} M)", batch=args.batch_size, workers=args.workers,
                   dtype=str(dtype).removeprefix("torch.") if device.type == "cuda" else "float32")
    if args.workers:  # the fork server that workers come from starts once, untimed
        worker_context()
        multiprocessing.forkserver.ensure_running()
    rows = [setting | {"measure": "decode + preprocess (DataLoader)",
                       "images/s": decode_rate(paths, preprocess, args.batch_size, args.workers,
                                               device)}]
    on_device = device.type == "cuda" if args.device_decode is None else args.device_decode
    if on_device:
        device_decode_rate(paths[:args.batch_size], args.batch_size, device)  # nvJPEG start-up
        rows.append(setting | {"measure": f"decode_jpeg on {device.type} + resize there",
                               "images/s": device_decode_rate(paths, args.batch_size, device)})
    with torch.inference_mode():
        files = ImageFiles(paths, preprocess)
        batch = to_device(torch.stack([files[i][1] for i in range(min(args.batch_size,
                                                                      len(paths)))]), device)
        rows.append(setting | {"measure": "model alone (encode_image)",
                               "images/s": model_rate(model, batch, device, dtype,
                                                      args.model_repeats)})
        rate, vectors = end_to_end_rate(
            model, lambda: (b.pixels for b in loader(paths, preprocess, args.batch_size,
                                                     args.workers, device)), device, dtype)
        check_unit_vectors(name, vectors, len(paths))
        rows.append(setting | {"measure": "end to end (files -> fp16 L2 embeddings)",
                               "images/s": rate})
        if on_device:
            rate, vectors = end_to_end_rate(
                model, lambda: device_decoded(paths, args.batch_size, device), device, dtype)
            check_unit_vectors(name, vectors, len(paths))
            rows.append(setting | {"workers": 0, "images/s": rate,
                                   "measure": f"end to end, decode_jpeg on {device.type}"})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder of JPEGs")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=[TINY_NAME, "ViT-B-32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                        help="CUDA autocast dtype (CPU always runs float32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="DataLoader decode processes (0 = in the main process)")
    parser.add_argument("--device-decode", action=argparse.BooleanOptionalAction, default=None,
                        help="also decode with torchvision.io.decode_jpeg on --device, alone "
                        "and end to end (default: on CUDA only)")
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_tiny_config()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    paths = list_jpegs(args.data, args.images)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}")
    print(f"# {where}; torch {torch.__version__}, open_clip {open_clip.__version__}; "
          f"{len(paths)} JPEGs from {args.data}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = []
    for name in args.models:
        rows += measure(name, paths, args, device, dtype)
        print(f"# {name} done; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print("| model (vision params) | measure | batch | workers | dtype | images/s |")
    print("|---|---|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['measure']} | {r['batch']} | {r['workers']} | {r['dtype']} "
              f"| {r['images/s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
