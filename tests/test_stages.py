import hashlib
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest
from prefect import flow
from pydantic import BaseModel

from gridistill.refine_options import DiverOptions
from gridistill.stages import (
    ArtifactRef,
    NotInKey,
    StoreSpec,
    WeightsInKey,
    changed_libraries,
    key_params,
    library_versions,
    run_stage,
    stage_key,
    stage_task,
)
from gridistill.tasks.embed import EmbedParams
from gridistill.tasks.enhance import EnhanceParams
from gridistill.tasks.refine import RefineParams
from gridistill.tasks.teacher import TeacherParams


class Params(BaseModel):
    size: int = 1
    device: Annotated[str, NotInKey] = "cpu"
    progress: Annotated[bool, NotInKey] = True


def ref(key: str) -> ArtifactRef:
    return ArtifactRef(stage="up", scope="all", key=key, folder=f"up/all/{key}")


def test_key_depends_on_what_changes_the_result_only():
    base = stage_key("s", "v1", "alpha", Params(), [ref("u1")])
    assert base != stage_key("s", "v1", "beta", Params(), [ref("u1")])  # per-class artifacts
    assert base != stage_key("s", "v2", "alpha", Params(), [ref("u1")])  # code version
    assert base != stage_key("s", "v1", "alpha", Params(size=2), [ref("u1")])
    assert base != stage_key("s", "v1", "alpha", Params(), [ref("u2")])  # upstream content
    assert base == stage_key("s", "v1", "alpha", Params(device="cuda", progress=False),
                             [ref("u1")])


def test_run_stage_computes_once_then_reuses(tmp_path):
    calls = []

    def compute(store, folder, scope, params, upstream):
        calls.append(scope)
        store.write_text(f"{folder}/out.txt", f"{scope}:{params.size}")
        return {"n": 1}

    spec = StoreSpec(root=str(tmp_path))
    first = run_stage("demo", compute, spec, "alpha", Params(), [])
    second = run_stage("demo", compute, spec, "alpha", Params(), [])
    assert calls == ["alpha"] and first.folder == second.folder and second.meta == {"n": 1}
    assert second.seconds == first.seconds
    assert spec.open().read_bytes(f"{first.folder}/out.txt") == b"alpha:1"


def test_reused_metadata_keeps_its_key_order(tmp_path):
    def compute(store, folder, scope, params, upstream):
        return {"metrics": {"student": "s", "top1": 1.0, "ipc": 1}, "b": 1, "a": 2}

    spec = StoreSpec(root=str(tmp_path))
    computed = run_stage("demo", compute, spec, "alpha", Params(), [])
    reused = run_stage("demo", compute, spec, "alpha", Params(), [])
    assert list(reused.meta) == ["metrics", "b", "a"]
    assert list(reused.meta["metrics"]) == list(computed.meta["metrics"])


def test_a_commit_removed_by_a_concurrent_forced_run_means_recompute(tmp_path, monkeypatch):
    """Another run forcing this stage can remove the commit marker at any moment, also right
    before this run reads it: this run must then recompute, not fail."""
    from gridistill.storage import COMMIT_MARKER, RunStore

    calls = []

    def compute(store, folder, scope, params, upstream):
        calls.append(scope)
        store.write_text(f"{folder}/out.txt", scope)
        return {"n": len(calls)}

    spec = StoreSpec(root=str(tmp_path))
    first = run_stage("demo", compute, spec, "alpha", Params(), [])
    read_json = RunStore.read_json

    def uncommitted_just_before(self, path):
        if path.endswith(COMMIT_MARKER) and len(calls) == 1:
            self.uncommit(first.folder)  # the other run, between any check and this read
        return read_json(self, path)

    monkeypatch.setattr(RunStore, "read_json", uncommitted_just_before)
    again = run_stage("demo", compute, spec, "alpha", Params(), [])
    assert calls == ["alpha", "alpha"] and again.meta == {"n": 2}
    assert spec.open().is_committed(again.folder)
    spec.open().uncommit(again.folder)
    spec.open().uncommit(again.folder)  # twice: a no-op, as when two runs force at once


class Outer(BaseModel):
    inner: Params = Params()
    seed: int = 0
    batch_size: int = 8  # not marked: part of the key, whatever its name


def test_fields_marked_not_in_key_are_left_out_also_in_nested_models():
    assert key_params(Outer()) == {"inner": {"size": 1}, "seed": 0, "batch_size": 8}
    assert key_params(Outer(inner=Params(device="cuda"))) == key_params(Outer())


