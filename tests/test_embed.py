import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gridistill.models import MissingWeightsError, cached_model, load_clip
from gridistill.stages import StoreSpec
from gridistill.storage import RunStore
from gridistill.tasks.embed import (
    Embedded,
    EmbedParams,
    choose_embedder,
    embed_class,
    embed_files,
    load_inference_clip,
    pixel_pca_project,
    pixel_thumbnail,
)
from gridistill.tasks.index import IndexParams, index_dataset
from gridistill.tasks.load import LoadParams, load_class
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
    vectors = choose_embedder("clip", clip_model=name, clip_pretrained=path,
                              batch_size=2).embed(images)
    assert vectors.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_missing_clip_weights_name_the_weights_and_the_remedy():
    with pytest.raises(MissingWeightsError, match="(?s)ViT-B-32.*--clip-pretrained"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(MissingWeightsError, match="neither a file nor a known tag"):
        load_clip("ViT-B-32", "/no/such/checkpoint.pt")


def test_auto_takes_the_packaged_network_without_clip_and_clip_is_strict(caplog):
    choice = choose_embedder("auto", clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    assert choice.name == "efficientnet-lite0"
    assert "CLIP weights unavailable" in choice.fallback_reason
    assert choice.weights.endswith(".pth") and Path(choice.weights).is_file()
    with pytest.raises(MissingWeightsError):
        choose_embedder("clip", clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")


def test_auto_falls_back_loudly_to_pixels_without_any_weights(caplog):
    choice = choose_embedder("auto", clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k",
                             classifier_checkpoint="/not/cached/anywhere.pth")
    assert choice.name == "pixels-pca" and "CLIP weights unavailable" in choice.fallback_reason
    assert "efficientnet-lite0 weights unavailable" in choice.fallback_reason
    assert "EMBEDDER FALLBACK" in caplog.text
    with pytest.raises(MissingWeightsError):
        choose_embedder("efficientnet-lite0", clip_model="", clip_pretrained="",
                        classifier_checkpoint="/not/cached/anywhere.pth")


def test_packaged_embedder_gives_unit_vectors_that_tell_classes_apart():
    from gridistill.config import demo_data_root

    root = Path(demo_data_root()) / "test"
    classes = sorted(p.name for p in root.iterdir())[:2]
    images = [Image.open(f).convert("RGB") for name in classes
              for f in sorted((root / name).iterdir())[:4]]
    choice = choose_embedder("efficientnet-lite0", clip_model="", clip_pretrained="",
                             batch_size=4)
    assert choice.fallback_reason is None
    vectors = choice.embed(images)
    assert vectors.shape == (8, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similarity = vectors @ vectors.T
    within = (similarity[:4, :4].sum() - 4) / 12 + (similarity[4:, 4:].sum() - 4) / 12
    assert within / 2 > similarity[:4, 4:].mean() + 0.1


def test_pixel_pca_separates_classes():
    images = [make_image((220, 30, 30), s) for s in range(8)]
    images += [make_image((30, 30, 220), 100 + s) for s in range(8)]
    def pixel_pca_embed(images, dim):
        return pixel_pca_project(np.stack([pixel_thumbnail(im).numpy() for im in images]), dim)

    vectors = pixel_pca_embed(images, dim=8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similarity = vectors @ vectors.T
    within = (similarity[:8, :8].mean() + similarity[8:, 8:].mean()) / 2
    assert within > similarity[:8, 8:].mean() + 0.5
    np.testing.assert_array_equal(vectors, pixel_pca_embed(images, dim=8))


@pytest.fixture
def image_files(tmp_path):
    """10 files (JPEG and PNG, several sizes) and their decoded-in-memory equivalents."""
    paths = []
    for i in range(10):
        image = make_image((40 * (i % 5), 90, 160), i, size=24 + 8 * (i % 3))
        path = tmp_path / f"{i:02d}.{'jpg' if i % 2 else 'png'}"
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("kind", ["clip", "pixels-pca"])
def test_decode_workers_do_not_change_the_embeddings(tiny_clip_checkpoint, image_files, kind):
    name, path, _ = tiny_clip_checkpoint
    choice = choose_embedder(kind, clip_model=name, clip_pretrained=path, batch_size=4)
    in_thread = embed_files(choice, image_files, num_workers=0)
    in_workers = embed_files(choice, image_files, num_workers=2)
    assert in_thread.kept == in_workers.kept == list(range(10)) and in_thread.failed == []
    np.testing.assert_array_equal(in_thread.vectors, in_workers.vectors)
    from gridistill.tasks.ingest import read_image

    decoded = [read_image(p).image for p in image_files]
    np.testing.assert_allclose(in_thread.vectors, choice.embed(decoded), atol=1e-6)


def test_an_out_of_memory_batch_is_embedded_in_halves(tiny_clip_checkpoint, image_files,
                                                       small_device, caplog):
    name, path, _ = tiny_clip_checkpoint
    choice = choose_embedder("clip", clip_model=name, clip_pretrained=path, batch_size=4,
                             what="embed[test]")
    expected = embed_files(choice, image_files).vectors
    model = cached_model(load_inference_clip, name, path, device="cpu").model
    sizes = small_device(model, "encode_image", 2)
    choice = choose_embedder("clip", clip_model=name, clip_pretrained=path, batch_size=4,
                             what="embed[test]")
    with caplog.at_level(logging.WARNING, logger="gridistill.resources"):
        halved = embed_files(choice, image_files).vectors
    np.testing.assert_allclose(halved, expected, atol=1e-6)
    assert sizes == [4, 2, 2] + [2, 2] + [2]  # one failure; later loader batches start at 2
    assert ["embed[test]: out of memory at batch size 4" in r.getMessage()
            for r in caplog.records if r.name == "gridistill.resources"] == [True]


def test_a_file_that_fails_to_decode_is_dropped_at_embed_with_its_reason(tiny_dataset,
                                                                         tmp_path, caplog):
    alpha = tiny_dataset["train"] / "alpha"
    jpeg = (tmp_path / "x.jpg")
    make_image((200, 40, 40), 99).save(jpeg, quality=90)
    data = jpeg.read_bytes()
    (alpha / "img_005.png").unlink()
    (alpha / "truncated.jpg").write_bytes(data[:len(data) // 2])  # a whole header, half a scan
    store = StoreSpec(root=str(tmp_path / "run"))
    dataset = index_dataset.fn(store, IndexParams(data=str(tiny_dataset["train"]),
                                                  holdout_share=0))
    loaded = load_class.fn(store, "alpha", LoadParams(), [dataset])
    assert loaded.meta["skipped"] == 0 and loaded.meta["images"] == 12  # the header is fine
    with caplog.at_level(logging.WARNING):
        ref = embed_class.fn(store, "alpha", EmbedParams(embedder="pixels-pca", progress=False),
                             [loaded])
    run = RunStore(store.root)
    images = run.read_parquet(f"{loaded.folder}/images.parquet")
    table = run.read_parquet(f"{ref.folder}/embeddings.parquet")
    skipped = run.read_parquet(f"{ref.folder}/skipped.parquet")
    [bad_id] = images.loc[images["path"].str.endswith("truncated.jpg"), "image_id"]
    assert skipped["path"].str.endswith("truncated.jpg").tolist() == [True]
    assert skipped["reason"].iat[0].startswith("OSError: image file is truncated")
    assert ref.meta["images"] == 11 and ref.meta["skipped_by_reason"] == {"OSError": 1}
    # Ids and paths stay those of the load stage's table, minus the dropped row.
    expected = images[images["image_id"] != bad_id][["image_id", "path", "sha256"]]
    pd.testing.assert_frame_equal(table[["image_id", "path", "sha256"]],
                                  expected.reset_index(drop=True))
    assert "embed[alpha]: skipped 1 of 12 images {'OSError': 1}" in caplog.text


def test_a_class_that_decodes_nothing_fails_with_its_reasons(tiny_dataset, tmp_path):
    store = StoreSpec(root=str(tmp_path / "run"))
    dataset = index_dataset.fn(store, IndexParams(data=str(tiny_dataset["train"]),
                                                  holdout_share=0))
    loaded = load_class.fn(store, "beta", LoadParams(), [dataset])
    for path in RunStore(store.root).read_parquet(f"{loaded.folder}/images.parquet")["path"]:
        with open(path, "r+b") as f:  # same size, same header: only the hash tells
            f.seek(-8, 2)
            f.write(b"\0" * 8)
    with pytest.raises(ValueError, match=r"class 'beta' has no usable images: 12 skipped "
                                         r"\{'changed since the load stage': 12\}; see .*"
                                         r"embed/beta/.*/skipped.parquet"):
        embed_class.fn(store, "beta", EmbedParams(embedder="pixels-pca", progress=False),
                       [loaded])


def test_decode_workers_start_inside_a_prefect_flow_run(prefect_harness, image_files):
    """Where the stage really runs: in a process whose Prefect services are up. Workers forked
    from such a process fail at exit (Prefect's at-exit hooks), so they must come from the
    fork server; this failed with a plain fork."""
    from prefect import flow

    choice = choose_embedder("pixels-pca", clip_model="", clip_pretrained="", batch_size=4)

    @flow
    def embed_in_flow() -> Embedded:
        return embed_files(choice, image_files, num_workers=2)

    in_flow = embed_in_flow()
    assert in_flow.failed == [] and in_flow.kept == list(range(len(image_files)))
    np.testing.assert_array_equal(in_flow.vectors,
                                  embed_files(choice, image_files, num_workers=0).vectors)


def test_decode_workers_read_from_object_storage(s3_bucket, image_files):
    """Workers open their own S3 connections (fsspec resets its event loop on fork)."""
    import fsspec

    url, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    remote = [f"{url}/img/{local.rsplit('/', 1)[-1]}" for local in image_files[:4]]
    for local, target in zip(image_files, remote, strict=False):
        fs.put_file(local, target)
    choice = choose_embedder("pixels-pca", clip_model="", clip_pretrained="", batch_size=3)
    in_thread = embed_files(choice, remote, storage_options=options, num_workers=0)
    in_workers = embed_files(choice, remote, storage_options=options, num_workers=2)
    assert in_workers.failed == [] and in_workers.kept == [0, 1, 2, 3]
    np.testing.assert_array_equal(in_thread.vectors, in_workers.vectors)
