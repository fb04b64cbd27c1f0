"""The closed sets of the parameters: one source each, choices in the schema (the UI form's
drop-downs, with their defaults), and a wrong value refused when parameters are validated."""

from __future__ import annotations

import re
import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gridistill import choices, distilled_sets
from gridistill.config import DistillConfig, Stage


def names(literal: Any) -> tuple[str, ...]:
    return typing.get_args(literal)


def test_each_closed_set_equals_the_table_it_mirrors():
    from gridistill.models import IMAGENET_CLASSIFIERS
    from gridistill.tasks.embed import EMBEDDERS
    from gridistill.tasks.enhance import ENHANCE_BACKENDS
    from gridistill.tasks.grid_layout import GRID_SELECTIONS
    from gridistill.tasks.protocols import PROTOCOLS
    from gridistill.tasks.select import REAL_IMAGES
    from gridistill.tasks.selectors import SELECTION_METHODS
    from gridistill.tasks.students import STUDENTS

    assert names(choices.Selector) == SELECTION_METHODS
    assert names(choices.SelectionMethod) == (*SELECTION_METHODS, REAL_IMAGES)
    assert names(choices.EnhanceBackend) == ENHANCE_BACKENDS
    assert names(choices.Embedder) == EMBEDDERS
    assert names(choices.EvalProtocol) == tuple(PROTOCOLS)
    assert names(choices.Student) == STUDENTS
    assert names(choices.ImageNetClassifier) == IMAGENET_CLASSIFIERS
    assert names(choices.Teacher) == (*STUDENTS, *IMAGENET_CLASSIFIERS)
    assert names(DistillConfig.model_fields["grid_selection"].annotation) == GRID_SELECTIONS
    assert names(distilled_sets.Normalization) == tuple(distilled_sets.NORMALIZATIONS)
    assert names(distilled_sets.SubsetPreset) == tuple(distilled_sets.SUBSET_PRESETS)


CLOSED_FIELDS = {"methods": choices.SelectionMethod, "enhance": choices.EnhanceBackend,
                 "embedder": choices.Embedder, "eval_protocol": choices.EvalProtocol,
                 "eval_student": choices.Student, "teacher": choices.Teacher,
                 "grid_selection": typing.Literal["sequential", "joint"],
                 "task_runner": typing.Literal["thread", "dask", "ray"], "force_from": Stage}


def enum_of(prop: dict[str, Any]) -> list[str]:
    """The choices of a schema property: its own, its items', or its non-null option's."""
    for option in [prop, prop.get("items", {}), *prop.get("anyOf", [])]:
        if "enum" in option:
            return option["enum"]
    raise AssertionError(f"no enum in {prop}")


def test_the_schema_has_choices_and_defaults_for_the_closed_sets_and_list_fields():
    props = DistillConfig.model_json_schema()["properties"]
    for name, literal in CLOSED_FIELDS.items():
        assert enum_of(props[name]) == list(names(literal)), name
        assert props[name]["default"] == DistillConfig.model_fields[name].default, name
    assert props["methods"]["default"] == ["ssdim", "random", "random-real"]
    assert props["enhance"]["default"] == ["bilinear"]
    first, second = DistillConfig(), DistillConfig()
    first.methods.append("kcenter")  # a plain list default is copied, never shared
    assert second.methods == ["ssdim", "random", "random-real"]


@pytest.mark.parametrize("field, value", [
    ("methods", ["ssdm"]), ("enhance", ["sdturbo"]), ("embedder", "clip2"),
    ("eval_protocol", "cpu_soft"), ("eval_student", "resnet19"), ("teacher", "efficientnet-b9"),
    ("force_from", "grid"), ("task_runner", "threads"), ("grid_selection", "both")])
def test_a_wrong_choice_is_refused_naming_the_allowed_values(field, value):
    with pytest.raises(ValidationError) as refused:
        DistillConfig(**{field: value})
    [error] = refused.value.errors()
    assert error["loc"][0] == field and error["type"] == "literal_error"
    assert all(repr(name) in error["msg"] for name in names(CLOSED_FIELDS[field]))


def test_the_deployed_flows_refuse_a_wrong_choice_when_validating_their_parameters():
    """What a deployment run does first, before any task: Flow.validate_parameters."""
    from prefect.exceptions import ParameterTypeError

    from gridistill.flows.pooled import distill_pooled
    from gridistill.flows.refine_existing import refine_existing
    from gridistill.flows.subset import subset_distill

    calls = [(distill_pooled, {"config": {"methods": ["ssdim", "ssdm"]}}),
             (subset_distill, {"config": {"eval_protocol": "cpu_small"}}),
             (refine_existing, {"request": {"input": "x", "out": "y",
                                            "normalization": "image-net"}})]
    for flow, parameters in calls:
        with pytest.raises(ParameterTypeError, match="Input should be"):
            flow.validate_parameters(parameters)


def test_form_descriptions_have_no_markup_that_the_ui_would_swallow():
    """The UI renders descriptions as Markdown/HTML: an <a+b> would vanish."""
    from gridistill.flows.pooled import PoolOptions, SegmentRequest
    from gridistill.flows.refine_existing import RefineRequest

    models: list[type[BaseModel]] = [DistillConfig, PoolOptions, SegmentRequest, RefineRequest]
    for model in models:
        for name, field in model.model_fields.items():
            assert not re.search(r"<[^>]*>", field.description or ""), (model.__name__, name)
