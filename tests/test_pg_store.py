"""What only the PostgreSQL store (hub/pg_store.py) does, on a real server: several
stores (as several hubs would) on one database at once, the change log's order
under concurrency, NOTIFY, the timers' lease, and text PostgreSQL cannot hold.
What both engines share is tested in test_store.py, against each of them.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

import factory
from conftest import TIMEOUT, Api, start_hub, wait_for
from dicomhub.errors import StoreError
from dicomhub.protocol import Record
from hub import pg_schema, qido
from hub.pg_store import CHANGES_LOCK, PGStore
from hub.store import AuditEntry, ListQuery
from dicomhub.bench.pgcluster import Cluster
from procs import run_cli, write_config
from test_store import T0, record, rejection


@pytest.fixture
async def stores(pg_database: str) -> AsyncIterator[Callable[[], Awaitable[PGStore]]]:
    """Opens stores on one fresh database (each has its own pool, as a hub would)."""
    opened: list[PGStore] = []

    async def open_store() -> PGStore:
        store = PGStore(pg_database)
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


async def sql(url: str, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows from a connection of the test's own, past the store."""
    con = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await con.fetch(statement, *args)]
    finally:
        await con.close()


def in_order_without_gaps(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# The change log under concurrency -----------------------------------------------------


async def test_two_stores_ingesting_at_once_keep_one_log_without_gaps(stores) -> None:
    a, b = await stores(), await stores()

    def batch(n: int) -> list[Record]:
        # Batch n from either store holds the same SOPs, and overlaps batch n + 4.
        return [record(i, series=f"1.2.{n % 4}") for i in range(n, n + 5)]

    sent = [(store, f"w{k}", n) for n in range(30) for k, store in enumerate((a, b))]
    results = await asyncio.gather(*(store.ingest(watcher, batch(n), T0 + n)
                                     for store, watcher, n in sent))

    sops = {r.sop_instance_uid for _, _, n in sent for r in batch(n)}
    assert sum(r.stored for r in results) == len(sops)  # each SOP stored once
    assert sum(r.stored + r.duplicates for r in results) == 5 * len(sent)
    stats = await a.stats()
    assert (stats["instances"], stats["series"]) == (len(sops), 4)

    log = await b.changes(0, 100_000)
    seqs = [c.seq for c in log]
    assert in_order_without_gaps(seqs)
    assert log == sorted((c for r in results for c in r.changes), key=lambda c: c.seq)
    # Seq order is commit order: each series' count only grows along the log.
    counts: dict[str, list[int]] = defaultdict(list)
    for change in log:
        counts[change.payload["series_instance_uid"]].append(change.payload["instance_count"])
    for uid, seen in counts.items():
        assert seen == sorted(set(seen)), uid
        series = await a.get_series(uid)
        assert series is not None and series["instance_count"] == seen[-1]
    assert [c.kind for c in log].count("series.created") == 4


async def test_a_reader_polling_the_log_never_misses_a_seq(stores) -> None:
    a, b, reader = await stores(), await stores(), await stores()
    seen: list[int] = []
    writers_done = asyncio.Event()

    async def poll() -> None:
        since = 0
        while True:
            finished = writers_done.is_set()  # then one more pass reads to the end
            changes = await reader.changes(since, 7)
            seen.extend(c.seq for c in changes)
            if changes:
                since = changes[-1].seq
            elif finished:
                return

    async def write(store: PGStore, watcher: str) -> None:
        for n in range(25):
            await store.ingest(watcher, [record(i, series=f"3.{watcher}.{n % 3}")
                                         for i in range(n, n + 3)], T0 + n)

    polling = asyncio.create_task(poll())
    await asyncio.gather(write(a, "w1"), write(b, "w2"), write(a, "w3"), write(b, "w4"))
    writers_done.set()
    await asyncio.wait_for(polling, TIMEOUT)
    full = [c.seq for c in await reader.changes(0, 100_000)]
    assert len(full) == 100 and in_order_without_gaps(full)  # one series change a batch
    assert seen == full


async def test_a_writer_waits_while_another_append_is_open(stores, pg_database: str) -> None:
    store = await stores()
    con = await asyncpg.connect(pg_database)
    try:
        open_append = con.transaction()
        await open_append.start()
        await con.execute("SELECT pg_advisory_xact_lock($1)", CHANGES_LOCK)
        early = await con.fetchval("INSERT INTO changes (time, kind, payload)"
                                   " VALUES ($1, 'test.open', '{}') RETURNING seq", T0)
        ingest = asyncio.create_task(store.ingest("w1", [record(1)], T0))

        async def store_waits() -> bool:
            return bool(await con.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))

        await wait_for(store_waits, "the store's writer to wait for the change-log lock")
        # It has taken no seq: the reader sees nothing, not a later seq before ours.
        assert await store.changes(0, 10) == [] and not ingest.done()
        await open_append.commit()
        result = await asyncio.wait_for(ingest, TIMEOUT)
        assert [c.seq for c in result.changes] == [early + 1]
        assert [c.seq for c in await store.changes(0, 10)] == [early, early + 1]
    finally:
        await con.close()


