"""DIVER on any distilled set given by URL: the ``gridistill refine`` command as a GPU flow.

The input (a folder or a file, local or any fsspec URL) is copied to a scratch directory on
the worker, refined by :func:`gridistill.cli_refine.run_refine`, and the resulting
ImageFolder is uploaded to ``out``; nothing else touches the worker's disk.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from prefect import flow
from prefect.artifacts import create_link_artifact
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from flows.pooled import redact, segment_device
from gridistill.cli_refine import add_refine_parser, run_refine
from gridistill.distilled_sets import InputKind, Normalization, SubsetPreset


class RefineRequest(BaseModel):
    """The options of ``gridistill refine``, typed for the Prefect UI form."""

    input_url: str = Field(description="Distilled set: ImageFolder, run root, .pt or .npz URL.")
    out: str = Field(description="Where the refined ImageFolder goes (local path or URL); "
                                 "must be empty or new.")
    input_kind: InputKind = Field("auto", description="auto: detected from the input.")
    method: str | None = Field(None, description="Which distilled set of a run root (e.g. ssdim).")
    labels_url: str | None = Field(None, description="MTT labels file, when not beside it.")
    normalization: Normalization | None = Field(None, description=(
        "Mean/std the float tensor sets were normalised with (none: already in [0, 1])."))
    classes_preset: SubsetPreset | None = Field(None, description=(
        "Maps class i to its ImageNet-1K label, in the MTT/GLaD/DATM class order."))
    wnids_url: str | None = Field(None, description="File: one WNID per line (line i = class i).")
    dit: str = Field("facebook/DiT-XL-2-256", description="DiT hub id or local directory.")
    vae: str = Field("stabilityai/sd-vae-ft-mse", description="VAE hub id or local directory.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description=(
        "auto, cuda, cuda:N or cpu (the CPU only on request)."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_steps: int = Field(50, ge=1)
    t_f: int = Field(25, ge=1)
    t_r: int | None = None
    t_h: int = Field(40, ge=1)
    t_l: int = Field(25, ge=1)
    gamma: float = Field(0.1, ge=0.0, description="Semantic guidance (0.02 for NCFM sets).")
    cfg_scale: float = 4.0
    seed: int = 0
    batch_size: int = Field(32, ge=1)
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


# Request fields that name remote files, and the CLI option their local copy goes to.
_URL_FIELDS = {"input_url": "input", "labels_url": "labels", "wnids_url": "wnids"}


def refine_arguments(request: RefineRequest, local: dict[str, str | None]) -> argparse.Namespace:
    """The request as parsed ``gridistill refine`` options: through the CLI's own parser, so
    its defaults and checks apply and an option the CLI lacks fails loudly."""
    values = request.model_dump(exclude={"storage_options", *_URL_FIELDS}) | local
    argv = ["refine"]
    for name, value in values.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    parser = argparse.ArgumentParser(prog="gridistill", exit_on_error=False)
    add_refine_parser(parser.add_subparsers(dest="command"))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(f"gridistill refine has no option(s) {unknown}")
    return args


@flow(name="gridistill-refine-existing")
def refine_existing(request: RefineRequest, gpu_concurrency_limit: str = "gpu") -> str:
    """Refine ``request.input_url`` with DIVER and write the ImageFolder to ``request.out``."""
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
        local = {option: _fetch(getattr(request, field), scratch_dir, options)
                 for field, option in _URL_FIELDS.items()}
        args = refine_arguments(request, local | {"out": str(local_out), "device": device})
        # run_refine reports problems on stderr for the terminal; here they become the error.
        errors, report = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(report):
            status = run_refine(args)
        for line in report.getvalue().splitlines():
            log.info(line)
        if status != 0:
            raise RuntimeError(f"refine failed: {errors.getvalue().strip()}")
        _upload(local_out, out_fs, out_path)
    create_link_artifact(key="gridistill-refined", link=request.out, link_text="refined set",
                         description=f"DIVER-refined {request.input_url}")
    return request.out
