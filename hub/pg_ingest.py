"""PostgreSQL writes that append to the change log: a batch, and what it logs.

A port of the SQLite store's `_Ingest`, rule for rule and in the same order, so
both engines give the same counts, rows, change kinds and payloads. Only the
round trips differ: statements on different tables that SQLite runs one after
another are joined into one (data-modifying WITH), and the batch's indexed SOPs
are looked up at once. It runs inside a transaction the caller opened under the
change-log lock (see pg_store.py), so no other writer runs meanwhile: each
statement sees every earlier batch.

PostgreSQL text cannot hold NUL, which SQLite stores: an instance record with
NUL in any text attribute is rejected as corrupt (refusing the whole batch
would make the watcher resend it forever), and NUL in a rejection's detail is
shown as U+FFFD.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicomhub.protocol import InstanceRecord, Record, Rejection

from .items import series_item, watcher_item
from .store import Change, IngestResult, iso

SERIES_SELECT = """
    SELECT s.id, s.series_instance_uid, st.study_instance_uid, st.study_date,
           st.study_description, st.accession_number, p.patient_id, p.patient_name,
           s.modality, s.series_number, s.series_description, s.body_part_examined,
           s.series_date, s.series_time, s.instance_count, s.status, s.first_seen,
           s.last_seen, s.stable_since
    FROM series s JOIN studies st ON st.id = s.study_pk
                  JOIN patients p ON p.id = st.patient_pk
