"""What the audit sinks' worker threads spend is counted per sink (``sinks.base.in_worker_thread``):
the audit log's cost paid outside its build passes."""

from __future__ import annotations

import threading
import time

import pytest

from authz_server.audit.sinks.base import in_worker_thread


class Account:
    cpu_seconds = 0.0


def _spin(seconds: float) -> str:
    ends = time.thread_time() + seconds
    while time.thread_time() < ends:
        pass
    return threading.current_thread().name


async def test_the_work_runs_off_the_loop_and_its_cpu_is_counted() -> None:
    account = Account()
    ran_in = await in_worker_thread(account, _spin, 0.02)
    assert ran_in != threading.current_thread().name
    assert account.cpu_seconds >= 0.02
    await in_worker_thread(account, _spin, 0.02)
    assert account.cpu_seconds >= 0.04, "a second batch adds to the first"


async def test_work_that_fails_is_counted_and_its_error_reaches_the_caller() -> None:
    account = Account()

    def fails() -> None:
        _spin(0.01)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await in_worker_thread(account, fails)
    assert account.cpu_seconds >= 0.01
