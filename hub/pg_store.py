"""The PostgreSQL store (asyncpg), for a database several hubs may share.

The same semantics as the SQLite store: `ingest` is one transaction, idempotent
by SOP Instance UID, and durable when it returns (commits wait for the WAL
flush: synchronous_commit is turned back on for our sessions if the server has
it off). Reads and writes share one connection pool.

The change log and its order. `changes.seq` is a bigserial, and a sequence
hands out numbers when rows are inserted, not when they commit: two concurrent
writers could take seq 7 and 8 and commit 8 first, and a reader that saw 8
would resume after it and never see 7. So every transaction that may append to
the log first takes one transaction-level advisory lock (CHANGES_LOCK), before
it writes anything. Appends are thereby serialized: each takes its seqs after
the previous holder committed, so seqs commit in order and every reader sees a
prefix of the log. Under the lock the sequence is also set back to the
committed maximum, so the seqs of a writer that rolled back (which nobody saw)
are handed out again, as SQLite's AUTOINCREMENT does: the log has no gaps, and
as its rows are never deleted, no committed seq is ever reused.

We chose the lock over "readers read only below the oldest seq in flight"
because it also gives ingest what SQLite's single writer gives it: a batch never
races another for the same SOP, series or study, so the SQLite store's
check-then-insert logic ports unchanged (pg_ingest.py), with no unique-violation
retries and no deadlocks. Writes that log nothing (keys, sessions, audit,
backlog) do not take it. Within this process an asyncio lock queues the
appending writers before they take a pooled connection, so writers waiting
their turn do not hold the connections readers need.

After a transaction that appended changes, `NOTIFY dicomhub_changes, '<last
seq>'` (delivered at commit) tells `listen_changes` subscribers, in any hub.
That, and the lease on the series timers (`lead`), are in pg_shared.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from dicomhub.config import redact_url
from dicomhub.errors import StoreError
from dicomhub.protocol import Record

from . import pg_schema, qido_pg
from .items import (
    audit_item,
    instance_items,
    patient_item,
    rejection_item,
    series_item,
    study_item,
    watcher_item,
)
from .pg_ingest import SERIES_SELECT, ChangeLog, Ingest, without_nul
from .pg_shared import CHANNEL, CONNECTION_ERRORS, ChangeListener, Lease, close_quietly
from .qido import Query as QidoQuery
from .store import AuditEntry, Change, IngestResult, KeyInfo, ListQuery, Page, Store, iso

T = TypeVar("T")

CHANGES_LOCK = 0x6469636F6D680002  # pg_advisory_xact_lock: one change-log writer at a time
POOL_SIZE = 10
HUB_PREFIX = "dicomhub-hub-"  # application_name of every session of a hub, + its id
SWEEP_INTERVAL = 5.0  # seconds between the leader's sweeps of dead hubs' watchers
CONNECT_TIMEOUT = 10.0
MAX_ID = 2**63 - 1
MIN_VERSION = 13  # gen_random_uuid() in core
# How an appending transaction starts, in one round trip: the lock, then the
# sequence set back to the committed maximum (see the module docstring).
_BEGIN_APPEND = (f"SELECT pg_advisory_xact_lock({CHANGES_LOCK});"
                 " SELECT setval(pg_get_serial_sequence('changes', 'seq'),"
                 " coalesce(max(seq), 0) + 1, false) FROM changes")

_OPEN_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, ValueError, StoreError)

_STUDY_SELECT = """
    SELECT st.id, st.study_instance_uid, p.patient_id, p.patient_name,
           p.patient_birth_date, p.patient_sex, st.study_date, st.study_time,
           st.study_description, st.accession_number, st.study_id,
           st.referring_physician_name, st.first_seen, st.last_seen,
           (SELECT count(*) FROM series s WHERE s.study_pk = st.id) AS series_count,
           (SELECT coalesce(sum(instance_count), 0)::bigint FROM series s
             WHERE s.study_pk = st.id) AS instance_count,
           (SELECT string_agg(DISTINCT modality, ',') FROM series s
             WHERE s.study_pk = st.id AND modality != '') AS modalities
    FROM studies st JOIN patients p ON p.id = st.patient_pk