"""
_TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(InstanceRecord)
                     if f.type in ("str", str))
NUL_DETAIL = "a text attribute holds a NUL character, which the database cannot store"


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def without_nul(text: str) -> str:
    """Text PostgreSQL can store: NUL shown as U+FFFD (for what is only displayed)."""
    return text.replace("\x00", "\ufffd")




class ChangeLog:
    """One write transaction's connection and the change-log entries it appends.

    Only open one inside a transaction holding the change-log lock: that is what
    makes seqs commit in the order they are handed out."""

    def __init__(self, con: Any) -> None:
        self.con = con
        self.last_seq = 0  # the newest seq appended (0: none), for NOTIFY

    async def append(self, now: float, kind: str, payload: dict[str, Any]) -> Change:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        seq = int(await self.con.fetchval(
            "INSERT INTO changes (time, kind, payload) VALUES ($1, $2, $3) RETURNING seq",
            now, kind, text))
        self.last_seq = seq
        return Change(seq, now, kind, payload)

    async def series_state(self, series_pk: int) -> dict[str, Any]:
        row = await self.con.fetchrow(SERIES_SELECT + " WHERE s.id = $1", series_pk)
        return series_item(row)

    async def watcher_state(self, watcher_id: str) -> dict[str, Any]:
        row = await self.con.fetchrow("SELECT * FROM watchers WHERE watcher_id = $1",
                                      watcher_id)
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


def _fill(column: str, n: int) -> str:
    """`column` set to parameter $n if it is still empty (first non-empty value wins)."""
    return f"{column} = CASE WHEN {column} = '' THEN ${n} ELSE {column} END"


# A new instance, counted, and what it fills in at each level, in one round trip
# (SQLite takes four statements; they touch four tables, so nothing is lost by
# running them as one). $15 is `now`; the study and the patient are filled only
# when the record names the series' own ($30, $36).
_STORE_INSTANCE = (
    "WITH instance AS (INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid,"
    " instance_number, number_of_frames, rows, columns, bits_allocated,"
    " transfer_syntax_uid, specific_character_set, watcher_id, path, size, mtime,"
    " received) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)),"
    f" series_fill AS (UPDATE series SET {_fill('modality', 16)},"
    " series_number = coalesce(series_number, $17),"
    f" {_fill('series_description', 18)}, {_fill('body_part_examined', 19)},"
    f" {_fill('series_date', 20)}, {_fill('series_time', 21)},"
    f" {_fill('pps_start_date', 22)}, {_fill('pps_start_time', 23)},"
    " instance_count = instance_count + 1, last_seen = $15, status = 'receiving',"
    " stable_since = NULL WHERE id = $2),"
    f" study_fill AS (UPDATE studies SET {_fill('study_date', 24)},"
    f" {_fill('study_time', 25)}, {_fill('study_description', 26)},"
    f" {_fill('accession_number', 27)}, {_fill('study_id', 28)},"
    f" {_fill('referring_physician_name', 29)}, last_seen = $15"
    " WHERE id = $31 AND $30::boolean),"
    f" patient_fill AS (UPDATE patients SET {_fill('issuer_of_patient_id', 32)},"
    f" {_fill('patient_name', 33)}, {_fill('patient_birth_date', 34)},"
    f" {_fill('patient_sex', 35)}, last_seen = $15 WHERE id = $37 AND $36::boolean)"
    " SELECT 1")


class Ingest:
    """One batch, applied inside the caller's transaction.

    Attributes merge by "first non-empty value wins": a later record fills what
    is still empty and never overwrites. A study stays with the patient it was
    first seen with, and a series with its study; a record that names another
    study or patient for them fills nothing at those levels.
    """

    def __init__(self, log: ChangeLog, watcher_id: str, now: float) -> None:
        self.log, self.con, self.watcher_id, self.now = log, log.con, watcher_id, now
        self.places: dict[str, _Place] = {}  # series UID -> its place, for this batch
        self.indexed: dict[str, str] = {}  # SOP UID -> its series UID
        self.created: set[int] = set()
        self.grown: dict[int, str] = {}  # series pk -> uid
        self.stored = self.duplicates = self.rejected = 0
        self.changes: list[Change] = []

    async def run(self, records: Sequence[Record], backlog: int) -> IngestResult:
        await self._find_indexed(records)
        for record in records:
            if isinstance(record, Rejection):
                await self.reject(record)
            elif any(_has_nul(getattr(record, name)) for name in _TEXT_FIELDS):
                await self.reject(Rejection(
                    path=record.path, size=record.size, mtime=record.mtime, reason="corrupt",
                    detail=NUL_DETAIL, sop_instance_uid=record.sop_instance_uid))
            else:
                await self.instance(record)
        for pk in self.grown:
            kind = "series.created" if pk in self.created else "series.updated"
            self.changes.append(await self.log.append(self.now, kind,
                                                      await self.log.series_state(pk)))
        await self.con.execute(
            "UPDATE watchers SET instances = instances + $1, rejections = rejections + $2,"
            " backlog = $3, last_seen = $4 WHERE watcher_id = $5",
            self.stored, self.rejected, backlog, self.now, self.watcher_id)
        touched = {uid: self.now for uid in self.grown.values()}
        return IngestResult(self.stored, self.duplicates, self.rejected, self.changes, touched)

    async def _find_indexed(self, records: Sequence[Record]) -> None:
        """Which of the batch's SOPs are indexed already, and in which series: one
        query for the batch (no other writer can add any meanwhile), kept up to date
        as the batch goes, where SQLite asks once per record."""
        uids = [r.sop_instance_uid for r in records if isinstance(r, InstanceRecord)
                and not _has_nul(r.sop_instance_uid)]
        rows = await self.con.fetch(
            "SELECT i.sop_instance_uid, s.series_instance_uid FROM instances i"
            " JOIN series s ON s.id = i.series_pk WHERE i.sop_instance_uid = ANY($1::text[])",
            uids)
        self.indexed = {row[0]: row[1] for row in rows}

    async def reject(self, r: Rejection) -> None:
        con = self.con
        detail, sop_uid = without_nul(r.detail), without_nul(r.sop_instance_uid)
        old = await con.fetchrow(
            "WITH file AS (DELETE FROM files WHERE watcher_id = $1 AND path = $2)"
            " SELECT reason, detail, size, mtime FROM rejections"
            " WHERE watcher_id = $1 AND path = $2", self.watcher_id, r.path)
        if old is not None and tuple(old) == (r.reason, detail, r.size, r.mtime):
            self.duplicates += 1  # the same outcome re-sent after a lost acknowledgement
            return
        row = await con.fetchrow(
            "INSERT INTO rejections (watcher_id, path, reason, detail, sop_instance_uid, size,"
            " mtime, time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
            "ON CONFLICT (watcher_id, path) DO UPDATE SET reason = excluded.reason,"
            " detail = excluded.detail, sop_instance_uid = excluded.sop_instance_uid,"
            " size = excluded.size, mtime = excluded.mtime, time = excluded.time "
            "RETURNING watcher_id, path, reason, detail, sop_instance_uid, size, time",
            self.watcher_id, r.path, r.reason, detail, sop_uid, r.size, r.mtime, self.now)
        payload = dict(row)
        payload["time"] = iso(payload["time"])
        self.changes.append(await self.log.append(self.now, "instance.rejected", payload))
        self.rejected += 1

    async def instance(self, r: InstanceRecord) -> None:
        con = self.con
        existing = self.indexed.get(r.sop_instance_uid)
        if existing is not None and existing != r.series_instance_uid:
            await self.reject(Rejection(
                path=r.path, size=r.size, mtime=r.mtime, reason="conflict",
                sop_instance_uid=r.sop_instance_uid,
                detail=f"SOP Instance UID {r.sop_instance_uid} is already indexed in series "
                       f"{existing}, not {r.series_instance_uid}"))
            return
        if existing is None:
            place = await self._place(r)
            await self._store(r, place)
            self.indexed[r.sop_instance_uid] = r.series_instance_uid
            self.grown[place.series_pk] = r.series_instance_uid
            self.stored += 1
        else:
            self.duplicates += 1
        cleared = await con.fetchval(
            "WITH file AS (INSERT INTO files (watcher_id, path, sop_instance_uid, size, mtime,"
            " received) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (watcher_id, path)"
            " DO UPDATE SET sop_instance_uid = excluded.sop_instance_uid,"
            " size = excluded.size, mtime = excluded.mtime, received = excluded.received)"
            " DELETE FROM rejections WHERE watcher_id = $1 AND path = $2 RETURNING reason",
            self.watcher_id, r.path, r.sop_instance_uid, r.size, r.mtime, self.now)
        if cleared is not None:
            self.changes.append(await self.log.append(self.now, "rejection.cleared", {
                "watcher_id": self.watcher_id, "path": r.path,
                "sop_instance_uid": r.sop_instance_uid, "previous_reason": cleared}))

    async def _store(self, r: InstanceRecord, place: _Place) -> None:
        """Insert the new instance, count it and fill attributes still empty, level by
        level."""
        await self.con.execute(
            _STORE_INSTANCE,
            r.sop_instance_uid, place.series_pk, r.sop_class_uid, r.instance_number,
            r.number_of_frames, r.rows, r.columns, r.bits_allocated, r.transfer_syntax_uid,
            r.specific_character_set, self.watcher_id, r.path, r.size, r.mtime, self.now,
            # the series ($16-$23)
            r.modality, r.series_number, r.series_description, r.body_part_examined,
            r.series_date, r.series_time, r.performed_procedure_step_start_date,
            r.performed_procedure_step_start_time,
            # the study ($24-$31), if the record names the series' own
            r.study_date, r.study_time, r.study_description, r.accession_number, r.study_id,
            r.referring_physician_name, r.study_instance_uid == place.study_uid,
            place.study_pk,
            # the patient ($32-$37), if the record names the study's own
            r.issuer_of_patient_id, r.patient_name, r.patient_birth_date, r.patient_sex,
            r.patient_id == place.patient_id, place.patient_pk)

    async def _place(self, r: InstanceRecord) -> _Place:
        """Find the series' rows, creating series, study and patient as needed."""
        place = self.places.get(r.series_instance_uid)
        if place is not None:
            return place
        con = self.con
        row = await con.fetchrow(
            "SELECT s.id, st.id, st.study_instance_uid, p.id, p.patient_id FROM series s"
            " JOIN studies st ON st.id = s.study_pk JOIN patients p ON p.id = st.patient_pk"
            " WHERE s.series_instance_uid = $1", r.series_instance_uid)
        if row is not None:
            place = _Place(*row)
        else:
            study = await con.fetchrow(
                "SELECT st.id, st.study_instance_uid, p.id, p.patient_id FROM studies st"
                " JOIN patients p ON p.id = st.patient_pk WHERE st.study_instance_uid = $1",
                r.study_instance_uid)
            found = tuple(study) if study is not None else await self._new_study(r)
            series_pk = int(await con.fetchval(
                "INSERT INTO series (series_instance_uid, study_pk, first_seen, last_seen)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                r.series_instance_uid, found[0], self.now, self.now))
            self.created.add(series_pk)
            place = _Place(series_pk, *found)
        self.places[r.series_instance_uid] = place
        return place

    async def _new_study(self, r: InstanceRecord) -> tuple[int, str, int, str]:
        con = self.con
        patient_pk = int(await con.fetchval(
            "INSERT INTO patients (patient_id, first_seen, last_seen) VALUES ($1, $2, $3)"
            " ON CONFLICT (patient_id) DO UPDATE SET last_seen = excluded.last_seen"
            " RETURNING id", r.patient_id, self.now, self.now))
        study_pk = int(await con.fetchval(
            "INSERT INTO studies (study_instance_uid, patient_pk, first_seen, last_seen)"
            " VALUES ($1, $2, $3, $4) RETURNING id",
            r.study_instance_uid, patient_pk, self.now, self.now))
        return study_pk, r.study_instance_uid, patient_pk, r.patient_id