async def test_stores_migrating_a_fresh_database_at_once_all_succeed(pg_database: str) -> None:
    racing = [PGStore(pg_database) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in racing))
        assert await sql(pg_database, "SELECT version FROM schema_version") == [
            (pg_schema.VERSION,)]
        assert len(await sql(pg_database, "SELECT * FROM settings")) == 1
        result = await racing[0].ingest("w1", [record(1)], T0)
        assert await racing[3].changes(0, 10) == result.changes
    finally:
        for store in racing:
            await store.close()


# Other hubs hear of commits ---------------------------------------------------------


async def test_notify_reaches_listeners_on_other_connections_at_commit(
        stores, pg_database: str) -> None:
    listening, writer = await stores(), await stores()
    woken: asyncio.Queue[None] = asyncio.Queue()
    await listening.listen_changes(lambda: woken.put_nowait(None))
    payloads: asyncio.Queue[str] = asyncio.Queue()
    raw = await asyncpg.connect(pg_database)  # any client may LISTEN too
    try:
        await raw.add_listener("dicomhub_changes", lambda *n: payloads.put_nowait(n[-1]))
        first = await writer.ingest("w1", [record(1), rejection("x.dcm")], T0)
        assert await asyncio.wait_for(payloads.get(), TIMEOUT) == str(first.changes[-1].seq)
        await asyncio.wait_for(woken.get(), TIMEOUT)
        assert await listening.changes(0, 10) == first.changes  # committed when heard

        # A batch that logs nothing notifies nothing: the next payload is the next batch's.
        await writer.ingest("w1", [record(1)], T0 + 1)
        change = await writer.watcher_connected("w2", "k", "watcher", "10.0.0.1", 0, T0 + 2)
        assert await asyncio.wait_for(payloads.get(), TIMEOUT) == str(change.seq)
    finally:
        await raw.close()


async def test_listening_resumes_after_its_connection_is_lost(stores, pg_database: str) -> None:
    listening, writer = await stores(), await stores()
    woken: asyncio.Queue[None] = asyncio.Queue()
    await listening.listen_changes(lambda: woken.put_nowait(None))
    killed = await sql(pg_database, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                    " WHERE datname = current_database()"
                                    " AND query LIKE 'LISTEN %'")
    assert len(killed) == 1
    # Back, it wakes its subscribers at once: something may have committed meanwhile.
    await asyncio.wait_for(woken.get(), TIMEOUT)
    await writer.ingest("w1", [record(1)], T0)
    await asyncio.wait_for(woken.get(), TIMEOUT)


async def test_one_store_at_a_time_holds_the_lease(stores) -> None:
    a, b = await stores(), await stores()
    assert await a.lead() is True
    assert await b.lead() is False
    assert await a.lead() is True  # kept while its connection lives
    await a.close()
    assert await wait_for(b.lead, "the lease to pass to the other store")
    assert await b.lead() is True


