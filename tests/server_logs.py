"""A Prefect server's log, read for what the server does not report otherwise: it logs a failing
background service (the scheduler, say) and carries on. Every fixture that starts a server
(the harness in conftest.py, the stack in test_orchestration_e2e.py) fails on one."""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A server log's records start with Prefect's "HH:MM:SS.mmm | LEVEL |" or uvicorn's "ERROR:".
LOG_RECORD = re.compile(r"^(?:\d\d:\d\d:\d\d\.\d+ \| |ERROR:)", re.MULTILINE)
LOG_PROBLEM = re.compile(r"^\S+ \| ERROR|^ERROR:|^Traceback \(most recent call last\)",
                         re.MULTILINE)
# Prefect on SQLite (here; the compose file runs Postgres) logs a write that lost the race for
# SQLite's one writer, then retries it: the worker channel reconnects and heartbeats again 30 s
# later, docket's Retry and Perpetual log each failed attempt of a background task (marking
# polled work queues ready, say) under "docket.dependencies" before they reschedule it, and the
# task-run recorder puts a batch it could not flush back on its queue (it logs "Dropping event"
# for one it gives up on, and that still counts). The attempt that ends a docket task is logged
# by "docket.worker" and still counts. Only these records, ending in "database is locked", are
# tolerated.
TRANSIENT_SQLITE_ERRORS = re.compile("|".join((
    r"prefect\.server\.api\.workers - Worker channel setup failed due to a transient server error",
    r"prefect\.server\.utilities\.worker_channel - Worker channel heartbeat persistence failed",
    r"docket\.dependencies - ↩ ",
    r"prefect\.server\.services\.task_run_recorder - Error flushing \d+ events "
    r"\(\d+ to retry, 0 dropped\)",
)))


def server_log_problem(log: Path) -> str | None:
    """The server log's first error record or traceback, or None. The server logs a failing
    background service (the scheduler, say) and carries on, so only its log shows it."""
    text = log.read_text(errors="replace") if log.exists() else ""
    starts = [0, *(match.start() for match in LOG_RECORD.finditer(text)), len(text)]
    for start, end in itertools.pairwise(starts):
        record = text[start:end]
        transient = (TRANSIENT_SQLITE_ERRORS.search(record) is not None
                     and "(sqlite3.OperationalError) database is locked" in record)
        if LOG_PROBLEM.search(record) and not transient:
            return record[:4000]
    return None


@contextmanager
def children_write_to(log: Path) -> Iterator[None]:
    """This process's stdout and stderr descriptors point at ``log`` inside the block, so a
    child started there (the harness's server) writes to it for good; restored on exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        for descriptor, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, descriptor)
            os.close(copy)
