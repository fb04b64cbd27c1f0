"""DIVER refinement (ICML 2026): pull distilled images back toward natural images with a DiT.

Plain torch functions composed from diffusers parts: ``DiTTransformer2DModel`` predicts the
noise, ``AutoencoderKL`` maps pixels to latents, and ``DDIMScheduler`` does every DDIM
update (:meth:`~diffusers.DDIMScheduler.step`) and the forward noising
(:meth:`~diffusers.DDIMScheduler.add_noise`). The one new term, DIVER's semantic guidance,
lives in :func:`semantic_guidance`.

Step indices (the paper's t_f, t_r, t_h, t_l)
---------------------------------------------
With ``num_steps`` = N DDIM steps, ``scheduler.set_timesteps(N)`` gives the training
timesteps in sampling order, noisiest first. Step index ``k`` in 1..N names the timestep
``τ_k = scheduler.timesteps[N - k]``: k = N is the noisiest (τ = 980 for N = 50 and the DiT
schedule), k = 1 the last (τ = 0). ``z_k`` is a latent at noise level τ_k and k = 0 is the
clean latent. "DDIM step k" maps z_k → z_{k-1} with ε_θ(z_k, τ_k), so a reverse process that
starts at step s runs steps s, s-1, ..., 1 (s model evaluations).

- ``t_f``: z0 is noised to τ_{t_f}: z_{t_f} = √ᾱ_{τ_{t_f}}·z0 + √(1−ᾱ_{τ_{t_f}})·ε
  (``scheduler.add_noise``). t_f = 0 adds no noise and runs no step.
- ``t_r``: the step the reverse process starts at; defaults to t_f, where the noise in the
  latent matches the timestep the model is told. The paper writes
  ẑ_{t_r} = z_{t_f} with t_r = 50 > t_f = 25, i.e. the 25-step-noised latent handed to a full
  50-step reverse process; pass ``t_r=num_steps`` for that reading.
- ``t_h`` ≥ ``t_l``: the semantic phase. DDIM step k gets semantic guidance iff
  t_l ≤ k ≤ t_h (both ends included); every other step is plain CFG.

σ_t
---
σ_k = √(1 − ᾱ_{τ_k}) = ``sqrt(1 - scheduler.alphas_cumprod[τ_k])``: the standard deviation of
the noise in z_k under the forward process (the coefficient of ε in ``add_noise``). It is not
DDIM's ``std_dev_t`` (σ_t(η) in the DDIM paper), which is zero for deterministic DDIM (η = 0)
and would switch the guidance off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from gridistill.refine_options import DiverOptions, check_diver_parameters
from gridistill.resources import run_in_batches

if TYPE_CHECKING:
    from gridistill.models import DiTBundle


def step_timestep(scheduler: DDIMScheduler, step_index: int) -> torch.Tensor:
    """τ_k: the training timestep of DDIM step ``step_index`` (1 = last, N = noisiest).

    ``scheduler.set_timesteps(N)`` must have been called.
    """
    num_steps = len(scheduler.timesteps)
    if not 1 <= step_index <= num_steps:
        raise ValueError(f"step index must be in 1..{num_steps}, got {step_index}")
    return scheduler.timesteps[num_steps - step_index]


def semantic_guidance(latents: torch.Tensor, anchor_latents: torch.Tensor,
                      scheduler: DDIMScheduler, timestep: torch.Tensor,
                      gamma: float) -> torch.Tensor:
    """DIVER's semantic-guidance term γ·∇G_t, subtracted from the DDIM update.

    G_t(z_t) = σ_t·‖z_t − z0‖²/2, so ∇G_t = σ_t·(z_t − z0); the paper treats σ_t as a
    constant of z_t (no autograd), which is what keeps the step as cheap as plain DDIM.
    σ_t = √(1 − ᾱ_t) from ``scheduler.alphas_cumprod`` (see the module docstring).
    """
    sigma_t = (1.0 - scheduler.alphas_cumprod[int(timestep)]) ** 0.5
    return gamma * sigma_t.item() * (latents - anchor_latents)


def _guided_noise(latents: torch.Tensor, class_labels: torch.Tensor, components: DiTBundle,
                  timestep: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """ε̂ = ε_uncond + s·(ε_cond − ε_uncond), both branches in one batched forward."""
    transformer = components.transformer
    latent_channels = transformer.config.in_channels
    # DiT's label embedding has one extra row after the real classes: the CFG null class.
    null_class = transformer.config.num_embeds_ada_norm
    use_cfg = cfg_scale != 1.0
    model_input = components.scheduler.scale_model_input(latents, timestep)
    if use_cfg:
        model_input = torch.cat([model_input, model_input])
        class_labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)])
    timesteps = timestep.to(device=latents.device, dtype=torch.long).expand(len(model_input))
    output = transformer(model_input.to(transformer.dtype), timestep=timesteps,
                         class_labels=class_labels).sample
    # With learned sigma (DiT-XL/2: out_channels = 2·in) the extra channels are the variance,
    # which deterministic DDIM does not use.
    noise = output[:, :latent_channels].float()
    if not use_cfg:
        return noise
    cond_noise, uncond_noise = noise.chunk(2)
    return uncond_noise + cfg_scale * (cond_noise - uncond_noise)


@torch.no_grad()
def denoise_latents(latents: torch.Tensor, class_labels: torch.Tensor, components: DiTBundle,
                    *, start_step: int, num_steps: int, t_h: int, t_l: int, gamma: float,
                    cfg_scale: float, anchor_latents: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse DDIM from step ``start_step`` down to step 1, with CFG at every step.

    On steps t_l ≤ k ≤ t_h with ``anchor_latents`` (z0) given, the update is
    z_{k-1} = DDIM(z_k) − γ·σ_k·(z_k − z0); elsewhere z_{k-1} = DDIM(z_k). Step indices and
    σ_k are defined in the module docstring. Latents stay float32 whatever the model dtype.
    """
    # On its own the sampler's latents are at the noise level of the step it starts from.
    check_diver_parameters(num_steps=num_steps, t_f=start_step, t_r=start_step, t_h=t_h,
                           t_l=t_l, cfg_scale=cfg_scale)
    if gamma != 0.0 and anchor_latents is None:
        raise ValueError("semantic guidance (gamma != 0) needs anchor_latents (z0)")
    scheduler = components.scheduler
    # Timesteps stay on the CPU, as in DiTPipeline: the scheduler indexes alphas_cumprod with
    # them, which works whichever device add_noise has moved that table to.
    scheduler.set_timesteps(num_steps)
    latents = latents.float()
    for step_index in range(start_step, 0, -1):
        timestep = step_timestep(scheduler, step_index)
        noise = _guided_noise(latents, class_labels, components, timestep, cfg_scale)
        next_latents = scheduler.step(noise, timestep, latents).prev_sample
        if gamma != 0.0 and t_l <= step_index <= t_h:
            next_latents = next_latents - semantic_guidance(
                latents, anchor_latents, scheduler, timestep, gamma)
        latents = next_latents
    return latents


