"""The store interface the hub's handlers use, and the values it returns.

Handlers see only :class:`Store`; the SQLite implementation lives in
`sqlite_store.py`, and another engine can be added beside it without touching
them. Every method returns JSON-ready dicts (times as ISO 8601 UTC strings).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dicomhub.protocol import Record

from .qido import Query as QidoQuery


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(frozen=True)
class Change:
    seq: int
    time: float
    kind: str
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": iso(self.time), "kind": self.kind, **self.payload}


@dataclass(frozen=True)
class IngestResult:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    changes: list[Change] = field(default_factory=list)
    # series UID -> time of its newest instance, for the stability timers
    touched: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ListQuery:
    """A page request: equality filters (already validated), a limit and a cursor."""

    filters: dict[str, str] = field(default_factory=dict)
    limit: int = 100
    after: int = 0  # the last row id of the previous page (0: start at the beginning)
    newest_first: bool = False


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_after: int | None  # row id to continue after, None on the last page


@dataclass(frozen=True)
class AuditEntry:
    time: float
    actor: str  # key name, or "cli" for the command line
    role: str
    action: str  # e.g. "read", "live.subscribe", "key.create", "auth.failed"
    target: str  # what was touched (a route with its identifiers)
    address: str
    outcome: str = "ok"


@dataclass(frozen=True)
class KeyInfo:
    name: str
    role: str


class Store(abc.ABC):
    """What the hub needs from a database. Implementations must make `ingest` one
    transaction, idempotent by SOP Instance UID, and durable when it returns."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # ingest and series state
    @abc.abstractmethod
    async def ingest(self, watcher_id: str, records: Sequence[Record], now: float,
                     backlog: int = 0) -> IngestResult: ...

    @abc.abstractmethod
    async def receiving_series(self) -> list[tuple[str, float]]: ...

    @abc.abstractmethod
    async def mark_stable(self, series_uids: Sequence[str], now: float,
                          stable_after: float) -> list[Change]: ...

    # watchers
    @abc.abstractmethod
    async def watcher_connected(self, watcher_id: str, key_name: str, software: str,
                                address: str, backlog: int, now: float) -> Change: ...

    @abc.abstractmethod
    async def watcher_disconnected(self, watcher_id: str, now: float) -> Change | None:
        """None when the watcher has meanwhile connected through another hub."""

    @abc.abstractmethod
    async def watcher_backlog(self, watcher_id: str, backlog: int, now: float) -> None: ...

    @abc.abstractmethod
    async def reset_watchers(self) -> None:
        """Mark every watcher disconnected (at start: no connection survives a restart)."""

    @abc.abstractmethod
    async def list_watchers(self) -> list[dict[str, Any]]: ...

    # reads
    @abc.abstractmethod
    async def list_series(self, query: ListQuery) -> Page: ...

    @abc.abstractmethod
    async def get_series(self, series_uid: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_studies(self, query: ListQuery) -> Page: ...

    @abc.abstractmethod
    async def get_study(self, study_uid: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_patients(self, query: ListQuery) -> Page: ...

    @abc.abstractmethod
    async def get_patient(self, patient_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_rejections(self, query: ListQuery) -> Page: ...

    @abc.abstractmethod
    async def qido(self, query: QidoQuery) -> tuple[list[dict[str, Any]], bool]:
        """One page of a DICOMweb search: rows keyed by attribute keyword, and
        whether more follow."""

    @abc.abstractmethod
    async def changes(self, since: int, limit: int) -> list[Change]: ...

    @abc.abstractmethod
    async def last_seq(self) -> int: ...

    @abc.abstractmethod
    async def stats(self) -> dict[str, int]: ...

    # keys
    @abc.abstractmethod
    async def create_key(self, name: str, role: str, key_hash: str, now: float) -> None: ...

    @abc.abstractmethod
    async def find_key(self, key_hash: str) -> KeyInfo | None: ...

    @abc.abstractmethod
    async def list_keys(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def revoke_key(self, name: str, now: float) -> bool: ...

    @abc.abstractmethod
    async def count_keys(self) -> int: ...

    # dashboard sessions and one-time login links (token hashes only)
    @abc.abstractmethod
    async def create_session(self, token_hash: str, key_name: str, kind: str, now: float,
                             expires: float) -> bool:
        """Bind a token to the live key `key_name`; False when there is no such key."""

    @abc.abstractmethod
    async def find_session(self, token_hash: str, now: float) -> KeyInfo | None:
        """The key behind a live session token (not a login link), or None."""

    @abc.abstractmethod
    async def redeem_login(self, token_hash: str, now: float) -> str | None:
        """Use up a one-time login link; return its key's name, or None if spent,
        expired or its key revoked."""

    @abc.abstractmethod
    async def delete_session(self, token_hash: str) -> None: ...

    @abc.abstractmethod
    async def setting(self, name: str) -> str | None:
        """A value the hub keeps for itself (e.g. 'mask_secret')."""

    # audit trail (append-only)
    @abc.abstractmethod
    async def audit(self, entries: Sequence[AuditEntry]) -> None: ...

    @abc.abstractmethod
    async def list_audit(self, query: ListQuery) -> Page: ...

    # several hubs on one database. A hub alone on its file needs none of this.
    shared: bool = False  # other hubs may write to the same database

    async def lead(self) -> bool:
        """Keep, or try to take, the lease on the series stability timers: True while
        this hub holds it. The lease lets one hub at a time run the timers; it is
        not what keeps a series from becoming stable twice (mark_stable is)."""
        return True

    async def listen_changes(self, wake: Callable[[], None]) -> None:
        """From now on, call `wake` (on the event loop) after any hub commits to the
        change log. `wake` carries no data: the log itself is read for that. A hub
        alone hears of its own commits directly, so by default nothing is done."""
        return None
