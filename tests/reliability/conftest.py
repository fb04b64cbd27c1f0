"""Helpers for the reliability suite: hostile inputs, a function-level pipeline, flows run in
subprocesses (so that they can be killed), and a fault-injecting proxy in front of moto."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gridistill.stages import ArtifactRef, StoreSpec
from gridistill.storage import COMMIT_MARKER, RunStore

RUN_FLOW = Path(__file__).with_name("run_flow.py")


# -- images ----------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write_classes(root: Path, per_class: int, seed: int = 0,
                  names: tuple[str, ...] = ("alpha", "beta", "gamma")) -> Path:
    """An ImageFolder of noise images, ``per_class`` in each class."""
    for index, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise_image(seed + 100 * index + i).save(root / name / f"{i:03d}.png")
    return root


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width x height`` pixels (a decompression bomb
    as far as any reader that trusts the header is concerned)."""
    data = bytearray(encode(noise_image(0, (4, 4)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, the reason category reported, "" when kept): by ``load`` from the
    header, or by ``embed`` where the pixels are decoded (truncated.jpg, corrupt.jpg)."""
    good = noise_image(7, (40, 30))
    jpeg = encode(good, "JPEG", quality=90)
    deep = Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16))
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "OSError"),
        "corrupt.jpg": (jpeg[:200] + bytes(range(256)) * 4, "OSError"),
        "zero.jpg": (b"", "empty file"),
        "text.png": (b"this is not an image\n", "UnidentifiedImageError"),
        "html.jpeg": (b"<html><body>404 Not Found</body></html>", "UnidentifiedImageError"),
        "bomb.png": (png_claiming_size(30_000, 30_000), "DecompressionBombError"),
        "bomb_72mp.png": (png_claiming_size(9_000, 8_000), "decompression bomb or huge image"),
        "tiny.png": (encode(noise_image(8, (4, 4)), "PNG"), "too small"),
        "cmyk.jpg": (encode(noise_image(9, (32, 32), "CMYK"), "JPEG"), ""),
        "palette.png": (encode(noise_image(10).convert("P", palette=Image.ADAPTIVE), "PNG"), ""),
        "palette_transparent.gif": (encode(noise_image(11).convert("P"), "GIF",
                                           transparency=0), ""),
        "deep16.png": (encode(deep, "PNG"), ""),
        "float32.tif": (encode(Image.fromarray(np.random.default_rng(1).random(
            (32, 32), dtype=np.float32)), "TIFF"), ""),
        "alpha.png": (encode(noise_image(12, (32, 32), "RGBA"), "PNG"), ""),
        "greyalpha.png": (encode(noise_image(13, (32, 32), "LA"), "PNG"), ""),
        "bilevel.bmp": (encode(noise_image(14).convert("1"), "BMP"), ""),
        "smaller_than_cell.png": (encode(noise_image(15, (12, 12)), "PNG"), ""),
        "huge_ok.jpg": (encode(noise_image(16, (2400, 1600)), "JPEG", quality=50), ""),
        "wide.webp": (encode(noise_image(17, (64, 9)), "WEBP"), ""),
    }


# -- a function-level pipeline (no Prefect) ---------------------------------------------------
def run_pipeline(root: str, data: str, test_data: str | None = None, *, grid_size: int = 2,
                 ipc: int = 1, force: bool = False, holdout_share: float = 0.2,
                 storage_options: dict[str, Any] | None = None) -> dict[str, list[ArtifactRef]]:
    """index -> load -> embed -> select -> grids, each stage's body called directly."""
    from gridistill.tasks.embed import EmbedParams, embed_class
    from gridistill.tasks.grids import GridParams, assemble_class_grids
    from gridistill.tasks.index import IndexParams, index_dataset
    from gridistill.tasks.load import LoadParams, load_class
    from gridistill.tasks.select import SelectParams, select_class

    store = StoreSpec(root=root, storage_options=storage_options or {})
    dataset = index_dataset.fn(store, IndexParams(data=data, test_data=test_data,
                                                         holdout_share=holdout_share))
    refs: dict[str, list[ArtifactRef]] = {"dataset": [dataset]}
    for name, _, _ in dataset.meta["classes"]:
        chain = [dataset]
        for stage, task, params in [
            ("load", load_class, LoadParams()),
            ("embed", embed_class, EmbedParams(embedder="pixels-pca", progress=False)),
            ("select", select_class, SelectParams(ipc=ipc, grid_size=grid_size)),
            ("grids", assemble_class_grids, GridParams(grid_size=grid_size, resolution=32)),
        ]:
            chain = [task.fn(store, name, params, chain, force)]
            refs.setdefault(stage, []).append(chain[0])
    return refs


# -- comparing run roots ----------------------------------------------------------------------
def committed_files(root: Path, stages: tuple[str, ...]) -> dict[str, bytes]:
    """Every file of every committed folder of ``stages`` (commit markers excluded: they hold
    timings), keyed by its path relative to the root."""
    files = {}
    for marker in sorted(root.rglob(COMMIT_MARKER)):
        folder = marker.parent
        if folder.relative_to(root).parts[0] not in stages:
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != COMMIT_MARKER and ".tmp-" not in path.name:
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


def assert_committed_folders_complete(root: Path) -> int:
    """Every committed folder's files parse completely (no torn artifact is marked finished);
    returns how many committed folders were checked."""
    import pandas as pd

    store = RunStore(str(root))
    folders = [m.parent for m in root.rglob(COMMIT_MARKER)]
    for folder in folders:
        json.loads((folder / COMMIT_MARKER).read_text())
        for path in folder.rglob("*"):
            if path.name.startswith(".tmp-") or path.is_dir():
                continue
            if path.suffix == ".parquet":
                pd.read_parquet(path)
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
        assert store.is_committed(str(folder.relative_to(root)))
    return len(folders)


# -- flows in subprocesses --------------------------------------------------------------------
def flow_config(data: Path, test_data: Path | None, out: str, **overrides: Any) -> dict[str, Any]:
    """tests/test_flow.py's tiny configuration, as JSON for :data:`RUN_FLOW`."""
    return {"data": str(data), "test_data": str(test_data) if test_data else None, "out": out,
            "ipc": 1, "grid_size": 2, "grid_resolution": 32, "methods": ["ssdim"],
            "embedder": "pixels-pca", "enhance": ["bilinear"], "enhance_scale": 2, "eval_seeds": 1,
            "eval_image_size": 16, "eval_epochs": 1, "progress": False, "device": "cpu",
            **overrides}


@dataclass
class FlowRun:
    """One flow run in a process forked by :data:`RUN_FLOW`."""

    pid: int
    status: Path

    def poll(self) -> int | None:
        """The exit code; -9 once killed; None while running."""
        if self.status.exists() and self.status.read_text():
            return int(self.status.read_text())
        return None if Path(f"/proc/{self.pid}").exists() else -9

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"flow run {self.pid} still running after {timeout}s")
            time.sleep(0.05)
        return code

    def kill(self) -> None:
        """kill -9, then wait until the process is gone."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while Path(f"/proc/{self.pid}").exists():
            time.sleep(0.005)


class FlowLauncher:
    """Starts flow runs through one :data:`RUN_FLOW` process (imports paid once)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, str(RUN_FLOW)], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.runs = 0

    def start(self, config: dict[str, Any], log: Path,
              env: dict[str, str] | None = None) -> FlowRun:
        self.runs += 1
        status = log.with_name(f"{log.name}.{self.runs}.status")
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"config": config, "log": str(log),
                                             "status": str(status), "env": env or {}}) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer.startswith("started "), f"flow launcher died: {answer!r}"
        return FlowRun(int(answer.split()[1]), status)

    def run(self, config: dict[str, Any], log: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> int:
        return self.start(config, log, env).wait(timeout)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="session")
