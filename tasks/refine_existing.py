"""Refine an existing distilled set with DIVER into an ImageFolder of PNGs: the work behind
``gridistill refine`` and the refine-existing flow, given one :class:`RefineJob`."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gridistill.distilled_sets import (
    imagenet_labels_for_classes,
    imagenet_wnids,
    preset_wnids,
    read_distilled_set,
    read_wnid_list,
)
from gridistill.models import load_dit
from gridistill.refine_options import RefineJob

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _class_wnids(job: RefineJob) -> list[str] | None:
    if job.classes_preset:
        return preset_wnids(job.classes_preset)
    if job.wnids:
        return read_wnid_list(job.wnids)
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


def refine_set(job: RefineJob, report: Callable[[str], None] = print) -> None:
    """Check inputs and weights (before any heavy work), refine, write PNGs to ``job.out``.

    Raises ValueError (a bad input or class mapping), MissingWeightsError or FileExistsError
    (``job.out`` is not empty) before anything is written; ``report`` gets progress lines.
    """
    # Imported here so `gridistill --help` does not pay for importing diffusers.
    from gridistill.tasks.refine import diver_refine

    out = Path(job.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; refusing to mix or overwrite outputs")
    device = _resolve_device(job.device)
    dtype = DTYPES.get(job.dtype) or (torch.bfloat16 if device.type == "cuda"
                                      else torch.float32)
    class_wnids = _class_wnids(job)
    components = load_dit(job.diver.dit, job.diver.vae, device=device, dtype=dtype)
    distilled = read_distilled_set(job.input, kind=job.input_kind,
                                   normalization=job.normalization, labels_path=job.labels,
                                   method=job.method)
    class_labels = imagenet_labels_for_classes(distilled.num_classes, distilled.class_names,
                                               wnids=class_wnids)
    report(f"refining {len(distilled.images)} images of {distilled.num_classes} classes from "
           f"{distilled.source} with {components.source} on {device} ({dtype})")
    started = time.perf_counter()
    refined = diver_refine(distilled.images, class_labels[distilled.class_indices], components,
                           job.diver, seed=job.seed, batch_size=job.batch_size)
    seconds = time.perf_counter() - started
    all_wnids = imagenet_wnids()
    folder_names = distilled.class_names or [all_wnids[int(label)] for label in class_labels]
    write_image_folder(out, refined, distilled.class_indices, folder_names, class_labels)
    report(f"wrote {len(refined)} PNGs to {out} in {seconds:.1f} s "
           f"({seconds / max(len(refined), 1):.3f} s/image)")
