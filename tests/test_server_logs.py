"""The server-log check tolerates only writes that SQLite locked out and that Prefect retries."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_logs import server_log_problem

LOCKED = "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked\n"
TRACEBACK = 'Traceback (most recent call last):\n  File "session.py", line 449, in execute\n'
INFO = "21:16:48.001 | INFO    | prefect.server - Scheduled 3 runs\n"


def record(logger: str, message: str, error: str) -> str:
    return f"21:16:49.102 | ERROR   | {logger} - {message}\n{TRACEBACK}{error}"


def problem_in(tmp_path: Path, *records: str) -> str | None:
    log = tmp_path / "server.log"
    log.write_text("".join(records))
    return server_log_problem(log)


@pytest.mark.parametrize("logger, message", [
    ("docket.dependencies", "↩ [ 60280ms] mark_work_queues_ready(polled_work_queue_ids=...)"),
    ("prefect.server.utilities.worker_channel", "Worker channel heartbeat persistence failed"),
    ("prefect.server.services.task_run_recorder",
     "Error flushing 1 events (1 to retry, 0 dropped)"),
])
def test_a_retried_write_that_sqlite_locked_out_is_tolerated(
        tmp_path: Path, logger: str, message: str) -> None:
    assert problem_in(tmp_path, INFO, record(logger, message, LOCKED), INFO) is None


@pytest.mark.parametrize("logger, message, error", [
    # docket.worker logs the attempt that ends a task: no retry follows it.
    ("docket.worker", "↩ [ 60280ms] mark_work_queues_ready(...)", LOCKED),
    # A retried attempt that failed for another reason than the lock.
    ("docket.dependencies", "↩ [ 12ms] mark_work_queues_ready(...)", "KeyError: 'id'\n"),
    ("prefect.server.services.scheduler", "Unexpected error in: Scheduler", LOCKED),
    # The recorder gave up on some of the batch's events.
    ("prefect.server.services.task_run_recorder", "Error flushing 3 events (1 to retry, 2 dropped)",
     LOCKED),
    ("prefect.server.services.task_run_recorder", "Dropping event 5f1c after 4 failed attempts",
     LOCKED),
])
def test_any_other_error_record_is_reported(
        tmp_path: Path, logger: str, message: str, error: str) -> None:
    failing = record(logger, message, error)
    assert problem_in(tmp_path, INFO, failing, INFO) == failing


def test_a_log_without_errors_or_no_log_at_all_passes(tmp_path: Path) -> None:
    assert problem_in(tmp_path, INFO, INFO) is None
    assert server_log_problem(tmp_path / "absent.log") is None
