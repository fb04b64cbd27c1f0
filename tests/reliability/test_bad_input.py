"""Bad input: every hostile file, folder, class name, manifest row and embedding is either
reported per item (skipped, with its reason, in the stage output) or stops the run with a
clear error before any model work. Nothing crashes in the middle of a run."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gridistill.stages import ArtifactRef, StoreSpec
from gridistill.storage import RunStore, StorageError
from gridistill.tasks.index import IndexParams, index_dataset
from gridistill.tasks.ingest import decode_image, scan_samples
from gridistill.tasks.load import LoadParams, load_class
from gridistill.tasks.select import SelectParams, select_class

from .conftest import (
    flow_config,
    hostile_files,
    noise_image,
    run_pipeline,
)


def hostile_dataset(root: Path) -> Path:
    """``alpha``: 12 good images, every hostile file and an exact duplicate; ``beta é x`` (a
    unicode name with spaces): 12 good; ``gamma``: 3, fewer than IPC·L² = 4; ``empty``: no
    images; plus a stray file at the top and a non-image file in a class folder."""
    for index, (name, count) in enumerate([("alpha", 12), ("beta é x", 12), ("gamma", 3)]):
        (root / name).mkdir(parents=True)
        for i in range(count):
            noise_image(100 * index + i).save(root / name / f"img_{i:02d}.png")
    for file_name, (data, _) in hostile_files().items():
        (root / "alpha" / file_name).write_bytes(data)
    shutil.copy(root / "alpha" / "img_00.png", root / "alpha" / "copy_of_00.png")
    (root / "alpha" / "notes.txt").write_text("not a sample")
    (root / "empty").mkdir()
    (root / "README.md").write_text("stray file")
    return root


def clean_test_set(root: Path) -> Path:
    for index, name in enumerate(("alpha", "beta é x", "gamma")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            noise_image(5000 + 100 * index + i).save(root / name / f"t{i}.png")
    return root


def test_decode_reports_every_hostile_file_and_never_raises():
    for name, (data, reason) in hostile_files().items():
        decoded = decode_image(data)
        if reason in ("", "too small"):
            assert decoded.error is None and decoded.image.mode == "RGB", name
        else:
            assert decoded.image is None and decoded.error.startswith(reason), (name, decoded)


def test_transparent_and_deep_images_keep_their_content():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert decode_image(_png(rgba)).image.getpixel((0, 0)) == (255, 255, 255)  # not black
    ramp = Image.fromarray(np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16))
    pixels = np.asarray(decode_image(_png(ramp)).image)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200  # scaled


def _png(image: Image.Image) -> bytes:
    from .conftest import encode

    return encode(image, "PNG")


# Files whose header is valid but whose pixel data is not: the load stage reads headers only,
# so these are found where the pixels are decoded, once, in the embed stage.
DECODE_FAILURES = ("truncated.jpg", "corrupt.jpg")


def _reasons(store: RunStore, folder: str) -> dict[str, str]:
    skipped = store.read_parquet(f"{folder}/skipped.parquet")
    return {Path(p).name: r for p, r in zip(skipped["path"], skipped["reason"], strict=True)}


def test_load_and_embed_report_each_skipped_file_with_its_reason(tmp_path):
    data = hostile_dataset(tmp_path / "data")
    refs = run_pipeline(str(tmp_path / "run"), str(data), str(clean_test_set(tmp_path / "test")))
    store = RunStore(str(tmp_path / "run"))
    by_scope = {ref.scope: ref for ref in refs["load"]}
    embedded = {ref.scope: ref for ref in refs["embed"]}
    expected = {name: reason for name, (_, reason) in hostile_files().items() if reason}
    expected["img_00.png"] = "exact duplicate: same bytes as " + str(data / "alpha/copy_of_00.png")
    at_embed = {name: expected.pop(name) for name in DECODE_FAILURES}
    for folder, wanted in [(by_scope["alpha"].folder, expected),
                           (embedded["alpha"].folder, at_embed)]:
        reasons = _reasons(store, folder)
        assert set(reasons) == set(wanted), folder
        for name, reason in wanted.items():
            assert reasons[name].startswith(reason), (name, reasons[name])
    kept = store.read_parquet(f"{by_scope['alpha'].folder}/images.parquet")
    assert len(kept) == 12 + len(hostile_files()) - len(expected) + 1  # + copy_of_00, - img_00
    table = store.read_parquet(f"{embedded['alpha'].folder}/embeddings.parquet")
    assert len(table) == len(kept) - len(at_embed)
    assert not any(table["path"].str.endswith(DECODE_FAILURES))
    meta = by_scope["alpha"].meta
    assert meta["skipped"] == len(expected) == sum(meta["skipped_by_reason"].values())
    assert embedded["alpha"].meta["skipped_by_reason"] == {"OSError": len(at_embed)}
    assert embedded["beta é x"].meta["skipped"] == 0
    # Every class still produced its grid; gamma's 3 images were cycled to fill 4 cells.
    assert [ref.meta["grids"] for ref in refs["grids"]] == [1, 1, 1]
    assert {ref.scope: ref.meta["filled"] for ref in refs["select"]} == {
        "alpha": False, "beta é x": False, "gamma": True}


def test_index_reports_empty_class_folders_stray_and_non_image_files(tmp_path):
    data = hostile_dataset(tmp_path / "data")
    refs = run_pipeline(str(tmp_path / "run"), str(data), None)
    dataset = refs["dataset"][0]
    assert [name for name, _, _ in dataset.meta["classes"]] == ["alpha", "beta é x", "gamma"]
    ignored = RunStore(str(tmp_path / "run")).read_parquet(f"{dataset.folder}/ignored.parquet")
    found = {Path(p).name: r for p, r in zip(ignored["path"], ignored["reason"], strict=True)}
    assert found == {"README.md": "not inside a class folder",
                     "notes.txt": "not an image file name (extension)",
                     "empty": "class folder 'empty' has no image files: not a class"}
    assert dataset.meta["ignored"] == 3
    # The unicode, spaced class name is a storage key like any other, inside the run root.
    assert (tmp_path / "run" / "load" / "beta é x").is_dir()


def test_a_class_with_no_usable_image_is_a_clear_error_with_its_reasons(tmp_path):
    data = tmp_path / "data"
    (data / "broken").mkdir(parents=True)
    for index, (data_bytes, reason) in enumerate(hostile_files().values()):
        if reason not in ("", "too small"):
            (data / "broken" / f"{index}.jpg").write_bytes(data_bytes)
    # Header failures stop at load; the decode failures (valid headers) stop the class at embed.
    with pytest.raises(ValueError, match=r"class 'broken' has no usable images: 2 skipped "
                                         r"\{'OSError': 2\}; see .*embed/broken/.*skipped.parquet"):
        run_pipeline(str(tmp_path / "run"), str(data), None)
    [load_folder] = (tmp_path / "run" / "load" / "broken").iterdir()
    assert len(pd.read_parquet(load_folder / "skipped.parquet")) >= 4  # 5 less the test share
    [folder] = (tmp_path / "run" / "embed" / "broken").iterdir()
    reasons = pd.read_parquet(folder / "skipped.parquet")["reason"]  # readable, not committed
    assert len(reasons) == 2 and reasons.str.startswith("OSError").all()
    assert not (folder / "_COMMITTED.json").exists()
    assert not (tmp_path / "run" / "select").exists()  # stopped before selection


@pytest.mark.slow
def test_bad_data_fails_at_once_while_storage_errors_are_retried(prefect_harness, tmp_path,
                                                                 monkeypatch):
    from prefect import flow

    (tmp_path / "data" / "broken").mkdir(parents=True)
    (tmp_path / "data" / "broken" / "a.jpg").write_bytes(b"not an image")
    attempts: list[str] = []  # each load attempt writes skipped.parquet first
    original = RunStore.write_bytes

    def counting_write(self: RunStore, key: str, data: bytes) -> None:
        if key.endswith("skipped.parquet"):
            attempts.append(key)
            if "flaky" in self.root:
                raise StorageError(f"writing {self.url(key)} failed: injected")
        original(self, key, data)

    monkeypatch.setattr(RunStore, "write_bytes", counting_write)

    @flow
    def load_only(root: str) -> str:
        """The load task's failure message (the task fails; the flow reports it)."""
        store = StoreSpec(root=root)
        dataset = index_dataset(store, IndexParams(data=str(tmp_path / "data"), holdout_share=0))
        return load_class(store, "broken", LoadParams(), [dataset], return_state=True).message

    started = time.monotonic()
    assert "no usable images" in load_only(str(tmp_path / "run"))
    assert len(attempts) == 1 and time.monotonic() - started < 10  # no retry, no delay
    attempts.clear()
    assert "skipped.parquet failed: injected" in load_only(str(tmp_path / "flaky"))
    assert len(attempts) == 3  # 1 + 2 retries


