"""Task runners for the per-class fan-out: a thread pool (default), Dask or Ray.

prefect-dask and prefect-ray are optional extras, imported only when asked for, so the
default install never pays for them and a missing extra fails with the command that fixes it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

TaskRunnerKind = Literal["thread", "dask", "ray"]


class MissingExtraError(ImportError):
    """An optional task-runner package is not installed."""


def _import_extra(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"task_runner={extra!r} needs the {module.replace('_', '-')} package, which is not "
            f"installed: pip install -c constraints.txt 'gridistill[{extra}]' (or choose "
            "task_runner='thread')") from exc


def build_task_runner(kind: TaskRunnerKind, *, max_workers: int,
                      address: str | None = None) -> TaskRunner:
    """The task runner for ``kind``.

    ``address`` names an existing cluster (Dask scheduler ``tcp://host:8786``, Ray
    ``ray://host:10001``); without it Dask starts a ``LocalCluster`` and Ray a local instance,
    each with ``max_workers`` single-threaded workers (stage tasks parallelise internally).
    """
    if kind == "thread":
        if address:
            raise ValueError("task_runner='thread' runs in this process: it takes no address")
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind == "dask":
        prefect_dask = _import_extra("prefect_dask", "dask")
        if address:
            return prefect_dask.DaskTaskRunner(address=address)
        return prefect_dask.DaskTaskRunner(
            cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1})
    if kind == "ray":
        prefect_ray = _import_extra("prefect_ray", "ray")
        if address:
            return prefect_ray.RayTaskRunner(address=address)
        return prefect_ray.RayTaskRunner(init_kwargs={"num_cpus": max_workers})
    raise ValueError(f"unknown task runner {kind!r}; choose thread, dask or ray")
