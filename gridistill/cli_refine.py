"""``gridistill refine``: DIVER-refine any distilled set into an ImageFolder of PNGs.

The options are :class:`~gridistill.refine_options.RefineJob`'s fields;
:func:`gridistill.tasks.refine_existing.refine_set` does the work for the command and for the
refine-existing flow alike.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from gridistill.cli_options import add_model_options, model_values, one_line
from gridistill.models import MissingWeightsError
from gridistill.refine_options import RefineJob
from gridistill.tasks.refine_existing import refine_set


def add_refine_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "refine", help="DIVER: refine a distilled set with a pretrained DiT",
        description="Refine a distilled set (ImageFolder, run root, MTT/DATM .pt, .npz) with "
                    "DIVER (DiT-XL/2 + DDIM + semantic guidance) and write an ImageFolder of PNGs.")
    add_model_options(parser, RefineJob)
    parser.set_defaults(func=run_refine)
    return parser


def run_refine(args: argparse.Namespace) -> int:
    """``gridistill refine``: 0 on success, 2 (one line on stderr) for a mistake found before
    any work."""
    try:
        job = RefineJob(**model_values(args, RefineJob))
    except ValidationError as exc:
        print(f"error: {one_line(exc, RefineJob)}", file=sys.stderr)
        return 2
    try:
        refine_set(job)
    except (MissingWeightsError, ValueError, FileExistsError) as exc:
        # DistilledSetError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
