"""``gridistill`` command line. ``run`` options are generated from :class:`DistillConfig`,
so the CLI, the Prefect UI form and the Python API never disagree."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

# A first ephemeral Prefect server on a fresh machine takes ~20-30 s to start, over Prefect's
# 20 s default; set before Prefect is imported. An explicit user setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from gridistill.cli_options import add_model_options, model_values, one_line  # noqa: E402
from gridistill.config import DistillConfig  # noqa: E402  (after the env default above)


class UsageError(Exception):
    """A mistake in the command line, found before any work: one line, exit code 2."""


def fail(message: str) -> NoReturn:
    print(f"gridistill: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    # One line rather than argparse's usage block: `run` has too many options to repeat them.
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see: {self.prog} --help)")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    try:
        return DistillConfig(**model_values(args, DistillConfig))
    except ValidationError as exc:
        raise UsageError(one_line(exc, DistillConfig)) from None


def _reach(flag: str, url: str,
           options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """The filesystem and path of ``url``, and whether it exists; failing to ask is an error."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        return fs, path, fs.exists(path)
    except Exception as exc:  # unknown protocol, network, credentials...
        raise UsageError(f"{flag} {url}: cannot reach it ({type(exc).__name__}: {exc})") from None


def check_locations(config: DistillConfig) -> None:
    """What the run needs from outside, checked before Prefect starts: the data and test data
    exist, the class list reads, the run root can be written (local) or reached (URL)."""
    options = config.storage_options
    for flag, url in (("--data", config.data), ("--test-data", config.test_data)):
        if url is not None:
            if not _reach(flag, url, options)[2]:
                raise UsageError(f"{flag} {url}: no such directory or manifest")
    if config.class_list is not None:
        fs, path, _ = _reach("--class-list", config.class_list, options)
        try:
            with fs.open(path, "rt") as file:
                names = file.read().split()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--class-list {config.class_list}: cannot read it "
                             f"({type(exc).__name__}: {exc})") from None
        if not names:
            raise UsageError(f"--class-list {config.class_list}: names no class")
    fs, path, _ = _reach("--out", config.out, options)
    if isinstance(fs, LocalFileSystem):
        existing = Path(path)
        while not existing.exists():
            existing = existing.parent
        try:  # a real write: permission bits say nothing for root or on read-only mounts
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise UsageError(f"--out {config.out}: cannot write in {existing} "
                             f"({type(exc).__name__}: {exc})") from None


def run_distill(config: DistillConfig) -> dict[str, Any]:
    from gridistill.flows.distill import distill
    from gridistill.runners import build_task_runner

    runner = build_task_runner(config.task_runner, max_workers=config.worker_count(),
                               address=config.task_runner_address)
    return distill.with_options(task_runner=runner)(config)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_locations(config)
    where = os.environ.get("PREFECT_API_URL") or "an embedded temporary Prefect server"
    print(f"gridistill: distilling {config.data} -> {config.out} (Prefect: {where})")
    started = time.perf_counter()
    result = run_distill(config)
    seconds = time.perf_counter() - started
    print(f"\ngridistill: finished in {seconds:.1f}s; report: {result['report']}")
    for row in result["metrics"]:
        print(f"  {row['method']:>12}: top-1 final {row['top1_final_mean']:.2f} ± "
              f"{row['top1_final_std']:.2f}%  best {row['top1_best_mean']:.2f} ± "
              f"{row['top1_best_std']:.2f}%  ({row['seeds']} seeds)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gridistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="distil a dataset end to end (Prefect flow)",
                              description=DistillConfig.__doc__)
    add_model_options(run, DistillConfig)
    run.set_defaults(func=_run)
    from gridistill.cli_refine import add_refine_parser

    add_refine_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
