"""The store on a real database, no hub around it: every test runs against both
engines, SQLite (hub/sqlite_store.py, a real file) and PostgreSQL (hub/pg_store.py,
a real server), which must give the same answers.

Every write passes an explicit `now`, so times and stability are deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dicomhub.errors import StoreError
from dicomhub.protocol import InstanceRecord, Rejection
from hub import pg_schema, qido, schema
from hub.pg_store import PGStore
from hub.sqlite_store import SQLiteStore
from hub.store import Change, ListQuery, Store, iso

pytestmark = pytest.mark.asyncio

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# What a batch that cannot be written raises, by engine (both roll it back whole).
DB_ERRORS = (sqlite3.Error, StoreError, asyncpg.PostgresError, asyncpg.InterfaceError)
EMPTY_STATS = {"patients": 0, "studies": 0, "series": 0, "series_receiving": 0,
               "instances": 0, "files": 0, "rejections": 0, "last_seq": 0}


def record(n: int, series: str = "1.2.3.1", study: str = "1.2.3", *,
           path: str | None = None, **extra: Any) -> InstanceRecord:
    values: dict[str, Any] = dict(
        path=path if path is not None else f"s/{series}/{n}.dcm", size=100 + n, mtime=T0 - 60,
        sop_instance_uid=f"{series}.{n}", series_instance_uid=series, study_instance_uid=study,
        patient_id="P1", patient_name="Doe^Jane", modality="CT", series_number=1,
        instance_number=n)
    values.update(extra)
    return InstanceRecord(**values)


def rejection(path: str, reason: str = "truncated", detail: str = "ends inside a value",
              size: int = 50, mtime: float = T0 - 30, **extra: Any) -> Rejection:
    return Rejection(path=path, size=size, mtime=mtime, reason=reason, detail=detail, **extra)


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Makes unopened stores, all on the same (fresh) database of one engine."""
    if request.param == "sqlite":
        path = tmp_path / "hub.sqlite3"
        return lambda: SQLiteStore(path)
    url = request.getfixturevalue("pg_database")
    return lambda: PGStore(url)


