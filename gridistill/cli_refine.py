"""``gridistill refine``: DIVER-refine any distilled set into an ImageFolder of PNGs.

The lead wires it in ``gridistill/cli.py``::

    add_refine_parser(subparsers)   # then: args.func(args) or run_refine(args)
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gridistill.distilled_sets import (
    INPUT_KINDS,
    NORMALIZATIONS,
    SUBSET_PRESETS,
    imagenet_labels_for_classes,
    imagenet_wnids,
    preset_wnids,
    read_distilled_set,
    read_wnid_list,
)
from gridistill.models import MissingWeightsError, load_dit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_refine_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "refine", help="DIVER: refine a distilled set with a pretrained DiT",
        description="Refine a distilled set (ImageFolder, run root, MTT/DATM .pt, .npz) with "
                    "DIVER (DiT-XL/2 + DDIM + semantic guidance) and write an ImageFolder of PNGs.")
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument("--input", required=True, help="distilled set: a folder or a file")
    io_group.add_argument("--out", required=True, help="output ImageFolder (must be empty/new)")
    io_group.add_argument("--input-kind", choices=INPUT_KINDS, default="auto")
    io_group.add_argument("--method", help="which distilled set of a run root (e.g. ssdim)")
    io_group.add_argument("--labels", help="MTT labels file when not labels_<tag>.pt beside it")
    io_group.add_argument(
        "--normalization", choices=sorted(NORMALIZATIONS),
        help="mean/std the tensor images were normalised with (required for float .pt/.npz; "
             "MTT/DATM ImageNet subsets: imagenet)")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--classes-preset", choices=sorted(SUBSET_PRESETS),
                         help="class i -> ImageNet-1K label, in MTT/GLaD/DATM class order")
    classes.add_argument("--wnids", help="file: one WNID per line (line i = class i), or a CSV "
                                         "with a wnid column")
    model = parser.add_argument_group("model")
    model.add_argument("--dit", default="facebook/DiT-XL-2-256",
                       help="diffusers DiT: hub id or local directory")
    model.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                       help="diffusers AutoencoderKL: hub id or local directory")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    model.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="auto: bfloat16 on CUDA, float32 on CPU")
    diver = parser.add_argument_group("DIVER (step indices: 1 = last DDIM step, N = noisiest)")
    diver.add_argument("--num-steps", type=int, default=50, help="DDIM steps N")
    diver.add_argument("--t-f", type=int, default=25, help="noise z0 to this step")
    diver.add_argument("--t-r", type=int, help="start the reverse process here (default t_f; "
                                                "the paper's literal reading: N)")
    diver.add_argument("--t-h", type=int, default=40, help="semantic phase: highest step")
    diver.add_argument("--t-l", type=int, default=25, help="semantic phase: lowest step")
    diver.add_argument("--gamma", type=float, default=0.1,
                       help="semantic guidance scale (paper 0.1; 0.02 for NCFM sets)")
    diver.add_argument("--cfg-scale", type=float, default=4.0)
    diver.add_argument("--seed", type=int, default=0)
    diver.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(func=run_refine)
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _class_wnids(args: argparse.Namespace) -> list[str] | None:
    if args.classes_preset:
        return preset_wnids(args.classes_preset)
    if args.wnids:
        return read_wnid_list(args.wnids)
    return None


def write_image_folder(out: Path, images: torch.Tensor, class_indices: torch.Tensor,
                       folder_names: list[str], imagenet_labels: torch.Tensor) -> None:
    """``out/<folder>/<input position>.png`` plus ``classes.csv`` (label, wnid, folder)."""
    wnids = imagenet_wnids()
    pixels = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    for position, (array, class_index) in enumerate(zip(pixels, class_indices.tolist(),
                                                        strict=True)):
        folder = out / folder_names[class_index]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{position:05d}.png")
    with (out / "classes.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "wnid", "folder"])
        for class_index, folder in enumerate(folder_names):
            writer.writerow([class_index, wnids[int(imagenet_labels[class_index])], folder])


def run_refine(args: argparse.Namespace) -> int:
    """Check inputs and weights (before any heavy work), refine, write PNGs. 0 = success."""
    # Imported here so `gridistill --help` does not pay for importing diffusers.
    from tasks.refine import check_diver_parameters, diver_refine

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} is not empty; refusing to mix or overwrite outputs",
              file=sys.stderr)
        return 2
    device = _resolve_device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda"
                                       else torch.float32)
    try:
        check_diver_parameters(num_steps=args.num_steps, t_f=args.t_f, t_r=args.t_r,
                               t_h=args.t_h, t_l=args.t_l, cfg_scale=args.cfg_scale)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        class_wnids = _class_wnids(args)
        components = load_dit(args.dit, args.vae, device=device, dtype=dtype)
        distilled = read_distilled_set(args.input, kind=args.input_kind,
                                       normalization=args.normalization,
                                       labels_path=args.labels, method=args.method)
        class_labels = imagenet_labels_for_classes(distilled.num_classes, distilled.class_names,
                                                   wnids=class_wnids)
    except (MissingWeightsError, ValueError) as exc:  # DistilledSetError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"refining {len(distilled.images)} images of {distilled.num_classes} classes from "
          f"{distilled.source} with {components.source} on {device} ({dtype})")
    started = time.perf_counter()
    refined = diver_refine(
        distilled.images, class_labels[distilled.class_indices], components, t_f=args.t_f,
        t_r=args.t_r, num_steps=args.num_steps, t_h=args.t_h, t_l=args.t_l, gamma=args.gamma,
        cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    all_wnids = imagenet_wnids()
    folder_names = distilled.class_names or [all_wnids[int(label)] for label in class_labels]
    write_image_folder(out, refined, distilled.class_indices, folder_names, class_labels)
    print(f"wrote {len(refined)} PNGs to {out} in {seconds:.1f} s "
          f"({seconds / max(len(refined), 1):.3f} s/image)")
    return 0
