"""The watcher's durable state: the outbox and the memory of delivered files.

Both live in one SQLite file, and a parse result enters the outbox and the
memory in the same transaction. So after any crash either both hold it (the
record waits in the outbox, the file is not parsed again) or neither does
(the file is parsed again). A record leaves the outbox only when the hub has
acknowledged it, which the hub does only after its own commit.

Two writes skip waiting for the disk, because losing them at a power failure
costs only a repetition: removing acknowledged records (they are sent again and
the hub, idempotent, counts them once), and storing records of files this
watcher synced itself under a watched folder (the DICOM listener's): the
start-up walk finds such a file again when its record is gone.

Paths are stored as bytes: file names need not be valid UTF-8.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomhub.errors import DicomhubError
from dicomhub.protocol import Record, record_text
from dicomhub.errors import StoreError
from dicomhub.sqlitethread import DB_ERRORS, SQLiteThread

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " record TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS delivered (path BLOB PRIMARY KEY, size INTEGER NOT NULL,"
    " mtime_ns INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


_OPEN_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, StoreError)


def _create_schema(con: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        con.execute(statement)


class StateError(DicomhubError):
    """The state folder cannot be used (locked by another watcher, unwritable, full)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A parse result to keep: the record (as its JSON text), and the file version it
    came from."""

    path: bytes
    size: int
    mtime_ns: int
    text: str
    remember: bool = True  # False for outcomes worth retrying (e.g. unreadable files)
    # True when the file is this watcher's own, synced under a watched folder: the
    # start-up walk would find it again, so its record may be stored lazily.
    refound: bool = False

    @classmethod
    def of(cls, path: bytes, size: int, mtime_ns: int, record: Record) -> Outcome:
        return cls(path, size, mtime_ns, record_text(record))


class State:
    def __init__(self, folder: Path, key: str | None = None) -> None:
        self.folder = Path(folder)
        self.key = key  # SQLCipher key: the outbox is encrypted at rest
        self._db = SQLiteThread("watcher-state")
        self._lock_fd: int | None = None
        self.backlog = 0
        self._uncertain = False  # a write failed: recount the backlog with the next

    async def open(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"state folder {str(self.folder)!r} is in use by another "
                             "watcher; give each watcher its own state_dir") from None
        except OSError as exc:
            raise StateError(f"state folder {str(self.folder)!r} cannot be used: "
                             f"{exc.strerror}") from None
        try:
            con = await self._db.open(self.folder / "state.sqlite3", self.key)
            await self._db.transaction(_create_schema)
            self.backlog = await self._db.run(
                lambda: con.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except _OPEN_ERRORS as exc:
            raise StateError(f"state database in {str(self.folder)!r} cannot be opened: "
                             f"{exc}") from None

    async def close(self) -> None:
        await self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # identity -----------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self._db.run(
            lambda: self._db.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone())
        return row[0] if row else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._db.transaction(lambda con: con.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)))

    # delivered-file memory ----------------------------------------------------

    async def unchanged(self, files: Sequence[tuple[bytes, int, int]]) -> set[bytes]:
        """Of (path, size, mtime_ns), the paths already handled in exactly that version."""
        def run() -> set[bytes]:
            same = set()
            for path, size, mtime_ns in files:
                row = self._db.con.execute("SELECT size, mtime_ns FROM delivered WHERE path = ?",
                                       (path,)).fetchone()
                if row is not None and row[0] == size and row[1] == mtime_ns:
                    same.add(path)
            return same

        return await self._db.run(run)

    # outbox -------------------------------------------------------------------

    async def put(self, outcomes: Iterable[Outcome]) -> int:
        """Store outcomes in the outbox and the memory, in one transaction."""
        rows = list(outcomes)

        def run(con: sqlite3.Connection) -> int:
            for outcome in rows:
                con.execute("INSERT INTO outbox (record) VALUES (?)", (outcome.text,))
                if outcome.remember:
                    con.execute("INSERT OR REPLACE INTO delivered (path, size, mtime_ns)"
                                " VALUES (?, ?, ?)",
                                (outcome.path, outcome.size, outcome.mtime_ns))
                else:
                    con.execute("DELETE FROM delivered WHERE path = ?", (outcome.path,))
            return len(rows)

        added, count = await self._write(run, durable=not all(o.refound for o in rows))
        self.backlog = self.backlog + added if count is None else count
        return added

    async def _write(self, run: Callable[[sqlite3.Connection], int], *,
                     durable: bool = True) -> tuple[int, int | None]:
        """Run a write transaction: its result, and the outbox's size when it had to
        be counted. After a failed write it is counted with the next that succeeds:
        on a full disk SQLite can report an error for a commit that did reach the
        file, so the count kept in memory may be off."""
        recount = self._uncertain

        def write(con: sqlite3.Connection) -> tuple[int, int | None]:
            result = run(con)
            count = con.execute("SELECT count(*) FROM outbox").fetchone()[0] if recount \
                else None
            return result, count

        try:
            result, count = await self._db.transaction(write, durable=durable)
        except DB_ERRORS as exc:
            self._uncertain = True
            raise StateError(f"cannot write to the state folder {str(self.folder)!r}: "
                             f"{exc}{_diagnosis(self.folder)}") from None
        self._uncertain = False
        return result, count

    async def pending(self, after_id: int, limit: int) -> list[tuple[int, str]]:
        """Outbox rows after `after_id`, oldest first, as (id, record JSON)."""
        try:
            return await self._db.run(lambda: self._db.con.execute(
                "SELECT id, record FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall())
        except DB_ERRORS as exc:
            raise StateError(f"cannot read the outbox in {str(self.folder)!r}: "
                             f"{exc}{_diagnosis(self.folder)}") from None

    async def acknowledge(self, first_id: int, last_id: int) -> int:
        """Drop acknowledged records; return how many left the outbox."""
        def run(con: sqlite3.Connection) -> int:
            return con.execute("DELETE FROM outbox WHERE id BETWEEN ? AND ?",
                               (first_id, last_id)).rowcount

        removed, count = await self._write(run, durable=False)
        self.backlog = self.backlog - removed if count is None else count
        return removed


def _diagnosis(folder: Path) -> str:
    """What SQLite's "disk I/O error" means, found by trying a small write ourselves:
    its message hides the operating system's reason (read-only, full, gone)."""
    probe = folder / ".write-probe"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return f" ({exc.strerror or exc})"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return ""