@pytest.fixture
async def store(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    s = make_store()
    await s.open()
    yield s
    await s.close()


async def all_changes(store: Store, since: int = 0) -> list[Change]:
    return await store.changes(since, 10_000)


async def kinds(store: Store, since: int = 0) -> list[str]:
    return [c.kind for c in await all_changes(store, since)]


async def all_rejections(store: Store, **filters: str) -> list[dict[str, Any]]:
    return (await store.list_rejections(ListQuery(filters=filters, limit=1000))).items


async def series_uids(store: Store, **filters: str) -> list[str]:
    page = await store.list_series(ListQuery(filters=filters, limit=1000))
    assert page.next_after is None
    return [s["series_instance_uid"] for s in page.items]


async def raw(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Rows read straight from the store's database, past the store (same SQL in both)."""
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as con:
            return con.execute(sql).fetchall()
    assert isinstance(store, PGStore)
    con = await asyncpg.connect(store.url)
    try:
        return [tuple(row) for row in await con.fetch(sql)]
    finally:
        await con.close()


async def file_rows(store: Store) -> list[tuple[Any, ...]]:
    return await raw(store, "SELECT watcher_id, path, sop_instance_uid FROM files"
                            " ORDER BY watcher_id, path")


async def schema_version(store: Store) -> int:
    if isinstance(store, SQLiteStore):
        [(version,)] = await raw(store, "PRAGMA user_version")
    else:
        [(version,)] = await raw(store, "SELECT version FROM schema_version")
    return int(version)


async def set_schema_version(store: Store, version: int) -> None:
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as con:
            con.execute(f"PRAGMA user_version = {version}")
            con.commit()
        return
    assert isinstance(store, PGStore)
    con = await asyncpg.connect(store.url)
    try:
        await con.execute("UPDATE schema_version SET version = $1", version)
    finally:
        await con.close()


def current_version(store: Store) -> int:
    return pg_schema.VERSION if isinstance(store, PGStore) else schema.VERSION


async def connect(store: Store, watcher: str = "w1", backlog: int = 0,
                  now: float = T0 - 100) -> Change:
    return await store.watcher_connected(watcher, "ingest-key", "dicomhub-watcher 1.0",
                                         "127.0.0.1", backlog, now)


# Idempotence by SOP Instance UID ---------------------------------------------------


async def test_the_same_batch_twice_is_stored_once(store: Store) -> None:
    batch = [record(1), record(2), record(3)]
    first = await store.ingest("w1", batch, T0)
    assert (first.stored, first.duplicates, first.rejected) == (3, 0, 0)
    assert first.touched == {"1.2.3.1": T0}
    seq = await store.last_seq()

    again = await store.ingest("w1", batch, T0 + 1)
    assert (again.stored, again.duplicates, again.rejected) == (0, 3, 0)
    assert again.changes == [] and again.touched == {}
    assert await store.last_seq() == seq  # nothing logged for duplicates

    series = await store.get_series("1.2.3.1")
    assert series is not None
    assert series["instance_count"] == 3 and len(series["instances"]) == 3
    assert series["last_seen"] == iso(T0)  # a duplicate is not a new instance
    assert await store.stats() == {**EMPTY_STATS, "patients": 1, "studies": 1, "series": 1,
                                   "series_receiving": 1, "instances": 3, "files": 3,
                                   "last_seq": seq}


async def test_a_sop_uid_repeated_inside_one_batch_counts_once(store: Store) -> None:
    result = await store.ingest("w1", [record(1), record(1, path="copy/1.dcm")], T0)
    assert (result.stored, result.duplicates) == (1, 1)
    assert [c.kind for c in result.changes] == ["series.created"]
    assert result.changes[0].payload["instance_count"] == 1


async def test_a_duplicate_from_another_path_adds_only_a_file(store: Store) -> None:
    await store.ingest("w1", [record(1)], T0)
    before = await store.stats()
    seq = await store.last_seq()

    copy = record(1, path="backup/copy-of-1.dcm")
    result = await store.ingest("w1", [copy], T0 + 5)
    assert (result.stored, result.duplicates, result.rejected) == (0, 1, 0)
    assert result.changes == []
    assert await store.last_seq() == seq

    after = await store.stats()
    assert after == {**before, "files": before["files"] + 1}
    assert await file_rows(store) == [("w1", "backup/copy-of-1.dcm", "1.2.3.1.1"),
                                     ("w1", "s/1.2.3.1/1.dcm", "1.2.3.1.1")]
    series = await store.get_series("1.2.3.1")
    assert series is not None and series["instance_count"] == 1
    # the instance still points at the file it was first indexed from
    assert [i["path"] for i in series["instances"]] == ["s/1.2.3.1/1.dcm"]


async def test_the_same_instance_from_another_watcher_counts_once(store: Store) -> None:
    await store.ingest("w1", [record(1)], T0)
    result = await store.ingest("w2", [record(1)], T0 + 1)
    assert (result.stored, result.duplicates) == (0, 1)
    assert (await store.stats())["instances"] == 1
    assert [r[0] for r in await file_rows(store)] == ["w1", "w2"]


async def test_a_sop_uid_indexed_in_another_series_is_a_conflict(store: Store) -> None:
    await store.ingest("w1", [record(1, series="1.2.3.1")], T0)
    before = await store.stats()
    seq = await store.last_seq()

    clash = record(1, series="1.2.3.9", path="elsewhere/x.dcm", sop_instance_uid="1.2.3.1.1")
    result = await store.ingest("w1", [clash], T0 + 1)
    assert (result.stored, result.duplicates, result.rejected) == (0, 0, 1)
    assert result.touched == {}

    [change] = result.changes
    assert change.kind == "instance.rejected" and change.seq == seq + 1
    assert change.payload["reason"] == "conflict"
    assert change.payload["path"] == "elsewhere/x.dcm"
    assert change.payload["sop_instance_uid"] == "1.2.3.1.1"
    assert "1.2.3.1" in change.payload["detail"] and "1.2.3.9" in change.payload["detail"]

    [row] = await all_rejections(store)
    assert row["reason"] == "conflict" and row["watcher_id"] == "w1"
    assert row["path"] == "elsewhere/x.dcm" and row["sop_instance_uid"] == "1.2.3.1.1"
    assert "series 1.2.3.1" in row["detail"] and "1.2.3.9" in row["detail"]

    # No series, instance or file for the clashing record.
    assert await store.get_series("1.2.3.9") is None
    assert await store.stats() == {**before, "rejections": 1, "last_seq": seq + 1}
    series = await store.get_series("1.2.3.1")
    assert series is not None and series["instance_count"] == 1


# One ingest call is one transaction ---------------------------------------------------


async def test_a_batch_that_fails_midway_leaves_nothing(store: Store) -> None:
    await connect(store, backlog=9)
    seq = await store.last_seq()
    watcher_before = await store.list_watchers()
    # The last record cannot be bound by the driver (a list where an integer belongs): it
    # fails inside INSERT INTO instances, after its own patient, study and series rows
    # and the earlier records (and a logged rejection) were written in this transaction.
    bad = dataclasses.replace(
        record(1, series="9.9.1", study="9.9", patient_id="P9"), rows=["not", "bindable"])
    batch = [record(1), record(2), rejection("junk.txt", "not_dicom"), bad]
    with pytest.raises(DB_ERRORS):
        await store.ingest("w1", batch, T0, backlog=3)

    assert await store.stats() == {**EMPTY_STATS, "last_seq": seq}
    assert await store.last_seq() == seq
    assert await kinds(store, seq) == []
    assert (await store.list_series(ListQuery())).items == []
    assert (await store.list_studies(ListQuery())).items == []
    assert (await store.list_patients(ListQuery())).items == []
    assert await all_rejections(store) == []
    assert await store.get_patient("P1") is None and await store.get_patient("P9") is None
    assert await store.list_watchers() == watcher_before  # counters and backlog untouched
    assert await file_rows(store) == []

    # The store is still usable, and the good records go in on a retry.
    result = await store.ingest("w1", batch[:3], T0 + 1, backlog=3)
    assert (result.stored, result.rejected) == (2, 1)
    assert [c.seq for c in result.changes] == [seq + 1, seq + 2]


async def test_a_bad_sop_uid_fails_the_whole_batch(store: Store) -> None:
    await store.ingest("w1", [record(1)], T0)
    before = await store.stats()
    bad = dataclasses.replace(record(5), sop_instance_uid=["1", "2"])  # type: ignore[arg-type]
    with pytest.raises(DB_ERRORS):
        await store.ingest("w1", [record(2), record(3, series="1.2.3.2"), bad], T0 + 1)
    assert await store.stats() == before
    assert await store.get_series("1.2.3.2") is None
    series = await store.get_series("1.2.3.1")
    assert series is not None and series["instance_count"] == 1


# Change log ---------------------------------------------------------------------------


async def test_series_created_then_updated_once_per_batch(store: Store) -> None:
    first = await store.ingest("w1", [record(1), record(2), record(1, series="1.2.3.2")], T0)
    assert [(c.kind, c.payload["series_instance_uid"], c.payload["instance_count"])
            for c in first.changes] == [("series.created", "1.2.3.1", 2),
                                        ("series.created", "1.2.3.2", 1)]
    assert all(c.time == T0 and c.payload["status"] == "receiving" for c in first.changes)

    second = await store.ingest("w1", [record(3), record(4), record(5), record(1)], T0 + 10)
    [updated] = second.changes  # one per series per batch, none for the untouched one
    assert updated.kind == "series.updated"
    assert updated.payload["series_instance_uid"] == "1.2.3.1"
    assert updated.payload["instance_count"] == 5
    assert updated.payload["last_seen"] == iso(T0 + 10)
    assert updated.payload["first_seen"] == iso(T0)

    # a batch of only duplicates logs nothing
    assert (await store.ingest("w1", [record(5)], T0 + 20)).changes == []

    logged = await all_changes(store)
    assert [c.kind for c in logged] == ["series.created", "series.created", "series.updated"]
    assert logged == [*first.changes, *second.changes]  # what is returned is what is stored


async def test_seq_strictly_increases_across_kinds(store: Store) -> None:
    await connect(store)
    await store.ingest("w1", [record(1), rejection("bad.dcm")], T0)
    await store.mark_stable(["1.2.3.1"], T0 + 30, 10)
    await store.ingest("w1", [record(2)], T0 + 40)
    await store.watcher_disconnected("w1", T0 + 50)
    logged = await all_changes(store)
    assert [c.kind for c in logged] == ["watcher.connected", "instance.rejected",
                                        "series.created", "series.stable", "series.updated",
                                        "watcher.disconnected"]
    seqs = [c.seq for c in logged]
    assert seqs == sorted(set(seqs)) and seqs[0] >= 1
    assert await store.last_seq() == seqs[-1]
    # paging through the log by seq
    assert [c.seq for c in await store.changes(seqs[1], 2)] == seqs[2:4]
    assert await store.changes(seqs[-1], 10) == []


async def test_rejections_are_logged_once_until_they_change(store: Store) -> None:
    await connect(store)
    result = await store.ingest("w1", [rejection("a.dcm"), rejection("b.txt", "not_dicom")], T0)
    assert result.rejected == 2
    assert [(c.kind, c.payload["path"], c.payload["reason"]) for c in result.changes] == [
        ("instance.rejected", "a.dcm", "truncated"), ("instance.rejected", "b.txt", "not_dicom")]
    assert result.changes[0].payload["time"] == iso(T0)
    assert result.changes[0].payload["watcher_id"] == "w1"
    seq = await store.last_seq()

    # re-sent unchanged (a lost acknowledgement): no new row, no new change
    resent = await store.ingest("w1", [rejection("a.dcm")], T0 + 5)
    assert resent.changes == []
    assert await store.last_seq() == seq
    [row] = await all_rejections(store, reason="truncated")
    assert row["time"] == iso(T0)

    # each of reason, detail, size and mtime counts as a change
    variants = [rejection("a.dcm", "corrupt"),
                rejection("a.dcm", "corrupt", detail="bad tag"),
                rejection("a.dcm", "corrupt", detail="bad tag", size=51),
                rejection("a.dcm", "corrupt", detail="bad tag", size=51, mtime=T0 - 1)]
    for i, variant in enumerate(variants, 1):
        changed = await store.ingest("w1", [variant], T0 + 10 * i)
        assert changed.rejected == 1
        [change] = changed.changes
        assert change.kind == "instance.rejected" and change.seq == seq + i
        assert change.payload["reason"] == "corrupt"
        assert change.payload["detail"] == variant.detail
        assert change.payload["size"] == variant.size
        assert change.payload["time"] == iso(T0 + 10 * i)
        rows = [r for r in await all_rejections(store) if r["path"] == "a.dcm"]
        assert len(rows) == 1  # replaced, not added
        assert (rows[0]["reason"], rows[0]["detail"], rows[0]["size"], rows[0]["time"]) == (
            "corrupt", variant.detail, variant.size, iso(T0 + 10 * i))

    assert (await store.stats())["rejections"] == 2
    assert await all_rejections(store, reason="truncated") == []
    [watcher] = await store.list_watchers()
    assert watcher["rejections"] == 2 + len(variants)


async def test_rejections_of_the_same_path_are_per_watcher(store: Store) -> None:
    await store.ingest("w1", [rejection("a.dcm")], T0)
    result = await store.ingest("w2", [rejection("a.dcm")], T0)
    assert result.rejected == 1 and len(result.changes) == 1
    assert [r["watcher_id"] for r in await all_rejections(store)] == ["w1", "w2"]
    assert [r["watcher_id"] for r in await all_rejections(store, watcher_id="w2")] == ["w2"]


async def test_a_rejection_goes_when_its_path_is_indexed(store: Store) -> None:
    path = "incoming/1.dcm"
    await store.ingest("w1", [rejection(path), rejection(path + ".other")], T0)
    await store.ingest("w2", [rejection(path)], T0)
    seq = await store.last_seq()

    result = await store.ingest("w1", [record(1, path=path)], T0 + 10)  # the copy finished
    assert (result.stored, result.rejected) == (1, 0)
    remaining = {(r["watcher_id"], r["path"]) for r in await all_rejections(store)}
    assert remaining == {("w1", path + ".other"), ("w2", path)}  # only (w1, path) goes
    assert (await store.stats())["rejections"] == 2
    assert await kinds(store, seq) == ["rejection.cleared", "series.created"]


async def test_a_rejection_goes_also_when_its_path_holds_a_duplicate(store: Store) -> None:
    await store.ingest("w1", [record(1)], T0)
    await store.ingest("w1", [rejection("copy.dcm")], T0)
    result = await store.ingest("w1", [record(1, path="copy.dcm")], T0 + 1)
    assert result.duplicates == 1
    assert await all_rejections(store) == []


async def test_a_file_goes_when_its_path_is_rejected(store: Store) -> None:
    await store.ingest("w1", [record(1), record(2)], T0)
    await store.ingest("w2", [record(1)], T0)
    assert len(await file_rows(store)) == 3

    result = await store.ingest("w1", [rejection("s/1.2.3.1/1.dcm", "corrupt")], T0 + 10)
    assert result.rejected == 1
    assert await file_rows(store) == [("w1", "s/1.2.3.1/2.dcm", "1.2.3.1.2"),
                                     ("w2", "s/1.2.3.1/1.dcm", "1.2.3.1.1")]
    stats = await store.stats()
    assert (stats["files"], stats["rejections"], stats["instances"]) == (2, 1, 2)


# Patients and studies -----------------------------------------------------------------


async def test_patient_attributes_keep_the_first_non_empty_value(store: Store) -> None:
    # one study per batch, all for the same patient
    await store.ingest("w1", [record(1, study="1.1", series="1.1.1", patient_name="",
                                     patient_sex="", patient_birth_date="19700101")], T0)
    await store.ingest("w1", [record(1, study="1.2", series="1.2.1", patient_name="Doe^J",
                                     patient_sex="F", patient_birth_date="19991231")], T0 + 1)
    await store.ingest("w1", [record(1, study="1.3", series="1.3.1", patient_name="Other",
                                     patient_sex="M", issuer_of_patient_id="HOSP")], T0 + 2)
    patient = await store.get_patient("P1")
    assert patient is not None
    assert patient["patient_name"] == "Doe^J"
    assert patient["patient_sex"] == "F"
    assert patient["patient_birth_date"] == "19700101"
    assert patient["issuer_of_patient_id"] == "HOSP"
    assert patient["first_seen"] == iso(T0) and patient["last_seen"] == iso(T0 + 2)
    assert patient["study_count"] == 3
    assert (await store.stats())["patients"] == 1


async def test_patient_attributes_fill_in_from_later_copies_of_a_study(
        store: Store) -> None:
    await store.ingest("w1", [record(1, patient_name="")], T0)
    await store.ingest("w1", [record(2, patient_name="Doe^J")], T0 + 1)
    await store.ingest("w1", [record(3, patient_name="Other")], T0 + 2)
    patient = await store.get_patient("P1")
    assert patient is not None and patient["patient_name"] == "Doe^J"


async def test_attributes_fill_in_from_later_records_of_the_same_batch(
        store: Store) -> None:
    await store.ingest("w1", [
        record(1, patient_name="", study_description="", modality=""),
        record(2, patient_name="Doe^J", study_description="Head", modality="CT"),
        record(3, patient_name="Other", study_description="Foot", modality="MR"),
    ], T0)
    patient = await store.get_patient("P1")
    study = await store.get_study("1.2.3")
    series = await store.get_series("1.2.3.1")
    assert patient is not None and study is not None and series is not None
    assert (patient["patient_name"], study["study_description"], series["modality"]) == (
        "Doe^J", "Head", "CT")


async def test_study_attributes_keep_the_first_non_empty_value(store: Store) -> None:
    await store.ingest("w1", [record(1, study_description="", accession_number="A1",
                                     study_date="")], T0)
    await store.ingest("w1", [record(2, study_description="Head", accession_number="A2",
                                     study_date="20240102")], T0 + 1)
    await store.ingest("w1", [record(3, study_description="Foot", accession_number="",
                                     study_date="20250101", referring_physician_name="Dr^X")],
                       T0 + 2)
    study = await store.get_study("1.2.3")
    assert study is not None
    assert study["study_description"] == "Head"
    assert study["accession_number"] == "A1"
    assert study["study_date"] == "20240102"
    assert study["referring_physician_name"] == "Dr^X"
    assert study["first_seen"] == iso(T0) and study["last_seen"] == iso(T0 + 2)
    patient = await store.get_patient("P1")
    assert patient is not None and patient["last_seen"] == iso(T0 + 2)


async def test_series_attributes_keep_the_first_non_empty_value(store: Store) -> None:
    await store.ingest("w1", [record(1, modality="", series_number=None,
                                     series_description="")], T0)
    await store.ingest("w1", [record(2, modality="MR", series_number=4,
                                     series_description="Axial")], T0 + 1)
    await store.ingest("w1", [record(3, modality="CT", series_number=5,
                                     series_description="Sag")], T0 + 2)
    series = await store.get_series("1.2.3.1")
    assert series is not None
    assert (series["modality"], series["series_number"], series["series_description"]) == (
        "MR", 4, "Axial")


async def test_series_date_and_time_fill_in_from_later_records(store: Store) -> None:
    await store.ingest("w1", [record(1, series_date="", series_time="")], T0)
    await store.ingest("w1", [record(2, series_date="20240102", series_time="101500")], T0 + 1)
    series = await store.get_series("1.2.3.1")
    assert series is not None
    assert (series["series_date"], series["series_time"]) == ("20240102", "101500")


@pytest.mark.parametrize("same_batch", [True, False], ids=["same-batch", "later-batch"])
@pytest.mark.parametrize("same_series", [True, False], ids=["same-series", "new-series"])
async def test_a_study_keeps_its_first_patient(store: Store, same_batch: bool,
                                               same_series: bool) -> None:
    first = record(1, patient_id="P1", patient_name="First^P")
    other = record(2, series="1.2.3.1" if same_series else "1.2.3.2",
                   patient_id="P2", patient_name="Second^P")
    if same_batch:
        await store.ingest("w1", [first, other], T0)
    else:
        await store.ingest("w1", [first], T0)
        await store.ingest("w1", [other], T0 + 1)

    assert await store.get_patient("P2") is None  # no orphan patient
    assert (await store.list_patients(ListQuery())).items[0]["patient_id"] == "P1"
    stats = await store.stats()
    assert (stats["patients"], stats["studies"], stats["instances"]) == (1, 1, 2)
    study = await store.get_study("1.2.3")
    assert study is not None
    assert (study["patient_id"], study["patient_name"]) == ("P1", "First^P")
    assert all(s["patient_id"] == "P1" for s in study["series"])
    assert await series_uids(store, patient_id="P2") == []
    patient = await store.get_patient("P1")
    assert patient is not None and [s["study_instance_uid"] for s in patient["studies"]] == [
        "1.2.3"]


# Stability ----------------------------------------------------------------------------


async def test_mark_stable_only_marks_quiet_receiving_series(store: Store) -> None:
    await store.ingest("w1", [record(1, series="A")], T0)
    await store.ingest("w1", [record(1, series="B")], T0 + 5)
    await store.ingest("w1", [record(1, series="C")], T0 - 50)
    assert len(await store.mark_stable(["C"], T0 - 30, 10)) == 1  # C is stable already
    seq = await store.last_seq()

    assert sorted(await store.receiving_series()) == [("A", T0), ("B", T0 + 5)]
    changes = await store.mark_stable(["A", "B", "C", "unknown"], T0 + 10, 10)
    [change] = changes  # A: last_seen == now - stable_after; B: too recent; C: not receiving
    assert change.kind == "series.stable" and change.seq == seq + 1 and change.time == T0 + 10
    assert change.payload["series_instance_uid"] == "A"
    assert change.payload["status"] == "stable"
    assert change.payload["stable_since"] == iso(T0 + 10)
    assert change.payload["instance_count"] == 1
    assert await all_changes(store, seq) == changes

    assert await store.mark_stable(["A", "B", "C"], T0 + 10, 10) == []  # nothing twice
    assert await store.receiving_series() == [("B", T0 + 5)]
    assert await series_uids(store, status="stable") == ["A", "C"]
    assert await series_uids(store, status="receiving") == ["B"]
    stats = await store.stats()
    assert (stats["series"], stats["series_receiving"]) == (3, 1)
    c = await store.get_series("C")
    assert c is not None and c["stable_since"] == iso(T0 - 30)  # untouched by later calls


async def test_a_new_instance_reopens_a_stable_series(store: Store) -> None:
    await store.ingest("w1", [record(1)], T0)
    await store.mark_stable(["1.2.3.1"], T0 + 10, 10)

    # a duplicate does not reopen it
    assert (await store.ingest("w1", [record(1)], T0 + 15)).changes == []
    series = await store.get_series("1.2.3.1")
    assert series is not None and series["status"] == "stable"

    result = await store.ingest("w1", [record(2)], T0 + 20)
    [change] = result.changes
    assert change.kind == "series.updated"
    assert change.payload["status"] == "receiving" and change.payload["stable_since"] is None
    assert change.payload["instance_count"] == 2
    assert result.touched == {"1.2.3.1": T0 + 20}
    series = await store.get_series("1.2.3.1")
    assert series is not None
    assert (series["status"], series["stable_since"]) == ("receiving", None)
    assert await store.receiving_series() == [("1.2.3.1", T0 + 20)]

    assert await store.mark_stable(["1.2.3.1"], T0 + 29, 10) == []  # quiet for only 9 s
    [again] = await store.mark_stable(["1.2.3.1"], T0 + 30, 10)
    assert again.payload["stable_since"] == iso(T0 + 30)


# Reads --------------------------------------------------------------------------------


async def test_list_series_pages_walk_every_row_once(store: Store) -> None:
    uids = [f"1.2.3.{n}" for n in range(1, 8)]
    for i, uid in enumerate(uids):
        await store.ingest("w1", [record(1, series=uid)], T0 + i)

    for limit in (1, 2, 3, 7, 100):
        seen: list[str] = []
        after = 0
        pages = 0
        while True:
            page = await store.list_series(ListQuery(limit=limit, after=after))
            pages += 1
            assert len(page.items) <= limit
            seen += [s["series_instance_uid"] for s in page.items]
            if page.next_after is None:
                break
            assert page.next_after > after and len(page.items) == limit
            after = page.next_after
        assert seen == uids, limit  # in order, each once
        assert pages == max(1, -(-len(uids) // limit)), limit  # no trailing empty page

    # a cursor past the last row gives an empty last page
    last = await store.list_series(ListQuery(limit=6))
    assert last.next_after is not None
    tail = await store.list_series(ListQuery(limit=6, after=last.next_after))
    assert [s["series_instance_uid"] for s in tail.items] == uids[6:]
    assert tail.next_after is None
    empty = await store.list_series(ListQuery(limit=6, after=10**9))
    assert empty.items == [] and empty.next_after is None


async def test_list_series_filters(store: Store) -> None:
    await store.ingest("w1", [
        record(1, series="s1", study="st1", patient_id="P1", modality="CT"),
        record(1, series="s2", study="st1", patient_id="P1", modality="MR"),
        record(1, series="s3", study="st2", patient_id="P2", modality="CT"),
        record(1, series="s4", study="st3", patient_id="P2", modality="US"),
    ], T0)
    await store.ingest("w1", [record(2, series="s4", study="st3", patient_id="P2")], T0 + 50)
    await store.mark_stable(["s1", "s2", "s3", "s4"], T0 + 10, 10)

    assert await series_uids(store) == ["s1", "s2", "s3", "s4"]
    assert await series_uids(store, patient_id="P1") == ["s1", "s2"]
    assert await series_uids(store, patient_id="P2") == ["s3", "s4"]
    assert await series_uids(store, patient_id="nobody") == []
    assert await series_uids(store, study_instance_uid="st1") == ["s1", "s2"]
    assert await series_uids(store, modality="CT") == ["s1", "s3"]
    assert await series_uids(store, status="stable") == ["s1", "s2", "s3"]
    assert await series_uids(store, status="receiving") == ["s4"]
    assert await series_uids(store, patient_id="P2", modality="CT", status="stable") == ["s3"]
    assert await series_uids(store, patient_id="P1", modality="US") == []

    page = await store.list_series(ListQuery(filters={"modality": "CT"}, limit=1))
    assert [s["series_instance_uid"] for s in page.items] == ["s1"]
    assert page.next_after is not None
    rest = await store.list_series(ListQuery(filters={"modality": "CT"}, limit=1,
                                             after=page.next_after))
    assert [s["series_instance_uid"] for s in rest.items] == ["s3"]
    assert rest.next_after is None


async def test_get_series_lists_instances_by_instance_number(store: Store) -> None:
    await store.ingest("w1", [record(3), record(1)], T0)
    await store.ingest("w2", [record(2, number_of_frames=5, rows=512, columns=256,
                                     transfer_syntax_uid="1.2.840.10008.1.2.1",
                                     sop_class_uid="1.2.840.10008.5.1.4.1.1.2")], T0 + 1)
    series = await store.get_series("1.2.3.1")
    assert series is not None
    assert [i["instance_number"] for i in series["instances"]] == [1, 2, 3]
    assert [i["sop_instance_uid"] for i in series["instances"]] == [
        "1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"]
    second = series["instances"][1]
    assert second == {"sop_instance_uid": "1.2.3.1.2",
                      "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "instance_number": 2,
                      "number_of_frames": 5, "rows": 512, "columns": 256,
                      "transfer_syntax_uid": "1.2.840.10008.1.2.1", "watcher_id": "w2",
                      "path": "s/1.2.3.1/2.dcm", "size": 102, "received": iso(T0 + 1)}
    assert series["study_instance_uid"] == "1.2.3" and series["patient_id"] == "P1"
    assert series["patient_name"] == "Doe^Jane" and series["instance_count"] == 3
    assert "id" not in series
    assert await store.get_series("no.such.series") is None


async def test_get_study_aggregates_its_series(store: Store) -> None:
    await store.ingest("w1", [
        record(1, series="s1", modality="CT"), record(2, series="s1", modality="CT"),
        record(1, series="s2", modality="MR"),
        record(1, series="s3", modality="CT"), record(2, series="s3"), record(3, series="s3"),
        record(1, series="s4", modality=""),
        record(1, series="x1", study="other", modality="PT"),
    ], T0)
    study = await store.get_study("1.2.3")
    assert study is not None
    assert study["series_count"] == 4
    assert study["instance_count"] == 7
    assert study["modalities"] == ["CT", "MR"]  # distinct, sorted, no empty value
    assert [s["series_instance_uid"] for s in study["series"]] == ["s1", "s2", "s3", "s4"]
    assert [s["instance_count"] for s in study["series"]] == [2, 1, 3, 1]
    assert study["patient_id"] == "P1" and "id" not in study
    assert await store.get_study("no.such.study") is None

    listed = (await store.list_studies(ListQuery(limit=10))).items
    assert [(s["study_instance_uid"], s["series_count"], s["instance_count"],
             s["modalities"]) for s in listed] == [("1.2.3", 4, 7, ["CT", "MR"]),
                                                   ("other", 1, 1, ["PT"])]


async def test_get_patient_lists_its_studies(store: Store) -> None:
    await store.ingest("w1", [
        record(1, series="a1", study="A", study_description="Head"),
        record(1, series="b1", study="B", study_description="Foot"),
        record(2, series="b1", study="B"),
        record(1, series="c1", study="C", patient_id="P2"),
    ], T0)
    patient = await store.get_patient("P1")
    assert patient is not None
    assert patient["study_count"] == 2 and patient["patient_name"] == "Doe^Jane"
    assert [(s["study_instance_uid"], s["study_description"], s["instance_count"])
            for s in patient["studies"]] == [("A", "Head", 1), ("B", "Foot", 2)]
    assert "id" not in patient
    other = await store.get_patient("P2")
    assert other is not None and [s["study_instance_uid"] for s in other["studies"]] == ["C"]
    assert await store.get_patient("nobody") is None
    assert [p["patient_id"] for p in (await store.list_patients(ListQuery())).items] == [
        "P1", "P2"]


# Keys ---------------------------------------------------------------------------------


async def test_keys_are_created_found_listed_and_counted(store: Store) -> None:
    assert await store.count_keys() == 0 and await store.list_keys() == []
    await store.create_key("reader", "read", "hash-r", T0)
    await store.create_key("admin", "admin", "hash-a", T0 + 1)
    found = await store.find_key("hash-r")
    assert found is not None and (found.name, found.role) == ("reader", "read")
    assert await store.find_key("hash-unknown") is None
    assert await store.count_keys() == 2
    assert await store.list_keys() == [
        {"name": "admin", "role": "admin", "created": iso(T0 + 1), "revoked": None},
        {"name": "reader", "role": "read", "created": iso(T0), "revoked": None}]


async def test_a_live_key_name_is_unique(store: Store) -> None:
    await store.create_key("w", "ingest", "hash-1", T0)
    with pytest.raises(StoreError, match="key named 'w'.* already exists"):
        await store.create_key("w", "read", "hash-2", T0 + 1)
    assert await store.count_keys() == 1
    assert await store.find_key("hash-2") is None


async def test_revoked_keys_are_not_found_and_free_their_name(store: Store) -> None:
    await store.create_key("w", "ingest", "hash-1", T0)
    assert await store.revoke_key("w", T0 + 10) is True
    assert await store.find_key("hash-1") is None
    assert await store.count_keys() == 0
    assert await store.revoke_key("w", T0 + 11) is False  # already revoked
    assert await store.revoke_key("nobody", T0 + 11) is False

    await store.create_key("w", "read", "hash-2", T0 + 20)  # the name is free again
    found = await store.find_key("hash-2")
    assert found is not None and (found.name, found.role) == ("w", "read")
    assert await store.find_key("hash-1") is None
    assert await store.count_keys() == 1
    assert await store.list_keys() == [  # live keys first
        {"name": "w", "role": "read", "created": iso(T0 + 20), "revoked": None},
        {"name": "w", "role": "ingest", "created": iso(T0), "revoked": iso(T0 + 10)}]

    assert await store.revoke_key("w", T0 + 30) is True
    assert await store.count_keys() == 0


# Watchers -----------------------------------------------------------------------------


async def test_watcher_connect_and_disconnect_are_logged(store: Store) -> None:
    connected = await store.watcher_connected("w1", "key-1", "watcher 1.0", "10.0.0.5", 7, T0)
    assert connected.kind == "watcher.connected" and connected.time == T0
    assert connected.payload == {
        "watcher_id": "w1", "key_name": "key-1", "software": "watcher 1.0",
        "address": "10.0.0.5", "connected": True, "backlog": 7, "first_seen": iso(T0),
        "last_seen": iso(T0), "instances": 0, "rejections": 0}

    disconnected = await store.watcher_disconnected("w1", T0 + 5)
    assert disconnected.kind == "watcher.disconnected" and disconnected.seq > connected.seq
    assert disconnected.payload["connected"] is False
    assert disconnected.payload["last_seen"] == iso(T0 + 5)

    again = await store.watcher_connected("w1", "key-2", "watcher 1.1", "10.0.0.6", 0, T0 + 9)
    assert again.payload["first_seen"] == iso(T0)  # the same watcher, not a new one
    assert again.payload["key_name"] == "key-2" and again.payload["connected"] is True
    assert await kinds(store) == ["watcher.connected", "watcher.disconnected",
                                  "watcher.connected"]
    assert await all_changes(store) == [connected, disconnected, again]


async def test_reset_watchers_disconnects_those_of_hubs_gone(store: Store) -> None:
    await connect(store, "w1")
    await connect(store, "w2")
    await store.watcher_disconnected("w2", T0)
    await connect(store, "w3")
    seq = await store.last_seq()
    assert [w["connected"] for w in await store.list_watchers()] == [True, False, True]
    await store.reset_watchers()
    watchers = await store.list_watchers()
    # On a shared database only the watchers of hubs that are gone are reset, and
    # this store's hub is alive (test_pg_store covers one that died).
    alive = store.shared
    assert [(w["watcher_id"], w["connected"]) for w in watchers] == [
        ("w1", alive), ("w2", False), ("w3", alive)]
    assert await store.last_seq() == seq


async def test_ingest_updates_the_watcher_counters(store: Store) -> None:
    await connect(store, "w1", backlog=40, now=T0)
    await connect(store, "w2", backlog=1, now=T0)
    await store.ingest("w1", [record(1), record(2), record(1, path="dup.dcm"),
                              rejection("bad.dcm")], T0 + 1, backlog=25)
    await store.ingest("w1", [record(3), rejection("worse.dcm", "empty")], T0 + 2, backlog=3)
    w1, w2 = await store.list_watchers()
    assert (w1["instances"], w1["rejections"], w1["backlog"]) == (3, 2, 3)
    assert w1["last_seen"] == iso(T0 + 2)
    assert (w2["instances"], w2["rejections"], w2["backlog"]) == (0, 0, 1)

    await store.watcher_backlog("w2", 12, T0 + 3)
    w2 = (await store.list_watchers())[1]
    assert (w2["backlog"], w2["last_seen"]) == (12, iso(T0 + 3))


# DICOMweb search ----------------------------------------------------------------------


async def test_qido_matches_pages_and_counts_alike(store: Store) -> None:
    people = [("P_1", "Doe^Jane"), ("PX1", "Roe^Rick"), ("P%1", "Yamada^Tarou=山田^太郎"),
              ("P\\1", "O'Brien^Ann"), ("p_1", "doe^john"), ("P[1]", "Poe^Ed")]
    records = [record(1, series=f"1.9.{n}", study=f"1.8.{n}", patient_id=patient_id,
                      patient_name=name, modality="CT" if n % 2 else "MR")
               for n, (patient_id, name) in enumerate(people)]
    records.append(record(2, series="1.9.0", study="1.8.0", patient_id="P_1",
                          patient_name="Doe^Jane", modality="MR"))
    await store.ingest("w1", records, T0)

    async def ids(*params: tuple[str, str]) -> list[str]:
        rows, _ = await store.qido(qido.parse("study", list(params)))
        return [row["PatientID"] for row in rows]

    assert await ids() == [patient_id for patient_id, _ in people]  # oldest study first
    for literal in ("P_1", "P%1", "P\\1", "P[1]"):  # no character but * and ? is a wildcard
        assert await ids(("PatientID", literal)) == [literal]
    assert await ids(("PatientID", "P?1")) == ["P_1", "PX1", "P%1", "P\\1"]  # case-sensitive
    assert await ids(("PatientID", "*1")) == ["P_1", "PX1", "P%1", "P\\1", "p_1"]
    assert await ids(("PatientName", "doe*")) == ["p_1"]
    assert await ids(("PatientName", "doe"), ("fuzzymatching", "true")) == ["P_1", "p_1"]
    assert await ids(("PatientName", "山田^太郎")) == ["P%1"]  # the ideographic group
    assert await ids(("PatientName", "O'Brien^Ann")) == ["P\\1"]

    rows, more = await store.qido(qido.parse("study", [("limit", "2"), ("offset", "1")]))
    assert [row["PatientID"] for row in rows] == ["PX1", "P%1"] and more
    rows, more = await store.qido(qido.parse("study", [("limit", "2"), ("offset", "4")]))
    assert [row["PatientID"] for row in rows] == ["p_1", "P[1]"] and not more

    [row], more = await store.qido(qido.parse("study", [("StudyInstanceUID", "1.8.0")]))
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 2)
    assert row["ModalitiesInStudy"] == "MR" and not more
    series, _ = await store.qido(qido.parse("series", [("Modality", "CT")]))
    assert [s["SeriesInstanceUID"] for s in series] == ["1.9.1", "1.9.3", "1.9.5"]
    [instance], _ = await store.qido(qido.parse("instance", [("SOPInstanceUID", "1.9.0.2")]))
    assert (instance["InstanceNumber"], instance["SeriesInstanceUID"]) == (2, "1.9.0")


# Schema and files ---------------------------------------------------------------------


async def test_reopening_keeps_the_data(make_store: Callable[[], Store]) -> None:
    first = make_store()
    await first.open()
    await first.ingest("w1", [record(1), record(2), rejection("x.dcm")], T0)
    await first.create_key("k", "read", "hash-k", T0)
    stats = await first.stats()
    await first.close()

    second = make_store()
    await second.open()
    try:
        assert await second.stats() == stats
        assert (await second.find_key("hash-k")) is not None
        series = await second.get_series("1.2.3.1")
        assert series is not None and series["instance_count"] == 2
        # seq continues after the stored changes
        result = await second.ingest("w1", [record(3)], T0 + 1)
        assert result.changes[0].seq == stats["last_seq"] + 1
    finally:
        await second.close()
    assert await schema_version(second) == current_version(second)


async def test_a_newer_schema_is_refused(make_store: Callable[[], Store]) -> None:
    store = make_store()
    await store.open()
    await store.ingest("w1", [record(1)], T0)
    await store.close()
    newer_version = current_version(store) + 1
    await set_schema_version(store, newer_version)

    newer = make_store()
    try:
        with pytest.raises(StoreError, match=rf"version {newer_version} is newer"):
            await newer.open()
    finally:
        await newer.close()
    assert await schema_version(newer) == newer_version
    assert await raw(newer, "SELECT count(*) FROM instances") == [(1,)]


async def test_the_database_folder_is_created(tmp_path: Path) -> None:
    # SQLite only: a PostgreSQL database lives in its server, with no file of ours.
    path = tmp_path / "not" / "yet" / "there" / "hub.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    try:
        assert path.is_file()
        assert await store.stats() == EMPTY_STATS
    finally:
        await store.close()


async def test_a_fresh_database_is_migrated(store: Store) -> None:
    assert await schema_version(store) == current_version(store)
    if isinstance(store, SQLiteStore):
        assert await raw(store, "PRAGMA journal_mode") == [("wal",)]
        tables = {r[0] for r in await raw(
            store, "SELECT name FROM sqlite_master WHERE type='table'")}
    else:
        tables = {r[0] for r in await raw(
            store, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    assert {"patients", "studies", "series", "instances", "files", "rejections", "keys",
            "watchers", "changes", "sessions", "audit", "settings"} <= tables
    secret = await store.setting("mask_secret")  # made by the migration, 32 random bytes
    assert secret is not None and len(bytes.fromhex(secret)) == 32


async def test_a_path_that_cannot_be_a_database_is_a_store_error(tmp_path: Path) -> None:
    # SQLite only; PostgreSQL's open errors are in test_pg_store.py.
    folder = tmp_path / "db"
    folder.mkdir()
    store = SQLiteStore(folder)  # a directory, not a file
    try:
        with pytest.raises(StoreError, match="cannot open database"):
            await store.open()
    finally:
        await store.close()


# Times --------------------------------------------------------------------------------


async def test_times_are_iso_utc_with_z(store: Store) -> None:
    assert iso(T0) == "2023-11-14T22:13:20.000Z"
    assert iso(T0 + 0.5) == "2023-11-14T22:13:20.500Z"
    await connect(store, now=T0)
    await store.create_key("k", "read", "hash", T0)
    await store.revoke_key("k", T0 + 1)
    await store.ingest("w1", [record(1), rejection("bad.dcm")], T0 + 2)
    await store.mark_stable(["1.2.3.1"], T0 + 20, 10)

    series = await store.get_series("1.2.3.1")
    study = await store.get_study("1.2.3")
    patient = await store.get_patient("P1")
    assert series is not None and study is not None and patient is not None
    stamps = [series["first_seen"], series["last_seen"], series["stable_since"],
              series["instances"][0]["received"], study["first_seen"], study["last_seen"],
              patient["first_seen"], patient["last_seen"]]
    stamps += [r["time"] for r in await all_rejections(store)]
    for key in await store.list_keys():
        stamps += [key["created"], key["revoked"]]
    for watcher in await store.list_watchers():
        stamps += [watcher["first_seen"], watcher["last_seen"]]
    for change in await all_changes(store):
        as_json = change.to_json()
        stamps.append(as_json["time"])
        stamps += [as_json[k] for k in ("first_seen", "last_seen", "time") if k in change.payload]
    assert len(stamps) > 20
    for stamp in stamps:
        assert isinstance(stamp, str) and ISO_Z.match(stamp), stamp
    assert series["stable_since"] == "2023-11-14T22:13:40.000Z"
