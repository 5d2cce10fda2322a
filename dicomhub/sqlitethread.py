"""One sqlite3 connection owned by one thread, driven from asyncio.

Both the hub's store and the watcher's outbox write through this: a whole
transaction is one Python function run on the connection's own thread, so it
costs one thread hop however many statements it holds, and the event loop
never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def connect(path: Path) -> sqlite3.Connection:
    """WAL, so readers never wait for the writer; synchronous=FULL, so a commit is
    on disk before anyone is told it happened."""
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA foreign_keys=ON")
    return con


class SQLiteThread:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._con: sqlite3.Connection | None = None

    async def open(self, path: Path) -> sqlite3.Connection:
        self._con = await self.run(connect, path)
        return self._con

    async def close(self) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            await self.run(con.close)
        self._executor.shutdown(wait=True)

    @property
    def con(self) -> sqlite3.Connection:
        assert self._con is not None, "database is not open"
        return self._con

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the connection's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(con)` inside BEGIN IMMEDIATE … COMMIT; roll back if it raises."""
        return await self.run(self._in_transaction, fn)

    def _in_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            result = fn(con)
            con.execute("COMMIT")
            return result
        except BaseException:
            con.execute("ROLLBACK")
            raise
