import json

import numpy as np
import pytest
import torch

from gridistill.models import MissingWeightsError, load_clip
from tasks.embed import choose_embedder, clip_embed, pixel_pca_embed
from tests.conftest import make_image

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A tiny open_clip config registered by name, and a checkpoint file with its weights."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "tiny-clip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "tiny-clip-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test", pretrained=None)
    torch.save(model.state_dict(), folder / "tiny.pt")
    return "tiny-clip-test", str(folder / "tiny.pt"), model


def test_clip_loads_a_local_checkpoint_and_embeds(tiny_clip_checkpoint):
    name, path, reference = tiny_clip_checkpoint
    bundle = load_clip(name, path)
    for loaded, original in zip(bundle.model.state_dict().values(),
                                reference.state_dict().values(), strict=True):
        assert torch.equal(loaded, original)  # the checkpoint's weights, not a fresh init
    images = [make_image((200, 0, 0), seed) for seed in range(5)]
    vectors = clip_embed(bundle, images, batch_size=2)
    assert vectors.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_missing_clip_weights_name_the_weights_and_the_remedy():
    with pytest.raises(MissingWeightsError, match="(?s)ViT-B-32.*--clip-pretrained"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(MissingWeightsError, match="neither a file nor a known tag"):
        load_clip("ViT-B-32", "/no/such/checkpoint.pt")


def test_auto_falls_back_loudly_and_clip_is_strict(caplog):
    choice = choose_embedder("auto", clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    assert choice.name == "pixels-pca" and "CLIP weights unavailable" in choice.fallback_reason
    assert "EMBEDDER FALLBACK" in caplog.text
    with pytest.raises(MissingWeightsError):
        choose_embedder("clip", clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")


def test_pixel_pca_separates_classes():
    images = [make_image((220, 30, 30), s) for s in range(8)]
    images += [make_image((30, 30, 220), 100 + s) for s in range(8)]
    vectors = pixel_pca_embed(images, dim=8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similarity = vectors @ vectors.T
    within = (similarity[:8, :8].mean() + similarity[8:, 8:].mean()) / 2
    assert within > similarity[:8, 8:].mean() + 0.5
    np.testing.assert_array_equal(vectors, pixel_pca_embed(images, dim=8))
