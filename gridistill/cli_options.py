"""Command-line options generated from pydantic models, so a flag, a Prefect form field and a
Python argument are one field with one default.

A field holding a model (``DistillConfig.diver``) becomes that model's fields as flags of
their own (``--t-r``) in an argument group; :func:`model_values` nests them back.
"""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def _option_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type``/``nargs``/``choices`` for a pydantic field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin is list:
        kind, extra = _option_type(args[0])
        return kind, {**extra, "nargs": "+"}
    if origin is dict:
        return json.loads, {}
    if args and origin is not None:  # Optional[X]
        return _option_type(args[0])
    return annotation, {}


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      model: type[BaseModel]) -> None:
    """One flag per field of ``model``; every flag defaults to None (= the model's default),
    so the model, not argparse, decides what an absent flag means."""
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            group = parser.add_argument_group((field.description or name).rstrip("."))
            add_model_options(group, nested)
            continue
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        help_text = f"{field.description} ({'required' if required else f'default: {default}'})"
        if field.annotation is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        kind, extra = _option_type(field.annotation)
        parser.add_argument(flag(name), type=kind, default=None, required=required,
                            help=help_text, **extra)


def model_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The flags given on the command line, nested as ``model`` takes them."""
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            values[name] = model_values(args, nested)
        elif getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return values


def one_line(error: ValidationError, model: type[BaseModel]) -> str:
    """Each failed check as ``--option: message (got value)``, on one line; a nested model's
    fields are named by their own flags, as on the command line."""
    groups = {name for name, field in model.model_fields.items()
              if _nested_model(field.annotation) is not None}
    parts = []
    for item in error.errors():
        loc = list(item["loc"])
        if loc and loc[0] in groups:
            loc = loc[1:]
        where = "".join(f"[{p}]" if isinstance(p, int) else flag(p) for p in loc)
        got = "" if item["type"].startswith("value_error") else f" (got {item['input']!r})"
        parts.append(f"{where + ': ' if where else ''}{item['msg']}{got}")
    return "; ".join(parts)
