"""What every stage task shares: artifact references, content keys, caching, timing.

A stage is a function ``compute(store, folder, scope, params, upstream) -> metadata`` that
writes its outputs under ``folder``. :func:`stage_task` turns it into a Prefect task that

- derives the artifact key from the stage name, the version of the code that computes it (see
  below), the parameters that affect the result, and the upstream artifact keys;
- returns the committed artifact at once when the run root already has it, and reports the
  task run as ``Cached``: the commit marker is the only cache, so an artifact deleted by hand
  is recomputed, and a forced rerun's result is what every later run gets back;
- otherwise computes, then commits (marker last, so a crash never leaves a "finished" folder);
- recomputes when called with ``force=True`` (a UI rerun "from this stage"), in place.

The code version is a hash of the definitions the compute function reaches: starting from
it, every module-level function, class and constant of this project that its code names (also
through imports, in any module) is followed, and each is hashed as the code its syntax tree
gives back with docstrings stripped. So comments, docstrings and formatting never re-key an
artifact, nor does moving unchanged code to another module, while a change to a helper in
another module (a crop, a model's preprocessing) re-keys exactly the stages that reach it.
Type annotations are not followed (they are never evaluated), nor is library code: a new
library version does not re-key anything, since re-keying every ImageNet embedding on each
patch release of torch would cost more than the float rounding it guards against. Instead the
commit marker records the versions of the numeric libraries (:data:`NUMERIC_LIBRARIES`), and
reusing an artifact made under other versions logs a warning that names them (once per stage
and change, per process); ``force`` remakes it. The marker also lists the hash of each
definition, so two commits show what changed between them.

Parameters that change how a stage runs but never what it makes are marked on their field
with :data:`NotInKey` (``device: Annotated[str, NotInKey] = "cpu"``) and left out of the key.
A parameter that may name weights on disk (a checkpoint file, a model directory) is marked
:data:`WeightsInKey`: their contents are keyed too, as the dataset's images are, and a hub id
is keyed with the commit it resolves to.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import Completed
from pydantic import BaseModel, Field

from gridistill.key_markers import NotInKey, WeightsInKey
from gridistill.storage import RunStore, content_key, validate_key_part, weights_digest


class StoreSpec(BaseModel):
    """Where the run root lives. Credentials never go here: they come from the environment."""

    root: str
    storage_options: dict[str, Any] = Field(default_factory=dict)

    def open(self) -> RunStore:
        # As JSON: options may nest (``client_kwargs``, ``config_kwargs``), so are unhashable.
        return _open_store(self.root, json.dumps(self.storage_options, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _open_store(root: str, options: str) -> RunStore:
    return RunStore(root, json.loads(options))


class ArtifactRef(BaseModel):
    """A committed stage output, passed between tasks instead of the data itself."""

    stage: str
    scope: str
    key: str
    folder: str
    meta: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0


# -- code versions ---------------------------------------------------------------------------
Definition = tuple[str, str]  # (module, top-level name): the unit that is hashed


def _flatten(body: Sequence[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, also those inside top-level ``if``/``try``/``with`` blocks
    (``if TYPE_CHECKING:`` imports, optional-dependency fallbacks)."""
    for stmt in body:
        if isinstance(stmt, ast.If | ast.With):
            yield from _flatten(stmt.body)
            yield from _flatten(getattr(stmt, "orelse", []))
        elif isinstance(stmt, ast.Try):
            yield from _flatten(stmt.body)
            for handler in stmt.handlers:
                yield from _flatten(handler.body)
            yield from _flatten(stmt.orelse)
            yield from _flatten(stmt.finalbody)
        else:
            yield stmt


def _bound_names(stmt: ast.stmt) -> list[str]:
    """The names a module-level statement defines. ``Image.MAX_IMAGE_PIXELS = ...`` counts
    as defining ``Image``: the setting then goes with every use of ``Image`` in the module."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [stmt.name]
    targets = (stmt.targets if isinstance(stmt, ast.Assign)
               else [stmt.target] if isinstance(stmt, ast.AnnAssign | ast.AugAssign) else [])
    return [node.id for target in targets for node in ast.walk(target)
            if isinstance(node, ast.Name)]


class _ModuleCode:
    """A module's top-level definitions and imports, from its source."""

    def __init__(self, name: str, source: str, is_package: bool) -> None:
        self.package = name if is_package else name.rpartition(".")[0]
        self.bindings: dict[str, list[ast.stmt]] = defaultdict(list)
        self.imports: dict[str, tuple[str, str | None]] = {}  # local name -> (module, attribute)
        tree = ast.parse(source)
        _strip_docstrings(tree)
        for stmt in _flatten(tree.body):
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                self.imports.update(self.imported(stmt))
            else:
                for bound in _bound_names(stmt):
                    self.bindings[bound].append(stmt)

    def imported(self, stmt: ast.Import | ast.ImportFrom) -> dict[str, tuple[str, str | None]]:
        if isinstance(stmt, ast.Import):
            # `import a.b` binds `a`; `import a.b as c` binds `c` to `a.b`.
            return {alias.asname or alias.name.split(".")[0]:
                    (alias.name if alias.asname else alias.name.split(".")[0], None)
                    for alias in stmt.names}
        module = importlib.util.resolve_name("." * stmt.level + (stmt.module or ""),
                                             self.package) if stmt.level else stmt.module
        return {alias.asname or alias.name: (module, alias.name) for alias in stmt.names
                if alias.name != "*"}


