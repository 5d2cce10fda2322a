"""One sqlite3 connection owned by one thread, driven from asyncio.

Both the hub's store and the watcher's outbox write through this: a whole
transaction is one Python function run on the connection's own thread, so it
costs one thread hop however many statements it holds, and the event loop
never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .errors import StoreError

T = TypeVar("T")


try:  # SQLCipher, for encryption at rest; optional (pip install dicomhub[encryption])
    import sqlcipher3.dbapi2 as sqlcipher
except ImportError:  # pragma: no cover - depends on the install
    sqlcipher = None

# What either driver raises: code must catch these, not sqlite3's alone.
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,) + (
    (sqlcipher.Error,) if sqlcipher is not None else ())
INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError,) + (
    (sqlcipher.IntegrityError,) if sqlcipher is not None else ())


def open_connection(path: Path, key: str | None = None) -> sqlite3.Connection:
    """A connection, encrypted with SQLCipher when `key` is given.

    Raises StoreError for a wrong key (or a plain file opened with one) and when
    SQLCipher is not installed.
    """
    if key is None:
        con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        con.row_factory = sqlite3.Row
        return con
    if sqlcipher is None:
        raise StoreError("encryption at rest needs SQLCipher: pip install "
                         "'dicomhub[encryption]' (the sqlcipher3-binary package)")
    con = sqlcipher.connect(str(path), isolation_level=None, check_same_thread=False,
                            timeout=30)
    con.row_factory = sqlcipher.Row
    con.execute("PRAGMA key = '" + key.replace("'", "''") + "'")
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlcipher.DatabaseError:
        con.close()
        raise StoreError(f"cannot decrypt {str(path)!r}: wrong encryption key, or the "
                         "file was not made with encryption") from None
    return con  # type: ignore[no-any-return]


def connect(path: Path, key: str | None = None) -> sqlite3.Connection:
    """WAL, so readers never wait for the writer; synchronous=FULL, so a commit is
    on disk before anyone is told it happened."""
    con = open_connection(path, key)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA foreign_keys=ON")
    return con


class SQLiteThread:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._con: sqlite3.Connection | None = None
        self._durable = True  # connect() sets synchronous=FULL

    async def open(self, path: Path, key: str | None = None) -> sqlite3.Connection:
        self._con = await self.run(connect, path, key)
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

    async def transaction(self, fn: Callable[[sqlite3.Connection], T], *,
                          durable: bool = True) -> T:
        """Run `fn(con)` inside BEGIN IMMEDIATE … COMMIT; roll back if it raises.

        `durable=False` commits without waiting for the disk: for a transaction
        whose loss at power failure costs nothing but a repetition. In WAL mode
        such a commit is still atomic and ordered: it can only be lost together
        with every commit after it, up to the next durable one, which makes it
        durable too."""
        return await self.run(self._in_transaction, fn, durable)

    def _in_transaction(self, fn: Callable[[sqlite3.Connection], T],
                        durable: bool = True) -> T:
        con = self.con
        if con.in_transaction:
            # A ROLLBACK that failed (a full disk can refuse even that) left this one
            # open; end it, or every later BEGIN fails and the connection is stuck.
            con.execute("ROLLBACK")
        if durable != self._durable:  # per connection, and set outside transactions
            con.execute("PRAGMA synchronous=" + ("FULL" if durable else "NORMAL"))
            self._durable = durable
        con.execute("BEGIN IMMEDIATE")
        try:
            result = fn(con)
            con.execute("COMMIT")
            return result
        except BaseException:
            # SQLite may have rolled back already (a full disk, an I/O error); the
            # caller must see the original error, not "no transaction is active".
            if con.in_transaction:
                with contextlib.suppress(*DB_ERRORS):
                    con.execute("ROLLBACK")
            raise
