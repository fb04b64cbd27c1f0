import os

import pandas as pd
import pytest

from gridistill.storage import RunStore, content_key, validate_key_part


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore(str(tmp_path / "run"))
    url, options = request.getfixturevalue("s3_bucket")
    return RunStore(f"{url}/run", options)


def test_content_key_is_stable_and_order_independent():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})
    assert len(content_key("x")) == 16


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "../etc", "x..y", "a\x00"])
def test_validate_key_part_rejects_escaping_names(name):
    with pytest.raises(ValueError):
        validate_key_part(name)


@pytest.mark.parametrize("name", ["n01440764", "English springer", "café", "a.b"])
def test_validate_key_part_accepts_ordinary_names(name):
    assert validate_key_part(name) == name


def test_round_trips(store):
    frame = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    store.write_parquet("stage/a/table.parquet", frame)
    store.write_json("stage/a/meta.json", {"k": [1, 2]})
    pd.testing.assert_frame_equal(store.read_parquet("stage/a/table.parquet"), frame)
    assert store.read_json("stage/a/meta.json") == {"k": [1, 2]}
    assert store.list("stage/a") == ["stage/a/meta.json", "stage/a/table.parquet"]
    assert store.list("missing") == []


def test_folder_counts_as_finished_only_after_commit(store):
    store.write_bytes("stage/s/k/data.bin", b"payload")
    assert not store.is_committed("stage/s/k")
    store.commit("stage/s/k", {"meta": {"n": 1}})
    assert store.is_committed("stage/s/k")
    assert store.read_commit("stage/s/k") == {"meta": {"n": 1}}


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path))
    store.write_bytes("a/file.bin", b"old")

    def crash(*args):
        raise OSError("disk died mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_bytes("a/file.bin", b"new")
    monkeypatch.undo()
    assert store.read_bytes("a/file.bin") == b"old"  # the reader never sees a partial write
    store.write_bytes("a/file.bin", b"new")
    leftovers = [p for p in os.listdir(tmp_path / "a") if p.startswith(".tmp-")]
    assert store.read_bytes("a/file.bin") == b"new"
    assert leftovers == []
