"""Cache keys follow the code that makes each artifact: comments, docstrings and formatting
never re-key it, and a change to a helper in another module re-keys exactly the stages whose
code reaches it. Edited sources are handed to a CodeIndex; no repository file is touched."""

from __future__ import annotations

import ast
import importlib.util
import io
import tokenize
from pathlib import Path

import pytest

from gridistill.stages import CodeIndex, code_definitions, code_version
from gridistill.storage import RunStore
from gridistill.tasks.embed import embed_class
from gridistill.tasks.enhance import enhance_class
from gridistill.tasks.evaluate import evaluate_grids
from gridistill.tasks.grids import assemble_class_grids
from gridistill.tasks.load import load_class
from gridistill.tasks.refine import refine_class
from gridistill.tasks.select import select_class
from gridistill.tasks.teacher import build_teacher
from gridistill.tasks.test_split import decode_test_split

STAGES = {task.name: task.fn.compute for task in (
    load_class, decode_test_split, embed_class, select_class, assemble_class_grids,
    enhance_class, refine_class, build_teacher, evaluate_grids)}


def real_source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()


def versions(sources: dict[str, str] | None = None) -> dict[str, str]:
    index = CodeIndex(sources)
    return {stage: index.version([compute]) for stage, compute in STAGES.items()}


def rekeyed(module: str, edit) -> set[str]:
    """The stages whose key changes when ``module``'s source is replaced by ``edit(source)``."""
    before = versions()
    after = versions({module: edit(real_source(module))})
    return {stage for stage in STAGES if after[stage] != before[stage]}


def modules_reached() -> set[str]:
    return {name.split(":")[0] for compute in STAGES.values()
            for name in CodeIndex().definitions([compute])}


def reworded_comments(source: str) -> str:
    """Every comment reworded; the layout as tokenize writes it (formatting changes too)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return tokenize.untokenize([(t.type, "# reworded" if t.type == tokenize.COMMENT else t.string)
                                for t in tokens])


def reworded_docstrings(source: str) -> str:
    """Every docstring reworded, and one added to each function that had none."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                first.value.value = "Reworded. " + first.value.value
            else:
                node.body.insert(0, ast.Expr(ast.Constant("A new docstring.")))
    return ast.unparse(tree)


def with_statement(qualname: str, statement: str):
    """An edit that puts ``statement`` first in the body of function or method ``qualname``."""
    def edit(source: str) -> str:
        tree = ast.parse(source)
        scope: ast.AST = tree
        for part in qualname.split("."):
            scope = next(node for node in scope.body if getattr(node, "name", None) == part)
        scope.body.insert(0, ast.parse(statement).body[0])
        return ast.unparse(tree)

    return edit


@pytest.mark.parametrize("edit", [reworded_comments, reworded_docstrings])
def test_comment_docstring_and_layout_edits_keep_every_key(edit):
    modules = modules_reached()
    assert {"gridistill.tasks.augment", "gridistill.models", "gridistill.tasks.ingest"} <= modules
    assert versions({module: edit(real_source(module)) for module in modules}) == versions()


def test_a_change_to_the_crop_rekeys_the_stages_that_train_students_only():
    edit = with_statement("sample_crop_box", "p_align = min(p_align, 0.5)")
    assert rekeyed("gridistill.tasks.augment", edit) == {"teacher", "evaluate"}


def test_a_change_to_model_preprocessing_rekeys_the_stages_that_run_the_classifier():
    edit = with_statement("ImageNetClassifier.normalise", "pixels = pixels.clamp(0, 1)")
    assert rekeyed("gridistill.models", edit) == {"embed", "teacher", "evaluate"}


@pytest.mark.parametrize(("function", "stages"), [
    ("load_dit", {"refine"}),  # the DiT's DDIM scheduler
    ("load_sd_turbo", {"enhance"}),  # SD-Turbo's scheduler
])
def test_a_change_to_a_model_loader_rekeys_the_stage_that_uses_it(function, stages):
    assert rekeyed("gridistill.models", with_statement(function, "source = str(source)")) == stages


def test_a_change_to_a_reader_rekeys_the_stage_that_reads_not_the_one_that_wrote():
    # read_embeddings lives in tasks/embed.py, but only select runs it.
    edit = with_statement("read_embeddings", "ref = ref")
    assert rekeyed("gridistill.tasks.embed", edit) == {"select"}


def test_a_change_to_the_wnid_table_rekeys_the_stages_that_label_by_wnid():
    edit = with_statement("imagenet_wnids", "sorted_order = True")
    assert rekeyed("gridistill.distilled_sets", edit) == {"refine", "teacher", "evaluate"}


