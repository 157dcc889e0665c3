"""Stopping background tasks: one home for cancel-then-wait."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_all(tasks: list["asyncio.Task[Any]"]) -> None:
    """Cancel every task, wait for each to finish (whatever it raised), and empty the list."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
    tasks.clear()
