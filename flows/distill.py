"""The distillation DAG (:mod:`gridistill.flows.dag`) run in one process.

Every node's tasks are started at once under the flow's task runner, each waiting only for
its own inputs; ``flows/pooled.py`` runs the same nodes hop by hop over work pools.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from gridistill.config import DistillConfig
from gridistill.flows.dag import (
    Setup,
    build_dag,
    collect,
    index_and_check,
    report_run,
    submit,
)
from gridistill.stages import StoreSpec
from gridistill.tasks.index import class_names


# No flow or task persists its result: Prefect would pickle it (see gridistill/stages.py).
@flow(name="gridistill-distill", task_runner=ThreadPoolTaskRunner(max_workers=2),
      persist_result=False)
def distill(config: DistillConfig) -> dict[str, Any]:
    """Distil ``config.data`` into ``config.ipc`` grids per class and evaluate them."""
    log = get_run_logger()
    store = StoreSpec(root=config.out, storage_options=config.storage_options)
    setup = Setup(config, config.resolved_device())
    setup.load_models()  # missing weights stop the run here, before any data is read
    dataset = index_and_check(config, store)
    dag = build_dag(config)
    refs, timings = collect(submit(dag, dag.nodes, setup, store, dataset, class_names(dataset)))
    result = report_run(store, config, dataset, refs, timings, setup.notes(),
                        setup.embedder_summary() or config.embedder)
    log.info("report: %s", result["report"])
    return result
