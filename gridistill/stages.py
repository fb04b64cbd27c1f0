"""What every stage task shares: artifact references, content keys, caching, timing.

A stage is a function ``compute(store, folder, scope, params, upstream) -> metadata`` that
writes its outputs under ``folder``. :func:`stage_task` turns it into a Prefect task that

- derives the artifact key from the stage name, the source of the stage's module (code
  version), the parameters that affect the result, and the upstream artifact keys;
- returns the committed artifact at once when the run root already has it;
- otherwise computes, then commits (marker last, so a crash never leaves a "finished" folder);
- recomputes when called with ``force=True`` (a UI rerun "from this stage"), in place;
- uses the same key as Prefect's cache key, so a rerun reports every finished task as
  ``Cached``. (An artifact deleted by hand behind Prefect's back needs a refreshed run.)
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from pydantic import BaseModel, Field

import gridistill
from gridistill.storage import RunStore, content_key, validate_key_part

# Parameters that change how fast a stage runs, never what it produces.
NON_KEY_FIELDS = frozenset({"device", "batch_size", "progress", "num_workers"})


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


@functools.cache
def module_version(module_name: str) -> str:
    """The code version of a stage: a hash of its module's source and the package version."""
    source = inspect.getsource(importlib.import_module(module_name))
    return hashlib.sha256(f"{gridistill.__version__}\n{source}".encode()).hexdigest()[:12]


def key_params(params: BaseModel) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude=set(NON_KEY_FIELDS))


def stage_key(stage: str, version: str, scope: str, params: BaseModel,
              upstream: Sequence[ArtifactRef]) -> str:
    return content_key(stage, version, scope, key_params(params), [u.key for u in upstream])


def stage_folder(stage: str, scope: str, key: str) -> str:
    return f"{stage}/{validate_key_part(scope)}/{key}"


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run (e.g. `.fn(...)` in a unit test)
        return logging.getLogger("gridistill")


StageCompute = Callable[[RunStore, str, str, Any, list[ArtifactRef]], dict[str, Any]]


def run_stage(stage: str, compute: StageCompute, store: StoreSpec, scope: str, params: BaseModel,
              upstream: Sequence[ArtifactRef], force: bool = False) -> ArtifactRef:
    """Return the committed artifact for these inputs, computing it only if missing (or if
    ``force``: then the folder is un-committed first, so a crash mid-way leaves it unfinished)."""
    version = module_version(compute.__module__)
    key = stage_key(stage, version, scope, params, upstream)
    folder = stage_folder(stage, scope, key)
    run_store = store.open()
    log = stage_logger()
    if force:
        run_store.uncommit(folder)
    elif (committed := run_store.commit_if_any(folder)) is not None:
        log.info("%s[%s]: reusing %s", stage, scope, run_store.url(folder))
        return ArtifactRef(stage=stage, scope=scope, key=key, folder=folder,
                           meta=committed.get("meta", {}))
    started = time.perf_counter()
    meta = compute(run_store, folder, scope, params, list(upstream))
    seconds = time.perf_counter() - started
    run_store.commit(folder, {
        "stage": stage, "scope": scope, "key": key, "code_version": version,
        "params": key_params(params), "upstream": [u.key for u in upstream],
        "seconds": seconds, "meta": meta,
    })
    log.info("%s[%s]: computed in %.2fs -> %s", stage, scope, seconds, run_store.url(folder))
    return ArtifactRef(stage=stage, scope=scope, key=key, folder=folder, meta=meta, seconds=seconds)


def _cache_key(stage: str, compute: StageCompute) -> Callable[[TaskRunContext, dict], str]:
    def cache_key(context: TaskRunContext, parameters: Mapping[str, Any]) -> str:
        if parameters.get("force"):
            return f"forced-{uuid.uuid4().hex}"  # never found, so Prefect runs the task
        store: StoreSpec = parameters["store"]
        key = stage_key(stage, module_version(compute.__module__), parameters["scope"],
                        parameters["params"], parameters["upstream"])
        # The run root is part of the key: the same inputs in another root are another artifact.
        return content_key(store.root, key)

    return cache_key


def retry_unless_bad_data(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry storage and other transient failures, but not a
    ``ValueError`` (bad input data, e.g. a class with no usable image): it would only fail
    again, after the retry delays."""
    return not isinstance(state.data, ValueError)


def stage_task(stage: str, *, retries: int = 2, tags: Sequence[str] = ()) -> Callable:
    """Decorate a stage's compute function into a cached Prefect task (see module doc)."""

    def decorate(compute: StageCompute):
        def run(store: StoreSpec, scope: str, params: BaseModel, upstream: list[ArtifactRef],
                force: bool = False) -> ArtifactRef:
            return run_stage(stage, compute, store, scope, params, upstream, force)

        run.__name__ = run.__qualname__ = compute.__name__
        run.__module__, run.__doc__ = compute.__module__, compute.__doc__
        return task(
            name=stage,
            task_run_name=f"{stage}[{{scope}}]",
            cache_key_fn=_cache_key(stage, compute),
            persist_result=True,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=[2, 10, 30][:retries] or 0,
            retry_condition_fn=retry_unless_bad_data,
            # Tags are opt-in: Prefect 3.8 asks the server for a concurrency lease for every
            # tagged task run (~40-120 ms each, measured in benchmarks/fanout.py).
            tags=list(tags),
        )(run)

    return decorate
