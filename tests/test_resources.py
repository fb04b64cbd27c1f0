"""Out-of-memory handling of batched stages, with OOM simulated deterministically."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import torch

import gridistill.resources as resources
from gridistill.resources import BatchLimit, is_out_of_memory, run_in_batches


class FakeDevice:
    """Runs a batch only when it fits ``capacity`` items; records every attempted size."""

    def __init__(self, capacity: int, error: type[Exception] = torch.cuda.OutOfMemoryError):
        self.capacity, self.error, self.attempts = capacity, error, []

    def __call__(self, batch: Sequence[int]) -> list[int]:
        self.attempts.append(len(batch))
        if len(batch) > self.capacity:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [2 * x for x in batch]


@pytest.fixture
def frees(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(resources, "free_accelerator_memory", lambda: calls.append(1))
    return calls


def test_oom_halves_the_batch_retries_and_keeps_the_smaller_size(frees, caplog):
    device = FakeDevice(capacity=3)
    with caplog.at_level(logging.WARNING, logger="gridistill.resources"):
        batches = run_in_batches(device, list(range(10)), 8, what="embed[alpha]")
    assert [x for batch in batches for x in batch] == [2 * x for x in range(10)]
    # 8 fails, 4 fails, 2 fits; the rest of the items stay at 2 (the last slice is what is left).
    assert device.attempts == [8, 4, 2, 2, 2, 2, 2]
    assert len(frees) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "embed[alpha]: out of memory at batch size 8" in warnings[0]
    assert "retrying at 2" in warnings[1]


def test_a_shared_limit_carries_the_halving_over_to_later_calls(frees, caplog):
    device, limit = FakeDevice(capacity=2), BatchLimit(8)
    with caplog.at_level(logging.WARNING, logger="gridistill.resources"):
        first = run_in_batches(device, list(range(8)), limit)
        second = run_in_batches(device, list(range(8, 16)), limit)
    assert [x for batch in first + second for x in batch] == [2 * x for x in range(16)]
    assert limit.size == 2 and device.attempts == [8, 4, 2, 2, 2, 2] + [2] * 4
    assert len(caplog.records) == 2  # the second call did not run out of memory again


def test_no_oom_means_no_retry(frees):
    device = FakeDevice(capacity=100)
    assert run_in_batches(device, list(range(5)), 2) == [[0, 2], [4, 6], [8]]
    assert device.attempts == [2, 2, 1] and frees == []


def test_oom_at_the_minimum_batch_size_fails_the_class(frees):
    device = FakeDevice(capacity=1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_in_batches(device, list(range(8)), 8, min_batch_size=2)
    assert device.attempts == [8, 4, 2]


def test_other_errors_are_not_retried(frees):
    device = FakeDevice(capacity=1, error=ValueError)
    with pytest.raises(ValueError):
        run_in_batches(device, list(range(8)), 8)
    assert device.attempts == [8] and frees == []


def test_a_real_cpu_allocation_failure_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: refused by the allocator, never touched
    assert is_out_of_memory(info.value)
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(MemoryError())


def test_empty_input_and_invalid_sizes():
    assert run_in_batches(FakeDevice(1), [], 4) == []
    for batch_size, min_batch_size in [(0, 1), (4, 0), (4, 5)]:
        with pytest.raises(ValueError, match="min_batch_size"):
            run_in_batches(FakeDevice(1), [1], batch_size, min_batch_size=min_batch_size)


def test_free_accelerator_memory_runs_without_a_gpu():
    resources.free_accelerator_memory()  # no CUDA/MPS here: only a garbage collection
