"""Small asyncio helpers."""

from __future__ import annotations

import asyncio

from dicomhub.aio import cancelled_quietly


async def test_a_lost_cancellation_is_noticed() -> None:
    async def retrying() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # what a library that converts or swallows it looks like
            cancelled_quietly()

    task = asyncio.create_task(retrying())
    await asyncio.sleep(0)
    task.cancel()
    try:
        await asyncio.wait_for(task, 5)
    except asyncio.CancelledError:
        pass
    assert task.cancelled()
