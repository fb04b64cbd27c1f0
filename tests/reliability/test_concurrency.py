"""Concurrency: runs writing to the same run root at the same time, one of them recomputing
every stage in place (``force``), never corrupt each other: content-addressed folders,
atomic file writes, commit markers last."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import (
    assert_committed_folders_complete,
    committed_files,
    flow_config,
    run_pipeline,
    write_classes,
)

WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from reliability.conftest import run_pipeline
    root, data, test, force, go = sys.argv[1:6]
    while not os.path.exists(go):
        time.sleep(0.01)
    for round in range(2):
        run_pipeline(root, data, test, force=force == "1" and round > 0)
""")


def test_concurrent_pipelines_on_one_root_do_not_corrupt_each_other(tmp_path):
    data = str(write_classes(tmp_path / "train", 5, names=("alpha", "beta")))
    test = str(write_classes(tmp_path / "test", 2, seed=500, names=("alpha", "beta")))
    run_pipeline(str(tmp_path / "reference"), data, test)
    stages = ("dataset", "load", "embed", "select", "grids")
    reference = committed_files(tmp_path / "reference", stages)

    root, go = tmp_path / "shared", tmp_path / "go"
    script = WORKER.format(tests=str(Path(__file__).resolve().parents[1]))
    workers = [subprocess.Popen([sys.executable, "-c", script, str(root), data, test, force,
                                 str(go)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for force in ("0", "1")]
    time.sleep(1)
    go.touch()
    outputs = [w.communicate(timeout=240)[0].decode(errors="replace") for w in workers]
    # A plain string message is printed whole (a list of strings would be abbreviated).
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(
        output.replace("\r", "\n")[-3000:] for output in outputs)
    assert assert_committed_folders_complete(root) == len(list(
        (tmp_path / "reference").rglob("_COMMITTED.json")))
    assert committed_files(root, stages) == reference


@pytest.mark.slow
def test_two_flows_on_one_root_at_once(flows, tiny_dataset, tmp_path):
    """Two real flow runs at once on one root, the second forcing every stage from ``load``."""
    config = flow_config(tiny_dataset["train"], tiny_dataset["test"], str(tmp_path / "run"))
    log = tmp_path / "flows.log"
    runs = [flows.start(config, log), flows.start(config | {"force_from": "load"}, log)]
    assert [run.wait() for run in runs] == [0, 0], log.read_text()[-4000:]
    root = Path(config["out"])
    assert_committed_folders_complete(root)
    single = tmp_path / "single"
    config_single = config | {"out": str(single)}
    assert flows.run(config_single, log) == 0, log.read_text()[-3000:]
    stages = ("dataset", "load", "embed", "select", "grids", "enhance")
    assert committed_files(root, stages) == committed_files(single, stages)
