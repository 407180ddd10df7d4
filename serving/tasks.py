"""The gateway's background loops (vLLM health, adapter routing, Redis memory): stopping one for sure.

On Python 3.11 a cancellation can be lost: `asyncio.wait_for` (which redis-py's connection pool uses to wait for
a connection) swallows a `cancel()` that arrives as its inner future completes, and a `while True` loop then runs
on. A gateway's shutdown that awaited such a task once hung for good (seen in its tests: one stop in five).
`stop` cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

RECANCEL_S = 0.5


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait for it to end, cancelling it again every RECANCEL_S while it has not."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=RECANCEL_S)
        if not done:
            log.debug("%s went on after its cancellation: cancelling it again", task.get_name())
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s ended with %r", task.get_name(), task.exception())
