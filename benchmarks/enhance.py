"""Seconds per grid and peak memory of the enhance backends at 224 -> 896 (×4).

    HF_HUB_OFFLINE=1 python benchmarks/enhance.py                      # CPU, tiny random weights
    HF_HUB_OFFLINE=1 python benchmarks/enhance.py --arch sd-turbo      # SD-Turbo-sized, random
    HF_HUB_OFFLINE=1 python benchmarks/enhance.py --source DIR_OR_ID   # real weights

On CUDA the parts run in fp16 (``--dtype`` overrides). Weights are random unless ``--source``
is given; random weights cost the same time as real ones, only the images are meaningless.
``--arch sd-turbo`` builds SD-Turbo's architecture (SD 2.1-base: 865M-parameter UNet, OpenCLIP
ViT-H text tower) from a config written here, since no config can be downloaded; ``tiny`` is the
test suite's scale. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's
peak resident set on CPU (weights and Python runtime included).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from gridistill.models import (  # noqa: E402
    CLIP_BPE_VOCAB_SIZE,
    StableDiffusionComponents,
    build_clip_tokenizer,
    load_sd_turbo,
)
from gridistill.tasks.enhance import enhance_grids  # noqa: E402

# SD-Turbo's scheduler_config.json.
SD_TURBO_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
)
# Architectures as (UNet, VAE, text encoder) keyword sets.
ARCHITECTURES = {
    "tiny": (
        dict(layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
             attention_head_dim=8, norm_num_groups=16),
        dict(layers_per_block=1, block_out_channels=(8, 16, 16, 16), norm_num_groups=8),
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    ),
    "sd-turbo": (  # stabilityai/sd-turbo = SD 2.1-base
        dict(layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
             use_linear_projection=True),
        dict(layers_per_block=2, block_out_channels=(128, 256, 512, 512)),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
             num_attention_heads=16, hidden_act="gelu", projection_dim=512),
    ),
}


def random_components(arch: str, device: str, dtype: torch.dtype) -> StableDiffusionComponents:
    unet_kwargs, vae_kwargs, text_kwargs = ARCHITECTURES[arch]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_kwargs)
    vae = AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **vae_kwargs)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_BPE_VOCAB_SIZE,
                                                max_position_embeddings=77, **text_kwargs))
    for module in (unet, vae, text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StableDiffusionComponents(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(**SD_TURBO_SCHEDULER), source=f"random {arch}",
    )


class PeakRss:
    """Peak resident set of this process while the block runs, sampled every 2 ms (CPU tensors
    are malloc'd, so there is no allocator counter to ask as on CUDA)."""

    def __enter__(self) -> PeakRss:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self.page

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def time_backend(grids: torch.Tensor, backend: str, device: str, repeats: int,
                 **kwargs) -> tuple[float, float, float]:
    """Seconds per grid (best of ``repeats`` timed calls after one warm-up), peak memory and
    its rise over the memory held before the calls (weights, runtime), in MiB: CUDA memory
    allocated on the GPU, or the process's resident set on CPU."""
    cuda = device.startswith("cuda")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    enhance_grids(grids[:1], backend, progress=False, **kwargs)  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    best = float("inf")
    with PeakRss() as host:
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            enhance_grids(grids, backend, progress=False, **kwargs)
            synchronize()
            best = min(best, (time.perf_counter() - start) / len(grids))
    peak, held = (torch.cuda.max_memory_allocated(), held) if cuda else (host.peak, host.start)
    return best, peak / 2**20, (peak - held) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), default="tiny")
    parser.add_argument("--source", default=None, help="real weights: directory or hub id")
    parser.add_argument("--grids", type=int, default=2, help="grids per timed call")
    parser.add_argument("--size", type=int, default=224, help="stored grid side, pixels")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiles", default="none,512", help="tile sizes; 'none' = untiled")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.source:
        components = load_sd_turbo(args.source, device=args.device, dtype=dtype)
        weights = f"real ({args.source})"
    else:
        components = random_components(args.arch, args.device, dtype)
        weights = f"random {args.arch}"
    grids = torch.rand(args.grids, 3, args.size, args.size,
                       generator=torch.Generator().manual_seed(0))
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    out_side = args.size * 4
    print(f"# enhance benchmark: {args.size}->{out_side}, {machine}, {dtype_name}, "
          f"weights {weights}, {args.grids} grids/call, best of {args.repeats}")
    memory = "GPU allocated" if args.device.startswith("cuda") else "process RSS"
    print(f"| backend | tile | batch | s / grid | peak {memory} (MiB) | rise during calls (MiB) |")
    print("|---|---|---|---|---|---|")
    for backend in ("bilinear", "bicubic"):
        seconds, peak, rise = time_backend(grids.to(args.device), backend, args.device,
                                           args.repeats)
        print(f"| {backend} | - | - | {seconds:.4f} | {peak:.0f} | {rise:.0f} |", flush=True)
    for tile in args.tiles.split(","):
        tile_size = None if tile == "none" else int(tile)
        seconds, peak, rise = time_backend(
            grids, "sd-turbo", args.device, args.repeats, prompts=["a photo of a dog"],
            components=components, tile_size=tile_size, batch_size=args.batch_size,
        )
        print(f"| sd-turbo | {tile} | {args.batch_size} | {seconds:.4f} | {peak:.0f} | "
              f"{rise:.0f} |", flush=True)


if __name__ == "__main__":
    main()
