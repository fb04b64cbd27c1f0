"""``gridistill`` command line. ``run`` options are generated from :class:`DistillConfig`,
so the CLI, the Prefect UI form and the Python API never disagree."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from typing import Any

# A first ephemeral Prefect server on a fresh machine takes ~20-30 s to start, over Prefect's
# 20 s default; set before Prefect is imported. An explicit user setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from gridistill.config import DistillConfig  # noqa: E402  (after the env default above)


def _option_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type``/``nargs``/``choices`` for a pydantic field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return args[0], {"nargs": "+"}
    if origin is dict:
        return json.loads, {}
    if args and origin is not None:  # Optional[X]
        return _option_type(args[0])
    return annotation, {}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    for name, field in DistillConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (default: {default})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        kind, extra = _option_type(field.annotation)
        parser.add_argument(flag, type=kind, default=None, help=help_text, **extra)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    given = {name: getattr(args, name) for name in DistillConfig.model_fields}
    return DistillConfig(**{k: v for k, v in given.items() if v is not None})


def run_distill(config: DistillConfig) -> dict[str, Any]:
    from flows.distill import distill
    from gridistill.runners import build_task_runner

    runner = build_task_runner(config.task_runner, max_workers=config.worker_count(),
                               address=config.task_runner_address)
    options: dict[str, Any] = {"task_runner": runner}
    if config.result_storage:
        options["result_storage"] = config.result_storage
    return distill.with_options(**options)(config)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
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
    parser = argparse.ArgumentParser(prog="gridistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="distil a dataset end to end (Prefect flow)",
                              description=DistillConfig.__doc__)
    add_config_options(run)
    run.set_defaults(func=_run)
    from gridistill.cli_refine import add_refine_parser

    add_refine_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
