"""Detail enhancement of downsampled grids: interpolation baselines and one-step diffusion
inversion.

Grid Distillation (CVPR 2026) stores each L×L grid downsampled to one image y0 and restores the
lost high frequencies with one step of SD-Turbo, following InvSR (Yue et al., "Arbitrary-steps
image super-resolution via diffusion inversion"):

    x_τ = sqrt(ᾱ_τ)·E(up(y0)) + sqrt(1 − ᾱ_τ)·ε,   ε ~ N(0, I)  or  ε ~ f_w(y0, τ)
    x_0 = D(one scheduler step of UNet(x_τ, τ, text(prompt)))

E/D are the VAE encoder/decoder, up() is bicubic ×scale and f_w is InvSR's noise predictor. The
maths lives in diffusers: the scheduler's ``add_noise`` (in its own parameterisation: SD-Turbo's
Euler scheduler writes x_τ = z + σ_τ·ε and divides by sqrt(σ_τ² + 1) in ``scale_model_input``,
the same thing) and ``step``. This module only composes the parts, tiles, and draws the noise.

Plain torch: no Prefect, no I/O. Weights come from :mod:`gridistill.models`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gridistill.models import (
    SD_TURBO_HOW,
    InvSRNoisePredictor,
    MissingWeightsError,
    StableDiffusionComponents,
    load_invsr_noise_predictor,
    load_sd_turbo,
)
from gridistill.resources import BatchLimit, run_in_batches

logger = logging.getLogger(__name__)

ENHANCE_BACKENDS = ("none", "bilinear", "bicubic", "sd-turbo")
COLOUR_FIXES = ("wavelet", "ycbcr")
DEFAULT_PROMPT_TEMPLATE = "a photo of a {name}"
# SD-Turbo's native resolution (512 px = 64 latent cells), InvSR's 128 px low-resolution chop ×4.
DEFAULT_TILE_SIZE = 512
DEFAULT_TILE_OVERLAP = 64


# -- prompts --------------------------------------------------------------------------------
def class_prompts(class_names: Sequence[str], template: str = DEFAULT_PROMPT_TEMPLATE,
                  wnid_to_name: Mapping[str, str] | None = None) -> list[str]:
    """One text prompt per class, ``template.format(name=...)``.

    A class given as a WNID is looked up in ``wnid_to_name``; of a map value listing synonyms
    ("tench, Tinca tinca") the first is used. Underscores become spaces ("German_shepherd").
    """
    if "{name}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{name}} field")
    prompts = []
    for class_name in class_names:
        name = class_name
        if wnid_to_name is not None and class_name in wnid_to_name:
            name = wnid_to_name[class_name].split(",")[0]
        prompts.append(template.format(name=name.replace("_", " ").strip()))
    return prompts


# -- colour fix (InvSR's optional post-processing) ----------------------------------------------
def _atrous_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """3×3 binomial (B-spline) blur with holes: one level of the à trous wavelet transform."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype, device=image.device) / 4
    kernel = (taps[:, None] * taps[None, :]).expand(image.shape[1], 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=dilation)


def wavelet_colour_fix(enhanced: torch.Tensor, reference: torch.Tensor,
                       levels: int = 5) -> torch.Tensor:
    """Keep the enhanced image's high frequencies and the reference's low frequencies (colour,
    illumination): after ``levels`` à trous blurs, out = enhanced − low(enhanced) + low(ref)."""

    def low_pass(image: torch.Tensor) -> torch.Tensor:
        for level in range(levels):
            image = _atrous_blur(image, 2**level)
        return image

    return enhanced - low_pass(enhanced) + low_pass(reference)


# Full-range ITU-R BT.601 (JPEG) RGB -> YCbCr; the offsets cancel in the round trip.
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114],
                              [-0.168736, -0.331264, 0.5],
                              [0.5, -0.418688, -0.081312]])


