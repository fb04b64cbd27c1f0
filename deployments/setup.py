"""One-off server setup before ``prefect deploy --all``: work pools and the GPU limit.
Idempotent, so it is safe in a container entrypoint or CI.

    python -m gridistill.deployments.setup --gpu-slots 1

Credentials never go here: s3fs reads them from the environment / the AWS chain on each
process that touches the bucket.
"""

from __future__ import annotations

import argparse

from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

POOLS = ("cpu", "gpu")
GPU_LIMIT = "gpu"


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


def save_aws_credentials_block(name: str, access_key_id: str, secret_access_key: str) -> None:
    """A Secret block that workers load into their environment (``aws_credentials_block``)."""
    Secret(value={"aws_access_key_id": access_key_id,
                  "aws_secret_access_key": secret_access_key}).save(name, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridistill.deployments.setup",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-slots", type=int, default=1,
                        help="size of the 'gpu' concurrency limit: GPUs serving the gpu pool")
    args = parser.parse_args(argv)
    ensure_work_pools()
    ensure_gpu_limit(args.gpu_slots)
    print(f"work pools {', '.join(POOLS)}; concurrency limit {GPU_LIMIT}={args.gpu_slots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