async def test_a_watcher_stays_connected_while_the_hub_it_uses_lives(stores) -> None:
    a, b = await stores(), await stores()

    async def connected() -> dict[str, bool]:
        return {w["watcher_id"]: w["connected"] for w in await b.list_watchers()}

    await a.watcher_connected("w1", "k", "test", "10.0.0.1", 0, T0)
    await b.watcher_connected("w2", "k", "test", "10.0.0.2", 0, T0)
    await b.reset_watchers()  # b starting again: a's watcher is not b's to reset
    assert await connected() == {"w1": True, "w2": True}
    # w2 moves to a; b then hears its old connection end: w2 stays connected.
    await a.watcher_connected("w2", "k", "test", "10.0.0.2", 0, T0 + 1)
    assert await b.watcher_disconnected("w2", T0 + 2) is None
    assert await connected() == {"w1": True, "w2": True}
    assert "hub" not in (await b.list_watchers())[0]  # internal: not in the API
    await a.close()  # a dies: its watchers are not connected any more
    await b.reset_watchers()
    assert await connected() == {"w1": False, "w2": False}


# What PostgreSQL cannot hold, and other guarantees -------------------------------------


async def test_text_postgresql_cannot_hold_is_rejected_or_shown_replaced(stores) -> None:
    store = await stores()
    result = await store.ingest("w1", [record(1, patient_name="Doe\x00Jane"), record(2),
                                       rejection("bad.dcm", detail="odd\x00byte")], T0)
    assert (result.stored, result.rejected) == (1, 2)
    rejections = {r["path"]: r for r in (await store.list_rejections(ListQuery())).items}
    assert rejections["s/1.2.3.1/1.dcm"]["reason"] == "corrupt"
    assert "NUL" in rejections["s/1.2.3.1/1.dcm"]["detail"]
    assert rejections["bad.dcm"]["detail"] == "odd\ufffdbyte"
    # Looking up a value with NUL finds nothing, rather than failing.
    assert await store.get_series("1.2\x00") is None
    assert (await store.list_series(ListQuery(filters={"patient_id": "P\x00"}))).items == []
    assert await store.qido(qido.parse("study", [("PatientID", "P\x00")])) == ([], False)
    await store.audit([AuditEntry(T0, "reader", "read", "read", "/api/series/a\x00b", "::1")])
    [entry] = (await store.list_audit(ListQuery())).items
    assert entry["target"] == "/api/series/a\ufffdb"


