"""Fan-out of change-log entries to live clients, and wake-ups for long polls.

Publishing never waits for a client: each message is put on every client's
bounded queue without awaiting, and a task per client drains its own queue
onto its socket. A client whose queue is full is too slow; it is cut off and
told the last seq it was sent, so it can resume from there. Ingest and the
other clients never notice it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dicomhub.aio import stop_task

from .mask import mask
from .store import Change, Store, iso

log = logging.getLogger("dicomhub.hub")

# Messages a client may fall behind before it is cut off: more than one batch can
# produce (1,000 records, each a rejection or a series change), so a client that
# keeps up is never cut off by a single large batch.
QUEUE_LIMIT = 5000
STATS_INTERVAL = 1.0
TAIL_POLL = 1.0  # seconds; see Feed._tail


class Client:
    """One live subscriber: its queue and what it was last sent."""

    def __init__(self, on_overflow: Callable[[Client], None], limit: int = QUEUE_LIMIT,
                 masked: bool = False) -> None:
        self.queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue(limit)
        self.on_overflow = on_overflow
        self.masked = masked  # sees patients masked (phi_display = "masked", read role)
        self.overflowed = False
        self.last_sent = 0

    def offer(self, seq: int, text: str) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait((seq, text))
        except asyncio.QueueFull:
            self.overflowed = True
            self.on_overflow(self)


def encode(change: Change) -> str:
    return json.dumps(change.to_json(), ensure_ascii=False, separators=(",", ":"))


class Feed:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time,
                 masked: bool = False) -> None:
        self.store, self.clock, self.masked = store, clock, masked
        self.mask_secret: bytes | None = None  # set at start when phi_display = "masked"
        self.clients: set[Client] = set()
        self.last_seq = 0
        self._changed = asyncio.Event()
        self._stats_task: asyncio.Task[None] | None = None
        self._tail_task: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        # Called after changes read from a shared log (other hubs' among them).
        self.on_changes: Callable[[], None] | None = None
        self._previous: tuple[float, int, int] | None = None  # time, files, rejections

    async def start(self) -> None:
        self.last_seq = await self.store.last_seq()
        if self.masked:
            secret = await self.store.setting("mask_secret")
            assert secret is not None, "the schema migration makes the mask secret"
            self.mask_secret = bytes.fromhex(secret)
        self._stats_task = asyncio.create_task(self._stats_loop(), name="feed-stats")
        if self.store.shared:
            await self.store.listen_changes(self._poke.set)
            self._tail_task = asyncio.create_task(self._tail(), name="feed-tail")

    async def stop(self) -> None:
        await stop_task(self._tail_task)
        await stop_task(self._stats_task)

    def publish(self, changes: Sequence[Change]) -> None:
        """Called after each commit, in seq order; never blocks. With a shared store
        it only wakes the tail: the log, not this hub's commits, sets the order."""
        if self.store.shared:
            self._poke.set()
            return
        self._deliver(changes)

    async def _tail(self) -> None:
        """With several hubs on one database, every hub sends its clients what the
        change log holds, in seq order, whoever committed it. The store's `changes`
        never skips a seq that is yet to commit, so reading after the last one
        sent leaves no gap; a wake-up from any hub's commit, or TAIL_POLL without
        one (should a notification be lost), starts a read."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TAIL_POLL):
                    await self._poke.wait()
            self._poke.clear()
            try:
                while True:
                    changes = await self.store.changes(self.last_seq, 1000)
                    if changes:
                        self._deliver(changes)
                        if self.on_changes is not None:
                            self.on_changes()
                    if len(changes) < 1000:
                        break
            except Exception:
                log.exception("reading the change log failed; retrying")

    def _deliver(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        for change in changes:
            text = encode(change)
            masked = None  # made once per change, and only if someone needs it
            for client in list(self.clients):
                if client.masked:
                    masked = masked or self.encode(change, True)
                    client.offer(change.seq, masked)
                else:
                    client.offer(change.seq, text)
        self.last_seq = max(self.last_seq, changes[-1].seq)
        # Wake every long poll: swap in a fresh event so later waiters wait anew.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_after(self, seq: int, timeout: float) -> bool:
        """Wait until a change after `seq` exists or `timeout` passes; True if one does."""
        deadline = self.clock() + timeout
        while self.last_seq <= seq:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        return True

    # live clients -------------------------------------------------------------

    def encode(self, change: Change, masked: bool) -> str:
        if masked and self.mask_secret is not None:
            return json.dumps(mask(change.to_json(), self.mask_secret), ensure_ascii=False,
                              separators=(",", ":"))
        return encode(change)

    def masks(self, role: str) -> bool:
        """Does a caller with this role see patients masked?"""
        return self.mask_secret is not None and role != "admin"

    def subscribe(self, on_overflow: Callable[[Client], None], masked: bool = False) -> Client:
        client = Client(on_overflow, masked=masked)
        self.clients.add(client)
        return client

    def unsubscribe(self, client: Client) -> None:
        self.clients.discard(client)

    async def replay(self, since: int, send: Callable[[int, str], Awaitable[None]],
                     masked: bool = False) -> int:
        """Send every logged change after `since`, oldest first; return the last seq sent.

        Call after subscribing: whatever commits during the replay is then both
        in the log and in the client's queue, and the caller drops the copies
        with seq <= the returned value. So there is no gap and no duplicate.
        """
        last = since
        while True:
            changes = await self.store.changes(last, 1000)
            for change in changes:
                await send(change.seq, self.encode(change, masked))
                last = change.seq
            if len(changes) < 1000:
                return last

    # stats --------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            if not self.clients:
                self._previous = None
                continue
            try:
                text = json.dumps(await self.stats(), ensure_ascii=False,
                                  separators=(",", ":"))
            except Exception:
                log.exception("computing live stats failed")
                continue
            for client in list(self.clients):
                client.offer(0, text)

    async def stats(self) -> dict[str, Any]:
        counts = await self.store.stats()
        watchers = await self.store.list_watchers()
        now = self.clock()
        files, rejections = counts["files"], counts["rejections"]
        files_rate = rejections_rate = 0.0
        if self._previous is not None:
            then, old_files, old_rejections = self._previous
            elapsed = max(now - then, 1e-6)
            files_rate = max(0, files - old_files) / elapsed
            rejections_rate = max(0, rejections - old_rejections) / elapsed
        self._previous = (now, files, rejections)
        return {"kind": "stats", "time": iso(now), "files_per_second": round(files_rate, 1),
                "rejections_per_second": round(rejections_rate, 1), **counts,
                "watchers": watchers}
