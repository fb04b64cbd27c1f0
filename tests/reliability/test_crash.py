"""Crash safety: a run killed at any point resumes, and its outputs equal an uninterrupted
run's, bit for bit for the deterministic stages. A partial artifact is never read as done."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from gridistill.storage import RunStore

from .conftest import (
    assert_committed_folders_complete,
    committed_files,
    flow_config,
    run_pipeline,
    write_classes,
)

# In the order the flow first writes them; the last one is the run report's first file.
FLOW_STAGES = ("dataset", "load", "embed", "select", "grids", "enhance", "evaluate",
               "contact_sheet_ssdim.png")


class SimulatedKill(BaseException):
    """Raised mid-run like a SIGKILL: no ``except Exception`` handler sees it."""


def test_killed_at_every_write_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    data = str(write_classes(tmp_path / "train", 5, names=("alpha", "beta")))
    test = str(write_classes(tmp_path / "test", 1, seed=500, names=("alpha", "beta")))
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what is tested here
    run_pipeline(str(tmp_path / "reference"), data, test)
    reference = committed_files(tmp_path / "reference", ("dataset", "load", "embed", "select",
                                                         "grids"))
    writes = sum(1 for p in (tmp_path / "reference").rglob("*") if p.is_file())
    assert writes == 27 and len(reference) == writes - 9  # 9 folders, each with a marker

    original = RunStore.write_bytes
    for crash_at in range(writes):
        calls = 0

        def dying_write(self: RunStore, key: str, payload: bytes, crash_at: int = crash_at) -> None:
            nonlocal calls
            calls += 1
            if calls > crash_at:
                # What a kill -9 mid-write leaves: a torn temporary beside the target.
                torn = Path(self.path(key))
                torn.parent.mkdir(parents=True, exist_ok=True)
                (torn.parent / f".tmp-torn-{torn.name}").write_bytes(payload[: len(payload) // 2])
                raise SimulatedKill(key)
            original(self, key, payload)

        root = tmp_path / f"run{crash_at}"
        monkeypatch.setattr(RunStore, "write_bytes", dying_write)
        with pytest.raises(SimulatedKill):
            run_pipeline(str(root), data, test)
        monkeypatch.setattr(RunStore, "write_bytes", original)
        assert_committed_folders_complete(root)
        run_pipeline(str(root), data, test)  # the rerun
        assert committed_files(root, ("dataset", "load", "embed", "select", "grids")) == reference
        shutil.rmtree(root)


@pytest.mark.slow
def test_kill_9_in_each_stage_of_the_real_flow_then_rerun(flows, tiny_dataset, tmp_path):
    """The flow in a subprocess, killed (SIGKILL) as each stage's first output appears; each
    rerun resumes from what was committed; the last one completes and matches a clean run."""
    log = tmp_path / "flows.log"
    reference = flow_config(tiny_dataset["train"], tiny_dataset["test"], str(tmp_path / "ref"))
    assert flows.run(reference, log) == 0, log.read_text()[-3000:]
    config = reference | {"out": str(tmp_path / "run")}
    root = Path(config["out"])
    killed_in = []
    for stage in FLOW_STAGES:
        run = flows.start(config, log)
        deadline = time.monotonic() + 180
        while not (root / stage).exists() and run.poll() is None:
            assert time.monotonic() < deadline, f"stage {stage} never started"
            time.sleep(0.005)
        if run.poll() is None:
            killed_in.append(stage)
        run.kill()
        assert run.poll() == -9, log.read_text()[-3000:]
        assert_committed_folders_complete(root)
        assert not (root / "report.md").exists()  # the report is written last
    assert killed_in == list(FLOW_STAGES)
    assert flows.run(config, log) == 0, log.read_text()[-3000:]

    stages = ("dataset", "load", "embed", "select", "grids", "enhance", "evaluate")
    resumed, clean = committed_files(root, stages), committed_files(Path(reference["out"]), stages)
    # Every artifact of the clean run, byte for byte. (A source edit during the test changes
    # stage keys: folders under new keys may then sit beside these, and are not compared.)
    assert {path: resumed.get(path) for path in clean} == clean and len(clean) >= 30
    for name in ("metrics.parquet", "contact_sheet_ssdim.png"):
        assert (root / name).read_bytes() == (Path(reference["out"]) / name).read_bytes()
    assert os.path.getsize(root / "report.md") > 0
