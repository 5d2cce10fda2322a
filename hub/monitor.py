"""The task that turns quiet series stable, driven by the pure StabilityTracker.

It loads every series still `receiving` from the store when it starts (and
whenever it takes the lease), so the quiet period holds across a hub restart:
a series whose last instance came before the restart becomes stable on time,
and none stays receiving forever.

With several hubs on one database, one of them holds the lease on the timers
(`Store.lead`); the others check every LEASE_CHECK seconds and the first to
find it free takes over. The leader learns of series other hubs touched from
the change log (`refresh`). The lease is for efficiency only: `mark_stable`
changes a series only if it is still receiving and quiet, in one statement, so
even two leaders at once could not make a series stable twice.
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

LEASE_CHECK = 1.0  # seconds; a dead leader's successor starts within about this


class SeriesMonitor:
    def __init__(self, store: Store, stable_after: float,
                 publish: Callable[[Sequence[Change]], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.publish, self.clock = store, publish, clock
        self.tracker = StabilityTracker(stable_after)
        self.leading = False
        self._stale = True  # reload the receiving series before the next check
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if await self._check_lease():
            await self._reload()
        self._task = asyncio.create_task(self._run(), name="series-monitor")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    def touch(self, touched: Mapping[str, float]) -> None:
        for uid, last_seen in touched.items():
            self.tracker.touch(uid, last_seen)
        self._wake.set()

    def refresh(self) -> None:
        """Other hubs may have touched series: reload them before the next check."""
        if self.store.shared:
            self._stale = True
            self._wake.set()

    async def _check_lease(self) -> bool:
        try:
            leading = await self.store.lead()
        except Exception:
            log.exception("checking the lease on the series timers failed")
            leading = False
        if leading != self.leading and self.store.shared:
            if leading:
                log.info("this hub now runs the series stability timers")
            else:
                log.warning("this hub no longer holds the lease on the series timers")
        self._stale = self._stale or (leading and not self.leading)
        self.leading = leading
        return leading

    async def _reload(self) -> None:
        for uid, last_seen in await self.store.receiving_series():
            self.tracker.touch(uid, last_seen)
        self._stale = False

    async def _run(self) -> None:
        while True:
            deadline = self.tracker.next_deadline() if self.leading else None
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            if self.store.shared:
                timeout = LEASE_CHECK if timeout is None else min(timeout, LEASE_CHECK)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self.store.shared and not await self._check_lease():
                continue
            try:
                if self._stale:
                    await self._reload()
            except Exception:
                log.exception("loading the receiving series failed; retrying")
                continue
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
