"""The enhance stage: interpolation backends, and the one-step SD inversion checked against
diffusers' own StableDiffusionImg2ImgPipeline with tiny random models built from config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gridistill.models import (
    CLIP_BPE_VOCAB_SIZE,
    InvSRNoisePredictor,
    MissingWeightsError,
    StableDiffusionComponents,
    build_clip_tokenizer,
    check_clip_tokenizer,
    load_invsr_noise_predictor,
    load_sd_turbo,
)
from gridistill.tasks.enhance import (
    ENHANCE_BACKENDS,
    class_prompts,
    encode_prompts,
    enhance_grids,
    enhancement_record,
    grid_generator,
    tile_starts,
    upsample,
    wavelet_colour_fix,
    ycbcr_colour_fix,
)

# SD-Turbo's scheduler_config.json (EulerDiscrete, trailing spacing, epsilon prediction).
SD_TURBO_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
    interpolation_type="linear", use_karras_sigmas=False,
)
TINY_PREDICTOR = dict(block_out_channels=(16, 32), layers_per_block=(1, 1), latent_channels=4,
                      norm_num_groups=8, temb_channels=32, attention_head_dim=8)



@pytest.fixture(scope="module")
def tiny() -> StableDiffusionComponents:
    """SD-shaped parts with tiny widths: the VAE keeps SD's 1/8 latent grid and 4 channels."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_BPE_VOCAB_SIZE, hidden_size=32, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    ))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return StableDiffusionComponents(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(**SD_TURBO_SCHEDULER), source="tiny-from-config",
    )