class _References(ast.NodeVisitor):
    """The names a definition's code uses: loaded names, ``module.attribute`` pairs and the
    imports inside its functions. Annotations are skipped (never evaluated at run time)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.attributes: set[tuple[str, str]] = set()
        self.imports: list[ast.Import | ast.ImportFrom] = []

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name):
            self.attributes.add((node.value.id, node.attr))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.append(node)

    visit_ImportFrom = visit_Import

    def visit_arg(self, node: ast.arg) -> None:
        pass

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for child in [*node.decorator_list, node.args, *node.body]:
            self.visit(child)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)


def _head(decorator: ast.expr) -> str:
    """The name a decorator starts with (``stage_task`` of ``@stage_task("load")``)."""
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return node.id if isinstance(node, ast.Name) else ""


def _strip_docstrings(tree: ast.AST) -> None:
    """Drop string statements (docstrings, and strings used as comments): they do nothing."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                kept = [s for s in body if not (isinstance(s, ast.Expr)
                                                and isinstance(s.value, ast.Constant)
                                                and isinstance(s.value.value, str))]
                setattr(node, field, kept or [ast.Pass()])


class CodeIndex:
    """Reads the project's modules (once each) and hashes the definitions a root reaches.

    ``sources`` replaces the source of the named modules (to ask what a change would do);
    every other module is read from its file. Only modules of the roots' top-level packages
    and of ``gridistill`` are followed: libraries are not hashed.
    """

    def __init__(self, sources: Mapping[str, str] | None = None) -> None:
        self.sources = dict(sources or {})
        self._modules: dict[str, _ModuleCode | None] = {}

    def module(self, name: str) -> _ModuleCode | None:
        """The parsed module, or None when it is not a project module with a source file."""
        if name not in self._modules:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec else None
            is_package = bool(spec and spec.submodule_search_locations is not None)
            if name in self.sources:
                self._modules[name] = _ModuleCode(name, self.sources[name], is_package)
            elif origin and origin.endswith(".py"):
                self._modules[name] = _ModuleCode(name, Path(origin).read_text(), is_package)
            else:
                self._modules[name] = None
        return self._modules[name]

    def resolve(self, module: str, name: str, packages: frozenset[str]) -> Definition | None:
        """Where ``name`` as seen from ``module`` is defined (following re-exports); None for
        a library, a local or built-in name, and for this module: the stage machinery decides
        where an artifact goes, not what it holds."""
        if (module == __name__ or module.split(".")[0] not in packages
                or (code := self.module(module)) is None):
            return None
        if name in code.bindings:
            return module, name
        source, attribute = code.imports.get(name, (None, None))
        return self.resolve(source, attribute, packages) if source and attribute else None

    def _code(self, code: _ModuleCode, stmt: ast.stmt) -> str:
        """The statement as code: no docstrings, comments or formatting, nor the
        :func:`stage_task` decorator (its retries and tags change no artifact)."""
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.decorator_list:
            stmt = copy.copy(stmt)
            stmt.decorator_list = [d for d in stmt.decorator_list if code.imports.get(
                _head(d), ("", None))[0] != __name__]
        # ast.unparse, not ast.dump: the dump's fields change between Python versions, and
        # workers in different images must agree on keys.
        return ast.unparse(stmt)

    def _definition(self, module: str, name: str, packages: frozenset[str],
                    ) -> tuple[str, list[Definition]]:
        """The hash of one definition's code, and the definitions it uses."""
        code = self.module(module)
        if code is None or name not in code.bindings:
            raise LookupError(f"no top-level definition {name!r} in module {module!r}")
        statements = code.bindings[name]
        digest = hashlib.sha256("\n".join(self._code(code, stmt) for stmt in statements
                                          ).encode()).hexdigest()[:12]
        refs = _References()
        for stmt in statements:
            refs.visit(stmt)
        used = [self.resolve(module, each, packages) for each in refs.names]
        for alias, attribute in refs.attributes:
            target, member = code.imports.get(alias, (None, None))
            if target and member is None:  # `import package.module as alias`
                used.append(self.resolve(target, attribute, packages))
        for stmt in refs.imports:
            used += [self.resolve(source, attribute, packages)
                     for source, attribute in code.imported(stmt).values() if attribute]
        return digest, [definition for definition in used if definition is not None]

    def definitions(self, roots: Sequence[Callable[..., Any]]) -> dict[str, str]:
        """``"module:name"`` -> hash of its code, for every definition the roots reach."""
        packages = frozenset({"gridistill", *(root.__module__.split(".")[0] for root in roots)})
        # A nested function or a method is hashed with the top-level definition holding it.
        pending = [(root.__module__, root.__qualname__.split(".")[0]) for root in roots]
        hashes: dict[str, str] = {}
        while pending:
            module, name = pending.pop()
            if f"{module}:{name}" not in hashes:
                hashes[f"{module}:{name}"], used = self._definition(module, name, packages)
                pending += used
        return dict(sorted(hashes.items()))

    def version(self, roots: Sequence[Callable[..., Any]]) -> str:
        """One hash of the roots' code."""
        return _version(self.definitions(roots))


