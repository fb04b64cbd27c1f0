"""One-off server setup before ``prefect deploy --all``: work pools, the GPU limit, and the
result-storage block. Idempotent, so it is safe in a container entrypoint or CI.

    python -m deployments.setup --gpu-slots 1 \\
        --results-url s3://gridistill-results/prefect \\
        --storage-option endpoint_url=http://minio:9000

Credentials never go here: s3fs reads them from the environment / the AWS chain on each
process that touches the bucket.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.filesystems import RemoteFileSystem

POOLS = ("cpu", "gpu")
GPU_LIMIT = "gpu"
RESULTS_BLOCK = "gridistill-results"


def ensure_work_pools(pools: tuple[str, ...] = POOLS) -> None:
    """Process work pools: each worker runs a flow run as a subprocess of its own."""
    with get_client(sync_client=True) as client:
        for name in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:
                pass


def ensure_gpu_limit(slots: int, name: str = GPU_LIMIT) -> None:
    """The global concurrency limit GPU segments hold a slot of: one slot per GPU."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots))
        else:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=slots))


def save_results_block(url: str, storage_options: dict[str, Any],
                       name: str = RESULTS_BLOCK) -> str:
    """A RemoteFileSystem block for Prefect's cached results; returns its slug for
    ``DistillConfig.result_storage`` or ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``."""
    RemoteFileSystem(basepath=url, settings=storage_options).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def save_aws_credentials_block(name: str, access_key_id: str, secret_access_key: str) -> None:
    """A Secret block that workers load into their environment (``aws_credentials_block``)."""
    Secret(value={"aws_access_key_id": access_key_id,
                  "aws_secret_access_key": secret_access_key}).save(name, overwrite=True)


def _option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.setup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-slots", type=int, default=1,
                        help="size of the 'gpu' concurrency limit: GPUs serving the gpu pool")
    parser.add_argument("--results-url", help="fsspec URL for Prefect's cached results")
    parser.add_argument("--storage-option", action="append", type=_option, default=[],
                        metavar="KEY=VALUE", help="fsspec option for --results-url (repeatable)")
    args = parser.parse_args(argv)
    ensure_work_pools()
    ensure_gpu_limit(args.gpu_slots)
    print(f"work pools {', '.join(POOLS)}; concurrency limit {GPU_LIMIT}={args.gpu_slots}")
    if args.results_url:
        slug = save_results_block(args.results_url, dict(args.storage_option))
        print(f"result storage block {slug} -> {args.results_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