def flows(prefect_harness) -> Iterator[FlowLauncher]:
    """Flow runs in their own processes, against the harness's API server."""
    from prefect.settings import PREFECT_API_URL

    launcher = FlowLauncher({**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                             "PREFECT_LOGGING_LEVEL": "INFO"})
    yield launcher
    launcher.close()


# -- a fault-injecting HTTP proxy in front of the S3 server -----------------------------------
Rule = Callable[[str, str], str]  # (method, path) -> "pass" | "500" | "hang" | "drop"


@dataclass
class FaultProxy:
    """Forwards HTTP to ``upstream``; ``rule`` decides per request to pass it, answer 500,
    hang past the client's timeout, or drop the connection. Records every request."""

    upstream: str
    rule: Rule = lambda method, path: "pass"  # noqa: E731
    hang_seconds: float = 2.0
    requests: list[tuple[float, str, str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                action = proxy.rule(self.command, self.path)
                proxy.requests.append((time.monotonic(), self.command, self.path, action))
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "hang":
                    time.sleep(proxy.hang_seconds)
                    self.close_connection = True
                    return
                if action == "500":
                    payload = (b"<?xml version='1.0'?><Error><Code>InternalError</Code>"
                               b"<Message>injected</Message></Error>")
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                host, port = proxy.upstream.removeprefix("http://").split(":")
                upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def fault_proxy(s3_endpoint) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint).start()
    yield proxy
    proxy.stop()


def s3_options(endpoint: str, **config: Any) -> dict[str, Any]:
    """s3fs options with botocore's own retries off, so that Prefect's retries are what the
    tests observe (s3fs still retries timeouts a few times), and short timeouts."""
    return {"endpoint_url": endpoint,
            "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 1,
                              "read_timeout": 1, **config}}