async def test_the_audit_trail_is_append_only(stores, pg_database: str) -> None:
    store = await stores()
    await store.audit([AuditEntry(T0, "cli", "admin", "key.create", "k (read)", "local")])
    con = await asyncpg.connect(pg_database)
    try:
        for statement in ("UPDATE audit SET actor = 'nobody'", "DELETE FROM audit",
                          "TRUNCATE audit"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await con.execute(statement)
    finally:
        await con.close()
    assert [e["actor"] for e in (await store.list_audit(ListQuery())).items] == ["cli"]


async def test_commits_are_durable_even_where_the_database_says_otherwise(
        pg_database: str) -> None:
    await sql(pg_database, "DO $$ BEGIN EXECUTE format("
                           "'ALTER DATABASE %I SET synchronous_commit = off',"
                           " current_database()); END $$")
    assert await sql(pg_database, "SHOW synchronous_commit") == [("off",)]
    store = PGStore(pg_database)
    await store.open()
    try:
        async with store._db.acquire() as con:  # a connection the store writes with
            assert await con.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await store.close()


async def test_a_database_that_cannot_be_opened_is_a_store_error(postgres: Cluster) -> None:
    store = PGStore(postgres.url("no_such_database", password="s3cret"))
    try:
        with pytest.raises(StoreError, match="cannot open database") as caught:
            await store.open()
    finally:
        await store.close()
    assert "no_such_database" in str(caught.value) and "s3cret" not in str(caught.value)


async def test_a_newer_schema_is_refused_before_anything_changes(stores, pg_database) -> None:
    await stores()
    await sql(pg_database, "UPDATE schema_version SET version = $1", pg_schema.VERSION + 5)
    newer = PGStore(pg_database)
    try:
        with pytest.raises(StoreError, match="upgrade dicomhub"):
            await newer.open()
    finally:
        await newer.close()


# A whole hub, and the command line ----------------------------------------------------


async def test_a_hub_on_postgresql_indexes_what_a_watcher_sends(
        tmp_path: Path, pg_database: str, run_watcher: Any,
        http: aiohttp.ClientSession) -> None:
    hub = await start_hub(tmp_path, database_url=pg_database, stable_after=0.5)
    try:
        assert isinstance(hub.store, PGStore) and not (tmp_path / "hub.sqlite3").exists()
        running = await run_watcher(hub)
        first = factory.write(running.inbox / "study" / "1.dcm")
        factory.write(running.inbox / "study" / "2.dcm", InstanceNumber=2,
                      StudyInstanceUID=first.StudyInstanceUID,
                      SeriesInstanceUID=first.SeriesInstanceUID)
        (running.inbox / "notes.dcm").write_text("not an image\n" * 20)
        api = Api(http, hub.url, await hub.key("read"))

        async def stable_series() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = (await api.get("/api/series"))["items"]
            return items if items and items[0]["status"] == "stable" else []

        [series] = await wait_for(stable_series, "the series to be indexed and turn stable")
        assert series["series_instance_uid"] == first.SeriesInstanceUID
        assert series["instance_count"] == 2 and series["patient_id"] == "TEST-0001"
        [rejected] = (await api.get("/api/rejections"))["items"]
        assert (rejected["path"], rejected["reason"]) == ("notes.dcm", "not_dicom")
        kinds = [c["kind"] for c in (await api.get("/api/changes"))["changes"]]
        assert {"watcher.connected", "series.created", "instance.rejected",
                "series.stable"} <= set(kinds)
        async with http.get(hub.url + "/dicomweb/studies",
                            headers={"Authorization": f"Bearer {api.key}"}) as resp:
            assert resp.status == 200
            [study] = await resp.json()
        assert study["0020000D"]["Value"] == [first.StudyInstanceUID]
        assert study["00201208"]["Value"] == [2]  # NumberOfStudyRelatedInstances
        await running.stop()
    finally:
        await hub.stop()


async def test_a_live_client_of_one_hub_hears_what_another_hub_stored(
        tmp_path: Path, pg_database: str, http: aiohttp.ClientSession) -> None:
    first = await start_hub(tmp_path, database_url=pg_database)
    second = await start_hub(tmp_path, database_url=pg_database)
    try:
        key = await second.key("read")
        ws = await http.ws_connect(second.url + "/ws/live?since=0",
                                   headers={"Authorization": f"Bearer {key}"})
        result = await first.store.ingest("w1", [record(1), rejection("x.dcm")], T0)
        heard: list[dict[str, Any]] = []
        while not heard or heard[-1]["seq"] < result.changes[-1].seq:
            message = json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
            if message["kind"] not in ("stats", "live"):
                heard.append(message)
        assert heard == [c.to_json() for c in result.changes]
        await ws.close()
    finally:
        await second.stop()
        await first.stop()


def test_the_keys_command_works_on_postgresql(tmp_path: Path, pg_database: str) -> None:
    write_config(tmp_path, hub=f'database = "{pg_database}"')
    created = run_cli("keys", "create", "--role", "read", "--name", "alice", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    listed = run_cli("keys", "list", cwd=tmp_path)
    assert "alice" in listed.stdout and created.stdout.strip() not in listed.stdout
    assert run_cli("keys", "revoke", "alice", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "data").exists()  # no SQLite file on the side
    rows = asyncio.run(sql(pg_database, "SELECT actor, action, target FROM audit ORDER BY id"))
    assert rows == [("cli", "key.create", "alice (read)"), ("cli", "key.revoke", "alice")]
