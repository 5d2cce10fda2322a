"""Small asyncio helpers shared by the hub and the watcher."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def cancelled_quietly() -> None:
    """Raise CancelledError if this task was asked to stop but the request got lost.

    On Python 3.11 asyncio.wait_for can swallow a cancellation that arrives as its
    inner call completes, and libraries turn one into their own errors; a loop
    that retries on errors then never stops (a watcher that ignored SIGTERM when
    its hub went away at the same moment). The task still counts the request.
    Loops here wait with asyncio.timeout, which does not lose it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