def _version(definitions: Mapping[str, str]) -> str:
    # By content, not by where each definition lives: moving unchanged code to another module
    # keeps every key.
    return hashlib.sha256("\n".join(sorted(definitions.values())).encode()).hexdigest()[:12]


_CODE = CodeIndex()


@functools.cache
def code_definitions(compute: Callable[..., Any]) -> dict[str, str]:
    """The definitions a stage's code reaches and their hashes (recorded in the commit)."""
    return _CODE.definitions([compute])


@functools.cache
def code_version(compute: Callable[..., Any]) -> str:
    """The code version of a stage: see the module doc."""
    return _version(code_definitions(compute))


# -- library versions --------------------------------------------------------------------------
# The distributions whose numerics go into the artifacts (decoding, resizing, the networks, the
# solvers); recorded in every commit marker and compared when an artifact is reused.
NUMERIC_LIBRARIES = ("numpy", "scipy", "pillow", "torch", "torchvision", "timm", "diffusers",
                     "transformers")


@functools.cache
def library_versions() -> dict[str, str]:
    """The installed version of each of :data:`NUMERIC_LIBRARIES` (those not installed are
    left out)."""
    versions = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def changed_libraries(recorded: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{library: (version recorded, version installed)}`` for each recorded library whose
    installed version differs ("not installed" when it is gone). A marker written before the
    versions were recorded has none, so nothing differs."""
    installed = library_versions()
    return {name: (version, installed.get(name, "not installed"))
            for name, version in sorted(recorded.items())
            if installed.get(name) != version}


_WARNED_LIBRARY_CHANGES: set[tuple[str, tuple[tuple[str, tuple[str, str]], ...]]] = set()


def _warn_if_made_under_other_libraries(stage: str, scope: str, url: str,
                                        recorded: Mapping[str, str]) -> None:
    changes = changed_libraries(recorded)
    if not changes or (stage, tuple(changes.items())) in _WARNED_LIBRARY_CHANGES:
        return
    _WARNED_LIBRARY_CHANGES.add((stage, tuple(changes.items())))
    listed = ", ".join(f"{name} {then} (now {now})" for name, (then, now) in changes.items())
    stage_logger().warning(
        "%s[%s]: reusing %s, made with %s; its numbers may differ in rounding from a fresh "
        "run. A forced rerun from this stage (--force-from, or a rerun in the UI) remakes it "
        "with the installed versions. Said once per stage and change.", stage, scope, url,
        listed)


# -- keys --------------------------------------------------------------------------------------
def _non_key_fields(model: BaseModel) -> dict[str, Any]:
    """Pydantic's ``exclude`` for the fields marked NotInKey, also in nested models."""
    exclude: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        if any(marker is NotInKey for marker in field.metadata):
            exclude[name] = True
        elif isinstance(value := getattr(model, name), BaseModel) and (
                nested := _non_key_fields(value)):
            exclude[name] = nested
    return exclude


def _with_weights_digests(model: BaseModel, dumped: dict[str, Any],
                          storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """``dumped`` with each WeightsInKey field that names weights on disk as
    ``{"path", "sha256"}``, and each that names a hub model as ``{"hub_id", "revision"}`` (the
    commit that would be loaded, so that a new upload re-keys)."""
    from gridistill.models import hub_revision

    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if name not in dumped:
            continue
        if any(marker is WeightsInKey for marker in field.metadata) and isinstance(value, str):
            if (digest := weights_digest(value, storage_options)) is not None:
                dumped[name] = {"path": value, "sha256": digest}
            elif (revision := hub_revision(value)) is not None:
                dumped[name] = {"hub_id": value, "revision": revision}
        elif isinstance(value, BaseModel):
            dumped[name] = _with_weights_digests(value, dumped[name], storage_options)
    return dumped


def key_params(params: BaseModel, storage_options: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
    """The parameters that are part of the artifact key: all but those marked NotInKey, and
    the contents of the weights that WeightsInKey fields name (read with ``storage_options``)."""
    dumped = params.model_dump(mode="json", exclude=_non_key_fields(params))
    return _with_weights_digests(params, dumped, storage_options or {})


def stage_key(stage: str, version: str, scope: str, params: BaseModel,
              upstream: Sequence[ArtifactRef],
              storage_options: Mapping[str, Any] | None = None) -> str:
    return content_key(stage, version, scope, key_params(params, storage_options),
                       [u.key for u in upstream])


def stage_folder(stage: str, scope: str, key: str) -> str:
    return f"{stage}/{validate_key_part(scope)}/{key}"


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run (e.g. `.fn(...)` in a unit test)
        return logging.getLogger("gridistill")


StageCompute = Callable[[RunStore, str, str, Any, list[ArtifactRef]], dict[str, Any]]


def _run_stage(stage: str, compute: StageCompute, store: StoreSpec, scope: str,
               params: BaseModel, upstream: Sequence[ArtifactRef], force: bool,
               ) -> tuple[ArtifactRef, bool]:
    """The artifact, and whether it was already committed."""
    version = code_version(compute)
    key = stage_key(stage, version, scope, params, upstream, store.storage_options)
    folder = stage_folder(stage, scope, key)
    run_store = store.open()
    log = stage_logger()
    if force:
        run_store.uncommit(folder)
    elif (committed := run_store.commit_if_any(folder)) is not None:
        log.info("%s[%s]: reusing %s", stage, scope, run_store.url(folder))
        _warn_if_made_under_other_libraries(stage, scope, run_store.url(folder),
                                            committed.get("libraries", {}))
        return ArtifactRef(stage=stage, scope=scope, key=key, folder=folder,
                           meta=committed.get("meta", {}),
                           seconds=committed.get("seconds", 0.0)), True
    started = time.perf_counter()
    meta = compute(run_store, folder, scope, params, list(upstream))
    seconds = time.perf_counter() - started
    run_store.commit(folder, {
        "stage": stage, "scope": scope, "key": key, "code_version": version,
        "code": code_definitions(compute), "libraries": library_versions(),
        "params": key_params(params, store.storage_options),
        "upstream": [u.key for u in upstream], "seconds": seconds, "meta": meta,
    })
    log.info("%s[%s]: computed in %.2fs -> %s", stage, scope, seconds, run_store.url(folder))
    return ArtifactRef(stage=stage, scope=scope, key=key, folder=folder, meta=meta,
                       seconds=seconds), False


def run_stage(stage: str, compute: StageCompute, store: StoreSpec, scope: str, params: BaseModel,
              upstream: Sequence[ArtifactRef], force: bool = False) -> ArtifactRef:
    """Return the committed artifact for these inputs, computing it only if missing (or if
    ``force``: then the folder is un-committed first, so a crash mid-way leaves it unfinished)."""
    return _run_stage(stage, compute, store, scope, params, upstream, force)[0]


def retry_unless_bad_data(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry storage and other transient failures, but not a
    ``ValueError`` (bad input data, e.g. a class with no usable image): it would only fail
    again, after the retry delays."""
    return not isinstance(state.data, ValueError)


def stage_task(stage: str, *, retries: int = 2, tags: Sequence[str] = ()) -> Callable:
    """Decorate a stage's compute function into a Prefect task (see module doc)."""

    def decorate(compute: StageCompute):
        def run(store: StoreSpec, scope: str, params: BaseModel, upstream: list[ArtifactRef],
                force: bool = False) -> Any:
            ref, reused = _run_stage(stage, compute, store, scope, params, upstream, force)
            context = TaskRunContext.get()
            if reused and context is not None and context.task.fn is run:
                # A state returned by the task body becomes its final state, as it is.
                return Completed(name="Cached", data=ref)
            return ref

        run.__name__ = run.__qualname__ = compute.__name__
        run.__module__, run.__doc__ = compute.__module__, compute.__doc__
        run.compute = compute  # the stage function itself: its code is the key's code version
        return task(
            name=stage,
            task_run_name=f"{stage}[{{scope}}]",
            # The run root's commit markers are the cache (see module doc), not Prefect's; and
            # nothing is persisted, because Prefect pickles a persisted result by default and
            # unpickles it to read it back (the ref is in the run root's marker anyway).
            cache_policy=NO_CACHE,
            persist_result=False,
            retries=retries,
            retry_delay_seconds=[2, 10, 30][:retries] or 0,
            retry_condition_fn=retry_unless_bad_data,
            # Tags are opt-in: Prefect 3.8 asks the server for a concurrency lease for every
            # tagged task run (~40-120 ms each, measured in benchmarks/fanout.py).
            tags=list(tags),
        )(run)

    return decorate
