"""The prepared device check (benchmarks/gpu_check.py): its CPU dry run passes every step, and
the device-only arguments parse, so the GPU's few minutes are not spent on a typo."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ holds scripts, not an installed package
from benchmarks import gpu_check  # noqa: E402

STEPS = list(gpu_check.STEPS)


def probe_wheel(folder: Path) -> Path:
    """A one-module wheel, so the dry run's install step runs the device's pip command."""
    folder.mkdir()
    path = folder / "gpu_check_probe-1.0-py3-none-any.whl"
    info = "gpu_check_probe-1.0.dist-info"
    files = {
        "gpu_check_probe.py": "",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return folder


def summary_statuses(summary: str) -> dict[str, str]:
    rows = [line.split("|")[1:3] for line in summary.splitlines() if line.startswith("| ")]
    return {name.strip(): status.strip() for name, status in rows[1:]}  # [0]: the header


@pytest.mark.slow
def test_cpu_dry_run_passes_every_step(tmp_path: Path):
    out = tmp_path / "out"
    command = [str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu", "--tiny",
               "--wheels", str(probe_wheel(tmp_path / "wheels")), "--work", str(tmp_path / "work")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env=os.environ | {"PYTHON": sys.executable})
    logs = {p.name: p.read_text()[-3000:] for p in sorted(out.glob("*.log"))}
    assert done.returncode == 0, (done.stdout, done.stderr, logs)
    statuses = summary_statuses((out / "summary.md").read_text())
    assert list(statuses) == ["make JPEGs", *STEPS]
    assert set(statuses.values()) == {"ok"}, statuses
    # The device tool brings back at most 8 files from its output folder.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.md", *(f"{step}.log" for step in STEPS)])
    assert (tmp_path / "work" / "site" / "gpu_check_probe.py").exists()
    assert "| ViT" not in logs["embed.log"] and "decode_jpeg on cpu" in logs["embed.log"]


class Parsed(Exception):
    """Raised instead of running a benchmark once its arguments parsed."""


@pytest.fixture
def parse_only(monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # a bad option exits with status 2 here
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def test_device_plan_arguments_parse(tmp_path: Path, parse_only, monkeypatch):
    """The real-size arguments that only the device runs, against each script's own parser."""
    from benchmarks import embed, enhance, refine, selection
    from gridistill import cli

    options = argparse.Namespace(device="cuda", tiny=False, wheels=str(tmp_path))
    steps = {step.name: step for step in gpu_check.plan(options, tmp_path)}
    assert list(steps) == STEPS
    assert "ViT-B-32" in steps["embed"].argv and "sd-turbo" in steps["enhance"].argv
    assert {"dit-xl-2-random", "1,8,32", "bfloat16"} <= set(steps["refine"].argv)
    mains = {"selection": selection.main, "embed": embed.main, "enhance": enhance.main,
             "refine": refine.main}
    for name, main in mains.items():
        argv = steps[name].argv
        arguments = argv[3:] if argv[1] == "-m" else argv[2:]
        monkeypatch.setattr(sys, "argv", [name, *arguments])
        with pytest.raises(Parsed):
            main() if name in ("selection", "enhance") else main(arguments)
    with pytest.raises(Parsed):
        cli.main(steps["run"].argv[3:])
