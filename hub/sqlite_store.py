"""The SQLite store (the embedded default).

Writes run on one dedicated thread (SQLiteThread): a batch is one Python
function inside one `BEGIN IMMEDIATE … COMMIT`, so it costs one thread hop
instead of one per statement, and SQLite's single writer is never contended.
Reads use aiosqlite on a second connection; WAL mode lets them run while a
batch commits. `synchronous=FULL` makes a commit durable before the watcher
is acknowledged.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from dicomhub.errors import StoreError
from dicomhub.sqlitethread import DB_ERRORS, INTEGRITY_ERRORS, SQLiteThread, open_connection
from dicomhub.protocol import InstanceRecord, Record, Rejection

from . import qido_sqlite, schema
from .items import (
    audit_item,
    instance_items,
    patient_item,
    rejection_item,
    series_item,
    study_item,
    watcher_item,
)
from .qido import Query as QidoQuery
from .store import AuditEntry, Change, IngestResult, KeyInfo, ListQuery, Page, Store, iso

_SERIES_SELECT = """
    SELECT s.id, s.series_instance_uid, st.study_instance_uid, st.study_date,
           st.study_description, st.accession_number, p.patient_id, p.patient_name,
           s.modality, s.series_number, s.series_description, s.body_part_examined,
           s.series_date, s.series_time, s.instance_count, s.status, s.first_seen,
           s.last_seen, s.stable_since
    FROM series s JOIN studies st ON st.id = s.study_pk
                  JOIN patients p ON p.id = st.patient_pk
"""
_STUDY_SELECT = """
    SELECT st.id, st.study_instance_uid, p.patient_id, p.patient_name,
           p.patient_birth_date, p.patient_sex, st.study_date, st.study_time,
           st.study_description, st.accession_number, st.study_id,
           st.referring_physician_name, st.first_seen, st.last_seen,
           (SELECT count(*) FROM series s WHERE s.study_pk = st.id) AS series_count,
           (SELECT coalesce(sum(instance_count), 0) FROM series s
             WHERE s.study_pk = st.id) AS instance_count,
           (SELECT group_concat(DISTINCT modality) FROM series s
             WHERE s.study_pk = st.id AND modality != '') AS modalities
    FROM studies st JOIN patients p ON p.id = st.patient_pk
"""
_PATIENT_SELECT = """
    SELECT p.id, p.patient_id, p.issuer_of_patient_id, p.patient_name,
           p.patient_birth_date, p.patient_sex, p.first_seen, p.last_seen,
           (SELECT count(*) FROM studies st WHERE st.patient_pk = p.id) AS study_count
    FROM patients p
