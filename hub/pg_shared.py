"""What hubs sharing one PostgreSQL database have besides the data: the lease on
the series timers, and word of each other's commits.

Each uses a dedicated connection, never a pooled one: a session-level advisory
lock and a LISTEN last exactly as long as their session, and a pool would reset
both whenever it takes a connection back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from dicomhub.aio import stop_task
from watcher.backoff import backoff

log = logging.getLogger("dicomhub.hub")

CHANNEL = "dicomhub_changes"  # NOTIFY payload: the last seq a transaction appended
LEASE_LOCK = 0x6469636F6D680003  # pg_try_advisory_lock key ("dicomhub", then 3)
LEASE_TIMEOUT = 5.0  # a lease check that takes longer counts as a lost lease
CLOSE_TIMEOUT = 10.0

CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

Connect = Callable[[], Awaitable[Any]]  # a new asyncpg connection to the database


async def close_quietly(con: Any) -> None:
    """Close a connection that may already be broken; never raises."""
    if con is None or con.is_closed():
        return
    try:
        await asyncio.wait_for(con.close(), CLOSE_TIMEOUT)
    except CONNECTION_ERRORS:
        con.terminate()


class Lease:
    """The series timers' lease: a session-level advisory lock on a connection of
    its own. It is released when this hub closes, dies, or loses that connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._con: Any = None
        self._held = False
        self._checking = asyncio.Lock()

    async def check(self) -> bool:
        """Keep the lease, or try to take it: True while it is held. Raises the
        connection's errors, after which the lease is not held."""
        async with self._checking:
            try:
                if self._con is None or self._con.is_closed():
                    self._held = False
                    self._con = await self._connect()
                if self._held:  # still connected, so the lock is still ours
                    await self._con.fetchval("SELECT 1", timeout=LEASE_TIMEOUT)
                else:
                    self._held = bool(await self._con.fetchval(
                        "SELECT pg_try_advisory_lock($1)", LEASE_LOCK, timeout=LEASE_TIMEOUT))
                return self._held
            except BaseException:
                # Whether the lock is held is now unknown: drop the connection (and
                # the lock with it), and start afresh next time.
                con, self._con, self._held = self._con, None, False
                if con is not None:
                    con.terminate()
                raise

    async def release(self) -> None:
        con, self._con, self._held = self._con, None, False
        await close_quietly(con)


class ChangeListener:
    """LISTENs on CHANNEL and calls every subscriber's `wake` for each notification.
    A lost connection is made again (with backoff), and then every `wake` is called
    once too: commits may have been missed meanwhile."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._wakes: list[Callable[[], None]] = []
        self._con: Any = None
        self._task: asyncio.Task[None] | None = None

    async def add(self, wake: Callable[[], None]) -> None:
        """Subscribe `wake`; returns once the first subscriber is listening."""
        self._wakes.append(wake)
        if self._task is None:
            lost = asyncio.Event()
            self._con = await self._listen(lost)
            self._task = asyncio.create_task(self._keep_listening(lost), name="pg-listen")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        con, self._con = self._con, None
        await close_quietly(con)

    async def _listen(self, lost: asyncio.Event) -> Any:
        """A new connection LISTENing on CHANNEL, which sets `lost` when it goes."""
        con = await self._connect()
        try:
            con.add_termination_listener(lambda _con: lost.set())
            await con.add_listener(CHANNEL, self._notified)
        except BaseException:
            con.terminate()
            raise
        return con

    def _notified(self, *_notification: Any) -> None:
        for wake in list(self._wakes):
            wake()

    async def _keep_listening(self, lost: asyncio.Event) -> None:
        while True:
            await lost.wait()
            log.warning("lost the connection that hears of other hubs' changes; reconnecting")
            await close_quietly(self._con)
            for delay in backoff():
                lost = asyncio.Event()
                try:
                    self._con = await self._listen(lost)
                    break
                except CONNECTION_ERRORS as exc:
                    log.warning("cannot listen for changes yet (%s); retrying in %.1f s",
                                exc, delay)
                    await asyncio.sleep(delay)
            self._notified()  # whatever committed while we were not listening
