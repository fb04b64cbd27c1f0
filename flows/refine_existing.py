"""DIVER on any distilled set given by URL: the ``gridistill refine`` command as a GPU flow.

The input (a folder or a file, local or any fsspec URL) is copied to a scratch directory on
the worker, refined by :func:`gridistill.tasks.refine_existing.refine_set` with the request's own
options, and the resulting ImageFolder is uploaded to ``out``; nothing else touches the
worker's disk.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from prefect import flow
from prefect.artifacts import create_link_artifact
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger
from pydantic import Field

from gridistill.flows.pooled import redact, segment_device
from gridistill.refine_options import RefineJob
from gridistill.tasks.refine_existing import refine_set


class RefineRequest(RefineJob):
    """The options of ``gridistill refine``; ``input``, ``labels``, ``wnids`` and ``out`` are
    local paths or fsspec URLs."""

    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "fsspec options for the URLs (no credentials: use the environment)."))


def _fetch(url: str | None, into: Path, options: dict[str, Any]) -> str | None:
    """A local path holding ``url``'s content (a copy when the URL is remote)."""
    if url is None:
        return None
    fs, path = fsspec.core.url_to_fs(url, **options)
    if isinstance(fs, LocalFileSystem):
        return path
    target = into / Path(path.rstrip("/")).name
    fs.get(path, str(target), recursive=fs.isdir(path))
    return str(target)


def _upload(local_dir: Path, fs: fsspec.AbstractFileSystem, target: str) -> None:
    """Copy the files under ``local_dir`` to ``target`` (same relative paths)."""
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        destination = f"{target.rstrip('/')}/{file.relative_to(local_dir).as_posix()}"
        fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), destination)


@flow(name="gridistill-refine-existing", persist_result=False)
def refine_existing(request: RefineRequest, gpu_concurrency_limit: str = "gpu") -> str:
    """Refine ``request.input`` with DIVER and write the ImageFolder to ``request.out``."""
    log = get_run_logger()
    log.info("refine request: %s", redact(request.model_dump(mode="json")))
    device = segment_device("gpu", request.device)
    options = request.storage_options
    out_fs, out_path = fsspec.core.url_to_fs(request.out, **options)
    if out_fs.exists(out_path) and out_fs.ls(out_path):
        raise FileExistsError(f"{request.out} is not empty; refusing to mix or overwrite outputs")
    gpu_slot = (concurrency(gpu_concurrency_limit, occupy=1, strict=True)
                if device != "cpu" else contextlib.nullcontext())
    with tempfile.TemporaryDirectory(prefix="gridistill-refine-") as scratch, gpu_slot:
        scratch_dir = Path(scratch)
        local_out = scratch_dir / "refined"
        local = {field: _fetch(getattr(request, field), scratch_dir, options)
                 for field in ("input", "labels", "wnids")}
        job = RefineJob(**request.model_dump(exclude={"storage_options"})
                        | local | {"out": str(local_out), "device": device})
        refine_set(job, report=log.info)
        _upload(local_out, out_fs, out_path)
    create_link_artifact(key="gridistill-refined", link=request.out, link_text="refined set",
                         description=f"DIVER-refined {request.input}")
    return request.out