"""
_SERIES_FILTERS = {
    "patient_id": "p.patient_id = ?",
    "study_instance_uid": "st.study_instance_uid = ?",
    "modality": "s.modality = ?",
    "status": "s.status = ?",
}
_STUDY_FILTERS = {
    "patient_id": "p.patient_id = ?",
    "accession_number": "st.accession_number = ?",
    "study_date": "st.study_date = ?",
}
_PATIENT_FILTERS = {"patient_id": "p.patient_id = ?"}
_REJECTION_FILTERS = {"reason": "reason = ?", "watcher_id": "watcher_id = ?"}







_OPEN_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, OSError, StoreError)


def migrate(con: sqlite3.Connection) -> None:
    """Bring the schema to the current version. Run it in one transaction (BEGIN
    IMMEDIATE: one migrating process at a time), so it is never left half-done."""
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version > schema.VERSION:
        raise StoreError(
            f"database schema version {version} is newer than this dicomhub "
            f"understands ({schema.VERSION}); upgrade dicomhub"
        )
    for number in range(version, schema.VERSION):
        for statement in schema.MIGRATIONS[number]:
            con.execute(statement)
    con.execute(f"PRAGMA user_version = {schema.VERSION}")


class SQLiteStore(Store):
    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = Path(path)
        self.key = key  # SQLCipher key: the file is encrypted at rest
        self._writer = SQLiteThread("store-writer")
        self._r: aiosqlite.Connection | None = None

    # lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            await self._writer.open(self.path, self.key)
            await self._writer.transaction(migrate)
            self._r = await aiosqlite.Connection(
                functools.partial(open_connection, self.path, self.key), iter_chunk_size=64)
            await self._r.execute("PRAGMA query_only=ON")
        except _OPEN_ERRORS as exc:
            await self.close()  # no thread or connection outlives a failed open
            if isinstance(exc, StoreError):
                raise
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(f"cannot open database {str(self.path)!r}: {why}") from exc

    async def close(self) -> None:
        if self._r is not None:
            await self._r.close()
            self._r = None
        await self._writer.close()

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        assert self._r is not None, "store is not open"
        async with self._r.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    # ingest ------------------------------------------------------------------

    async def ingest(self, watcher_id: str, records: Sequence[Record], now: float,
                     backlog: int = 0) -> IngestResult:
        return await self._writer.transaction(
            lambda con: _Ingest(con, watcher_id, now).run(records, backlog))

    async def receiving_series(self) -> list[tuple[str, float]]:
        rows = await self._fetchall(
            "SELECT series_instance_uid, last_seen FROM series WHERE status = 'receiving'")
        return [(r[0], r[1]) for r in rows]

    async def mark_stable(self, series_uids: Sequence[str], now: float,
                          stable_after: float) -> list[Change]:
        def run(con: sqlite3.Connection) -> list[Change]:
            changes = []
            for uid in series_uids:
                row = con.execute(
                    "UPDATE series SET status = 'stable', stable_since = ? "
                    "WHERE series_instance_uid = ? AND status = 'receiving' "
                    "AND last_seen <= ? RETURNING id",
                    (now, uid, now - stable_after)).fetchone()
                if row is not None:
                    changes.append(_log(con, now, "series.stable", _series_state(con, row[0])))
            return changes

        return await self._writer.transaction(run)

    # watchers ----------------------------------------------------------------

    async def watcher_connected(self, watcher_id: str, key_name: str, software: str,
                                address: str, backlog: int, now: float) -> Change:
        def run(con: sqlite3.Connection) -> Change:
            con.execute(
                "INSERT INTO watchers (watcher_id, key_name, software, address, connected,"
                " backlog, first_seen, last_seen) VALUES (?, ?, ?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (watcher_id) DO UPDATE SET key_name = excluded.key_name,"
                " software = excluded.software, address = excluded.address, connected = 1,"
                " backlog = excluded.backlog, last_seen = excluded.last_seen",
                (watcher_id, key_name, software, address, backlog, now, now))
            return _log(con, now, "watcher.connected", _watcher_state(con, watcher_id))

        return await self._writer.transaction(run)

    async def watcher_disconnected(self, watcher_id: str, now: float) -> Change | None:
        def run(con: sqlite3.Connection) -> Change:
            con.execute("UPDATE watchers SET connected = 0, last_seen = ? WHERE watcher_id = ?",
                        (now, watcher_id))
            return _log(con, now, "watcher.disconnected", _watcher_state(con, watcher_id))

        return await self._writer.transaction(run)

    async def watcher_backlog(self, watcher_id: str, backlog: int, now: float) -> None:
        def run(con: sqlite3.Connection) -> None:
            con.execute("UPDATE watchers SET backlog = ?, last_seen = ? WHERE watcher_id = ?",
                        (backlog, now, watcher_id))

        await self._writer.transaction(run)

    async def reset_watchers(self) -> None:
        """At start no watcher is connected, whatever the last run left behind."""
        await self._writer.transaction(lambda con: con.execute("UPDATE watchers SET connected = 0"))

    async def list_watchers(self) -> list[dict[str, Any]]:
        rows = await self._fetchall("SELECT * FROM watchers ORDER BY watcher_id")
        return [watcher_item(r) for r in rows]

    # reads -------------------------------------------------------------------

    async def _page(self, select: str, alias: str, filters: dict[str, str],
                    query: ListQuery, convert: Callable[[sqlite3.Row], dict[str, Any]]) -> Page:
        if query.newest_first:
            clauses = [f"{alias}.id < ?"]
            params: list[Any] = [query.after or 2**63 - 1]
        else:
            clauses = [f"{alias}.id > ?"]
            params = [query.after]
        for name, value in query.filters.items():
            clauses.append(filters[name])
            params.append(value)
        order = "DESC" if query.newest_first else "ASC"
        sql = f"{select} WHERE {' AND '.join(clauses)} ORDER BY {alias}.id {order} LIMIT ?"
        rows = await self._fetchall(sql, (*params, query.limit + 1))
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        return Page([convert(r) for r in rows], rows[-1]["id"] if more else None)

    async def list_series(self, query: ListQuery) -> Page:
        return await self._page(_SERIES_SELECT, "s", _SERIES_FILTERS, query, series_item)

    async def get_series(self, series_uid: str) -> dict[str, Any] | None:
        row = await self._fetchone(_SERIES_SELECT + " WHERE s.series_instance_uid = ?",
                                   (series_uid,))
        if row is None:
            return None
        item = series_item(row)
        rows = await self._fetchall(
            "SELECT sop_instance_uid, sop_class_uid, instance_number, number_of_frames,"
            " rows, columns, transfer_syntax_uid, watcher_id, path, size, received"
            " FROM instances WHERE series_pk = ? ORDER BY instance_number, id",
            (row["id"],))
        item["instances"] = instance_items(rows)
        return item

    async def list_studies(self, query: ListQuery) -> Page:
        return await self._page(_STUDY_SELECT, "st", _STUDY_FILTERS, query, study_item)

    async def get_study(self, study_uid: str) -> dict[str, Any] | None:
        row = await self._fetchone(_STUDY_SELECT + " WHERE st.study_instance_uid = ?",
                                   (study_uid,))
        if row is None:
            return None
        item = study_item(row)
        series = await self._fetchall(_SERIES_SELECT + " WHERE s.study_pk = ? ORDER BY s.id",
                                      (row["id"],))
        item["series"] = [series_item(s) for s in series]
        return item

    async def list_patients(self, query: ListQuery) -> Page:
        return await self._page(_PATIENT_SELECT, "p", _PATIENT_FILTERS, query, patient_item)

    async def get_patient(self, patient_id: str) -> dict[str, Any] | None:
        row = await self._fetchone(_PATIENT_SELECT + " WHERE p.patient_id = ?", (patient_id,))
        if row is None:
            return None
        item = patient_item(row)
        studies = await self._fetchall(_STUDY_SELECT + " WHERE st.patient_pk = ? ORDER BY st.id",
                                       (row["id"],))
        item["studies"] = [study_item(s) for s in studies]
        return item

    async def list_rejections(self, query: ListQuery) -> Page:
        select = ("SELECT r.id, r.watcher_id, r.path, r.reason, r.detail, r.sop_instance_uid,"
                  " r.size, r.time FROM rejections r")
        filters = {k: "r." + v for k, v in _REJECTION_FILTERS.items()}
        return await self._page(select, "r", filters, query, rejection_item)

    async def qido(self, query: QidoQuery) -> tuple[list[dict[str, Any]], bool]:
        sql, params = qido_sqlite.build(query)
        rows = await self._fetchall(sql, params)
        return [dict(r) for r in rows[:query.limit]], len(rows) > query.limit

    async def changes(self, since: int, limit: int) -> list[Change]:
        rows = await self._fetchall(
            "SELECT seq, time, kind, payload FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (since, limit))
        return [Change(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    async def last_seq(self) -> int:
        row = await self._fetchone("SELECT coalesce(max(seq), 0) FROM changes")
        return int(row[0]) if row else 0

    async def stats(self) -> dict[str, int]:
        row = await self._fetchone(
            "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),"
            " (SELECT count(*) FROM series),"
            " (SELECT count(*) FROM series WHERE status = 'receiving'),"
            " (SELECT count(*) FROM instances), (SELECT count(*) FROM files),"
            " (SELECT count(*) FROM rejections), (SELECT coalesce(max(seq), 0) FROM changes)")
        assert row is not None
        names = ("patients", "studies", "series", "series_receiving", "instances", "files",
                 "rejections", "last_seq")
        return dict(zip(names, (int(v) for v in row), strict=True))

    # keys --------------------------------------------------------------------

    async def create_key(self, name: str, role: str, key_hash: str, now: float) -> None:
        def run(con: sqlite3.Connection) -> None:
            try:
                con.execute("INSERT INTO keys (name, role, key_hash, created) VALUES (?, ?, ?, ?)",
                            (name, role, key_hash, now))
            except INTEGRITY_ERRORS:
                raise StoreError(f"a live key named {name!r} (or with that value) already "
                                 "exists; revoke it first or choose another name") from None

        await self._writer.transaction(run)

    async def find_key(self, key_hash: str) -> KeyInfo | None:
        row = await self._fetchone(
            "SELECT name, role FROM keys WHERE key_hash = ? AND revoked IS NULL", (key_hash,))
        return KeyInfo(row[0], row[1]) if row else None

    async def list_keys(self) -> list[dict[str, Any]]:
        rows = await self._fetchall(
            "SELECT name, role, created, revoked FROM keys ORDER BY revoked IS NOT NULL, name")
        return [{"name": r[0], "role": r[1], "created": iso(r[2]), "revoked": iso(r[3])}
                for r in rows]

    async def revoke_key(self, name: str, now: float) -> bool:
        def run(con: sqlite3.Connection) -> bool:
            cur = con.execute("UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                              (now, name))
            return cur.rowcount > 0

        return await self._writer.transaction(run)

    async def count_keys(self) -> int:
        row = await self._fetchone("SELECT count(*) FROM keys WHERE revoked IS NULL")
        return int(row[0]) if row else 0

    # sessions ------------------------------------------------------------------

    async def create_session(self, token_hash: str, key_name: str, kind: str, now: float,
                             expires: float) -> bool:
        def run(con: sqlite3.Connection) -> bool:
            con.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            row = con.execute("SELECT id FROM keys WHERE name = ? AND revoked IS NULL",
                              (key_name,)).fetchone()
            if row is None:
                return False
            con.execute("INSERT INTO sessions (token_hash, key_id, kind, created, expires)"
                        " VALUES (?, ?, ?, ?, ?)", (token_hash, row[0], kind, now, expires))
            return True

        return await self._writer.transaction(run)

    async def find_session(self, token_hash: str, now: float) -> KeyInfo | None:
        row = await self._fetchone(
            "SELECT k.name, k.role FROM sessions s JOIN keys k ON k.id = s.key_id"
            " WHERE s.token_hash = ? AND s.kind = 'session' AND s.expires > ?"
            " AND k.revoked IS NULL", (token_hash, now))
        return KeyInfo(row[0], row[1]) if row else None

    async def redeem_login(self, token_hash: str, now: float) -> str | None:
        def run(con: sqlite3.Connection) -> str | None:
            row = con.execute(
                "DELETE FROM sessions WHERE token_hash = ? AND kind = 'login'"
                " RETURNING key_id, expires", (token_hash,)).fetchone()
            if row is None or row[1] <= now:
                return None
            key = con.execute("SELECT name FROM keys WHERE id = ? AND revoked IS NULL",
                              (row[0],)).fetchone()
            return str(key[0]) if key else None

        return await self._writer.transaction(run)

    async def setting(self, name: str) -> str | None:
        row = await self._fetchone("SELECT value FROM settings WHERE name = ?", (name,))
        return str(row[0]) if row else None

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        rows = [(e.time, e.actor, e.role, e.action, e.target, e.address, e.outcome)
                for e in entries]
        await self._writer.transaction(lambda con: con.executemany(
            "INSERT INTO audit (time, actor, role, action, target, address, outcome)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", rows))

    async def list_audit(self, query: ListQuery) -> Page:
        select = ("SELECT a.id, a.time, a.actor, a.role, a.action, a.target, a.address,"
                  " a.outcome FROM audit a")
        filters = {"actor": "a.actor = ?", "action": "a.action = ?"}
        return await self._page(select, "a", filters, query, audit_item)

    async def delete_session(self, token_hash: str) -> None:
        await self._writer.transaction(
            lambda con: con.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,)))


# inside the writer thread ----------------------------------------------------------


def _log(con: sqlite3.Connection, now: float, kind: str, payload: dict[str, Any]) -> Change:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    seq = con.execute("INSERT INTO changes (time, kind, payload) VALUES (?, ?, ?) RETURNING seq",
                      (now, kind, text)).fetchone()[0]
    return Change(seq, now, kind, payload)


def _series_state(con: sqlite3.Connection, series_pk: int) -> dict[str, Any]:
    row = con.execute(_SERIES_SELECT + " WHERE s.id = ?", (series_pk,)).fetchone()
    return series_item(row)



def _watcher_state(con: sqlite3.Connection, watcher_id: str) -> dict[str, Any]:
    row = con.execute("SELECT * FROM watchers WHERE watcher_id = ?", (watcher_id,)).fetchone()
    return watcher_item(row) if row is not None else {"watcher_id": watcher_id,
                                                         "connected": False}


@dataclass(slots=True)
class _Place:
    """Where a series sits: its row and its study's and patient's, with their keys."""

    series_pk: int
    study_pk: int
    study_uid: str
    patient_pk: int
    patient_id: str


_SERIES_FILL = (
    "UPDATE series SET modality = iif(modality = '', ?, modality),"
    " series_number = coalesce(series_number, ?),"
    " series_description = iif(series_description = '', ?, series_description),"
    " body_part_examined = iif(body_part_examined = '', ?, body_part_examined),"
    " series_date = iif(series_date = '', ?, series_date),"
    " series_time = iif(series_time = '', ?, series_time),"
    " pps_start_date = iif(pps_start_date = '', ?, pps_start_date),"
    " pps_start_time = iif(pps_start_time = '', ?, pps_start_time),"
    " instance_count = instance_count + 1, last_seen = ?, status = 'receiving',"
    " stable_since = NULL WHERE id = ?")
_STUDY_FILL = (
    "UPDATE studies SET study_date = iif(study_date = '', ?, study_date),"
    " study_time = iif(study_time = '', ?, study_time),"
    " study_description = iif(study_description = '', ?, study_description),"
    " accession_number = iif(accession_number = '', ?, accession_number),"
    " study_id = iif(study_id = '', ?, study_id),"
    " referring_physician_name = iif(referring_physician_name = '', ?,"
    "   referring_physician_name), last_seen = ? WHERE id = ?")
_PATIENT_FILL = (
    "UPDATE patients SET issuer_of_patient_id = iif(issuer_of_patient_id = '', ?,"
    "   issuer_of_patient_id),"
    " patient_name = iif(patient_name = '', ?, patient_name),"
    " patient_birth_date = iif(patient_birth_date = '', ?, patient_birth_date),"
    " patient_sex = iif(patient_sex = '', ?, patient_sex), last_seen = ? WHERE id = ?")


class _Ingest:
    """One batch, applied inside the caller's transaction.

    Attributes merge by "first non-empty value wins": a later record fills what
    is still empty and never overwrites. A study stays with the patient it was
    first seen with, and a series with its study; a record that names another
    study or patient for them fills nothing at those levels.
    """

    def __init__(self, con: sqlite3.Connection, watcher_id: str, now: float) -> None:
        self.con, self.watcher_id, self.now = con, watcher_id, now
        self.places: dict[str, _Place] = {}  # series UID -> its place, for this batch
        self.created: set[int] = set()
        self.grown: dict[int, str] = {}  # series pk -> uid
        self.stored = self.duplicates = self.rejected = 0
        self.changes: list[Change] = []

    def run(self, records: Sequence[Record], backlog: int) -> IngestResult:
        for record in records:
            if isinstance(record, Rejection):
                self.reject(record)
            else:
                self.instance(record)
        for pk in self.grown:
            kind = "series.created" if pk in self.created else "series.updated"
            self.changes.append(_log(self.con, self.now, kind, _series_state(self.con, pk)))
        self.con.execute(
            "UPDATE watchers SET instances = instances + ?, rejections = rejections + ?,"
            " backlog = ?, last_seen = ? WHERE watcher_id = ?",
            (self.stored, self.rejected, backlog, self.now, self.watcher_id))
        touched = {uid: self.now for uid in self.grown.values()}
        return IngestResult(self.stored, self.duplicates, self.rejected, self.changes, touched)

    def reject(self, r: Rejection) -> None:
        con = self.con
        old = con.execute(
            "SELECT reason, detail, size, mtime FROM rejections WHERE watcher_id = ? AND path = ?",
            (self.watcher_id, r.path)).fetchone()
        con.execute("DELETE FROM files WHERE watcher_id = ? AND path = ?",
                    (self.watcher_id, r.path))
        if old is not None and tuple(old) == (r.reason, r.detail, r.size, r.mtime):
            self.duplicates += 1  # the same outcome re-sent after a lost acknowledgement
            return
        row = con.execute(
            "INSERT INTO rejections (watcher_id, path, reason, detail, sop_instance_uid, size,"
            " mtime, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (watcher_id, path) DO UPDATE SET reason = excluded.reason,"
            " detail = excluded.detail, sop_instance_uid = excluded.sop_instance_uid,"
            " size = excluded.size, mtime = excluded.mtime, time = excluded.time "
            "RETURNING watcher_id, path, reason, detail, sop_instance_uid, size, time",
            (self.watcher_id, r.path, r.reason, r.detail, r.sop_instance_uid, r.size,
             r.mtime, self.now)).fetchone()
        payload = dict(row)
        payload["time"] = iso(payload["time"])
        self.changes.append(_log(con, self.now, "instance.rejected", payload))
        self.rejected += 1

    def instance(self, r: InstanceRecord) -> None:
        con = self.con
        existing = con.execute(
            "SELECT s.series_instance_uid FROM instances i JOIN series s ON s.id = i.series_pk"
            " WHERE i.sop_instance_uid = ?", (r.sop_instance_uid,)).fetchone()
        if existing is not None and existing[0] != r.series_instance_uid:
            self.reject(Rejection(
                path=r.path, size=r.size, mtime=r.mtime, reason="conflict",
                sop_instance_uid=r.sop_instance_uid,
                detail=f"SOP Instance UID {r.sop_instance_uid} is already indexed in series "
                       f"{existing[0]}, not {r.series_instance_uid}"))
            return
        if existing is None:
            place = self._place(r)
            con.execute(
                "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid,"
                " instance_number, number_of_frames, rows, columns, bits_allocated,"
                " transfer_syntax_uid, specific_character_set, watcher_id, path, size,"
                " mtime, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.sop_instance_uid, place.series_pk, r.sop_class_uid, r.instance_number,
                 r.number_of_frames, r.rows, r.columns, r.bits_allocated,
                 r.transfer_syntax_uid,
                 r.specific_character_set, self.watcher_id, r.path, r.size, r.mtime, self.now))
            self._fill(r, place)
            self.grown[place.series_pk] = r.series_instance_uid
            self.stored += 1
        else:
            self.duplicates += 1
        con.execute(
            "INSERT INTO files (watcher_id, path, sop_instance_uid, size, mtime, received)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (watcher_id, path) DO UPDATE SET"
            " sop_instance_uid = excluded.sop_instance_uid, size = excluded.size,"
            " mtime = excluded.mtime, received = excluded.received",
            (self.watcher_id, r.path, r.sop_instance_uid, r.size, r.mtime, self.now))
        cleared = con.execute("DELETE FROM rejections WHERE watcher_id = ? AND path = ?"
                              " RETURNING reason", (self.watcher_id, r.path)).fetchone()
        if cleared is not None:
            self.changes.append(_log(con, self.now, "rejection.cleared", {
                "watcher_id": self.watcher_id, "path": r.path,
                "sop_instance_uid": r.sop_instance_uid, "previous_reason": cleared[0]}))

    def _fill(self, r: InstanceRecord, place: _Place) -> None:
        """Count the new instance and fill attributes still empty, level by level."""
        con, now = self.con, self.now
        con.execute(_SERIES_FILL, (r.modality, r.series_number, r.series_description,
                                   r.body_part_examined, r.series_date, r.series_time,
                                   r.performed_procedure_step_start_date,
                                   r.performed_procedure_step_start_time, now,
                                   place.series_pk))
        if r.study_instance_uid == place.study_uid:
            con.execute(_STUDY_FILL, (r.study_date, r.study_time, r.study_description,
                                      r.accession_number, r.study_id,
                                      r.referring_physician_name, now, place.study_pk))
        if r.patient_id == place.patient_id:
            con.execute(_PATIENT_FILL, (r.issuer_of_patient_id, r.patient_name,
                                        r.patient_birth_date, r.patient_sex, now,
                                        place.patient_pk))

    def _place(self, r: InstanceRecord) -> _Place:
        """Find the series' rows, creating series, study and patient as needed."""
        place = self.places.get(r.series_instance_uid)
        if place is not None:
            return place
        con = self.con
        row = con.execute(
            "SELECT s.id, st.id, st.study_instance_uid, p.id, p.patient_id FROM series s"
            " JOIN studies st ON st.id = s.study_pk JOIN patients p ON p.id = st.patient_pk"
            " WHERE s.series_instance_uid = ?", (r.series_instance_uid,)).fetchone()
        if row is not None:
            place = _Place(*row)
        else:
            study = con.execute(
                "SELECT st.id, st.study_instance_uid, p.id, p.patient_id FROM studies st"
                " JOIN patients p ON p.id = st.patient_pk WHERE st.study_instance_uid = ?",
                (r.study_instance_uid,)).fetchone()
            if study is None:
                study = self._new_study(r)
            series_pk = con.execute(
                "INSERT INTO series (series_instance_uid, study_pk, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?) RETURNING id",
                (r.series_instance_uid, study[0], self.now, self.now)).fetchone()[0]
            self.created.add(series_pk)
            place = _Place(series_pk, *study)
        self.places[r.series_instance_uid] = place
        return place

    def _new_study(self, r: InstanceRecord) -> tuple[int, str, int, str]:
        con = self.con
        patient_pk = con.execute(
            "INSERT INTO patients (patient_id, first_seen, last_seen) VALUES (?, ?, ?)"
            " ON CONFLICT (patient_id) DO UPDATE SET last_seen = excluded.last_seen"
            " RETURNING id", (r.patient_id, self.now, self.now)).fetchone()[0]
        study_pk = con.execute(
            "INSERT INTO studies (study_instance_uid, patient_pk, first_seen, last_seen)"
            " VALUES (?, ?, ?, ?) RETURNING id",
            (r.study_instance_uid, patient_pk, self.now, self.now)).fetchone()[0]
        return study_pk, r.study_instance_uid, patient_pk, r.patient_id
