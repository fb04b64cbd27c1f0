"""Resource safety for batched stages: out of memory halves the batch instead of failing.

A class whose images do not fit the configured batch (a larger GPU model, a smaller GPU, a
neighbour holding memory) should run slower, not fail. :func:`run_in_batches` calls ``fn`` on
consecutive slices of ``items``; when a slice runs out of memory it frees what it can, halves
the batch size, retries the same slice and keeps the smaller size for the rest of the items.
A stage that calls it once per incoming batch (e.g. per DataLoader batch) passes one
:class:`BatchLimit` to every call, so that a size that ran out of memory is not tried again.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

# Allocation failures that a smaller batch can avoid, by message, for those torch raises as a
# plain RuntimeError: the CPU allocator ("DefaultCPUAllocator: can't allocate memory", seen
# where memory is capped without overcommit) and the MPS backend ("MPS backend out of memory").
_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure that a smaller batch may avoid.

    ``torch.OutOfMemoryError`` (the same class as ``torch.cuda.OutOfMemoryError``) is what
    CUDA raises; CPU and MPS allocation failures are matched by their messages.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def free_accelerator_memory() -> None:
    """Return cached blocks to the device after a failed batch, so the retry can use them."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


@dataclass
class BatchLimit:
    """The batch size still believed to fit; :func:`run_in_batches` lowers it on out of memory.

    Shared by several calls, it carries a halving over to the later calls (one warning, not
    one failed attempt per call).
    """

    size: int


def run_in_batches(fn: Callable[[Sequence[T]], R], items: Sequence[T],
                   batch_size: int | BatchLimit, *, min_batch_size: int = 1,
                   what: str = "batch") -> list[R]:
    """``[fn(items[0:b]), fn(items[b:2b]), ...]``, halving ``b`` on out of memory.

    ``fn`` must be safe to call again on the same slice (no side effects before it returns).
    A slice that runs out of memory at ``min_batch_size`` re-raises the error, as does any
    error that is not an allocation failure. ``what`` names the work in the warning that each
    halving logs (e.g. ``"embed[n01440764]"``). ``batch_size`` given as a :class:`BatchLimit`
    starts from its size and leaves the halved size in it.
    """
    limit = batch_size if isinstance(batch_size, BatchLimit) else BatchLimit(batch_size)
    if limit.size < 1 or not 1 <= min_batch_size <= limit.size:
        raise ValueError(f"need 1 <= min_batch_size <= batch_size, got min_batch_size="
                         f"{min_batch_size}, batch_size={limit.size}")
    results: list[R] = []
    start, size = 0, limit.size
    while start < len(items):
        batch = items[start:start + size]
        try:
            results.append(fn(batch))
        except Exception as exc:
            if size <= min_batch_size or not is_out_of_memory(exc):
                raise
            smaller = max(min_batch_size, size // 2)
            log.warning("%s: out of memory at batch size %d (items %d-%d of %d); retrying at %d. "
                        "%s", what, size, start, start + len(batch) - 1, len(items), smaller,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            size = limit.size = smaller
        else:
            start += len(batch)
            continue
        # Outside the except block: its traceback no longer pins the failed batch's tensors.
        free_accelerator_memory()
    return results
