"""End to end: the real flow on a tiny generated dataset under Prefect's test harness."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from gridistill.config import DistillConfig
from gridistill.flows.distill import distill
from gridistill.storage import RunStore

pytestmark = pytest.mark.slow
STAGES = ["load", "test-split", "embed", "select", "grids", "enhance", "evaluate"]


def tiny_config(dataset, out: str, **overrides) -> DistillConfig:
    settings = dict(
        data=str(dataset["train"]), test_data=str(dataset["test"]), out=out, ipc=1,
        grid_size=2, grid_resolution=32, methods=["ssdim", "random"], embedder="pixels-pca",
        enhance=["bilinear"], enhance_scale=2, eval_image_size=16, eval_epochs=2, eval_seeds=1,
        progress=False, device="cpu",
    )
    return DistillConfig(**(settings | overrides))


def statuses(store: RunStore) -> dict[str, set[str]]:
    timings = store.read_parquet("timings.parquet")
    stages = timings["stage"].str.split(":").str[0]
    return {stage: set(group) for stage, group in timings.groupby(stages)["status"]}


def test_flow_end_to_end_then_cached_then_partial_rerun(prefect_harness, tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, str(tmp_path / "run"))
    result = distill(config)
    store = RunStore(config.out)

    assert {m["method"] for m in result["metrics"]} == {"ssdim", "random"}
    for row in result["metrics"]:
        assert 0.0 <= row["top1_final_mean"] <= 100.0 and row["test_images"] == 18
    first_metrics = store.read_parquet("metrics.parquet")
    report = store.read_bytes("report.md").decode()
    assert "| ssdim" in report and "EMBEDDER" not in report  # pixels-pca chosen explicitly
    assert statuses(store) == {s: {"Completed"} for s in STAGES}

    # Each class's artifacts hold that class's images, and grids have the right sizes.
    for class_name in ["alpha", "beta", "gamma"]:
        [load_folder] = store.list(f"load/{class_name}")
        paths = store.read_parquet(f"{load_folder}/images.parquet")["path"]
        assert len(paths) == 12 and all(f"/{class_name}/" in p for p in paths)
        for folder in store.list(f"select/{class_name}"):
            selected = store.read_parquet(f"{folder}/selection.parquet")["path"]
            assert len(selected) == 4 and all(f"/{class_name}/" in p for p in selected)
        for stage, side in [("grids", 32), ("enhance", 64)]:
            for folder in store.list(f"{stage}/{class_name}"):
                assert store.is_committed(folder)
                png = Image.open(io.BytesIO(store.read_bytes(f"{folder}/grid_000.png")))
                assert png.size == (side, side)

    distill(config)  # an immediate rerun: every stage comes from the cache
    assert statuses(store) == {s: {"Cached"} for s in STAGES}
    assert store.read_parquet("metrics.parquet").equals(first_metrics)

    distill(tiny_config(tiny_dataset, config.out, enhance_scale=3))  # one stage's parameter
    assert statuses(store) == {"load": {"Cached"}, "test-split": {"Cached"},
                               "embed": {"Cached"}, "select": {"Cached"}, "grids": {"Cached"},
                               "enhance": {"Completed"}, "evaluate": {"Completed"}}

    # A UI-style rerun: one class, from one stage on; everything else from the cache.
    grid_files = [f"{folder}/grid_000.png" for folder in store.list("grids/beta")]
    before = [store.read_bytes(key) for key in grid_files]
    distill(tiny_config(tiny_dataset, config.out, force_from="grids", force_classes=["beta"]))
    timings = store.read_parquet("timings.parquet")
    recomputed = timings[timings["status"] == "Completed"]
    assert sorted(zip(recomputed["stage"], recomputed["scope"], strict=True)) == [
        ("enhance:random", "beta"), ("enhance:ssdim", "beta"), ("evaluate", "random"),
        ("evaluate", "ssdim"), ("grids:random", "beta"), ("grids:ssdim", "beta")]
    assert [store.read_bytes(key) for key in grid_files] == before  # rewritten bit-identical


def test_missing_sd_turbo_weights_stop_the_run_before_any_work(prefect_harness, tiny_dataset,
                                                               tmp_path):
    from gridistill.models import MissingWeightsError

    config = tiny_config(tiny_dataset, str(tmp_path / "run"), enhance=["sd-turbo"])
    with pytest.raises(MissingWeightsError, match="(?s)stabilityai/sd-turbo.*supply"):
        distill(config)
    assert not (tmp_path / "run").exists()


def test_flow_with_run_root_on_s3_and_an_enhancement_ablation(prefect_harness, tiny_dataset,
                                                               s3_bucket):
    bucket, options = s3_bucket
    config = tiny_config(tiny_dataset, f"{bucket}/runs/tiny", storage_options=options,
                         methods=["ssdim"], enhance=["none", "bicubic"])
    result = distill(config)
    assert [m["method"] for m in result["metrics"]] == ["ssdim+none", "ssdim+bicubic"]
    store = RunStore(config.out, options)
    assert result["report"] == f"{bucket}/runs/tiny/report.md"
    assert store.exists("report.md") and store.exists("metrics.parquet")
    assert len(store.list("grids")) == 3 and store.exists("contact_sheet_ssdim.png")


def test_flow_with_diver_refinement_evaluates_before_and_after(prefect_harness, tmp_path):
    from tests.conftest import make_image
    from tests.test_refine import tiny_dit_parts

    dit_dir = tmp_path / "dit"
    for name, part in zip(["transformer", "vae", "scheduler"], tiny_dit_parts(), strict=True):
        part.save_pretrained(dit_dir / name)
    for split, count in [("train", 12), ("test", 4)]:
        for index, wnid in enumerate(["n01440764", "n02102040"]):  # DiT labels come from WNIDs
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(count):
                make_image((200 * index, 90, 200 - 200 * index), 100 * index + i + 7 * count).save(
                    tmp_path / split / wnid / f"{i}.png")
    config = tiny_config({"train": tmp_path / "train", "test": tmp_path / "test"},
                         str(tmp_path / "run"), methods=["ssdim"], refine=True,
                         diver={"dit": str(dit_dir), "vae": str(dit_dir)})
    result = distill(config)
    assert [m["method"] for m in result["metrics"]] == ["ssdim", "ssdim+diver"]
    store = RunStore(config.out)
    for wnid in ["n01440764", "n02102040"]:
        [folder] = store.list(f"refine/{wnid}")
        refined = Image.open(io.BytesIO(store.read_bytes(f"{folder}/grid_000.png")))
        assert refined.size == (64, 64)  # back at the enhanced grid's size
    assert "DIVER" in store.read_bytes("report.md").decode()

    from gridistill.distilled_sets import read_run_root

    distilled = read_run_root(config.out)  # the run root is itself an input for refine
    assert distilled.class_names == ["n01440764", "n02102040"] and len(distilled.images) == 2
    assert distilled.images.shape[-1] == 32  # the distilled set, not the enhanced copies


def test_flow_rded_protocol_trains_a_teacher_and_uses_it(prefect_harness, tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, str(tmp_path / "run"), methods=["random"],
                         eval_protocol="rded", teacher="convnet_d3", eval_seeds=2)
    result = distill(config)
    store = RunStore(config.out)
    [row] = result["metrics"]
    assert row["protocol"] == "rded" and row["seeds"] == 2 and row["top1_final_std"] >= 0
    [teacher_folder] = store.list("teacher/all")
    assert store.exists(f"{teacher_folder}/teacher.safetensors")
    assert store.read_bytes("accuracy.png").startswith(b"\x89PNG")
    assert "teacher convnet_d3" in store.read_bytes("report.md").decode()


def test_packaged_teacher_refuses_classes_that_are_not_wnids_before_loading(
        prefect_harness, tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, str(tmp_path / "run"), eval_protocol="cpu-soft",
                         teacher="efficientnet-lite0")
    with pytest.raises(ValueError, match=r"not ImageNet WNIDs: \['alpha', 'beta', 'gamma'\]"):
        distill(config)
    assert not RunStore(config.out).list("load")


def test_packaged_embedder_and_teacher_on_wnid_classes(prefect_harness, tiny_dataset, tmp_path):
    wnids = {"alpha": "n01440764", "beta": "n02102040", "gamma": "n02979186"}
    for split in ("train", "test"):
        for name, wnid in wnids.items():
            (tiny_dataset[split] / name).rename(tiny_dataset[split] / wnid)
    config = tiny_config(tiny_dataset, str(tmp_path / "run"), eval_protocol="cpu-soft",
                         teacher="efficientnet-lite0", embedder="auto",
                         methods=["ssdim", "random-real"])
    result = distill(config)
    store = RunStore(config.out)
    report = store.read_bytes("report.md").decode()
    assert "ior_vs_random_real" in report
    for folder in store.list(f"select/{wnids['beta']}"):
        selection = store.read_parquet(f"{folder}/selection.parquet")
        assert len(selection) in (1, 4)  # random-real: one photo (1 x 1); ssdim: a 2 x 2 grid
    assert "efficientnet-lite0 (weights: " in report  # the embedder and where its weights are
    assert "**teacher**: efficientnet-lite0 (" in report and "on the real test images" in report
    [embed_folder] = store.list(f"embed/{wnids['alpha']}")
    assert store.read_parquet(f"{embed_folder}/embeddings.parquet")["embedding"].iat[0].size == 1280
    assert {row["protocol"] for row in result["metrics"]} == {"cpu-soft"}


def test_both_executors_run_the_same_dag_and_hand_each_class_only_its_row(
        prefect_harness, tiny_dataset, tmp_path, monkeypatch):
    """The work-pool executor, each segment run in this process instead of on a worker, makes
    the in-process flow's artifacts bit for bit; under both, every per-class task's dataset
    ref holds only its class's row."""
    from types import SimpleNamespace

    from prefect.states import Completed
    from reliability.conftest import committed_files

    from gridistill.deployments.setup import ensure_gpu_limit
    from gridistill.flows import dag, pooled

    def run_here(deployment, parameters, flow_run_name, poll_interval):
        pooled.run_segment(pooled.SegmentRequest.model_validate(parameters["request"]))
        return SimpleNamespace(state=Completed(), name=flow_run_name, id="in-process")

    dataset_rows: list[tuple[str, str, list]] = []
    launch = dag.launch

    def recording_launch(stage_task, store, params, scopes, upstream, force):
        dataset_rows.extend((stage_task.name, scope, ref.meta["classes"])
                            for scope, refs in zip(scopes, upstream, strict=True)
                            for ref in refs if getattr(ref, "stage", None) == "dataset")
        return launch(stage_task, store, params, scopes, upstream, force)

    ensure_gpu_limit(1)  # GPU segments hold a slot of it, as on the deployed stack
    monkeypatch.setattr(pooled, "run_deployment", run_here)
    monkeypatch.setattr(dag, "launch", recording_launch)
    metrics = {}
    for name, executor in (("distill", distill), ("pooled", pooled.distill_pooled)):
        dataset_rows.clear()
        result = executor(tiny_config(tiny_dataset, str(tmp_path / name)))
        metrics[name] = [(row["method"], row["top1_final_mean"]) for row in result["metrics"]]
        per_class = [(stage, scope, rows) for stage, scope, rows in dataset_rows
                     if stage in ("load", "test-split", "enhance")]
        assert len(per_class) == 3 + 3 + 2 * 3, name  # enhance: per class and method
        assert all([row[0] for row in rows] == [scope] for _, scope, rows in per_class), name
    stages = ("dataset", *STAGES)
    in_process, on_pools = (committed_files(tmp_path / name, stages)
                            for name in ("distill", "pooled"))
    assert on_pools.keys() == in_process.keys() and len(on_pools) > 3 * len(stages)
    assert [path for path in on_pools if on_pools[path] != in_process[path]] == []
    assert metrics["pooled"] == metrics["distill"]
