"""The task that turns quiet series stable, driven by the pure StabilityTracker.

At start it loads every series still `receiving` from the store, so the quiet
period holds across a hub restart: a series whose last instance came before
the restart becomes stable on time, and none stays receiving forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from dicomhub.aio import stop_task

from .stability import StabilityTracker
from .store import Change, Store

log = logging.getLogger("dicomhub.hub")


class SeriesMonitor:
    def __init__(self, store: Store, stable_after: float,
                 publish: Callable[[Sequence[Change]], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.publish, self.clock = store, publish, clock
        self.tracker = StabilityTracker(stable_after)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for uid, last_seen in await self.store.receiving_series():
            self.tracker.touch(uid, last_seen)
        self._task = asyncio.create_task(self._run(), name="series-monitor")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    def touch(self, touched: Mapping[str, float]) -> None:
        for uid, last_seen in touched.items():
            self.tracker.touch(uid, last_seen)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            deadline = self.tracker.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            now = self.clock()
            due = self.tracker.due(now)
            if not due:
                continue
            try:
                changes = await self.store.mark_stable(due, now, self.tracker.stable_after)
            except Exception:
                log.exception("marking %d series stable failed; retrying in 1 s", len(due))
                for uid in due:  # put them back: a transient store error must not strand them
                    self.tracker.touch(uid, now + 1.0 - self.tracker.stable_after)
                continue
            if changes:
                log.info("%d series became stable", len(changes))
                self.publish(changes)
