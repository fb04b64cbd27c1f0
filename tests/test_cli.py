import json
import os
import subprocess
import sys
import time
import typing

import fsspec
import pytest

from gridistill import cli
from gridistill.choices import SelectionMethod
from gridistill.cli import build_parser, check_locations, config_from_args, main
from gridistill.config import DistillConfig, demo_data_root
from gridistill.refine_options import DiverOptions
from gridistill.select_options import SsdimWeights


def test_help_lists_every_flow_parameter(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    names = [*DistillConfig.model_fields.keys() - {"diver", "ssdim"}, *DiverOptions.model_fields,
             *SsdimWeights.model_fields]
    for name in names:
        assert "--" + name.replace("_", "-") + " " in text


def test_diver_options_are_run_flags_of_their_own():
    config = config_from_args(build_parser().parse_args(
        ["run", "--refine", "--t-r", "50", "--gamma", "0.02", "--dit", "/models/dit"]))
    assert config.refine and config.diver == DiverOptions(t_r=50, gamma=0.02, dit="/models/dit")
    assert config_from_args(build_parser().parse_args(["run"])).diver == DiverOptions()


def test_diver_steps_out_of_order_are_one_line(capsys, no_run):
    err = error_line(capsys, ["run", "--refine", "--t-f", "30", "--t-r", "20"])
    assert "need 0 <= t_f <= t_r <= num_steps, got t_f=30, t_r=20" in err
    err = error_line(capsys, ["run", "--t-h", "0"])
    assert "--t-h: Input should be greater than or equal to 1 (got 0)" in err


def test_options_become_the_typed_flow_parameters():
    args = build_parser().parse_args([
        "run", "--data", "s3://bucket/train", "--ipc", "10", "--methods", "ssdim", "kcenter",
        "--enhance", "none", "bilinear", "--no-progress", "--storage-options",
        '{"endpoint_url": "http://127.0.0.1:9000"}', "--force-from", "grids"])
    config = config_from_args(args)
    assert config.ipc == 10 and config.methods == ["ssdim", "kcenter"]
    assert config.enhance == ["none", "bilinear"] and config.progress is False
    assert config.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert config.test_data is None and config.out.startswith("runs/bucket-train-")
    with pytest.raises(SystemExit):  # choices come from the typed model
        build_parser().parse_args(["run", "--force-from", "nowhere"])


def test_no_data_means_the_embedded_sample_with_its_test_split_and_class_list():
    config = DistillConfig()
    assert config.data == f"{demo_data_root()}/train"
    assert config.test_data == f"{demo_data_root()}/test"
    assert config.class_list.endswith("classes.csv")
    assert DistillConfig().out == config.out  # a rerun finds the same run root


def test_forced_stages_follow_the_stage_order():
    config = DistillConfig(force_from="grids", force_classes=["b"])
    assert config.forced("select", ["a", "b"]) == [False, False]
    assert config.forced("grids", ["a", "b"]) == [False, True]
    assert config.forced("evaluate", ["a", "b"]) == [False, True]


# -- mistakes: refused before Prefect starts, with one line and exit code 2 --------------------
@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if the CLI gets as far as the flow."""
    def never(*_args, **_kwargs):
        raise AssertionError("the CLI went on to run the flow")

    monkeypatch.setattr(cli, "run_distill", never)


def error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gridistill: error: "), err
    return err


def test_a_misspelt_method_is_refused_naming_the_allowed_ones_before_any_data_is_read(
        capsys, monkeypatch, no_run):
    monkeypatch.setattr(cli, "check_locations", lambda config: pytest.fail("read the data"))
    err = error_line(capsys, ["run", "--methods", "ssdim", "ssdm"])
    assert "--methods" in err and "'ssdm'" in err
    for name in typing.get_args(SelectionMethod):
        assert f"'{name}'" in err


def test_a_bad_value_is_one_line_naming_the_option(capsys, no_run):
    assert "--ipc: Input should be greater than or equal to 1 (got 0)" in error_line(
        capsys, ["run", "--ipc", "0"])
    assert "--storage-options: " in error_line(
        capsys, ["run", "--storage-options", '{"secret": "x"}'])


def test_missing_inputs_and_an_unwritable_run_root_are_one_line_each(capsys, tmp_path, no_run):
    data = str(tmp_path / "train")
    os.mkdir(data)
    assert f"--data {tmp_path}/nope: no such" in error_line(
        capsys, ["run", "--data", f"{tmp_path}/nope"])
    assert "--test-data" in error_line(
        capsys, ["run", "--data", data, "--test-data", f"{tmp_path}/nope"])
    assert "--class-list" in error_line(
        capsys, ["run", "--data", data, "--class-list", f"{tmp_path}/nope.txt"])
    (tmp_path / "empty.txt").write_text("\n")
    assert "names no class" in error_line(
        capsys, ["run", "--data", data, "--class-list", f"{tmp_path}/empty.txt"])
    (tmp_path / "file").write_text("")
    assert "cannot write in" in error_line(
        capsys, ["run", "--data", data, "--out", f"{tmp_path}/file/run"])
    assert "cannot reach it" in error_line(capsys, ["run", "--data", "nosuchfs://x/train"])


def test_the_embedded_sample_and_a_new_run_root_pass_the_checks(tmp_path):
    check_locations(DistillConfig(out=str(tmp_path / "new" / "run")))
    assert not (tmp_path / "new").exists()  # checking writes nothing that stays


def test_object_store_paths_are_checked_with_the_storage_options(capsys, s3_bucket, no_run):
    bucket, options = s3_bucket
    storage = ["--storage-options", json.dumps(options)]
    assert f"--data {bucket}/train: no such" in error_line(
        capsys, ["run", "--data", f"{bucket}/train", *storage])
    fsspec.filesystem("s3", **options).pipe(f"{bucket}/train/a/1.png", b"png")
    check_locations(DistillConfig(data=f"{bucket}/train", out=f"{bucket}/run",
                                  storage_options=options))


def test_a_missing_data_path_exits_2_at_once_without_prefect(tmp_path):
    """The real command: no traceback, and no Prefect server (the API it would call is dead)."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gridistill.cli", "run", "--data",
                           str(tmp_path / "nope")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"gridistill: error: --data {tmp_path / 'nope'}: no such directory " \
                          "or manifest\n"
    assert "distilling" not in done.stdout and not (tmp_path / "prefect").exists()
    assert time.perf_counter() - started < 60  # imports only; a server takes ~20 s more
