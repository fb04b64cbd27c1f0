"""DIVER refinement on a tiny DiT and VAE built from config (random weights, CPU, seconds)."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

import gridistill.tasks.refine as refine
from gridistill.cli_refine import add_refine_parser, run_refine
from gridistill.models import DiTBundle, MissingWeightsError, load_dit
from gridistill.refine_options import DiverOptions

NUM_STEPS = 50


def tiny_dit_parts() -> tuple[DiTTransformer2DModel, AutoencoderKL, DDIMScheduler]:
    torch.manual_seed(0)
    # The real DiT's shape in miniature: 1000 classes + the null class, learned sigma
    # (out_channels = 2 * in_channels), a 4-channel latent.
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=16).eval()
    # DiT's training schedule (linear betas, 1000 steps), no x0 clipping.
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              clip_sample=False)
    return transformer, vae, scheduler



@pytest.fixture(scope="module")
def components() -> DiTBundle:
    transformer, vae, scheduler = tiny_dit_parts()
    return DiTBundle(transformer=transformer, vae=vae, scheduler=scheduler, source="tiny",
                     vae_source="tiny")


@pytest.fixture
def distilled_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 24, 20, generator=generator)  # not the DiT's 16 px on purpose


LABELS = torch.tensor([3, 7, 999])


def test_gamma0_from_pure_noise_reproduces_dit_pipeline(components: DiTBundle) -> None:
    pipeline = DiTPipeline(transformer=components.transformer, vae=components.vae,
                           scheduler=DDIMScheduler.from_config(components.scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(LABELS.tolist(), guidance_scale=4.0, num_inference_steps=NUM_STEPS,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images
    # The pipeline's own starting noise: same shape, same generator seed.
    noise = randn_tensor((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    latents = refine.denoise_latents(noise, LABELS, components, start_step=NUM_STEPS,
                                     num_steps=NUM_STEPS, t_h=40, t_l=25, gamma=0.0,
                                     cfg_scale=4.0)
    images = refine.decode_latents(latents, components.vae)
    assert expected.std() > 0.01  # a non-trivial sample, so agreement means something
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("t_h", "t_l"), [(40, 25), (50, 50), (1, 1), (30, 10)])
def test_semantic_guidance_exactly_on_steps_in_window(
        components: DiTBundle, monkeypatch: pytest.MonkeyPatch, t_h: int, t_l: int) -> None:
    scheduler = components.scheduler
    stepped, guided, forward_batches = [], [], []

    def step_index(timestep: torch.Tensor) -> int:
        return NUM_STEPS - scheduler.timesteps.tolist().index(int(timestep))

    original_step, original_guidance = scheduler.step, refine.semantic_guidance

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        stepped.append(step_index(timestep))
        return original_step(model_output, timestep, sample, *args, **kwargs)

    def recording_guidance(latents, anchor, sched, timestep, gamma):
        guided.append(step_index(timestep))
        return original_guidance(latents, anchor, sched, timestep, gamma)

    monkeypatch.setattr(scheduler, "step", recording_step)
    monkeypatch.setattr(refine, "semantic_guidance", recording_guidance)
    hook = components.transformer.register_forward_pre_hook(
        lambda module, inputs, kwargs: forward_batches.append(len(inputs[0])), with_kwargs=True)
    try:
        clean = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        refine.refine_latents(clean, LABELS, components, noise,
                              DiverOptions(t_f=NUM_STEPS, t_h=t_h, t_l=t_l, gamma=0.1))
    finally:
        hook.remove()
    assert stepped == list(range(NUM_STEPS, 0, -1))
    assert guided == list(range(t_h, t_l - 1, -1))
    # Classifier-free guidance: both branches (3 conditional + 3 null) in one forward per step.
    assert forward_batches == [6] * NUM_STEPS


def test_guidance_changes_the_trajectory_from_step_t_h_on(components: DiTBundle,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, original_step = components.scheduler, components.scheduler.step
    samples: dict[int, torch.Tensor] = {}

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        samples[NUM_STEPS - scheduler.timesteps.tolist().index(int(timestep))] = sample.clone()
        return original_step(model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(scheduler, "step", recording_step)
    clean = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    trajectories = []
    for gamma in (0.0, 0.1):
        samples = {}
        refine.refine_latents(clean, LABELS, components, noise,
                              DiverOptions(t_f=NUM_STEPS, gamma=gamma))
        trajectories.append(samples)
    plain, guided = trajectories
    for k in range(NUM_STEPS, 39, -1):  # what steps 50..40 start from: nothing guided yet
        assert torch.equal(plain[k], guided[k])
    assert not torch.allclose(plain[39], guided[39])  # step 40's update was guided


@pytest.mark.parametrize("t_r", [None, NUM_STEPS])
def test_larger_gamma_ends_closer_to_z0(components: DiTBundle, t_r: int | None) -> None:
    clean = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    distances = []
    for gamma in (0.0, 0.05, 0.1, 0.3):
        final = refine.refine_latents(clean, LABELS, components, noise,
                                      DiverOptions(t_r=t_r, gamma=gamma))
        distances.append(float((final - clean).norm()))
    assert distances == sorted(distances, reverse=True)
    assert len(set(distances)) == len(distances), distances


def test_t_f_zero_returns_the_vae_reconstruction(components: DiTBundle,
                                                 distilled_images: torch.Tensor) -> None:
    calls = []
    hook = components.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        refined = refine.diver_refine(distilled_images, LABELS, components,
                                      DiverOptions(t_f=0), progress=False)
    finally:
        hook.remove()
    vae = components.vae
    with torch.no_grad():
        pixels = F.interpolate(distilled_images, size=(16, 16), mode="bilinear", antialias=True)
        posterior = vae.encode(pixels * 2 - 1).latent_dist.mean
        decoded = vae.decode(posterior).sample
    expected = F.interpolate((decoded / 2 + 0.5).clamp(0, 1), size=(24, 20), mode="bilinear",
                             antialias=True)
    assert calls == []
    assert refined.shape == distilled_images.shape
    torch.testing.assert_close(refined, expected, atol=1e-5, rtol=1e-5)


def test_deterministic_for_a_seed_whatever_the_batch_size(components: DiTBundle,
                                                          distilled_images: torch.Tensor) -> None:
    def run(seed: int, batch_size: int) -> torch.Tensor:
        return refine.diver_refine(distilled_images, LABELS, components,
                                   DiverOptions(num_steps=10, t_f=8, t_h=6, t_l=3), seed=seed,
                                   batch_size=batch_size, progress=False)

    first = run(seed=0, batch_size=3)
    assert torch.equal(first, run(seed=0, batch_size=3))
    torch.testing.assert_close(first, run(seed=0, batch_size=2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, run(seed=1, batch_size=3))


def test_invalid_steps_are_refused_when_the_options_are_built() -> None:
    for bad in ({"t_f": 51}, {"t_f": 30, "t_r": 20}, {"t_h": 20, "t_l": 30}, {"t_l": 0},
                {"cfg_scale": 0.5}, {"t_r": 51}):
        with pytest.raises(ValueError):
            DiverOptions(**bad)


# -- loading and the CLI ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny-dit")
    transformer, vae, scheduler = tiny_dit_parts()
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    return root


def test_load_dit_from_a_local_directory(tiny_dit_dir) -> None:
    bundle = load_dit(str(tiny_dit_dir), vae=str(tiny_dit_dir))
    assert isinstance(bundle.scheduler, DDIMScheduler)
    assert bundle.transformer.config.num_embeds_ada_norm == 1000
    assert refine.dit_image_size(bundle) == 16


def test_load_dit_missing_weights_raise_a_clear_error(tiny_dit_dir, tmp_path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub look-up (and its retries) in tests
    with pytest.raises(MissingWeightsError, match="huggingface-cli download"):
        load_dit("no-such-org/no-such-dit", vae=str(tiny_dit_dir))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        (tiny_dit_dir / "transformer" / "config.json").read_text())
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        (tiny_dit_dir / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(MissingWeightsError):  # configs present, weight file absent
        load_dit(str(tmp_path), vae=str(tiny_dit_dir))


def parse_refine_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gridistill")
    add_refine_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["refine", *argv])


def test_cli_refines_mtt_tensors_into_an_image_folder(tiny_dit_dir, tmp_path) -> None:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    torch.save((images - mean) / std, tmp_path / "images_best.pt")
    torch.save(torch.tensor([0, 0, 1, 9]), tmp_path / "labels_best.pt")
    out = tmp_path / "refined"
    args = parse_refine_args(
        "--input", str(tmp_path / "images_best.pt"), "--out", str(out), "--normalization",
        "imagenet", "--classes-preset", "imagenette", "--dit", str(tiny_dit_dir), "--vae",
        str(tiny_dit_dir), "--num-steps", "10", "--t-f", "5", "--t-h", "8", "--t-l", "5",
        "--batch-size", "3")
    assert run_refine(args) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    # Class 9 of ImageNette (MTT order) is parachute, ImageNet index 701 = n03888257.
    assert written == ["n01440764/00000.png", "n01440764/00001.png", "n02102040/00002.png",
                       "n03888257/00003.png"]
    assert (out / "classes.csv").read_text().splitlines()[1] == "0,n01440764,n01440764"


def test_cli_refines_an_image_folder(tiny_dit_dir, tmp_path) -> None:
    for wnid in ("n01440764", "n02102040"):
        (tmp_path / "in" / wnid).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "in" / wnid / "a.png")
    out = tmp_path / "out"
    args = parse_refine_args("--input", str(tmp_path / "in"), "--out", str(out), "--dit",
                             str(tiny_dit_dir), "--vae", str(tiny_dit_dir), "--num-steps", "4",
                             "--t-f", "2", "--t-h", "3", "--t-l", "2")
    assert run_refine(args) == 0
    refined = Image.open(out / "n02102040" / "00001.png")
    assert refined.size == (20, 20)


def test_cli_missing_weights_stop_before_any_work(tmp_path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = parse_refine_args("--input", str(tmp_path / "does-not-matter"), "--out", str(out),
                             "--dit", "no-such-org/no-such-dit", "--classes-preset", "imagenette")
    assert run_refine(args) == 2
    assert "Missing pretrained weights for DiT" in capsys.readouterr().err
    assert not out.exists()


def test_out_of_memory_halves_the_batch_with_the_same_result(components: DiTBundle,
                                                             distilled_images: torch.Tensor,
                                                             small_device, caplog) -> None:
    """A fake device that fits one image (two transformer rows with CFG): the run halves
    3 -> 1 and gives the batch-size-1 result exactly (every image's noise is drawn up front)."""
    import logging

    def run(batch_size: int) -> torch.Tensor:
        return refine.diver_refine(distilled_images, LABELS, components,
                                   DiverOptions(num_steps=10, t_f=4, t_h=3, t_l=2), seed=0,
                                   batch_size=batch_size, progress=False)

    at_three, at_one = run(3), run(1)
    sizes = small_device(components.transformer, "forward", 2)
    with caplog.at_level(logging.WARNING, logger="gridistill.resources"):
        halved = run(3)
    assert torch.equal(halved, at_one)
    torch.testing.assert_close(halved, at_three, atol=1e-5, rtol=1e-5)
    assert sizes[0] == 6 and set(sizes[1:]) == {2}  # 3 images, then 1 (CFG doubles rows)
    assert ["DIVER refine: out of memory at batch size 3" in r.getMessage()
            for r in caplog.records if r.name == "gridistill.resources"] == [True]


def test_cli_refuses_steps_out_of_order_with_one_line(tmp_path, capsys) -> None:
    args = parse_refine_args("--input", str(tmp_path), "--out", str(tmp_path / "out"),
                             "--t-f", "30", "--t-r", "20")
    assert run_refine(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "need 0 <= t_f <= t_r <= num_steps" in err


def test_run_options_reach_the_refine_stage(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gridistill run --refine --t-r 50 --gamma 0.02``: through the flows' own binding
    (``gridistill.flows.dag.Setup``) the stage calls DIVER with exactly the options the command
    line gave (the DiT loader and DIVER itself are replaced by recorders)."""
    from gridistill.cli import build_parser, config_from_args
    from gridistill.flows.dag import Setup
    from gridistill.stages import ArtifactRef, StoreSpec
    from gridistill.storage import RunStore
    from gridistill.tasks.grids import write_grid_images

    config = config_from_args(build_parser().parse_args(
        ["run", "--refine", "--t-r", "50", "--gamma", "0.02", "--out", str(tmp_path / "run")]))
    received = []

    def recording_refine(images, labels, components, options, **kwargs):
        received.append(options)
        return images

    monkeypatch.setattr(refine, "diver_refine", recording_refine)
    monkeypatch.setattr(refine, "load_dit_for", lambda params: None)
    params = Setup(config, "cpu").refine()
    store = StoreSpec(root=config.out)
    write_grid_images(store.open(), "enhance/n01440764/k", [Image.new("RGB", (16, 16))])
    enhanced = ArtifactRef(stage="enhance", scope="n01440764", key="k",
                           folder="enhance/n01440764/k")
    refine.refine_class.fn(store, "n01440764", params, [enhanced])
    assert received == [DiverOptions(t_r=50, gamma=0.02)]
    assert RunStore(config.out).list("refine/n01440764")