@pytest.mark.parametrize("label", ["..", "../escape", "a/b", "a\\b", ".", "x..y"])
def test_unsafe_class_names_stop_the_run_before_anything_is_written(tmp_path, label):
    good = noise_image(1)
    for name in ("ok", "other"):
        (tmp_path / name).mkdir()
        good.save(tmp_path / name / "a.png")
    rows = [("ok/a.png", "ok"), ("other/a.png", label)]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match="invalid name for a storage key"):
        index_dataset.fn(StoreSpec(root=str(tmp_path / "run")), IndexParams(
            data=str(tmp_path / "m.csv")))
    assert not (tmp_path / "run").exists()


def test_manifest_problems_are_reported_per_row_or_stop_the_run(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(5):
        noise_image(i).save(tmp_path / "img" / f"{i}.png")
    rows = [("img/0.png", "NA"), ("img/3.png", "NA"), ("img/4.png", "null"),
            ("img/1.png", "null"), ("img/1.png", "null"),  # a duplicate row
            ("img/2.png", ""), ("", "NA"),  # incomplete rows
            ("img/missing.png", "NA"), ("/nowhere/at/all.png", "null")]  # missing files
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
    listing = scan_samples(str(tmp_path / "m.csv"))
    assert sorted(set(listing.samples["class_name"])) == ["NA", "null"]  # names, not NaN
    assert [r for _, r in listing.ignored] == ["missing path or label"] * 2 + [
        "duplicate manifest row"]
    refs = run_pipeline(str(tmp_path / "run"), str(tmp_path / "m.csv"), None, holdout_share=0)
    store = RunStore(str(tmp_path / "run"))
    skipped = pd.concat(store.read_parquet(f"{r.folder}/skipped.parquet") for r in refs["load"])
    assert sorted(skipped["reason"].str.split(":").str[0]) == ["missing file"] * 2

    conflicting = rows[:1] + [("img/0.png", "null")]
    pd.DataFrame(conflicting, columns=["path", "label"]).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="listed under different labels"):
        scan_samples(str(tmp_path / "c.csv"))
    (tmp_path / "classes.txt").write_text("NA\n")
    with pytest.raises(ValueError, match=r"classes not in the class list: \['null'\]"):
        index_dataset.fn(StoreSpec(root=str(tmp_path / "run2")), IndexParams(
            data=str(tmp_path / "m.csv"), class_list=str(tmp_path / "classes.txt")))
    assert not (tmp_path / "run2").exists()