def test_a_change_to_a_function_no_stage_uses_rekeys_nothing():
    edit = with_statement("read_npz", "path = str(path)")  # gridistill refine's input reader
    assert rekeyed("gridistill.distilled_sets", edit) == set()


def test_moving_unchanged_code_to_another_module_keeps_every_key():
    """As when a module is split: the definition moves, its old module imports it back."""
    grids = ast.parse(real_source("gridistill.tasks.grids"))
    ingest = ast.parse(real_source("gridistill.tasks.ingest"))
    [moved] = [node for node in grids.body if getattr(node, "name", "") == "center_crop_square"]
    grids.body.remove(moved)
    moved_import = "from gridistill.tasks.ingest import center_crop_square"
    grids.body.insert(0, ast.parse(moved_import).body[0])
    ingest.body.append(moved)
    assert versions({"gridistill.tasks.grids": ast.unparse(grids),
                     "gridistill.tasks.ingest": ast.unparse(ingest)}) == versions()


def test_the_stage_machinery_and_its_decorator_arguments_are_not_stage_code():
    assert not any(name.startswith("gridistill.stages:") for compute in STAGES.values()
                   for name in CodeIndex().definitions([compute]))
    source = real_source("gridistill.tasks.grids")
    assert '@stage_task("grids")' in source
    edited = source.replace('@stage_task("grids")', '@stage_task("grids", retries=5)')
    assert versions({"gridistill.tasks.grids": edited}) == versions()


def test_how_a_stage_runs_is_marked_out_of_its_key_on_the_field():
    from gridistill.stages import NotInKey
    from gridistill.tasks.embed import EmbedParams
    from gridistill.tasks.enhance import EnhanceParams
    from gridistill.tasks.evaluate import EvalParams
    from gridistill.tasks.grids import GridParams
    from gridistill.tasks.load import LoadParams
    from gridistill.tasks.refine import RefineParams
    from gridistill.tasks.select import SelectParams
    from gridistill.tasks.teacher import TeacherParams

    def not_in_key(model) -> set[str]:
        return {name for name, field in model.model_fields.items() if NotInKey in field.metadata}

    assert {model.__name__: not_in_key(model) for model in (
        LoadParams, EmbedParams, SelectParams, GridParams, EnhanceParams, RefineParams,
        TeacherParams, EvalParams)} == {
        "LoadParams": set(), "EmbedParams": {"device", "batch_size", "num_workers", "progress"},
        "SelectParams": set(), "GridParams": set(), "EnhanceParams": {"device", "progress"},
        "RefineParams": {"device", "batch_size", "progress"},
        "TeacherParams": {"device", "progress"}, "EvalParams": {"device", "progress"}}


def test_the_process_wide_version_is_the_index_of_the_files():
    compute = STAGES["grids"]
    assert code_version(compute) == CodeIndex().version([compute])
    assert "gridistill.tasks.grids:assemble_grid" in code_definitions(compute)


@pytest.fixture
def edited_code(monkeypatch):
    """Stage keys computed, for this test, as if the given modules had the given sources."""
    import gridistill.stages as stages

    def use(sources: dict[str, str]) -> None:
        monkeypatch.setattr(stages, "_CODE", CodeIndex(sources))
        code_version.cache_clear()
        code_definitions.cache_clear()

    yield use
    code_version.cache_clear()
    code_definitions.cache_clear()


@pytest.mark.slow
def test_a_rerun_after_comment_edits_is_cached_and_a_crop_change_recomputes_the_evaluations(
        prefect_harness, tiny_dataset, tmp_path, edited_code):
    from test_flow import statuses, tiny_config

    from gridistill.flows.dag import build_dag
    from gridistill.flows.distill import distill

    config = tiny_config(tiny_dataset, str(tmp_path / "run"))
    # The stages of the run's own DAG, as statuses() names them (label up to the method).
    store_stages = {node.label.split(":")[0] for node in build_dag(config).nodes}
    distill(config)
    edited_code({module: reworded_docstrings(reworded_comments(real_source(module)))
                 for module in modules_reached()})
    distill(config)
    store = RunStore(config.out)
    assert statuses(store) == {stage: {"Cached"} for stage in store_stages}
    edited_code({"gridistill.tasks.augment": with_statement("sample_crop_box", "p_align = 0.0")(
        real_source("gridistill.tasks.augment"))})
    distill(config)
    assert statuses(store) == {stage: {"Completed" if stage == "evaluate" else "Cached"}
                               for stage in store_stages}
