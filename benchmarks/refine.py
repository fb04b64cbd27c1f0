"""DIVER refinement throughput: seconds per image and peak memory, per batch size.

Run from the repository root::

    HF_HUB_OFFLINE=1 python -m benchmarks.refine                          # CPU, tiny random DiT
    HF_HUB_OFFLINE=1 python -m benchmarks.refine --model dit-xl-2-random \\
        --device cuda --dtype bfloat16 --batch-sizes 1,8,32 --images 64     # real sizes, GPU
    HF_HUB_OFFLINE=1 python -m benchmarks.refine --model pretrained --device cuda

``dit-xl-2-random`` builds DiT-XL/2-256 and the sd-vae-ft-mse architecture from config with
random weights: the same arithmetic as the pretrained models, so the same speed, without
needing the weights. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset per row)
and the process's peak resident set on CPU (a high-water mark: rows run in increasing batch
size so each row's value is its own peak or a smaller row's).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from dataclasses import dataclass

import torch

from gridistill.models import DiTBundle, load_dit
from gridistill.refine_options import DiverOptions
from gridistill.tasks.refine import dit_image_size, diver_refine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dit_bundle_from_config(model: str, device: torch.device, dtype: torch.dtype) -> DiTBundle:
    """Random-weight DiT + VAE + DDIM: ``tiny`` (16 px) or ``dit-xl-2-random`` (256 px)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    if model == "tiny":
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, layers_per_block=1,
            sample_size=16)
    else:
        # DiTTransformer2DModel's defaults are DiT-XL/2-256; the VAE is sd-vae-ft-mse's shape.
        transformer = DiTTransformer2DModel(out_channels=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
            sample_size=256)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              clip_sample=False)
    for module in (transformer, vae):
        module.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:  # diffusers warns on every dtype cast, even a no-op one
            module.to(dtype)
    return DiTBundle(transformer=transformer, vae=vae, scheduler=scheduler, source=model,
                     vae_source=model)


@dataclass
class Row:
    batch_size: int
    images: int
    seconds_per_image: float
    peak_memory_mib: float


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(components: DiTBundle, batch_size: int, num_images: int, t_f: int,
            t_r: int | None, device: torch.device) -> Row:
    size = dit_image_size(components)
    images = torch.rand(num_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(num_images) % 1000
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    diver_refine(images, labels, components, DiverOptions(t_f=t_f, t_r=t_r),
                 batch_size=batch_size, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return Row(batch_size, num_images, seconds / num_images, peak_memory_mib(device))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "dit-xl-2-random", "pretrained"],
                        default="tiny")
    parser.add_argument("--dit", default="facebook/DiT-XL-2-256", help="for --model pretrained")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                        help="for --model pretrained")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--images", type=int, default=32, help="images per row (>= batch size)")
    parser.add_argument("--t-f", type=int, default=25)
    parser.add_argument("--t-r", type=int, help="default t_f; 50 for the paper's full reverse")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice); "
                        "1 avoids OpenMP spin-waits on a shared, oversubscribed machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda"
                                       else torch.float32)
    if args.model == "pretrained":
        components = load_dit(args.dit, args.vae, device=device, dtype=dtype)
    else:
        components = dit_bundle_from_config(args.model, device, dtype)
    batch_sizes = sorted(int(b) for b in args.batch_sizes.split(","))
    # Warm-up (kernel selection, allocator) outside the timed rows.
    measure(components, 1, 1, min(args.t_f, 2), None, device)
    rows = [measure(components, b, max(args.images, b), args.t_f, args.t_r, device)
            for b in batch_sizes]

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{torch.get_num_threads()}-thread {platform.machine()} CPU")
    steps = args.t_f if args.t_r is None else args.t_r
    print(f"# DIVER refine: {args.model}, {dit_image_size(components)} px, {dtype}, "
          f"{machine}, {steps} DDIM steps (t_f={args.t_f}), CFG batched, torch "
          f"{torch.__version__}")
    memory = "peak CUDA alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| batch | images | s/image | {memory} |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.batch_size} | {row.images} | {row.seconds_per_image:.4f} | "
              f"{row.peak_memory_mib:.0f} |")


if __name__ == "__main__":
    main()
