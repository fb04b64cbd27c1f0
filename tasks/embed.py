"""Image embeddings for selection: open_clip, a packaged ImageNet network, or pixels-pca.

SSDIM only compares images of one class with each other, so any embedding whose inner
products reflect visual similarity works; CLIP is what the paper uses. ``embedder="auto"``
takes the first that is available: CLIP (when its weights are on the machine), then the
ImageNet-1K EfficientNet-Lite0 whose weights install with gridistill (pooled penultimate
features), then ``pixels-pca``, and says which it fell back to, loudly for pixels-pca: in the
log, in the stage's metadata and in the run report.

This stage is where every image is decoded, once (the load stage only reads headers): files
are read, decoded and preprocessed in ``torch.utils.data.DataLoader`` worker processes
(:class:`ImageFiles`), and the model runs on the batches they yield under
``torch.inference_mode``; on CUDA with pinned memory, non-blocking copies, channels_last and
bf16 (or fp16) autocast. A file that fails to decode is left out and listed with its reason.
``benchmarks/embed.py`` measures these same functions.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gridistill.models import (
    ClipBundle,
    ImageNetClassifier,
    MissingWeightsError,
    cached_model,
    load_clip,
    load_imagenet_classifier,
)
from gridistill.resources import BatchLimit, run_in_batches
from gridistill.stages import ArtifactRef, NotInKey, WeightsInKey, stage_task
from gridistill.storage import RunStore
from gridistill.tasks.ingest import read_image
from gridistill.tasks.load import no_usable_images, record_skipped

EMBEDDERS = ("auto", "clip", "efficientnet-lite0", "pixels-pca")
PACKAGED_EMBEDDER = "efficientnet-lite0"  # what "auto" takes when CLIP's weights are missing
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
Transform = Callable[[Image.Image], torch.Tensor]
log = logging.getLogger(__name__)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# -- decoding in DataLoader workers ---------------------------------------------------------
class ImageFiles(Dataset):
    """Images from fsspec URLs, read, decoded and transformed wherever the DataLoader calls it
    (its worker processes). Item i is ``(i, pixels, None)``, or ``(i, None, reason)`` for a
    file that cannot be decoded: reported, never raised, so one bad file does not fail a class.

    With ``sha256`` (the load stage's hashes) a file whose bytes changed since it was loaded is
    refused too: its embedding would not belong to the recorded hash.
    """

    def __init__(self, paths: Sequence[str], transform: Transform,
                 storage_options: dict[str, Any] | None = None,
                 sha256: Sequence[str] | None = None) -> None:
        self.paths, self.transform = list(paths), transform
        self.storage_options, self.sha256 = storage_options or {}, sha256

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        decoded = read_image(self.paths[index], self.storage_options)
        if decoded.error is not None:
            return index, None, decoded.error
        if self.sha256 is not None and decoded.sha256 != self.sha256[index]:
            return index, None, (f"changed since the load stage: sha256 {decoded.sha256}, "
                                 f"loaded as {self.sha256[index]}")
        return index, self.transform(decoded.image), None


class LoadedBatch(NamedTuple):
    """One DataLoader batch: the images that decoded, stacked, and those that did not."""

    indices: list[int]  # dataset positions of the rows of ``pixels``
    pixels: torch.Tensor  # (len(indices), ...) transform outputs; empty when none decoded
    failed: list[tuple[int, str]]  # (dataset position, reason)


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]) -> LoadedBatch:
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    return LoadedBatch([index for index, _ in good],
                       torch.stack([pixels for _, pixels in good]) if good else torch.empty(0),
                       [(index, reason) for index, pixels, reason in items if pixels is None])


def _on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def default_num_workers(device: str | torch.device) -> int:
    """Decode processes for the embed DataLoader when none are configured.

    CUDA: ``min(8, cores)``. One core decodes and resizes on the order of a hundred JPEGs
    a second while a GPU embeds thousands, so decoding must run beside the model, in parallel,
    or the GPU idles. CPU: 0 (decode in the task's thread). There the model and the decode
    share the same cores, the flow already embeds several classes at once in threads, and
    workers would be processes started anew for every class.
    """
    return min(8, os.cpu_count() or 1) if _on_cuda(device) else 0


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    """Where decode workers come from: a fork server, a clean process that imported this module
    once, never the calling process.

    A process running a Prefect flow holds Prefect's service threads and their at-exit hooks;
    a worker forked from it runs those hooks when it finishes, they fail there (no service loop
    in the child), and the worker exits with code 1 after doing its work, which the DataLoader
    turns into an error for the whole class. Forking from the fork server avoids that and costs
    one interpreter start per process, not per class. The server's environment is the one it
    started with, so :func:`image_loader` hands each worker the caller's current one.
    """
    context = multiprocessing.get_context("forkserver")
    # open_clip too: unpickling CLIP's preprocess in each worker would import it anew (~12 s).
    context.set_forkserver_preload([__name__, "open_clip"])
    return context


def _adopt_environment(environment: dict[str, str], worker_id: int) -> None:
    """Worker start: the environment of the process that made the loader (credentials that a
    flow loaded into ``os.environ`` after the fork server started, for example)."""
    os.environ.clear()
    os.environ.update(environment)


def image_loader(dataset: ImageFiles, *, batch_size: int, num_workers: int,
                 pin_memory: bool) -> DataLoader:
    """Batches of ``dataset`` as :class:`LoadedBatch`, in order, decoded by ``num_workers``
    processes from :func:`worker_context` (0: in the calling thread); ``pin_memory`` for
    non-blocking copies to CUDA."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_images, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None,
                      multiprocessing_context=worker_context() if num_workers else None,
                      worker_init_fn=functools.partial(_adopt_environment, dict(os.environ)))


# -- the model ------------------------------------------------------------------------------
def prepare_model(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Eval mode on ``device``; on CUDA channels_last weights, which the patch-embedding
    convolution runs fastest with (cuDNN's tensor-core kernels are NHWC)."""
    return model.eval().to(device, memory_format=torch.channels_last if _on_cuda(device)
                           else torch.preserve_format)


def to_device(pixels: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A (pinned) host batch to ``device`` without blocking; channels_last on CUDA to match
    :func:`prepare_model`."""
    return pixels.to(device, non_blocking=True, memory_format=torch.channels_last
                     if _on_cuda(device) else torch.preserve_format)


def load_inference_clip(name: str, pretrained: str, device: str) -> ClipBundle:
    """:func:`load_clip` with :func:`prepare_model` applied; through ``cached_model`` this runs
    once per process, so threads embedding other classes never see the weights converted."""
    bundle = load_clip(name, pretrained, device=device)
    prepare_model(bundle.model, device)  # in place: Module.to returns the module itself
    return bundle


def image_features(features: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                   device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """L2-normalised float32 ``features`` of one preprocessed host batch, left on ``device``."""
    # Mixed precision on CUDA only: CPU autocast would be slower, not faster.
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=_on_cuda(device)):
        vectors = features(to_device(pixels, device))
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def clip_features(model: torch.nn.Module, pixels: torch.Tensor, device: str | torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """L2-normalised float32 CLIP image embeddings of one preprocessed batch, on ``device``."""
    return image_features(model.encode_image, pixels, device, dtype)


def pixel_thumbnail(image: Image.Image, side: int = 32) -> torch.Tensor:
    """The pixels-pca transform: RGB ``side`` x ``side`` bilinear thumbnail in [0, 1], flat."""
    thumbnail = image.convert("RGB").resize((side, side), Image.BILINEAR)
    return torch.from_numpy(np.asarray(thumbnail, dtype=np.float32).ravel() / 255.0)


def pixel_pca_project(thumbnails: np.ndarray, dim: int = 64) -> np.ndarray:
    """Offline fallback: centred thumbnails projected on the class's top principal axes.

    Fitted per call (one class), so it needs no weights. Much weaker than CLIP: use it to run
    the pipeline without weights, not to judge selection quality.
    """
    centred = thumbnails - thumbnails.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:dim].T
    # A constant coordinate keeps a class of one image (or of identical ones) from becoming
    # all-zero vectors, which selection rightly refuses; it shifts every similarity equally.
    projected = np.hstack([projected, np.full((len(thumbnails), 1), 1e-3, np.float32)])
    return l2_normalise(projected).astype(np.float32)


@dataclass(frozen=True)
class EmbedderChoice:
    """An embedder split where the work happens: ``transform`` (one decoded image -> tensor,
    in the DataLoader workers), ``encode`` (a stacked batch -> float32 features) and ``finish``
    (all of a class's features -> L2-normalised float32 embeddings)."""

    name: str  # "clip:<model>/<pretrained>", "efficientnet-lite0" or "pixels-pca"
    transform: Transform
    encode: Callable[[torch.Tensor], np.ndarray]
    finish: Callable[[np.ndarray], np.ndarray]
    fallback_reason: str | None  # set when "auto" could not use CLIP
    device: str = "cpu"
    batch_size: int = 64
    weights: str = "none"  # where the weights came from (a file or a tag)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings of images already in memory, in this thread (no DataLoader)."""
        chunks = [self.encode(torch.stack([self.transform(im) for im in
                                           images[start:start + self.batch_size]]))
                  for start in range(0, len(images), self.batch_size)]
        return self.finish(np.concatenate(chunks))


def classifier_transform(classifier: ImageNetClassifier) -> Transform:
    """Resize the short side to ``size / 0.875`` (bicubic), centre-crop ``size``, [0, 1] floats:
    the evaluation transform of timm's EfficientNet-Lite weights."""
    from torchvision.transforms import v2

    size = classifier.image_size
    return v2.Compose([v2.PILToTensor(), v2.Resize(round(size / 0.875), antialias=True,
                                                   interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])


def batched_encoder(features: Callable[[torch.Tensor], torch.Tensor], device: str,
                    dtype: torch.dtype, batch_size: int, what: str
                    ) -> Callable[[torch.Tensor], np.ndarray]:
    """:func:`image_features` of a host batch, as numpy. Batches that run out of memory are
    retried in halves, and the smaller size is kept for the rest of the embedder's batches
    (``what`` names them in the warning)."""
    limit = BatchLimit(batch_size)

    def encode(pixels: torch.Tensor) -> np.ndarray:
        # Contiguous slices of a pinned batch stay pinned, so each part still copies async.
        parts = run_in_batches(
            lambda rows: image_features(features, pixels[rows.start:rows.stop], device,
                                        dtype).cpu().numpy(),
            range(len(pixels)), limit, what=what)
        return np.concatenate(parts)

    return encode


def load_inference_classifier(name: str, checkpoint: str | None, device: str
                              ) -> ImageNetClassifier:
    """:func:`load_imagenet_classifier` with :func:`prepare_model` applied (once per process)."""
    classifier = load_imagenet_classifier(name, checkpoint, device=device)
    prepare_model(classifier.model, device)
    return classifier


def choose_embedder(kind: str, *, clip_model: str, clip_pretrained: str, device: str = "cpu",
                    batch_size: int = 64, autocast_dtype: str = "bfloat16",
                    classifier_checkpoint: str | None = None,
                    what: str = "embed") -> EmbedderChoice:
    """Resolve ``kind`` (auto | clip | efficientnet-lite0 | pixels-pca) to an embedder.

    ``auto`` tries CLIP, then the packaged EfficientNet-Lite0, then pixels-pca; an explicit
    kind whose weights are missing raises :class:`MissingWeightsError` instead.
    ``classifier_checkpoint`` replaces the packaged EfficientNet-Lite0 weights.
    """
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder {kind!r}; choose one of {EMBEDDERS}")
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast dtype {autocast_dtype!r}; one of "
                         f"{sorted(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[autocast_dtype]
    pixels_pca = EmbedderChoice("pixels-pca", pixel_thumbnail, lambda batch: batch.numpy(),
                                pixel_pca_project, None, device, batch_size)
    if kind == "pixels-pca":
        return pixels_pca
    reasons: list[str] = []
    if kind in ("auto", "clip"):
        try:
            bundle = cached_model(load_inference_clip, clip_model, clip_pretrained,
                                  device=device)
        except MissingWeightsError as exc:
            if kind == "clip":
                raise
            reasons.append(f"CLIP weights unavailable ({clip_model}/{clip_pretrained})")
            log.warning("embedder: %s\n%s", reasons[-1], exc)
        else:
            # image_features already L2-normalises each batch: nothing is left to finish.
            encode = batched_encoder(bundle.model.encode_image, device, dtype, batch_size, what)
            return EmbedderChoice(f"clip:{clip_model}/{clip_pretrained}", bundle.preprocess,
                                  encode, lambda vectors: vectors, None, device, batch_size,
                                  weights=clip_pretrained)
    try:
        classifier = cached_model(load_inference_classifier, PACKAGED_EMBEDDER,
                                  classifier_checkpoint, device=device)
    except MissingWeightsError as exc:
        if kind != "auto":
            raise
        reasons.append(f"{PACKAGED_EMBEDDER} weights unavailable")
        reason = "; ".join(reasons) + "; using pixels-pca"
        log.warning("!!! EMBEDDER FALLBACK: %s\n%s", reason, exc)
        return replace(pixels_pca, fallback_reason=reason)
    encode = batched_encoder(classifier.features, device, dtype, batch_size, what)
    return EmbedderChoice(
        PACKAGED_EMBEDDER, classifier_transform(classifier), encode, lambda vectors: vectors,
        "; ".join(reasons) + f"; using {PACKAGED_EMBEDDER} (ImageNet-1K)" if reasons else None,
        device, batch_size, weights=classifier.source)


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (len(kept), d) float32, L2-normalised
    kept: list[int]  # positions in the input paths of the rows of ``vectors``
    failed: list[tuple[int, str]]  # positions that could not be decoded, and why


def embed_files(choice: EmbedderChoice, paths: Sequence[str], *,
                storage_options: dict[str, Any] | None = None,
                sha256: Sequence[str] | None = None, num_workers: int = 0,
                progress: bool = False) -> Embedded:
    """Embed image files, decoded in ``num_workers`` DataLoader processes; files that fail to
    decode are left out of the vectors and returned in ``failed``."""
    dataset = ImageFiles(paths, choice.transform, storage_options, sha256)
    pin = _on_cuda(choice.device)
    kept: list[int] = []
    failed: list[tuple[int, str]] = []
    chunks: list[np.ndarray] = []
    with tqdm(total=len(dataset), desc="embed", unit="img", disable=not progress,
              leave=False) as bar:
        for batch in image_loader(dataset, batch_size=choice.batch_size,
                                  num_workers=num_workers, pin_memory=pin):
            if batch.indices:
                chunks.append(choice.encode(batch.pixels))
                kept += batch.indices
            failed += batch.failed
            bar.update(len(batch.indices) + len(batch.failed))
    vectors = choice.finish(np.concatenate(chunks)) if chunks else np.zeros((0, 0), np.float32)
    return Embedded(vectors, kept, failed)


# -- Prefect task ----------------------------------------------------------------------------
class EmbedParams(BaseModel):
    embedder: str  # resolved by the flow: one of EMBEDDERS but "auto" (see flow)
    clip_model: str = "ViT-B-32"
    clip_pretrained: Annotated[str, WeightsInKey] = "laion2b_s34b_b79k"  # a tag or a file
    # Replaces the packaged efficientnet-lite0 weights.
    classifier_checkpoint: Annotated[str | None, WeightsInKey] = None
    device: Annotated[str, NotInKey] = "cpu"
    batch_size: Annotated[int, NotInKey] = 64
    # Decode processes; None: default_num_workers(device).
    num_workers: Annotated[int | None, NotInKey] = None
    autocast_dtype: str = "bfloat16"  # CUDA only ("float16" possible); CPU runs float32
    progress: Annotated[bool, NotInKey] = True


@stage_task("embed")
def embed_class(store: RunStore, folder: str, scope: str, params: EmbedParams,
                upstream: list[ArtifactRef]) -> dict[str, Any]:
    """Decode and embed one class's validated images; float16 L2-normalised vectors in Parquet.

    Images that fail to decode are left out of ``embeddings.parquet`` and listed, with their
    reasons, in ``skipped.parquet`` beside it.
    """
    (loaded,) = upstream
    images = store.read_parquet(f"{loaded.folder}/images.parquet")
    choice = choose_embedder(params.embedder, clip_model=params.clip_model,
                             clip_pretrained=params.clip_pretrained, device=params.device,
                             batch_size=params.batch_size, autocast_dtype=params.autocast_dtype,
                             classifier_checkpoint=params.classifier_checkpoint,
                             what=f"embed[{scope}]")
    workers = (default_num_workers(params.device) if params.num_workers is None
               else params.num_workers)
    result = embed_files(choice, images["path"].tolist(), storage_options=store.storage_options,
                         sha256=images["sha256"].tolist(), num_workers=workers,
                         progress=params.progress)
    skipped = [(images["path"].iat[index], reason) for index, reason in sorted(result.failed)]
    # Written first, so that a class with nothing usable still leaves its reasons to read.
    by_reason = record_skipped(store, folder, "embed", scope, skipped, len(images))
    if not result.kept:
        raise no_usable_images(store, folder, scope, len(skipped), by_reason)
    table = images.iloc[result.kept][["image_id", "path", "sha256"]].reset_index(drop=True)
    table = table.assign(embedding=list(result.vectors.astype(np.float16)))
    store.write_parquet(f"{folder}/embeddings.parquet", table)
    return {"embedder": choice.name, "weights": choice.weights,
            "dim": int(result.vectors.shape[1]), "images": len(table),
            "skipped": len(skipped), "skipped_by_reason": by_reason}


def read_embeddings(store: RunStore, ref: ArtifactRef) -> tuple[pd.DataFrame, np.ndarray]:
    """The embeddings table and its vectors as one (N, d) float32 array."""
    table = store.read_parquet(f"{ref.folder}/embeddings.parquet")
    return table, np.stack(table["embedding"].to_numpy()).astype(np.float32)
