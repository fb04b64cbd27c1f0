"""Imports run one way: core < algorithms and stages (tasks) < flows < deployments, CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> import package (pyproject.toml's package-dir).
PACKAGES = {"gridistill": "gridistill", "tasks": "gridistill.tasks",
            "flows": "gridistill.flows", "deployments": "gridistill.deployments"}
RANKS = {"core": 0, "tasks": 1, "flows": 2, "deployments": 3, "cli": 3}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[:2] in (["gridistill", "tasks"], ["gridistill", "flows"],
                     ["gridistill", "deployments"]):
        return parts[1]
    return "cli" if len(parts) > 1 and parts[1].startswith("cli") else "core"


def project_modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}".removesuffix(".__init__"): path
            for folder, package in PACKAGES.items()
            for path in sorted((REPO / folder).glob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every ``gridistill`` module the file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "gridistill":  # `from gridistill import flows`
                names |= {f"gridistill.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] == "gridistill"}


def test_the_layer_of_a_module_is_read_from_its_name():
    assert [layer(m) for m in ("gridistill.stages", "gridistill.tasks.ssdim",
                               "gridistill.flows.dag", "gridistill.cli_refine",
                               "gridistill.deployments.setup")] == [
        "core", "tasks", "flows", "cli", "deployments"]


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_imports_run_one_way(module: str):
    path = project_modules()[module]
    upward = {name: layer(name) for name in imported(path)
              if RANKS[layer(name)] > RANKS[layer(module)]}
    assert upward == {}, f"{module} ({layer(module)}) imports a higher layer"


def test_one_package_is_installed():
    """The folders install as ``gridistill.*`` only: an installed ``tasks`` or ``flows`` would
    shadow, or be shadowed by, any other project's."""
    import importlib.metadata

    import gridistill.tasks

    top_level = importlib.metadata.distribution("gridistill").read_text("top_level.txt")
    assert (top_level or "").split() == ["gridistill"]
    assert Path(gridistill.tasks.__file__).parent == REPO / "tasks"