@torch.no_grad()
def refine_latents(clean_latents: torch.Tensor, class_labels: torch.Tensor,
                   components: DiTBundle, noise: torch.Tensor,
                   options: DiverOptions) -> torch.Tensor:
    """DIVER in latent space: noise z0 to step t_f, then guided reverse DDIM from step t_r."""
    scheduler = components.scheduler
    scheduler.set_timesteps(options.num_steps)
    if options.t_f == 0:
        start_latents = clean_latents
    else:
        timestep = step_timestep(scheduler, options.t_f).reshape(1)
        start_latents = scheduler.add_noise(clean_latents, noise, timestep)
    return denoise_latents(start_latents, class_labels, components,
                           start_step=options.start_step, num_steps=options.num_steps,
                           anchor_latents=clean_latents, t_h=options.t_h, t_l=options.t_l,
                           gamma=options.gamma, cfg_scale=options.cfg_scale)


def dit_image_size(components: DiTBundle) -> int:
    """The pixel size the DiT works at: latent size × the VAE's downsampling factor."""
    vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
    return components.transformer.config.sample_size * vae_scale


@torch.no_grad()
def encode_images(images: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """Images in [0, 1] → z0 = scaling_factor · the posterior mean (deterministic)."""
    pixels = (images * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    posterior_mean = vae.encode(pixels).latent_dist.mode()
    return posterior_mean.float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """Latents (scaled as z0) → images in [0, 1], float32."""
    pixels = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (pixels.float() / 2.0 + 0.5).clamp(0.0, 1.0)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def diver_refine(images: torch.Tensor, imagenet_labels: torch.Tensor, components: DiTBundle,
                 options: DiverOptions | None = None, *, seed: int = 0, batch_size: int = 32,
                 progress: bool = True) -> torch.Tensor:
    """Refine distilled images with DIVER (SI + SG + SF); returns images like the input.

    Args:
        images: float (N, 3, H, W) in [0, 1], any H, W; resized to the DiT resolution
            (256 for DiT-XL/2-256) and the output resized back to (H, W).
        imagenet_labels: long (N,) ImageNet-1K class indices (0..999) for the conditioning.
        components: the DiT, its VAE and a ``DDIMScheduler`` (``gridistill.models.load_dit``).
        options: the step indices t_f, t_r, t_h, t_l (defined in the module docstring; t_f = 0
            returns the VAE reconstruction), ``num_steps``, γ and the CFG scale; default: the
            paper's. Its ``dit``/``vae`` name the weights for loaders; ``components`` are used.
        seed: seeds one CPU generator that draws every image's noise up front, so the result
            does not depend on ``batch_size`` or the device's RNG.
        batch_size: images per forward (the CFG doubles the transformer batch). A batch that
            runs out of memory is retried in halves, and the smaller size is kept.
    """
    options = options or DiverOptions()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(imagenet_labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(imagenet_labels)} labels")
    device = components.transformer.device
    size = dit_image_size(components)
    latent_shape = (len(images), components.transformer.config.in_channels,
                    components.transformer.config.sample_size,
                    components.transformer.config.sample_size)
    all_noise = randn_tensor(latent_shape, generator=torch.Generator().manual_seed(seed))
    bar = tqdm(total=len(images), disable=not progress, desc="DIVER refine", unit="img")

    def refine_batch(rows: range) -> torch.Tensor:
        batch = slice(rows.start, rows.stop)
        pixels = resize_images(images[batch].to(device=device, dtype=torch.float32),
                               (size, size))
        clean_latents = encode_images(pixels, components.vae)
        latents = refine_latents(
            clean_latents, imagenet_labels[batch].to(device=device, dtype=torch.long),
            components, all_noise[batch].to(device), options)
        decoded = decode_latents(latents, components.vae)
        refined = resize_images(decoded, tuple(images.shape[-2:])).cpu()
        bar.update(len(rows))
        return refined

    with bar:
        return torch.cat(run_in_batches(refine_batch, range(len(images)), batch_size,
                                        what="DIVER refine"))


# -- Prefect task (wiring owned by the flow; algorithms stay above this line) ----------------
from typing import Annotated, Any  # noqa: E402

from pydantic import BaseModel  # noqa: E402

from gridistill.distilled_sets import imagenet_wnids  # noqa: E402
from gridistill.models import cached_model, load_dit  # noqa: E402
from gridistill.stages import ArtifactRef, NotInKey, stage_task  # noqa: E402
from gridistill.storage import RunStore  # noqa: E402
from gridistill.tasks.grids import (  # noqa: E402
    pil_to_tensor,
    read_grid_images,
    tensor_to_pil,
    write_grid_images,
)


class RefineParams(BaseModel):
    diver: DiverOptions = DiverOptions()
    seed: int = 0
    device: Annotated[str, NotInKey] = "cpu"
    batch_size: Annotated[int, NotInKey] = 32
    progress: Annotated[bool, NotInKey] = True


def imagenet_index(class_name: str) -> int:
    """The DiT class label of a class folder named by its ImageNet WNID."""
    wnids = imagenet_wnids()
    if class_name not in wnids:
        raise ValueError(f"DIVER conditions the DiT on ImageNet-1K classes: class {class_name!r} "
                         "is not an ImageNet WNID (name class folders by WNID)")
    return wnids.index(class_name)


def load_dit_for(params: RefineParams) -> DiTBundle:
    """The DiT and VAE for ``params``, once per process (bf16 on CUDA, float32 on CPU)."""
    dtype = torch.bfloat16 if params.device.startswith("cuda") else torch.float32
    return cached_model(load_dit, params.diver.dit, params.diver.vae, device=params.device,
                        dtype=dtype)


@stage_task("refine")
def refine_class(store: RunStore, folder: str, scope: str, params: RefineParams,
                 upstream: list[ArtifactRef]) -> dict[str, Any]:
    """DIVER: pull one class's grids back toward natural images with the class-conditional DiT."""
    (grids_ref,) = upstream
    grids = pil_to_tensor(read_grid_images(store, grids_ref))
    labels = torch.full((len(grids),), imagenet_index(scope), dtype=torch.long)
    refined = diver_refine(grids, labels, load_dit_for(params), params.diver, seed=params.seed,
                           batch_size=params.batch_size, progress=params.progress)
    write_grid_images(store, folder, tensor_to_pil(refined))
    return {"gamma": params.diver.gamma, "resolution": int(refined.shape[-1])}