def _embeddings_ref(store: RunStore, vectors: np.ndarray) -> ArtifactRef:
    table = pd.DataFrame({"image_id": range(len(vectors)),
                          "path": [f"p{i}" for i in range(len(vectors))],
                          "sha256": ["0"] * len(vectors),
                          "embedding": list(vectors.astype(np.float16))})
    store.write_parquet("embed/c/k/embeddings.parquet", table)
    return ArtifactRef(stage="embed", scope="c", key="k", folder="embed/c/k")


def test_nan_embeddings_are_a_clear_error_naming_the_rows(tmp_path):
    store = RunStore(str(tmp_path))
    vectors = np.random.default_rng(0).normal(size=(6, 8))
    vectors[3, 2] = np.nan
    ref = _embeddings_ref(store, vectors)
    with pytest.raises(ValueError, match=r"rows \[3\] contain NaN or inf"):
        select_class.fn(StoreSpec(root=str(tmp_path)), "c", SelectParams(grid_size=2), [ref])
    assert not (tmp_path / "select").exists() or not any((tmp_path / "select").rglob("*.parquet"))


def test_a_class_with_a_single_usable_image_is_distilled(tmp_path):
    for name, count in [("solo", 1), ("many", 5)]:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(count):
            noise_image(i + 10 * count).save(tmp_path / "data" / name / f"{i}.png")
    refs = run_pipeline(str(tmp_path / "run"), str(tmp_path / "data"), None)
    assert len(refs["grids"]) == 2


@pytest.fixture(scope="module")
def hostile_run(flows, tmp_path_factory) -> tuple[RunStore, str]:
    """The real flow (Prefect, both selection methods) on the hostile dataset, once."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    data = hostile_dataset(tmp_path / "data")
    config = flow_config(data, clean_test_set(tmp_path / "test"), str(tmp_path / "run"),
                         methods=["ssdim", "random"])
    log = tmp_path / "flow.log"
    assert flows.run(config, log) == 0, log.read_text()[-3000:]
    return RunStore(config["out"]), log.read_text()


@pytest.mark.slow
def test_hostile_dataset_through_the_real_flow(hostile_run):
    store, log = hostile_run
    [load_alpha], [embed_alpha] = store.list("load/alpha"), store.list("embed/alpha")
    skipped = pd.concat([store.read_parquet(f"{load_alpha}/skipped.parquet"),
                         store.read_parquet(f"{embed_alpha}/skipped.parquet")])
    assert len(skipped) == sum(1 for _, reason in hostile_files().values() if reason) + 1
    timings = store.read_parquet("timings.parquet")
    assert set(timings["status"]) == {"Completed"}
    assert set(timings["scope"]) == {"alpha", "beta é x", "gamma", "ssdim", "random"}
    assert store.read_parquet("metrics.parquet")["test_images"].tolist() == [6, 6]
    assert "load[alpha]: skipped" in log and "ignored 3 entries" in log  # in the run's log
    assert "embed[alpha]: skipped 2 of" in log


@pytest.mark.slow
def test_the_run_report_lists_skipped_and_ignored_files(hostile_run):
    store, _ = hostile_run
    report = store.read_bytes("report.md").decode()
    # Header failures at load and decode failures at embed each get a warning in the report.
    assert "load[alpha]: skipped" in report and "embed[alpha]: skipped 2 files" in report
    assert "ignored" in report
