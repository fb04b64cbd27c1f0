"""Image embeddings for selection: open_clip, or an explicit offline fallback.

SSDIM only compares images of one class with each other, so any embedding whose inner
products reflect visual similarity works; CLIP is what the paper uses. When no CLIP weights
exist on the machine, ``embedder="auto"`` falls back to ``pixels-pca`` and says so loudly:
in the log, in the stage's metadata and in the run report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel
from tqdm.auto import tqdm

from gridistill.models import ClipBundle, MissingWeightsError, cached_model, load_clip
from gridistill.resources import run_in_batches
from gridistill.stages import ArtifactRef, stage_task
from gridistill.storage import RunStore
from tasks.ingest import read_image

EMBEDDERS = ("auto", "clip", "pixels-pca")
log = logging.getLogger(__name__)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def clip_embed(bundle: ClipBundle, images: Sequence[Image.Image], *, batch_size: int = 64,
               device: str = "cpu", progress: bool = False) -> np.ndarray:
    """L2-normalised CLIP image embeddings, (N, d) float32. A batch that runs out of GPU
    memory is retried in halves rather than failing the class."""
    autocast = device.startswith("cuda")
    bar = tqdm(total=len(images), desc="embed", unit="img", disable=not progress, leave=False)

    def embed_batch(batch: Sequence[Image.Image]) -> np.ndarray:
        pixels = torch.stack([bundle.preprocess(im) for im in batch]).to(device)
        with torch.inference_mode(), torch.autocast("cuda", enabled=autocast,
                                                    dtype=torch.float16):
            features = bundle.model.encode_image(pixels).float().cpu().numpy()
        bar.update(len(batch))
        return features

    with bar:
        chunks = run_in_batches(embed_batch, images, batch_size, what="embed")
    return l2_normalise(np.concatenate(chunks)).astype(np.float32)


def pixel_pca_embed(images: Sequence[Image.Image], *, side: int = 32, dim: int = 64) -> np.ndarray:
    """Offline fallback: centred 32x32 RGB pixels projected on the class's top principal axes.

    Fitted per call (one class), so it needs no weights. Much weaker than CLIP: use it to run
    the pipeline without weights, not to judge selection quality.
    """
    pixels = np.stack([
        np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
        for im in images
    ]) / 255.0
    centred = pixels - pixels.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:dim].T
    # A constant coordinate keeps a class of one image (or of identical ones) from becoming
    # all-zero vectors, which selection rightly refuses; it shifts every similarity equally.
    projected = np.hstack([projected, np.full((len(pixels), 1), 1e-3, np.float32)])
    return l2_normalise(projected).astype(np.float32)


@dataclass(frozen=True)
class EmbedderChoice:
    name: str  # "clip:<model>/<pretrained>" or "pixels-pca"
    embed: Callable[[Sequence[Image.Image]], np.ndarray]
    fallback_reason: str | None  # set when "auto" could not use CLIP


def choose_embedder(kind: str, *, clip_model: str, clip_pretrained: str, device: str = "cpu",
                    batch_size: int = 64, progress: bool = False) -> EmbedderChoice:
    """Resolve ``kind`` (auto | clip | pixels-pca) to an embedding function."""
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder {kind!r}; choose one of {EMBEDDERS}")
    if kind == "pixels-pca":
        return EmbedderChoice("pixels-pca", pixel_pca_embed, None)
    try:
        bundle = cached_model(load_clip, clip_model, clip_pretrained, device=device)
    except MissingWeightsError as exc:
        if kind == "clip":
            raise
        reason = f"CLIP weights unavailable ({clip_model}/{clip_pretrained}); using pixels-pca"
        log.warning("!!! EMBEDDER FALLBACK: %s\n%s", reason, exc)
        return EmbedderChoice("pixels-pca", pixel_pca_embed, reason)

    def embed(images: Sequence[Image.Image]) -> np.ndarray:
        return clip_embed(bundle, images, batch_size=batch_size, device=device, progress=progress)

    return EmbedderChoice(f"clip:{clip_model}/{clip_pretrained}", embed, None)


# -- Prefect task ----------------------------------------------------------------------------
class EmbedParams(BaseModel):
    embedder: str  # resolved by the flow: "clip" or "pixels-pca" (never "auto": see flow)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    device: str = "cpu"
    batch_size: int = 64
    progress: bool = True


@stage_task("embed")
def embed_class(store: RunStore, folder: str, scope: str, params: EmbedParams,
                upstream: list[ArtifactRef]) -> dict[str, Any]:
    """Embed one class's validated images; float16 L2-normalised vectors in Parquet."""
    (loaded,) = upstream
    images = store.read_parquet(f"{loaded.folder}/images.parquet")
    choice = choose_embedder(params.embedder, clip_model=params.clip_model,
                             clip_pretrained=params.clip_pretrained, device=params.device,
                             batch_size=params.batch_size, progress=params.progress)
    pixels = [read_image(path, store.storage_options).image for path in images["path"]]
    vectors = choice.embed(pixels)
    table = images[["image_id", "path", "sha256"]].assign(
        embedding=list(vectors.astype(np.float16)))
    store.write_parquet(f"{folder}/embeddings.parquet", table)
    return {"embedder": choice.name, "dim": int(vectors.shape[1]), "images": len(table)}


def read_embeddings(store: RunStore, ref: ArtifactRef) -> tuple[pd.DataFrame, np.ndarray]:
    """The embeddings table and its vectors as one (N, d) float32 array."""
    table = store.read_parquet(f"{ref.folder}/embeddings.parquet")
    return table, np.stack(table["embedding"].to_numpy()).astype(np.float32)
