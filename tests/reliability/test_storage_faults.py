"""Storage faults on loopback: an unreachable object store, and one that answers 500, hangs
or drops connections (a fault-injecting proxy in front of moto). Each operation fails with
an error naming the object; Prefect retries the stage with backoff; the next run resumes."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from gridistill.storage import RunStore, StorageError

from .conftest import flow_config, s3_options


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_store_is_a_clear_error_naming_the_key(s3_bucket):
    bucket, _ = s3_bucket
    store = RunStore(f"{bucket}/run", s3_options(f"http://127.0.0.1:{closed_port()}"))
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"writing {bucket}/run/stage/a/meta.json failed: "
                                           "EndpointConnectionError"):
        store.write_json("stage/a/meta.json", {"x": 1})
    with pytest.raises(StorageError, match=f"reading {bucket}/run/stage/a/meta.json failed"):
        store.read_json("stage/a/meta.json")
    with pytest.raises(StorageError, match=f"checking {bucket}/run/stage/a/_COMMITTED.json"):
        store.is_committed("stage/a")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("method", ["PUT", "GET"])
@pytest.mark.parametrize("fault", ["500", "hang", "drop"])
def test_faulty_store_is_a_clear_error_naming_the_key(s3_bucket, fault_proxy, fault, method,
                                                     monkeypatch):
    import s3fs

    # s3fs itself retries timeouts and dropped connections (5 times, nested for GETs: minutes);
    # once is enough to observe what surfaces after its retries.
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    bucket, _ = s3_bucket
    store = RunStore(f"{bucket}/run", s3_options(fault_proxy.url))
    key = f"grids/a/{uuid.uuid4().hex[:8]}/grid_000.png"
    store.write_bytes(key, b"payload")  # healthy: passes through the proxy to moto
    fault_proxy.rule = lambda m, path: fault if m == method and path.endswith(key) else "pass"
    action = {"PUT": "writing", "GET": "reading"}[method]
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"{action} {bucket}/run/{key} failed"):
        if method == "PUT":
            store.write_bytes(key, b"new payload")
        else:
            store.read_bytes(key)
    assert time.monotonic() - started < 20
    assert [r[3] for r in fault_proxy.requests if r[2].endswith(key) and r[1] == method][-1] \
        == fault
    fault_proxy.rule = lambda m, path: "pass"
    assert store.read_bytes(key) == b"payload"  # a failed PUT never replaced the object


@pytest.mark.slow
def test_flow_retries_with_backoff_fails_naming_the_key_then_resumes(
        flows, s3_bucket, fault_proxy, tiny_dataset, tmp_path):
    bucket, _ = s3_bucket
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}
    config = flow_config(tiny_dataset["train"], tiny_dataset["test"], f"{bucket}/run",
                         storage_options=s3_options(fault_proxy.url))
    fault_proxy.rule = lambda m, path: "500" if m == "PUT" and "/select/" in path else "pass"
    log = tmp_path / "flow.log"
    assert flows.run(config, log, env) != 0
    text = log.read_text()
    assert f"writing {bucket}/run/select/" in text and "selection.parquet failed" in text
    attempts: dict[str, list[float]] = {}
    for at, _, path, action in fault_proxy.requests:
        if action == "500":
            attempts.setdefault(path, []).append(at)
    # 1 + 2 retries per task; a class whose task was still retrying when another class's
    # final failure ended the flow has fewer.
    retried = [times for times in attempts.values() if len(times) == 3]
    assert retried and max(len(times) for times in attempts.values()) == 3
    for times in retried:
        assert times[1] - times[0] >= 2 and times[2] - times[1] >= 10  # Prefect's backoff

    fault_proxy.rule = lambda m, path: "pass"  # the store recovers; run again
    assert flows.run(config, log, env) == 0, log.read_text()[-3000:]
    store = RunStore(config["out"], config["storage_options"])
    timings = store.read_parquet("timings.parquet")
    status = dict(zip(timings["stage"].str.split(":").str[0] + "/" + timings["scope"],
                      timings["status"], strict=True))
    assert {status[f"{stage}/{c}"] for stage in ("load", "embed")
            for c in ("alpha", "beta", "gamma")} == {"Cached"}  # resumed, not redone
    assert {status[f"select/{c}"] for c in ("alpha", "beta", "gamma")} == {"Completed"}
