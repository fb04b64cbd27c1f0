import pytest

from gridistill.cli import build_parser, config_from_args
from gridistill.config import DistillConfig, demo_data_root


def test_help_lists_every_flow_parameter(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for name in DistillConfig.model_fields:
        assert "--" + name.replace("_", "-") in text


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