def test_the_commit_records_the_code_that_made_the_artifact(tmp_path):
    def compute(store, folder, scope, params, upstream):
        return {}

    spec = StoreSpec(root=str(tmp_path))
    ref = run_stage("demo", compute, spec, "alpha", Params(), [])
    commit = spec.open().read_commit(ref.folder)
    # A nested function is versioned with the top-level definition around it.
    assert f"{__name__}:test_the_commit_records_the_code_that_made_the_artifact" in commit["code"]
    assert commit["params"] == {"size": 1}


class WithWeights(BaseModel):
    weights: Annotated[str | None, WeightsInKey] = None
    size: int = 1


def test_a_weights_file_replaced_in_place_re_keys_and_recomputes(tmp_path):
    weights = tmp_path / "student.pt"
    weights.write_bytes(b"weights v1")
    loaded = []

    def compute(store, folder, scope, params, upstream):
        loaded.append(Path(params.weights).read_bytes())
        return {}

    spec = StoreSpec(root=str(tmp_path / "runs"))
    first = run_stage("demo", compute, spec, "alpha", WithWeights(weights=str(weights)), [])
    assert run_stage("demo", compute, spec, "alpha", WithWeights(weights=str(weights)),
                     []).key == first.key
    weights.write_bytes(b"weights v2, trained longer")
    second = run_stage("demo", compute, spec, "alpha", WithWeights(weights=str(weights)), [])
    assert second.key != first.key and loaded == [b"weights v1", b"weights v2, trained longer"]
    assert spec.open().read_commit(second.folder)["params"]["weights"] == {
        "path": str(weights), "sha256": hashlib.sha256(b"weights v2, trained longer").hexdigest()}


def test_same_bytes_under_a_new_time_keep_the_key_and_a_tag_is_keyed_as_it_is(tmp_path):
    weights = tmp_path / "student.pt"
    weights.write_bytes(b"weights")
    before = key_params(WithWeights(weights=str(weights)))
    os.utime(weights, (1, 1))
    assert key_params(WithWeights(weights=str(weights))) == before
    # A value that names no file (a weights tag) or no value at all is keyed as it is.
    assert key_params(WithWeights(weights="laion2b_s34b_b79k")) == {
        "weights": "laion2b_s34b_b79k", "size": 1}
    assert key_params(WithWeights()) == {"weights": None, "size": 1}


@pytest.mark.parametrize("params, field", [
    (EmbedParams(embedder="efficientnet-lite0"), "classifier_checkpoint"),
    (EmbedParams(embedder="clip"), "clip_pretrained"),
    (TeacherParams(architecture="efficientnet-lite0"), "checkpoint"),
    (EnhanceParams(backend="sd-turbo"), "noise_predictor"),
])
def test_every_stage_keys_the_contents_of_the_weights_it_is_given(tmp_path, params, field):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"trained")
    keyed = key_params(params.model_copy(update={field: str(weights)}))
    assert keyed[field] == {"path": str(weights), "sha256": hashlib.sha256(b"trained").hexdigest()}


