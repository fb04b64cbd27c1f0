"""The one storage module: fsspec URLs, atomic writes, content-derived keys.

Every stage writes under one run root (a local directory or any fsspec URL such as
``s3://bucket/prefix``). An artifact is a folder ``<stage>/<scope>/<key>/`` whose key is a
hash of everything that determines its content (dataset fingerprint, stage parameters,
upstream keys, code version). A folder only counts as finished once its ``_COMMITTED.json``
marker exists; the marker is written last, so a crash mid-stage leaves an uncommitted folder
that the next run simply rewrites.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

COMMIT_MARKER = "_COMMITTED.json"


def content_key(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_digest(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The SHA-256 of the weights at ``url`` (a local path or an fsspec URL), or None when
    nothing is there: of a file's bytes, or of a directory's files (a diffusers model folder),
    each by its path inside the directory and its own SHA-256. Entries whose name starts with
    a dot (``.cache/huggingface`` download records, say) are left out: they change when a
    download is repeated, the weights do not. Each file is hashed once per process while its
    size and time stay."""
    fs, path = fsspec.core.url_to_fs(os.path.expanduser(url), **dict(storage_options or {}))
    try:
        if fs.isfile(path):
            return _digest(fs, path, fs.ukey(path))
        if not fs.isdir(path):
            return None
        root = path.rstrip("/") + "/"
        listing = []
        for found in sorted(fs.find(path)):
            inside = found[len(root):]
            if not any(part.startswith(".") for part in inside.split("/")):
                listing.append((inside, _digest(fs, found, fs.ukey(found))))
    except OSError:  # no such bucket, say: the stage that opens it reports that
        return None
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _digest(fs: fsspec.AbstractFileSystem, path: str, stamp: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def validate_key_part(name: str) -> str:
    """Reject names that could escape their folder once they become part of a storage key."""
    bad = not name.strip() or name == "." or ".." in name or any(c in name for c in "/\\\x00")
    if bad:
        raise ValueError(f"invalid name for a storage key (no '/', '\\', '..' or NUL): {name!r}")
    return name


class StorageError(OSError):
    """A run-root operation failed (after the client's own retries); names the object's URL."""


class RunStore:
    """A run root on any fsspec filesystem.

    ``storage_options`` are passed to fsspec (for S3: ``endpoint_url`` via
    ``client_kwargs``, ``anon``...); credentials should come from the environment or the AWS
    credential chain and are never written anywhere.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.root_url = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url, **self.storage_options)
        self._local = isinstance(self.fs, LocalFileSystem)

    # -- paths -----------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def url(self, key: str) -> str:
        return f"{self.root_url}/{key}" if key else self.root_url

    def _failed(self, action: str, key: str, exc: Exception) -> StorageError:
        return StorageError(f"{action} {self.url(key)} failed: {type(exc).__name__}: {exc}")

    def exists(self, key: str) -> bool:
        try:
            return self.fs.exists(self.path(key))
        except Exception as exc:
            raise self._failed("checking", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the root) directly under ``prefix``; empty if it does not exist."""
        try:
            entries = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        start = len(self.root) + 1
        return sorted(e[start:] if e.startswith(self.root) else e for e in entries)

    # -- bytes -----------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: a reader sees either nothing or the whole object."""
        path = self.path(key)
        if self._local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                # A kill -9 can still leave a ".tmp-" file; it is never read as an artifact.
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            # An object-store PUT is all-or-nothing, so a direct write is already atomic.
            try:
                self.fs.pipe_file(path, data)
            except Exception as exc:
                raise self._failed("writing", key, exc) from exc

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._failed("reading", key, exc) from exc

    # -- typed helpers ---------------------------------------------------------------------
    def write_json(self, key: str, obj: Any) -> None:
        # Keys in the writer's order, so what is read back equals what was written, order
        # included (a reused stage's metadata makes the same table columns as a computed one).
        self.write_bytes(key, json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_parquet(self, key: str, frame: pd.DataFrame) -> None:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        self.write_bytes(key, buffer.getvalue())

    def read_parquet(self, key: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.read_bytes(key)))

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    # -- committed artifact folders --------------------------------------------------------
    def is_committed(self, folder: str) -> bool:
        return self.exists(f"{folder}/{COMMIT_MARKER}")

    def commit(self, folder: str, metadata: Mapping[str, Any]) -> None:
        """Mark ``folder`` finished. Call only after every file in it has been written."""
        self.write_json(f"{folder}/{COMMIT_MARKER}", dict(metadata))

    def uncommit(self, folder: str) -> None:
        """Mark ``folder`` unfinished again, before it is rewritten in place (a no-op when
        another run already did)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(f"{folder}/{COMMIT_MARKER}"))

    def read_commit(self, folder: str) -> dict[str, Any]:
        return self.read_json(f"{folder}/{COMMIT_MARKER}")

    def commit_if_any(self, folder: str) -> dict[str, Any] | None:
        """The commit metadata of ``folder``, or None when it is not committed. One read: a
        concurrent run's ``uncommit`` cannot fall between a check and the read."""
        try:
            return self.read_commit(folder)
        except FileNotFoundError:
            return None