"""
_PATIENT_SELECT = """
    SELECT p.id, p.patient_id, p.issuer_of_patient_id, p.patient_name,
           p.patient_birth_date, p.patient_sex, p.first_seen, p.last_seen,
           (SELECT count(*) FROM studies st WHERE st.patient_pk = p.id) AS study_count
    FROM patients p
"""
# Filter name -> the column compared for equality.
_SERIES_FILTERS = {"patient_id": "p.patient_id", "study_instance_uid": "st.study_instance_uid",
                   "modality": "s.modality", "status": "s.status"}
_STUDY_FILTERS = {"patient_id": "p.patient_id", "accession_number": "st.accession_number",
                  "study_date": "st.study_date"}
_PATIENT_FILTERS = {"patient_id": "p.patient_id"}
_REJECTION_FILTERS = {"reason": "r.reason", "watcher_id": "r.watcher_id"}
_AUDIT_FILTERS = {"actor": "a.actor", "action": "a.action"}


def _storable(*texts: str) -> bool:
    """False when some text holds NUL: PostgreSQL has no such value, so it matches nothing."""
    return not any("\x00" in text for text in texts)






class PGStore(Store):
    shared = True  # other hubs may use the same database

    def __init__(self, url: str) -> None:
        self.url = url  # postgresql://user@host/db (a password, if any, is never shown)
        # This hub's sessions carry this name: other hubs see in pg_stat_activity
        # whether the hub a watcher is connected through is still alive.
        self.hub = f"{HUB_PREFIX}{secrets.token_hex(6)}"
        self._swept = 0.0
        self._pool: Any = None
        self._appending = asyncio.Lock()
        self._lease = Lease(self._connect)
        self._listener = ChangeListener(self._connect)

    # lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        try:
            con = await self._connect()
            try:
                version = con.get_server_version()
                if version.major < MIN_VERSION:
                    raise StoreError(f"PostgreSQL {version.major} is too old for dicomhub: "
                                     f"it needs {MIN_VERSION} or newer")
                await pg_schema.migrate(con)
                # An acknowledged batch must survive a crash: where the server (or the
                # role, or the database) has synchronous_commit off, turn it on for our
                # sessions; any other value (local, remote_write, …) is kept as set.
                durable = await con.fetchval("SHOW synchronous_commit") != "off"
            finally:
                await close_quietly(con)
            settings = {"application_name": self.hub}
            if not durable:
                settings["synchronous_commit"] = "on"  # a session default: RESET keeps it
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT,
                server_settings=settings)
        except _OPEN_ERRORS as exc:
            await self.close()  # no pool or connection outlives a failed open
            if isinstance(exc, StoreError):
                raise
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(f"cannot open database {redact_url(self.url)!r}: {why}") from exc

    async def close(self) -> None:
        await self._listener.close()
        await self._lease.release()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT)
            except CONNECTION_ERRORS:
                pool.terminate()

    async def _connect(self) -> Any:
        return await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT,
                                     server_settings={"application_name": self.hub})

    @property
    def _db(self) -> Any:
        assert self._pool is not None, "store is not open"
        return self._pool

    async def _write(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(con)` in one transaction that appends nothing to the change log."""
        async with self._db.acquire() as con, con.transaction(isolation="read_committed"):
            return await fn(con)

    async def _append(self, fn: Callable[[ChangeLog], Awaitable[T]]) -> T:
        """Run `fn(log)` in one transaction that may append to the change log.

        Read committed on purpose: after the lock, each statement sees what the
        previous holder committed (a snapshot taken at BEGIN would not)."""
        async with self._appending, self._db.acquire() as con, \
                con.transaction(isolation="read_committed"):
            await con.execute(_BEGIN_APPEND)
            changelog = ChangeLog(con)
            result = await fn(changelog)
            if changelog.last_seq:
                await con.execute("SELECT pg_notify($1, $2)", CHANNEL,
                                  str(changelog.last_seq))
            return result

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._db.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._db.fetchrow(sql, *args)

    # several hubs ------------------------------------------------------------

    async def lead(self) -> bool:
        leading = await self._lease.check()
        if leading and time.monotonic() - self._swept > SWEEP_INTERVAL:
            # The leader also notices hubs that died (SIGKILL, a lost machine): their
            # watchers are not connected any more, whatever their rows say.
            self._swept = time.monotonic()
            await self.reset_watchers()
        return leading

    async def listen_changes(self, wake: Callable[[], None]) -> None:
        """Call `wake` after every commit that appended changes, from any hub on this
        database. Returns once listening. If the listening connection is lost, it is
        made again, and `wake` is called then too: changes may have been missed."""
        await self._listener.add(wake)

    # ingest and series state -----------------------------------------------------

    async def ingest(self, watcher_id: str, records: Sequence[Record], now: float,
                     backlog: int = 0) -> IngestResult:
        return await self._append(
            lambda changelog: Ingest(changelog, watcher_id, now).run(records, backlog))

    async def receiving_series(self) -> list[tuple[str, float]]:
        rows = await self._fetch(
            "SELECT series_instance_uid, last_seen FROM series WHERE status = 'receiving'")
        return [(r[0], r[1]) for r in rows]

    async def mark_stable(self, series_uids: Sequence[str], now: float,
                          stable_after: float) -> list[Change]:
        async def run(changelog: ChangeLog) -> list[Change]:
            changes = []
            for uid in filter(_storable, series_uids):
                pk = await changelog.con.fetchval(
                    "UPDATE series SET status = 'stable', stable_since = $1"
                    " WHERE series_instance_uid = $2 AND status = 'receiving'"
                    " AND last_seen <= $3 RETURNING id", now, uid, now - stable_after)
                if pk is not None:
                    changes.append(await changelog.append(
                        now, "series.stable", await changelog.series_state(pk)))
            return changes

        return await self._append(run)

    # watchers ----------------------------------------------------------------

    async def watcher_connected(self, watcher_id: str, key_name: str, software: str,
                                address: str, backlog: int, now: float) -> Change:
        async def run(changelog: ChangeLog) -> Change:
            await changelog.con.execute(
                "INSERT INTO watchers (watcher_id, key_name, software, address, connected,"
                " backlog, first_seen, last_seen, hub) VALUES ($1, $2, $3, $4, 1, $5, $6, $7,"
                " $8) ON CONFLICT (watcher_id) DO UPDATE SET key_name = excluded.key_name,"
                " software = excluded.software, address = excluded.address, connected = 1,"
                " backlog = excluded.backlog, last_seen = excluded.last_seen,"
                " hub = excluded.hub",
                watcher_id, without_nul(key_name), without_nul(software),
                without_nul(address), backlog, now, now, self.hub)
            return await changelog.append(now, "watcher.connected",
                                          await changelog.watcher_state(watcher_id))

        return await self._append(run)

    async def watcher_disconnected(self, watcher_id: str, now: float) -> Change | None:
        async def run(changelog: ChangeLog) -> Change | None:
            moved = await changelog.con.fetchval(
                "UPDATE watchers SET connected = 0, last_seen = $1 WHERE watcher_id = $2"
                " AND hub = $3 RETURNING 0", now, watcher_id, self.hub) is None
            if moved:
                return None  # it is connected through another hub by now
            return await changelog.append(now, "watcher.disconnected",
                                          await changelog.watcher_state(watcher_id))

        return await self._append(run)

    async def watcher_backlog(self, watcher_id: str, backlog: int, now: float) -> None:
        await self._write(lambda con: con.execute(
            "UPDATE watchers SET backlog = $1, last_seen = $2 WHERE watcher_id = $3",
            backlog, now, watcher_id))

    async def reset_watchers(self) -> None:
        """No watcher is connected through a hub that is gone (this hub's last run
        among them); those connected through hubs still running stay as they are."""
        await self._write(lambda con: con.execute(
            "UPDATE watchers SET connected = 0 WHERE connected = 1 AND hub NOT IN"
            " (SELECT application_name FROM pg_stat_activity"
            "  WHERE application_name LIKE $1)", HUB_PREFIX + "%"))

    async def list_watchers(self) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT * FROM watchers ORDER BY watcher_id")
        return [watcher_item(r) for r in rows]

    # reads -------------------------------------------------------------------

    async def _page(self, select: str, alias: str, filters: Mapping[str, str],
                    query: ListQuery, convert: Callable[[Any], dict[str, Any]]) -> Page:
        if not _storable(*query.filters.values()):
            return Page([], None)
        if query.newest_first:
            params: list[Any] = [query.after or MAX_ID]
            clauses = [f"{alias}.id < $1"]
        else:
            params = [query.after]
            clauses = [f"{alias}.id > $1"]
        for name, value in query.filters.items():
            params.append(value)
            clauses.append(f"{filters[name]} = ${len(params)}")
        params.append(query.limit + 1)
        order = "DESC" if query.newest_first else "ASC"
        sql = (f"{select} WHERE {' AND '.join(clauses)} ORDER BY {alias}.id {order}"
               f" LIMIT ${len(params)}")
        rows = await self._fetch(sql, *params)
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        return Page([convert(r) for r in rows], rows[-1]["id"] if more else None)

    async def list_series(self, query: ListQuery) -> Page:
        return await self._page(SERIES_SELECT, "s", _SERIES_FILTERS, query, series_item)

    async def get_series(self, series_uid: str) -> dict[str, Any] | None:
        if not _storable(series_uid):
            return None
        row = await self._fetchrow(SERIES_SELECT + " WHERE s.series_instance_uid = $1",
                                   series_uid)
        if row is None:
            return None
        item = series_item(row)
        rows = await self._fetch(
            "SELECT sop_instance_uid, sop_class_uid, instance_number, number_of_frames,"
            " rows, columns, transfer_syntax_uid, watcher_id, path, size, received"
            " FROM instances WHERE series_pk = $1"
            " ORDER BY instance_number NULLS FIRST, id",  # NULLS FIRST: as SQLite sorts
            row["id"])
        item["instances"] = instance_items(rows)
        return item

    async def list_studies(self, query: ListQuery) -> Page:
        return await self._page(_STUDY_SELECT, "st", _STUDY_FILTERS, query, study_item)

    async def get_study(self, study_uid: str) -> dict[str, Any] | None:
        if not _storable(study_uid):
            return None
        row = await self._fetchrow(_STUDY_SELECT + " WHERE st.study_instance_uid = $1",
                                   study_uid)
        if row is None:
            return None
        item = study_item(row)
        series = await self._fetch(SERIES_SELECT + " WHERE s.study_pk = $1 ORDER BY s.id",
                                   row["id"])
        item["series"] = [series_item(s) for s in series]
        return item

    async def list_patients(self, query: ListQuery) -> Page:
        return await self._page(_PATIENT_SELECT, "p", _PATIENT_FILTERS, query, patient_item)

    async def get_patient(self, patient_id: str) -> dict[str, Any] | None:
        if not _storable(patient_id):
            return None
        row = await self._fetchrow(_PATIENT_SELECT + " WHERE p.patient_id = $1", patient_id)
        if row is None:
            return None
        item = patient_item(row)
        studies = await self._fetch(
            _STUDY_SELECT + " WHERE st.patient_pk = $1 ORDER BY st.id", row["id"])
        item["studies"] = [study_item(s) for s in studies]
        return item

    async def list_rejections(self, query: ListQuery) -> Page:
        select = ("SELECT r.id, r.watcher_id, r.path, r.reason, r.detail, r.sop_instance_uid,"
                  " r.size, r.time FROM rejections r")
        return await self._page(select, "r", _REJECTION_FILTERS, query, rejection_item)

    async def qido(self, query: QidoQuery) -> tuple[list[dict[str, Any]], bool]:
        sql, params = qido_pg.build(query)
        rows = await self._fetch(sql, *params)
        return [dict(r) for r in rows[:query.limit]], len(rows) > query.limit

    async def changes(self, since: int, limit: int) -> list[Change]:
        rows = await self._fetch(
            "SELECT seq, time, kind, payload FROM changes WHERE seq > $1 ORDER BY seq"
            " LIMIT $2", since, limit)
        return [Change(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    async def last_seq(self) -> int:
        return int(await self._db.fetchval("SELECT coalesce(max(seq), 0) FROM changes"))

    async def stats(self) -> dict[str, int]:
        row = await self._fetchrow(
            "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),"
            " (SELECT count(*) FROM series),"
            " (SELECT count(*) FROM series WHERE status = 'receiving'),"
            " (SELECT count(*) FROM instances), (SELECT count(*) FROM files),"
            " (SELECT count(*) FROM rejections), (SELECT coalesce(max(seq), 0) FROM changes)")
        names = ("patients", "studies", "series", "series_receiving", "instances", "files",
                 "rejections", "last_seq")
        return dict(zip(names, (int(v) for v in row), strict=True))

    # keys --------------------------------------------------------------------

    async def create_key(self, name: str, role: str, key_hash: str, now: float) -> None:
        try:
            await self._write(lambda con: con.execute(
                "INSERT INTO keys (name, role, key_hash, created) VALUES ($1, $2, $3, $4)",
                name, role, key_hash, now))
        except asyncpg.IntegrityConstraintViolationError:
            raise StoreError(f"a live key named {name!r} (or with that value) already "
                             "exists; revoke it first or choose another name") from None

    async def find_key(self, key_hash: str) -> KeyInfo | None:
        if not _storable(key_hash):
            return None
        row = await self._fetchrow(
            "SELECT name, role FROM keys WHERE key_hash = $1 AND revoked IS NULL", key_hash)
        return KeyInfo(row[0], row[1]) if row else None

    async def list_keys(self) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT name, role, created, revoked FROM keys ORDER BY revoked IS NOT NULL, name")
        return [{"name": r[0], "role": r[1], "created": iso(r[2]), "revoked": iso(r[3])}
                for r in rows]

    async def revoke_key(self, name: str, now: float) -> bool:
        if not _storable(name):
            return False
        status = await self._write(lambda con: con.execute(
            "UPDATE keys SET revoked = $1 WHERE name = $2 AND revoked IS NULL", now, name))
        return int(status.split()[-1]) > 0

    async def count_keys(self) -> int:
        return int(await self._db.fetchval("SELECT count(*) FROM keys WHERE revoked IS NULL"))

    # sessions ------------------------------------------------------------------

    async def create_session(self, token_hash: str, key_name: str, kind: str, now: float,
                             expires: float) -> bool:
        async def run(con: Any) -> bool:
            await con.execute("DELETE FROM sessions WHERE expires <= $1", now)
            key_id = await con.fetchval(
                "SELECT id FROM keys WHERE name = $1 AND revoked IS NULL", key_name)
            if key_id is None:
                return False
            await con.execute(
                "INSERT INTO sessions (token_hash, key_id, kind, created, expires)"
                " VALUES ($1, $2, $3, $4, $5)", token_hash, key_id, kind, now, expires)
            return True

        return _storable(key_name) and await self._write(run)

    async def find_session(self, token_hash: str, now: float) -> KeyInfo | None:
        if not _storable(token_hash):
            return None
        row = await self._fetchrow(
            "SELECT k.name, k.role FROM sessions s JOIN keys k ON k.id = s.key_id"
            " WHERE s.token_hash = $1 AND s.kind = 'session' AND s.expires > $2"
            " AND k.revoked IS NULL", token_hash, now)
        return KeyInfo(row[0], row[1]) if row else None

    async def redeem_login(self, token_hash: str, now: float) -> str | None:
        async def run(con: Any) -> str | None:
            row = await con.fetchrow(
                "DELETE FROM sessions WHERE token_hash = $1 AND kind = 'login'"
                " RETURNING key_id, expires", token_hash)
            if row is None or row[1] <= now:
                return None
            name = await con.fetchval(
                "SELECT name FROM keys WHERE id = $1 AND revoked IS NULL", row[0])
            return str(name) if name is not None else None

        return await self._write(run) if _storable(token_hash) else None

    async def delete_session(self, token_hash: str) -> None:
        if _storable(token_hash):
            await self._write(lambda con: con.execute(
                "DELETE FROM sessions WHERE token_hash = $1", token_hash))

    async def setting(self, name: str) -> str | None:
        value = await self._db.fetchval("SELECT value FROM settings WHERE name = $1", name)
        return str(value) if value is not None else None

    # audit trail ----------------------------------------------------------------

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        # NUL (say, from a request path) would make PostgreSQL refuse the whole batch,
        # and the auditor would retry it forever: store it as U+FFFD instead.
        rows = [(e.time, *(without_nul(text) for text in (e.actor, e.role, e.action, e.target,
                                                          e.address, e.outcome)))
                for e in entries]
        await self._write(lambda con: con.executemany(
            "INSERT INTO audit (time, actor, role, action, target, address, outcome)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", rows))

    async def list_audit(self, query: ListQuery) -> Page:
        select = ("SELECT a.id, a.time, a.actor, a.role, a.action, a.target, a.address,"
                  " a.outcome FROM audit a")
        return await self._page(select, "a", _AUDIT_FILTERS, query, audit_item)