def write_model_dir(root: Path, unet: bytes) -> Path:
    """A diffusers-style model folder, with the download records a hub download leaves."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "Pipeline"}')
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(unet)
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "download.metadata").write_text("etag, time")
    return root


def test_a_model_directory_is_keyed_by_its_files_not_its_download_records(tmp_path):
    model = write_model_dir(tmp_path / "sd-turbo", b"unet v1")
    params = EnhanceParams(backend="sd-turbo", sd_turbo=str(model))
    before = key_params(params)["sd_turbo"]
    assert before["path"] == str(model) and len(before["sha256"]) == 64
    # Download records and file times are not the weights.
    (model / ".cache" / "huggingface" / "download.metadata").write_text("etag, later time")
    os.utime(model / "model_index.json", (1, 1))
    assert key_params(params)["sd_turbo"] == before
    # A weights file rewritten, or a file added, is.
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet v2")
    rewritten = key_params(params)["sd_turbo"]
    (model / "unet" / "config.json").write_text("{}")
    added = key_params(params)["sd_turbo"]
    assert len({before["sha256"], rewritten["sha256"], added["sha256"]}) == 3
    # The same files in another folder are the same weights under another name.
    copy = write_model_dir(tmp_path / "copy", b"unet v2")
    (copy / "unet" / "config.json").write_text("{}")
    assert key_params(EnhanceParams(sd_turbo=str(copy)))["sd_turbo"]["sha256"] == added["sha256"]


def test_the_refine_stage_keys_its_dit_and_vae_directories(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    dit = write_model_dir(tmp_path / "dit", b"dit")
    vae = write_model_dir(tmp_path / "vae", b"vae")
    keyed = key_params(RefineParams(diver=DiverOptions(dit=str(dit), vae=str(vae))))["diver"]
    assert keyed["dit"]["path"] == str(dit) and keyed["vae"]["path"] == str(vae)
    assert keyed["dit"]["sha256"] != keyed["vae"]["sha256"]
    # Hub ids that resolve to nothing (an empty cache, offline): keyed as they are.
    assert key_params(RefineParams())["diver"]["dit"] == "facebook/DiT-XL-2-256"


COMPUTED: list[int] = []


@stage_task("counted", retries=0)
def counted(store, folder, scope, params, upstream):
    COMPUTED.append(1)
    store.write_text(f"{folder}/out.txt", str(len(COMPUTED)))
    return {"computed": len(COMPUTED)}


@flow
def run_counted(store: StoreSpec, force: bool = False) -> tuple[str, dict, str]:
    future = counted.submit(store, "alpha", Params(), [], force)
    ref = future.result()
    return future.state.name, ref.meta, ref.folder


def test_the_commit_marker_is_the_only_cache(prefect_harness, tmp_path):
    """A rerun reports Cached; after a forced rerun, the next plain run gets the new result
    back, not the one from before the force; an artifact deleted by hand is made again."""
    store = StoreSpec(root=str(tmp_path))
    COMPUTED.clear()
    state, meta, folder = run_counted(store)
    assert (state, meta) == ("Completed", {"computed": 1})
    assert run_counted(store)[:2] == ("Cached", {"computed": 1})
    assert run_counted(store, force=True)[:2] == ("Completed", {"computed": 2})
    assert run_counted(store)[:2] == ("Cached", {"computed": 2})
    assert store.open().read_bytes(f"{folder}/out.txt") == b"2"
    store.open().fs.rm(store.open().path(folder), recursive=True)
    assert run_counted(store)[:2] == ("Completed", {"computed": 3})
    assert counted.fn(store, "alpha", Params(), []).meta == {"computed": 3}  # outside a run


def test_the_commit_records_the_library_versions_and_reuse_under_others_warns(
        tmp_path, monkeypatch, caplog):
    def compute(store, folder, scope, params, upstream):
        return {}

    spec = StoreSpec(root=str(tmp_path))
    made = run_stage("demo", compute, spec, "alpha", Params(), [])
    recorded = spec.open().read_commit(made.folder)["libraries"]
    assert recorded == library_versions() and recorded["numpy"] == np.__version__
    with caplog.at_level("WARNING", logger="gridistill"):
        run_stage("demo", compute, spec, "alpha", Params(), [])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

    upgraded = {**recorded, "numpy": "999.0"}
    monkeypatch.setattr("gridistill.stages.library_versions", lambda: upgraded)
    assert changed_libraries(recorded) == {"numpy": (np.__version__, "999.0")}
    with caplog.at_level("WARNING", logger="gridistill"):
        reused = run_stage("demo", compute, spec, "alpha", Params(), [])
        run_stage("demo", compute, spec, "alpha", Params(), [])  # said once
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert reused.key == made.key  # a new version warns, it does not re-key
    assert len(warnings) == 1 and f"numpy {np.__version__} (now 999.0)" in warnings[0]


def test_a_marker_without_library_versions_changes_nothing_and_a_removed_one_is_named(
        monkeypatch):
    monkeypatch.setattr("gridistill.stages.library_versions", lambda: {"numpy": "2.0"})
    assert changed_libraries({}) == {}
    assert changed_libraries({"numpy": "2.0", "timm": "1.0"}) == {"timm": ("1.0", "not installed")}


def fake_hub_cache(cache: Path, repo_id: str, commit: str) -> None:
    """The Hugging Face cache's layout for one model at one commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")


def test_a_hub_id_is_keyed_by_the_commit_the_cache_resolves_it_to(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    first, second = "a" * 40, "b" * 40
    fake_hub_cache(tmp_path, "facebook/DiT-XL-2-256", first)
    keyed = key_params(RefineParams())["diver"]
    assert keyed["dit"] == {"hub_id": "facebook/DiT-XL-2-256", "revision": first}
    assert keyed["vae"] == "stabilityai/sd-vae-ft-mse"  # not in this cache: keyed as it is
    fake_hub_cache(tmp_path, "facebook/DiT-XL-2-256", second)  # a newer upload, downloaded
    assert key_params(RefineParams())["diver"]["dit"]["revision"] == second