def _grids(count: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- interpolation backends ---------------------------------------------------------------------
def test_backends_listed_and_unknown_refused():
    assert ENHANCE_BACKENDS == ("none", "bilinear", "bicubic", "sd-turbo")
    with pytest.raises(ValueError, match="unknown enhance backend"):
        enhance_grids(_grids(), "lanczos")


def test_none_returns_input_unchanged_at_storage_resolution():
    grids = _grids(2)
    assert enhance_grids(grids, "none", scale=4) is grids


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_interpolation_backends(mode):
    grids = _grids(2, size=12)
    out = enhance_grids(grids, mode, scale=3)
    assert out.shape == (2, 3, 36, 36) and 0 <= out.min() and out.max() <= 1
    expected = F.interpolate(grids, scale_factor=3, mode=mode, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out, expected)


def test_enhanced_grids_are_accounted_apart_from_the_distilled_set():
    stored = _grids(3, size=12)
    record = enhancement_record(stored, enhance_grids(stored, "bicubic"), "bicubic", scale=4)
    assert record["counts_toward_storage_budget"] is False
    assert record["stored_size"] == [12, 12] and record["enhanced_size"] == [48, 48]
    assert record["grids"] == 3 and record["settings"] == {"scale": 4}


def test_class_prompts_template_and_wnid_map():
    assert class_prompts(["golden_retriever"]) == ["a photo of a golden retriever"]
    names = {"n01440764": "tench, Tinca tinca"}
    assert class_prompts(["n01440764"], "a {name}", names) == ["a tench"]
    with pytest.raises(ValueError, match="no {name}"):
        class_prompts(["dog"], "a photo")


# -- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_is_the_real_clip_bpe():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == CLIP_BPE_VOCAB_SIZE
    # Ids as open_clip's own SimpleTokenizer gives them, between start/end of text.
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_tokenizer_check_refuses_tiny_vocabulary():
    placeholder = CLIPTokenizer()  # what from_pretrained silently yields offline without files
    with pytest.raises(ValueError, match="placeholder"):
        check_clip_tokenizer(placeholder)


# -- the one-step inversion against diffusers' img2img pipeline --------------------------------
@pytest.mark.parametrize("timestep, steps, strength", [(200, 5, 0.2), (500, 2, 0.5)])
def test_one_step_matches_img2img_pipeline(tiny, timestep, steps, strength):
    """At strength τ/T with T/τ trailing steps, img2img runs exactly one step at index τ−1."""
    grids, prompt, seed = _grids(1), "a photo of a tench", 3
    ours = enhance_grids(grids, "sd-turbo", prompts=[prompt], components=tiny,
                         timestep=timestep, seed=seed, tile_size=None, progress=False)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=EulerDiscreteScheduler(**SD_TURBO_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # Same draws as grid 0: the posterior sample, then the noise, from grid_generator(seed, 0).
    theirs = pipe(prompt=prompt, image=upsample(grids, 4), strength=strength,
                  num_inference_steps=steps, guidance_scale=0.0, output_type="pt",
                  generator=grid_generator(seed, 0)).images
    assert ours.shape == theirs.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_prompt_reaches_the_unet(tiny):
    grids = _grids(1)
    run = dict(components=tiny, seed=0, tile_size=None, progress=False)
    dog = enhance_grids(grids, "sd-turbo", prompts=["a photo of a dog"], **run)
    again = enhance_grids(grids, "sd-turbo", prompts=["a photo of a dog"], **run)
    truck = enhance_grids(grids, "sd-turbo", prompts=["a photo of a truck"], **run)
    torch.testing.assert_close(dog, again, atol=0, rtol=0)
    assert (dog - truck).abs().max() > 1e-4


def test_grid_noise_is_independent_of_batching(tiny):
    grids = _grids(3)
    run = dict(prompts=["a photo of a dog"], components=tiny, tile_size=None, progress=False)
    together = enhance_grids(grids, "sd-turbo", batch_size=3, **run)
    alone = enhance_grids(grids[2:], "sd-turbo", batch_size=1, **run)
    torch.testing.assert_close(together[:2], enhance_grids(grids[:2], "sd-turbo", **run))
    assert (together[2] - alone[0]).abs().max() > 1e-4  # grid index picks the noise


def test_half_precision_stays_close_to_float32(tiny):
    """The CUDA path runs fp16; on CPU the same dtype handling is exercised with fp16 parts."""
    import copy

    half = copy.deepcopy(tiny)
    for module in (half.vae, half.unet, half.text_encoder):
        module.to(torch.float16)
    grids = _grids(1, size=24)
    run = dict(prompts=["a dog"], tile_size=64, tile_overlap=32, progress=False)
    full = enhance_grids(grids, "sd-turbo", components=tiny, **run)
    reduced = enhance_grids(grids, "sd-turbo", components=half, **run)
    assert reduced.dtype == torch.float32 and torch.isfinite(reduced).all()
    assert (reduced - full).abs().mean() < 5e-3


# -- tiling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, tile, overlap, align", [(896, 512, 64, 8), (128, 64, 16, 8),
                                                        (1000, 512, 100, 8), (64, 512, 64, 8)])
def test_tile_starts_cover_and_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] == max(0, size - tile)
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= tile - overlap + align for a, b in zip(starts, starts[1:], strict=False))


def test_stitching_is_exact_for_a_pointwise_step(tiny, monkeypatch):
    """With the SD step replaced by a pointwise map of (image, latent noise), any tiling must
    reproduce the untiled result exactly: checks crops, noise slices and blend weights."""
    import gridistill.tasks.enhance as enhance

    def pointwise_step(upsampled, prompt_embeds, components, *, noise_eps, **_):
        noise = F.interpolate(noise_eps[:, :3], scale_factor=8, mode="nearest")
        per_prompt = 0.1 * prompt_embeds[:, 2, 0, None, None, None]  # the class word's feature
        return (upsampled + 0.1 * noise + per_prompt).clamp(0, 1)

    monkeypatch.setattr(enhance, "invert_one_step", pointwise_step)
    grids = _grids(2, size=40)
    run = dict(prompts=["a dog", "a cat"], components=tiny, seed=5, progress=False)
    untiled = enhance_grids(grids, "sd-turbo", tile_size=None, **run)
    for tile_size, overlap, batch in [(64, 16, 3), (96, 48, 4), (128, 64, 1)]:
        tiled = enhance_grids(grids, "sd-turbo", tile_size=tile_size, tile_overlap=overlap,
                              batch_size=batch, **run)
        torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=0)


