"""Shared fixtures: tiny generated datasets, a quiet Prefect, a real S3 server on loopback."""

from __future__ import annotations

import os
import socket
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Before anything imports Prefect or huggingface_hub: offline, quiet, isolated.
_PREFECT_HOME = tempfile.mkdtemp(prefix="gridistill-prefect-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOCAL_STORAGE_PATH": os.path.join(_PREFECT_HOME, "results"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
})

@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test models are tiny and the 2-core CI machine runs other work: one thread is fastest
    (more only spin-wait) and keeps results independent of the core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CLASS_COLOURS = {"alpha": (200, 40, 40), "beta": (40, 200, 40), "gamma": (40, 40, 200)}


def make_image(colour: tuple[int, int, int], seed: int, size: int = 32) -> Image.Image:
    """A class-coloured image with seeded noise and a bright square at a seeded position."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    x, y = rng.integers(0, size - 8, 2)
    pixels[y:y + 8, x:x + 8] = 255
    return Image.fromarray(pixels.astype(np.uint8))


def write_image_folder(root: Path, per_class: int, seed_offset: int = 0) -> Path:
    for index, (name, colour) in enumerate(CLASS_COLOURS.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = make_image(colour, seed_offset + 1000 * index + i)
            image.save(root / name / f"img_{i:03d}.png")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> dict[str, Path]:
    """3 classes: 12 training images and 6 test images each, 32 px."""
    return {"train": write_image_folder(tmp_path / "train", 12),
            "test": write_image_folder(tmp_path / "test", 6, seed_offset=500)}


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness
    from server_logs import children_write_to, server_log_problem

    log = tmp_path_factory.mktemp("prefect-harness") / "server.log"
    with ExitStack() as harness:
        with children_write_to(log):  # the harness's server process inherits them
            harness.enter_context(prefect_test_harness(server_startup_timeout=180))
        yield
    # Every test that used the server fails with it: this teardown error names the last one.
    problem = server_log_problem(log)
    assert problem is None, f"the harness's prefect server logged an error:\n{problem}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with throwaway credentials."""
    from moto.server import ThreadedMotoServer

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY":
                       "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1"})
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns (s3:// URL, fsspec storage options)."""
    import uuid

    import s3fs

    options = {"endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return f"s3://{name}", options


@pytest.fixture
def small_device(monkeypatch):
    """``limit(owner, method, max_rows)`` makes ``owner.method`` act like a device that fits
    ``max_rows`` batch rows: a larger batch raises CUDA's out-of-memory error. Returns the list
    of batch sizes the method is called with, in order."""

    def limit(owner, method: str, max_rows: int) -> list[int]:
        original, sizes = getattr(owner, method), []

        def forward(batch, *args, **kwargs):
            sizes.append(len(batch))
            if len(batch) > max_rows:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated device)")
            return original(batch, *args, **kwargs)

        monkeypatch.setattr(owner, method, forward)
        return sizes

    return limit