def ycbcr_colour_fix(enhanced: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Luma (Y) from the enhanced image, chroma (Cb, Cr) from the reference."""
    to_ycbcr = _RGB_TO_YCBCR.to(enhanced)
    luma = torch.einsum("ij,njhw->nihw", to_ycbcr[:1], enhanced)
    chroma = torch.einsum("ij,njhw->nihw", to_ycbcr[1:], reference)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_ycbcr), torch.cat([luma, chroma], 1))


def _apply_colour_fix(enhanced: torch.Tensor, reference: torch.Tensor,
                      colour_fix: str | None) -> torch.Tensor:
    if colour_fix == "wavelet":
        return wavelet_colour_fix(enhanced, reference)
    if colour_fix == "ycbcr":
        return ycbcr_colour_fix(enhanced, reference)
    return enhanced


# -- tiling -----------------------------------------------------------------------------------
def tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering [0, size), neighbours overlapping by at
    least ``overlap − align`` (starts are rounded to multiples of ``align``), spread evenly."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must lie in [0, tile size {tile})")
    count = math.ceil((size - overlap) / (tile - overlap))
    last = size - tile
    return sorted({min(last, round(i * last / (count - 1) / align) * align)
                   for i in range(count)})


def _ramp(start: int, tile: int, previous_end: int | None,
          next_start: int | None) -> torch.Tensor:
    """1-D blend weight of one tile: a linear cross-fade over each overlap with a neighbour,
    1 elsewhere, so that the weights of overlapping tiles sum to a smooth partition."""
    weight = torch.ones(tile)
    position = torch.arange(tile, dtype=torch.float32) + 0.5
    if previous_end is not None and previous_end > start:
        weight = torch.minimum(weight, position / (previous_end - start))
    if next_start is not None and next_start < start + tile:
        weight = torch.minimum(weight, (tile - position) / (start + tile - next_start))
    return weight


def _tile_weights(starts: list[int], tile: int) -> list[torch.Tensor]:
    return [_ramp(start, tile,
                  starts[i - 1] + tile if i > 0 else None,
                  starts[i + 1] if i + 1 < len(starts) else None)
            for i, start in enumerate(starts)]


# -- the one-step inversion ----------------------------------------------------------------------
def upsample(grids: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    """``grids`` ×``scale`` by interpolation, clamped back to [0, 1] (bicubic overshoots)."""
    return F.interpolate(grids, scale_factor=scale, mode=mode, align_corners=False).clamp(0, 1)


def encode_prompts(prompts: Sequence[str], components: StableDiffusionComponents) -> torch.Tensor:
    """Text-encoder hidden states (len(prompts), 77, D), as diffusers' SD pipelines compute them
    (max-length padding, last hidden state, no CLIP skip)."""
    tokens = components.tokenizer(
        list(prompts), padding="max_length", max_length=components.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    encoder = components.text_encoder
    mask = (tokens.attention_mask.to(encoder.device)
            if getattr(encoder.config, "use_attention_mask", False) else None)
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]


def invert_one_step(upsampled: torch.Tensor, prompt_embeds: torch.Tensor,
                    components: StableDiffusionComponents, *, timestep: int,
                    posterior_eps: torch.Tensor, noise_eps: torch.Tensor,
                    low_res: torch.Tensor | None = None,
                    noise_predictor: InvSRNoisePredictor | None = None) -> torch.Tensor:
    """One SD step on a batch of upsampled images (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1].

    ``posterior_eps`` draws the VAE posterior sample (as ``latent_dist.sample(generator)``) and
    ``noise_eps`` the diffusion noise, or the noise predictor's posterior sample when one is given
    (then ``low_res`` is its input). ``timestep`` τ counts 1..T like InvSR's ``timesteps=[200]``:
    the UNet sees index τ−1, which is what img2img runs at strength τ/T with trailing spacing.
    """
    vae, unet = components.vae, components.unet
    # A fresh scheduler per call: set_timesteps/step mutate its state (step index, sigmas).
    scheduler = type(components.scheduler).from_config(components.scheduler.config)
    scheduler.set_timesteps(timesteps=[timestep - 1], device=unet.device)
    t = scheduler.timesteps[0]

    posterior = vae.encode(upsampled.to(vae.dtype) * 2 - 1).latent_dist
    latents = (posterior.mean + posterior.std * posterior_eps) * vae.config.scaling_factor
    if noise_predictor is None:
        noise = noise_eps
    else:
        noise_dist = noise_predictor(low_res, int(t))
        noise = noise_dist.mean + noise_dist.std * noise_eps
    latents = scheduler.add_noise(latents, noise, t.repeat(latents.shape[0]))
    model_input = scheduler.scale_model_input(latents, t)
    noise_pred = unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (decoded / 2 + 0.5).clamp(0, 1)


def _downscale_factors(components: StableDiffusionComponents) -> tuple[int, int]:
    vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(components.unet.config.block_out_channels) - 1)
    return vae_factor, unet_factor


def _resolve_weights(components: StableDiffusionComponents | str | Path | None,
                     noise_predictor: InvSRNoisePredictor | str | Path | None,
                     ) -> tuple[StableDiffusionComponents, InvSRNoisePredictor | None]:
    if components is None:
        raise MissingWeightsError("Stable Diffusion (SD-Turbo) VAE/UNet/text encoder",
                                  "none given", SD_TURBO_HOW)
    if isinstance(components, str | Path):
        components = load_sd_turbo(str(components))
    device, dtype = components.unet.device, components.unet.dtype
    if isinstance(noise_predictor, str | Path):
        noise_predictor = load_invsr_noise_predictor(noise_predictor, device=device, dtype=dtype)
    if noise_predictor is None:
        logger.warning("sd-turbo: no InvSR noise predictor given; noising with seeded Gaussian "
                       "noise (InvSR's learned start noise is off)")
    return components, noise_predictor


def grid_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator for grid ``index`` of a call with ``seed``: a grid's noise depends on
    neither the batch size, nor the tiling, nor the other grids in the call.

    (seed, index) is mixed by numpy's ``SeedSequence`` because torch's CPU generator keeps only
    the low 32 bits of its seed: a packed ``seed·2³² + index`` would ignore the seed.
    """
    mixed = np.random.SeedSequence([seed, index]).generate_state(1)[0]
    return torch.Generator(device="cpu").manual_seed(int(mixed))


def _crop(images: torch.Tensor, boxes: list[tuple[int, int, int]], tile_h: int, tile_w: int,
          factor: int) -> torch.Tensor:
    """Stack the tiles ``(image index, row, col)`` (output-pixel coordinates) of ``images``,
    which lie on a grid ``factor`` times coarser than the output (latents: the VAE factor)."""
    return torch.stack([images[g, ..., r // factor:(r + tile_h) // factor,
                               c // factor:(c + tile_w) // factor] for g, r, c in boxes])


def _sd_turbo(grids: torch.Tensor, *, scale: int, prompts: list[str],
              components: StableDiffusionComponents, timestep: int, seed: int,
              tile_size: int | None, tile_overlap: int, colour_fix: str | None,
              noise_predictor: InvSRNoisePredictor | None, batch_size: int,
              progress: bool) -> torch.Tensor:
    count, _, height, width = grids.shape
    device, dtype = components.unet.device, components.unet.dtype
    vae_factor, unet_factor = _downscale_factors(components)
    if noise_predictor is not None and noise_predictor.downscale * scale != vae_factor:
        matching_scale = vae_factor // noise_predictor.downscale
        raise ValueError(f"the noise predictor's output lies on a 1/{noise_predictor.downscale} "
                         f"grid of its input, the SD latent on a 1/{vae_factor} grid of the "
                         f"×{scale} output: they match only at scale {matching_scale}")
    # Pad the low-resolution grid (reflect, as InvSR) so that the ×scale image is a whole
    # number of UNet-compatible latent blocks; the padding is cropped off at the end.
    multiple = vae_factor * unet_factor
    lr_multiple = multiple // math.gcd(multiple, scale)
    pad_h, pad_w = (-height) % lr_multiple, (-width) % lr_multiple
    padded_h, padded_w = (height + pad_h) * scale, (width + pad_w) * scale
    # Tiles are whole latent blocks; they start on the latent grid so noise slices line up.
    if tile_size is None:
        tile_h, tile_w = padded_h, padded_w
    else:
        tile = max(multiple, tile_size // multiple * multiple)
        tile_h, tile_w = min(padded_h, tile), min(padded_w, tile)
    rows = tile_starts(padded_h, tile_h, tile_overlap, vae_factor)
    cols = tile_starts(padded_w, tile_w, tile_overlap, vae_factor)
    weight_maps = [(r, c, (wr[:, None] * wc[None, :]).to(device))
                   for r, wr in zip(rows, _tile_weights(rows, tile_h), strict=True)
                   for c, wc in zip(cols, _tile_weights(cols, tile_w), strict=True)]
    weight_sum = torch.zeros(padded_h, padded_w, device=device)
    for r, c, w in weight_maps:
        weight_sum[r:r + tile_h, c:c + tile_w] += w
    latent_shape = (components.vae.config.latent_channels, padded_h // vae_factor,
                    padded_w // vae_factor)

    unique_prompts = sorted(set(prompts))
    embeds = encode_prompts(unique_prompts, components).to(dtype)
    embed_index = torch.tensor([unique_prompts.index(p) for p in prompts])

    # Out of memory halves the tiles per forward pass for the rest of the call; every tile's
    # noise is a crop of its grid's draw, so the output does not depend on the batch size.
    limit = BatchLimit(batch_size)

    def enhance_chunk(chunk: range) -> torch.Tensor:
        low_res = grids[chunk.start:chunk.stop].to(device=device, dtype=torch.float32)
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            low_res = F.pad(low_res, (0, pad_w, 0, pad_h), mode=mode)
        upsampled = upsample(low_res, scale)
        # Per grid, in this order: VAE posterior draw, then diffusion noise (the img2img order).
        draws = [torch.randn((2, *latent_shape), generator=grid_generator(seed, i)) for i in chunk]
        standard_normal = torch.stack(draws).to(device=device, dtype=dtype)

        def enhance_tiles(batch: Sequence[tuple[int, int, int, torch.Tensor]]) -> torch.Tensor:
            boxes = [(g, r, c) for g, r, c, _ in batch]
            return invert_one_step(
                _crop(upsampled, boxes, tile_h, tile_w, 1).to(dtype),
                embeds[embed_index[[chunk.start + g for g, _, _ in boxes]].to(device)],
                components, timestep=timestep,
                posterior_eps=_crop(standard_normal[:, 0], boxes, tile_h, tile_w, vae_factor),
                noise_eps=_crop(standard_normal[:, 1], boxes, tile_h, tile_w, vae_factor),
                low_res=(_crop(low_res, boxes, tile_h, tile_w, scale).to(dtype)
                         if noise_predictor is not None else None),
                noise_predictor=noise_predictor,
            ).float()

        # Work items: (grid within chunk, row, col, blend weight), batched across grids. They
        # are blended only once all have run: a batch that runs out of memory is run again, so
        # it must not have added anything before it returns.
        work = [(g, r, c, w) for g in range(len(chunk)) for r, c, w in weight_maps]
        tiles = torch.cat(run_in_batches(enhance_tiles, work, limit, what="sd-turbo enhance"))
        accumulated = torch.zeros(len(chunk), 3, padded_h, padded_w, device=device)
        for tile_image, (g, r, c, w) in zip(tiles, work, strict=True):
            accumulated[g, :, r:r + tile_h, c:c + tile_w] += tile_image * w
        stitched = (accumulated / weight_sum)[..., :height * scale, :width * scale]
        reference = upsampled[..., :height * scale, :width * scale]
        return _apply_colour_fix(stitched, reference, colour_fix).clamp(0, 1).cpu()

    grids_per_chunk = max(1, batch_size // len(weight_maps))
    output = torch.empty(count, 3, height * scale, width * scale)
    bar = tqdm(total=count, desc="sd-turbo enhance", unit="grid", disable=not progress)
    for first in range(0, count, grids_per_chunk):
        chunk = range(first, min(count, first + grids_per_chunk))
        output[chunk.start:chunk.stop] = enhance_chunk(chunk)
        bar.update(len(chunk))
    bar.close()
    return output


def enhancement_record(stored: torch.Tensor, enhanced: torch.Tensor, backend: str,
                       **settings: object) -> dict[str, object]:
    """How an enhanced set is accounted for: a derived, cached artifact listed
    apart from the distilled set. The distilled set stays the stored grids, IPC images per class
    at the storage resolution; enhanced grids are recomputable from them plus ``settings`` and
    never count toward the storage budget."""
    return {
        "artifact": "enhanced grids (derived cache, recomputable)",
        "counts_toward_storage_budget": False,
        "derived_from": "distilled grids at storage resolution",
        "backend": backend,
        "grids": int(stored.shape[0]),
        "stored_size": [int(stored.shape[-2]), int(stored.shape[-1])],
        "enhanced_size": [int(enhanced.shape[-2]), int(enhanced.shape[-1])],
        "settings": {key: str(value) if isinstance(value, Path) else value
                     for key, value in settings.items()},
    }


# no_grad rather than inference_mode: inference tensors could not be saved for backward if a
# training loader fed the enhanced grids straight into a model.
@torch.no_grad()
def enhance_grids(grids: torch.Tensor, backend: str, *, scale: int = 4,
                  prompts: list[str] | None = None,
                  components: StableDiffusionComponents | str | Path | None = None,
                  timestep: int = 200, seed: int = 0,
                  tile_size: int | None = DEFAULT_TILE_SIZE,
                  tile_overlap: int = DEFAULT_TILE_OVERLAP, colour_fix: str | None = None,
                  noise_predictor: InvSRNoisePredictor | str | Path | None = None,
                  batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Enhance stored grids (N, 3, H, W) in [0, 1] to (N, 3, H·scale, W·scale) in [0, 1].

    Backends:
      - ``"none"``: no enhancement stage. The input is returned unchanged, at its storage
        resolution, and ``scale`` is ignored: the training loader's crops resize it themselves.
      - ``"bilinear"`` / ``"bicubic"``: interpolation ×scale (the paper's "without diffusion").
      - ``"sd-turbo"``: the one-step inversion (module docstring). ``components`` are loaded
        parts or a source for :func:`gridistill.models.load_sd_turbo`; ``noise_predictor`` a
        loaded :class:`InvSRNoisePredictor` or a checkpoint path. Both are resolved before any
        work, so missing weights raise :class:`MissingWeightsError` first. ``prompts`` has one
        entry per grid (see :func:`class_prompts`) or one for all; ``None`` means the empty
        prompt. Grid i's noise comes from :func:`grid_generator`\\ (seed, i). Images larger
        than ``tile_size`` output pixels are processed in tiles overlapping by at least
        ``tile_overlap`` pixels (less the alignment to the latent grid) and cross-faded;
        ``tile_size=None`` never tiles. ``batch_size`` counts tiles per forward pass.
        ``colour_fix`` is ``None``, ``"wavelet"`` or ``"ycbcr"`` against the bicubic upsample.
        Runs on the components' device and dtype; returns a float32 CPU tensor. A source string
        loads on CPU in float32: call ``load_sd_turbo(source, device, dtype)`` to choose.
    """
    if backend not in ENHANCE_BACKENDS:
        raise ValueError(f"unknown enhance backend {backend!r}; choose from {ENHANCE_BACKENDS}")
    if grids.ndim != 4 or grids.shape[1] != 3 or not grids.is_floating_point():
        raise ValueError(f"grids must be float (N, 3, H, W), got {tuple(grids.shape)} "
                         f"{grids.dtype}")
    if grids.numel() and (grids.min() < 0 or grids.max() > 1):
        raise ValueError("grids must lie in [0, 1]")
    if scale < 1 or batch_size < 1:
        raise ValueError(f"scale and batch_size must be positive, got {scale}, {batch_size}")
    if colour_fix is not None and colour_fix not in COLOUR_FIXES:
        raise ValueError(f"unknown colour fix {colour_fix!r}; choose None or one of {COLOUR_FIXES}")
    if backend == "none":
        return grids
    if backend in ("bilinear", "bicubic"):
        return upsample(grids.float(), scale, backend)

    if prompts is None:
        prompts = [""]
        logger.warning("sd-turbo: no prompts given; conditioning every grid on the empty prompt")
    if len(prompts) == 1:
        prompts = list(prompts) * grids.shape[0]
    if len(prompts) != grids.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {grids.shape[0]} grids: give one per grid "
                         "or one for all")
    components, noise_predictor = _resolve_weights(components, noise_predictor)
    num_train_timesteps = components.scheduler.config.num_train_timesteps
    if not 1 <= timestep <= num_train_timesteps:
        raise ValueError(f"timestep must lie in [1, {num_train_timesteps}], got {timestep}")
    return _sd_turbo(grids, scale=scale, prompts=prompts, components=components,
                     timestep=timestep, seed=seed, tile_size=tile_size, tile_overlap=tile_overlap,
                     colour_fix=colour_fix, noise_predictor=noise_predictor,
                     batch_size=batch_size, progress=progress)


# -- Prefect task (wiring owned by the flow; algorithms stay above this line) ----------------
from typing import Annotated, Any  # noqa: E402

from pydantic import BaseModel  # noqa: E402

from gridistill.models import cached_model  # noqa: E402
from gridistill.stages import ArtifactRef, NotInKey, WeightsInKey, stage_task  # noqa: E402
from gridistill.storage import RunStore  # noqa: E402
from gridistill.tasks.grids import (  # noqa: E402
    pil_to_tensor,
    read_grid_images,
    tensor_to_pil,
    write_grid_images,
)


class EnhanceParams(BaseModel):
    backend: str = "bilinear"
    scale: int = 4
    seed: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    sd_turbo: Annotated[str, WeightsInKey] = "stabilityai/sd-turbo"
    timestep: int = 200
    colour_fix: str | None = None
    noise_predictor: Annotated[str | None, WeightsInKey] = None
    device: Annotated[str, NotInKey] = "cpu"
    progress: Annotated[bool, NotInKey] = True


def load_enhancer(params: EnhanceParams) -> StableDiffusionComponents | None:
    """SD-Turbo parts for the ``sd-turbo`` backend (once per process), else None.

    Called by the flow before any work, so missing weights stop a run at once.
    """
    if params.backend not in ENHANCE_BACKENDS:
        raise ValueError(f"unknown enhance backend {params.backend!r}; one of {ENHANCE_BACKENDS}")
    if params.backend != "sd-turbo":
        return None
    dtype = torch.float16 if params.device.startswith("cuda") else torch.float32
    return cached_model(load_sd_turbo, params.sd_turbo, device=params.device, dtype=dtype)


@stage_task("enhance")
def enhance_class(store: RunStore, folder: str, scope: str, params: EnhanceParams,
                  upstream: list[ArtifactRef]) -> dict[str, Any]:
    """Enhance one class's grids; a derived artifact, listed apart from the distilled set."""
    grids_ref, dataset = upstream
    display = {name: shown for name, _, shown in dataset.meta["classes"]}[scope]
    grids = pil_to_tensor(read_grid_images(store, grids_ref))
    enhanced = enhance_grids(
        grids, params.backend, scale=params.scale, seed=params.seed,
        prompts=class_prompts([display] * len(grids), params.prompt_template)
        if params.backend == "sd-turbo" else None,
        components=load_enhancer(params),
        timestep=params.timestep, colour_fix=params.colour_fix,
        noise_predictor=params.noise_predictor, progress=params.progress)
    write_grid_images(store, folder, tensor_to_pil(enhanced))
    return {"backend": params.backend, "resolution": int(enhanced.shape[-1])}