def test_tiles_covering_the_image_reproduce_untiled(tiny):
    grids = _grids(2, size=32)
    run = dict(prompts=["a photo of a dog"], components=tiny, seed=1, progress=False)
    untiled = enhance_grids(grids, "sd-turbo", tile_size=None, **run)
    one_tile = enhance_grids(grids, "sd-turbo", tile_size=128, **run)
    torch.testing.assert_close(one_tile, untiled, atol=1e-6, rtol=0)


def test_overlapping_tiles_stay_close_to_untiled(tiny):
    """Tiles see less context (GroupNorm statistics, attention), so they cannot be exact; the
    stitched image must stay much closer to the untiled one than a different noise draw is."""
    grids = _grids(1, size=32)
    run = dict(prompts=["a photo of a dog"], components=tiny, progress=False)
    untiled = enhance_grids(grids, "sd-turbo", tile_size=None, seed=1, **run)
    tiled = enhance_grids(grids, "sd-turbo", tile_size=64, tile_overlap=32, seed=1, **run)
    other_seed = enhance_grids(grids, "sd-turbo", tile_size=None, seed=2, **run)
    assert tiled.shape == untiled.shape == (1, 3, 128, 128)
    tiling_error = (tiled - untiled).abs().mean()
    seed_spread = (other_seed - untiled).abs().mean()
    assert tiling_error < 0.5 * seed_spread, (tiling_error, seed_spread)


def test_non_multiple_sizes_are_padded_and_cropped(tiny):
    grids = torch.rand(1, 3, 13, 21)
    out = enhance_grids(grids, "sd-turbo", prompts=["x"], components=tiny, tile_size=64,
                        tile_overlap=16, progress=False)
    assert out.shape == (1, 3, 52, 84) and 0 <= out.min() and out.max() <= 1


# -- colour fix ---------------------------------------------------------------------------------
def test_ycbcr_colour_fix_takes_chroma_from_reference():
    enhanced, reference = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    fixed = ycbcr_colour_fix(enhanced, reference)
    luma = torch.tensor([0.299, 0.587, 0.114])
    torch.testing.assert_close(torch.einsum("j,njhw->nhw", luma, fixed),
                               torch.einsum("j,njhw->nhw", luma, enhanced))
    assert (fixed - enhanced).abs().mean() > 0.01


def test_wavelet_colour_fix_takes_low_frequencies_from_reference():
    reference = torch.rand(1, 3, 64, 64)
    flat = torch.full((1, 3, 64, 64), 0.5)
    # Only high frequencies of `flat` (none) survive: the result is the reference's low-pass.
    low_pass = wavelet_colour_fix(flat, reference)
    assert low_pass.std() < reference.std() / 4
    torch.testing.assert_close(low_pass.mean(), reference.mean(), atol=1e-2, rtol=0)


def test_colour_fix_runs_in_the_pipeline(tiny):
    out = enhance_grids(_grids(1), "sd-turbo", prompts=["x"], components=tiny,
                        colour_fix="wavelet", progress=False)
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="colour fix"):
        enhance_grids(_grids(1), "sd-turbo", components=tiny, colour_fix="lab")


# -- missing weights stop before any work --------------------------------------------------------
def test_missing_sd_weights_raise_before_work(tmp_path):
    with pytest.raises(MissingWeightsError, match="To supply them") as missing:
        enhance_grids(_grids(1), "sd-turbo", prompts=["x"], components=None)
    assert "SD-Turbo" in str(missing.value) and "--sd-source" in str(missing.value)
    with pytest.raises(MissingWeightsError, match="sd-turbo"):
        enhance_grids(_grids(1), "sd-turbo", components=str(tmp_path / "no-such-model"))


def test_missing_noise_predictor_raises_before_work(tiny, tmp_path):
    calls = []
    hook = tiny.vae.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(MissingWeightsError, match="noise_predictor_sd_turbo_v5.pth"):
            enhance_grids(_grids(1), "sd-turbo", prompts=["x"], components=tiny,
                          noise_predictor=tmp_path / "noise_predictor_sd_turbo_v5.pth")
    finally:
        hook.remove()
    assert not calls


def test_load_sd_turbo_from_a_local_directory(tiny, tmp_path):
    for part in ("vae", "unet", "text_encoder", "scheduler"):
        getattr(tiny, part).save_pretrained(tmp_path / part)
    loaded = load_sd_turbo(str(tmp_path))  # no tokenizer/ saved: open_clip's BPE is used
    assert len(loaded.tokenizer) == CLIP_BPE_VOCAB_SIZE
    assert isinstance(loaded.scheduler, EulerDiscreteScheduler)
    torch.testing.assert_close(encode_prompts(["a dog"], loaded), encode_prompts(["a dog"], tiny))
    CLIPTokenizer().save_pretrained(tmp_path / "tokenizer")  # the 2-token trap, on disk
    with pytest.raises(ValueError, match="placeholder"):
        load_sd_turbo(str(tmp_path))
    (tmp_path / "unet" / "config.json").unlink()
    with pytest.raises(MissingWeightsError, match="unet"):
        load_sd_turbo(str(tmp_path))


# -- InvSR's noise predictor ----------------------------------------------------------------------
def test_noise_predictor_checkpoint_round_trip_and_use(tiny, tmp_path):
    torch.manual_seed(0)
    predictor = InvSRNoisePredictor(**TINY_PREDICTOR)
    # InvSR's checkpoints may wrap the weights and carry the DDP prefix.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in predictor.state_dict().items()}}
    torch.save(wrapped, tmp_path / "np.pth")
    loaded = load_invsr_noise_predictor(tmp_path / "np.pth", config=TINY_PREDICTOR)
    for key, value in predictor.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    grids = _grids(1)
    run = dict(prompts=["a dog"], components=tiny, tile_size=None, progress=False)
    learned = enhance_grids(grids, "sd-turbo", noise_predictor=loaded, **run)
    gaussian = enhance_grids(grids, "sd-turbo", **run)
    assert learned.shape == (1, 3, 64, 64) and (learned - gaussian).abs().max() > 1e-4
    with pytest.raises(ValueError, match="scale"):
        enhance_grids(grids, "sd-turbo", scale=2, noise_predictor=loaded, **run)


def test_out_of_memory_halves_the_tile_batch_with_the_same_result(tiny, small_device, caplog):
    """A fake device that fits 2 tiles: the run halves 4 -> 2 and keeps 2, and its result is
    the run at batch size 2 exactly (each tile's noise is cut from its grid's own draw)."""
    import logging

    grids = _grids(2, size=32)
    run = dict(prompts=["a photo of a dog"], components=tiny, seed=3, tile_size=64,
               tile_overlap=32, progress=False)  # 9 tiles per grid
    at_four, at_two = (enhance_grids(grids, "sd-turbo", batch_size=b, **run) for b in (4, 2))
    sizes = small_device(tiny.unet, "forward", 2)
    with caplog.at_level(logging.WARNING, logger="gridistill.resources"):
        halved = enhance_grids(grids, "sd-turbo", batch_size=4, **run)
    torch.testing.assert_close(halved, at_two, atol=0, rtol=0)
    torch.testing.assert_close(halved, at_four, atol=1e-5, rtol=0)
    assert sizes == [4] + [2, 2, 2, 2, 1] * 2  # one failure, then 2 for both grids
    assert ["sd-turbo enhance: out of memory at batch size 4" in r.getMessage()
            for r in caplog.records if r.name == "gridistill.resources"] == [True]
