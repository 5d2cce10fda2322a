"""End to end in one process: a real watcher on a temp folder, a real hub on port 0."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
from pathlib import Path

import pytest

import factory
from conftest import Api, RunningHub, manifest, start_hub, wait_for

pytestmark = pytest.mark.asyncio


async def outcomes(api: Api) -> int:
    """Files with an outcome so far: indexed (a file row) or rejected."""
    stats = await api.get("/api/stats")
    return int(stats["files"] + stats["rejections"])


async def wait_outcomes(api: Api, count: int) -> None:
    async def reached() -> bool:
        return await outcomes(api) >= count

    await wait_for(reached, f"{count} files to be indexed or rejected")


async def test_every_sample_is_indexed_or_rejected(hub: RunningHub, api: Api, run_watcher,
                                                   samples: Path) -> None:
    running = await run_watcher(hub, workers=2)
    shutil.copytree(samples / "files", running.inbox / "samples")
    rows = manifest(samples)
    await wait_outcomes(api, len(rows))
    assert await outcomes(api) == len(rows)

    # Ground truth from the manifest (pydicom's own reading): distinct SOP Instance
    # UIDs per series, over files that name all three UIDs and are not DICOMDIRs.
    expected: dict[str, set[str]] = collections.defaultdict(set)
    for row in rows:
        uids = row["sop_instance_uid"], row["series_instance_uid"], row["study_instance_uid"]
        if all(uids) and "DICOMDIR" not in row["notes"]:
            expected[row["series_instance_uid"]].add(row["sop_instance_uid"])
    series = await api.all("/api/series")
    assert {s["series_instance_uid"]: s["instance_count"] for s in series} == {
        uid: len(sops) for uid, sops in expected.items()}

    rejections = {r["path"]: r for r in await api.all("/api/rejections")}
    for row in rows:
        path = "samples/" + row["path"].removeprefix("files/")
        if "not DICOM" in row["notes"]:
            assert rejections[path]["reason"] == "not_dicom", path
        if "zero-length" in row["notes"]:
            assert rejections[path]["reason"] == "empty", path
        if "DICOMDIR" in row["notes"]:
            assert rejections[path]["reason"] == "dicomdir", path
        if not row["sop_instance_uid"] and "not DICOM" not in row["notes"] \
                and "zero-length" not in row["notes"] and "DICOMDIR" not in row["notes"]:
            assert rejections[path]["reason"] in ("missing_uid", "not_dicom", "corrupt"), path
    assert all(r["detail"] for r in rejections.values())

    # Non-Latin names arrive intact, as UTF-8.
    names = {s["patient_name"] for s in series}
    for row in rows:
        marker = "PatientName decodes to '"
        if marker in row["notes"] and "\\x1b" not in row["notes"] \
                and row["series_instance_uid"] in expected:
            decoded = row["notes"].split(marker, 1)[1].rsplit("'", 1)[0]
            assert decoded in names, decoded


async def test_copies_of_one_instance_count_once(hub: RunningHub, api: Api,
                                                 run_watcher) -> None:
    running = await run_watcher(hub)
    ds = factory.write(running.inbox / "study" / "a.dcm")
    shutil.copy(running.inbox / "study" / "a.dcm", running.inbox / "study" / "copy-of-a")
    await wait_outcomes(api, 2)
    series = await api.get(f"/api/series/{ds.SeriesInstanceUID}")
    assert series["instance_count"] == 1
    assert (await api.get("/api/stats"))["files"] == 2


async def test_bad_files_become_rejections_and_heal_when_fixed(hub: RunningHub, api: Api,
                                                               run_watcher) -> None:
    running = await run_watcher(hub)
    inbox = running.inbox
    (inbox / "notes.dcm").write_text("this is not an image\n" * 20)
    (inbox / "empty.dcm").write_bytes(b"")
    factory.write(inbox / "no-series.dcm", SeriesInstanceUID=None)
    whole = inbox / "cut.dcm"
    ds = factory.write(whole)
    data = whole.read_bytes()
    cut = data.index(ds.SOPInstanceUID.encode()) + 5
    (inbox / ".cut.tmp").write_bytes(data[:cut])
    os.rename(inbox / ".cut.tmp", inbox / "cut-short.dcm")
    await wait_outcomes(api, 5)
    reasons = {r["path"]: r["reason"] for r in await api.all("/api/rejections")}
    assert reasons == {"notes.dcm": "not_dicom", "empty.dcm": "empty",
                       "no-series.dcm": "missing_uid", "cut-short.dcm": "truncated"}
    # The copy finishes: the same path is now a whole file, indexed; the rejection goes.
    (inbox / ".whole.tmp").write_bytes(data)
    os.rename(inbox / ".whole.tmp", inbox / "cut-short.dcm")

    async def healed() -> bool:
        paths = {r["path"] for r in await api.all("/api/rejections")}
        return "cut-short.dcm" not in paths

    await wait_for(healed, "the completed file to replace its rejection")
    cleared = [c for c in (await api.get("/api/changes"))["changes"]
               if c["kind"] == "rejection.cleared"]
    assert [(c["path"], c["previous_reason"]) for c in cleared] == [("cut-short.dcm",
                                                                     "truncated")]
    detail = await api.get(f"/api/series/{ds.SeriesInstanceUID}")
    assert detail["instance_count"] == 1
    assert {i["sop_instance_uid"] for i in detail["instances"]} == {ds.SOPInstanceUID}


@pytest.mark.fault
async def test_slow_writer_is_read_once_when_complete(hub: RunningHub, api: Api,
                                                      run_watcher, tmp_path: Path) -> None:
    running = await run_watcher(hub, settle=2.0)
    source = tmp_path / "source.dcm"
    ds = factory.write(source, pixels=96 * 1024)
    data = source.read_bytes()
    target = running.inbox / "slow.dcm"
    with target.open("wb") as fh:  # 3 s of writing, in chunks spaced well inside `settle`
        for start in range(0, len(data), 8192):
            fh.write(data[start:start + 8192])
            fh.flush()
            await asyncio.sleep(0.25)
    await wait_outcomes(api, 1)
    assert running.watcher.parsed == 1
    assert (await api.get("/api/stats"))["rejections"] == 0
    detail = await api.get(f"/api/series/{ds.SeriesInstanceUID}")
    assert detail["instances"][0]["size"] == len(data)


@pytest.mark.fault
async def test_temporary_and_hidden_names_wait_for_the_rename(hub: RunningHub, api: Api,
                                                              run_watcher) -> None:
    running = await run_watcher(hub)
    inbox = running.inbox
    factory.write(inbox / "incoming.part")
    factory.write(inbox / ".hidden.dcm")
    factory.write(inbox / "backup~")
    factory.write(inbox / ".staging" / "x.dcm")
    ds = factory.write(inbox / "x.tmp")
    os.rename(inbox / "x.tmp", inbox / "x.dcm")
    await wait_outcomes(api, 1)
    (inbox / ".staging").rename(inbox / "staged")
    await wait_outcomes(api, 2)
    files = {i["path"] for s in await api.all("/api/series")
             for i in (await api.get(f"/api/series/{s['series_instance_uid']}"))["instances"]}
    assert files == {"x.dcm", "staged/x.dcm"}
    assert (await api.get(f"/api/series/{ds.SeriesInstanceUID}"))["instance_count"] == 1


@pytest.mark.fault
async def test_restart_sends_nothing_twice_and_finds_new_files(hub: RunningHub, api: Api,
                                                               run_watcher) -> None:
    first = await run_watcher(hub, watcher_id="same")
    for n in range(5):
        factory.write(first.inbox / f"{n}.dcm", SeriesInstanceUID="1.2.99", InstanceNumber=n)
    await wait_outcomes(api, 5)
    await first.stop()
    factory.write(first.inbox / "while-away.dcm", SeriesInstanceUID="1.2.99")
    second = await run_watcher(hub, watcher_id="same")
    await wait_outcomes(api, 6)
    assert second.watcher.parsed == 1  # only the new file was read
    assert (await api.get("/api/series/1.2.99"))["instance_count"] == 6


@pytest.mark.fault
async def test_hub_down_during_ingest_loses_and_doubles_nothing(tmp_path: Path, http,
                                                                run_watcher) -> None:
    hub = await start_hub(tmp_path)
    port = int(hub.url.rsplit(":", 1)[1])
    read_key = await hub.key("read")
    api = Api(http, hub.url, read_key)
    running = await run_watcher(hub)
    total = 400
    for n in range(total):
        factory.write(running.inbox / f"s{n % 4}" / f"{n}.dcm",
                      SeriesInstanceUID=f"1.2.77.{n % 4}", StudyInstanceUID="1.2.77")

    async def some() -> bool:
        return (await api.get("/api/stats"))["instances"] >= 20

    await wait_for(some, "ingest to start")
    await hub.stop()
    assert running.watcher.state.backlog >= 0
    hub = await start_hub(tmp_path, port=port)  # same port and database
    try:
        await wait_outcomes(api, total)
        series = await api.all("/api/series")
        assert sorted(s["instance_count"] for s in series) == [100, 100, 100, 100]
        assert (await api.get("/api/stats"))["instances"] == total

        async def drained() -> bool:
            return running.watcher.state.backlog == 0

        await wait_for(drained, "the outbox to empty")
    finally:
        await running.stop()
        await hub.stop()


async def test_series_turns_stable_reopens_and_survives_restart(tmp_path: Path, http,
                                                                run_watcher) -> None:
    hub = await start_hub(tmp_path, stable_after=0.5)
    api = Api(http, hub.url, await hub.key("read"))
    running = await run_watcher(hub)
    try:
        factory.write(running.inbox / "1.dcm", SeriesInstanceUID="3.1")

        async def status(want: str, count: int) -> bool:
            series = (await api.get("/api/series"))["items"]
            return bool(series) and series[0]["status"] == want \
                and series[0]["instance_count"] == count

        await wait_for(lambda: status("stable", 1), "the series to become stable")
        factory.write(running.inbox / "2.dcm", SeriesInstanceUID="3.1")  # a late instance
        await wait_for(lambda: status("stable", 2), "the reopened series to settle again")
        kinds = [c["kind"] for c in (await api.get("/api/changes"))["changes"]
                 if c["kind"].startswith("series.")]
        assert kinds == ["series.created", "series.stable", "series.updated", "series.stable"]
        updated = [c for c in (await api.get("/api/changes"))["changes"]
                   if c["kind"] == "series.updated"][0]
        assert updated["instance_count"] == 2 and updated["status"] == "receiving"
    finally:
        await running.stop()
        await hub.stop()


async def test_stability_holds_across_a_hub_restart(tmp_path: Path, http) -> None:
    from dicomhub.protocol import InstanceRecord
    import time

    hub = await start_hub(tmp_path, stable_after=3600)
    await hub.store.watcher_connected("w", "k", "", "", 0, time.time())
    await hub.store.ingest("w", [InstanceRecord(
        path="a", size=1, mtime=1.0, sop_instance_uid="4.1.1", series_instance_uid="4.1",
        study_instance_uid="4")], time.time())
    await hub.stop()
    # Restarted with a quiet period that has already passed: stable on start.
    hub = await start_hub(tmp_path, stable_after=0.2)
    api = Api(http, hub.url, await hub.key("read"))
    try:
        async def stable() -> bool:
            return (await api.get("/api/series/4.1"))["status"] == "stable"

        await wait_for(stable, "the series to become stable after the restart")
    finally:
        await hub.stop()


async def test_several_roots_keep_their_paths_apart(hub: RunningHub, api: Api, run_watcher,
                                                    tmp_path: Path) -> None:
    roots = (tmp_path / "site-a", tmp_path / "site-b")
    await run_watcher(hub, watch=roots)
    first = factory.write(roots[0] / "x.dcm")
    second = factory.write(roots[1] / "x.dcm")
    (roots[1] / "junk.dcm").write_text("junk")
    await wait_outcomes(api, 3)
    paths = {}
    for ds in (first, second):
        detail = await api.get(f"/api/series/{ds.SeriesInstanceUID}")
        paths[ds.SOPInstanceUID] = detail["instances"][0]["path"]
    assert paths == {first.SOPInstanceUID: "site-a/x.dcm", second.SOPInstanceUID: "site-b/x.dcm"}
    assert [r["path"] for r in await api.all("/api/rejections")] == ["site-b/junk.dcm"]


@pytest.mark.fault
async def test_polling_mode_finds_files_without_kernel_events(hub: RunningHub, api: Api,
                                                              run_watcher) -> None:
    running = await run_watcher(hub, polling=True, poll_interval=0.2)
    ds = factory.write(running.inbox / "deep" / "er" / "a.dcm")
    await wait_outcomes(api, 1)
    assert (await api.get(f"/api/series/{ds.SeriesInstanceUID}"))["instance_count"] == 1


@pytest.mark.fault
async def test_symlink_loops_and_dangling_links_are_reported_not_followed(
        hub: RunningHub, api: Api, run_watcher, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox-links"
    (inbox / "tree").mkdir(parents=True)
    os.symlink(inbox, inbox / "tree" / "back-to-top")  # a folder loop: not followed
    os.symlink("self-loop", inbox / "self-loop")  # a file loop: ELOOP
    os.symlink(tmp_path / "nowhere.dcm", inbox / "dangling.dcm")
    ds = factory.write(inbox / "tree" / "real.dcm")
    await run_watcher(hub, watch=(inbox,))
    await wait_outcomes(api, 3)
    reasons = {r["path"]: r["reason"] for r in await api.all("/api/rejections")}
    assert reasons == {"self-loop": "unreadable", "dangling.dcm": "unreadable"}
    detail = await api.get(f"/api/series/{ds.SeriesInstanceUID}")
    assert [i["path"] for i in detail["instances"]] == ["tree/real.dcm"]


async def test_logs_never_hold_patient_names_or_ids(hub: RunningHub, api: Api, run_watcher,
                                                    samples: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import urllib.parse

    rows = manifest(samples)
    with caplog.at_level(logging.DEBUG):
        running = await run_watcher(hub, workers=2)
        shutil.copytree(samples / "files", running.inbox / "samples")
        await wait_outcomes(api, len(rows))
        # Reads that carry PHI in the path and the query string.
        patients = await api.all("/api/patients")
        for patient in patients[:20]:
            if patient["patient_id"]:
                quoted = urllib.parse.quote(patient["patient_id"], safe="")
                await api.get(f"/api/patients/{quoted}")
                await api.get("/api/series", patient_id=patient["patient_id"])
        async with api.session.get(api.base + "/api/patients/nobody-by-this-id-0",
                                   headers={"Authorization": f"Bearer {api.key}"}) as gone:
            assert gone.status == 404  # a miss is logged too, by route only
    phi = {p["patient_id"] for p in patients} | {p["patient_name"] for p in patients}
    # Values long and specific enough not to occur by chance in times or ports.
    phi = {v for v in phi if len(v) >= 5 and not v.replace(".", "").isdigit()}
    assert len(phi) > 20
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /api/patients/{patient_id" in text  # the access log was captured
    leaks = [f"{r.name}: {r.getMessage()[:300]}" for r in caplog.records
             if any(v in r.getMessage() for v in phi)]
    assert leaks == []


@pytest.mark.fault
async def test_reconciliation_finds_files_the_events_missed(hub: RunningHub, api: Api,
                                                            run_watcher) -> None:
    running = await run_watcher(hub, rescan_interval=0.3)
    observer = running.watcher.observer
    observer.stop()  # as if the kernel's event queue had overflowed: no events at all
    await asyncio.to_thread(observer.join, 5)
    ds = factory.write(running.inbox / "quiet" / "a.dcm")
    await wait_outcomes(api, 1)
    assert (await api.get(f"/api/series/{ds.SeriesInstanceUID}"))["instance_count"] == 1
    parsed, walks = running.watcher.parsed, running.watcher.rescans

    async def walked_twice_more() -> bool:
        return running.watcher.rescans >= walks + 2

    await wait_for(walked_twice_more, "two more reconciliation walks")
    assert running.watcher.parsed == parsed  # they re-read nothing already delivered


@pytest.mark.fault
async def test_a_file_replaced_by_another_is_read_again(hub: RunningHub, api: Api,
                                                        run_watcher) -> None:
    running = await run_watcher(hub)
    first = factory.write(running.inbox / ".a.tmp")
    os.rename(running.inbox / ".a.tmp", running.inbox / "a.dcm")
    await wait_for(lambda: _has_instance(api, first.SeriesInstanceUID), "the first file")
    second = factory.write(running.inbox / ".b.tmp", SeriesInstanceUID=first.SeriesInstanceUID,
                           InstanceNumber=2)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    os.replace(running.inbox / ".b.tmp", running.inbox / "a.dcm")  # new content, same name

    async def both() -> bool:
        series = await api.get(f"/api/series/{first.SeriesInstanceUID}")
        return series["instance_count"] == 2

    await wait_for(both, "the replacement to be indexed")
    assert (await api.get("/api/stats"))["files"] == 1  # the path now holds the new one
    series = await api.get(f"/api/series/{first.SeriesInstanceUID}")
    assert {i["sop_instance_uid"] for i in series["instances"]} == {
        first.SOPInstanceUID, second.SOPInstanceUID}


@pytest.mark.fault
async def test_a_file_deleted_right_after_it_appears_leaves_no_trace(hub: RunningHub, api: Api,
                                                                     run_watcher) -> None:
    running = await run_watcher(hub, settle=0.5)
    for n in range(20):
        path = running.inbox / f"gone-{n}.dcm"
        path.write_bytes(b"\0" * 10)  # still being written, as far as anyone knows
        path.unlink()
    keeper = factory.write(running.inbox / "kept.dcm")
    await wait_for(lambda: _has_instance(api, keeper.SeriesInstanceUID), "the kept file")
    stats = await api.get("/api/stats")
    assert (stats["files"], stats["rejections"]) == (1, 0)


async def _has_instance(api: Api, series_uid: str) -> bool:
    return bool([s for s in (await api.get("/api/series"))["items"]
                 if s["series_instance_uid"] == series_uid])


@pytest.mark.fault
async def test_a_large_folder_streams_through_a_bounded_queue(
        hub: RunningHub, api: Api, run_watcher, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from watcher import service

    monkeypatch.setattr(service, "PENDING_LIMIT", 20)
    monkeypatch.setattr(service, "SCAN_CHUNK", 10)
    for n in range(300):
        factory.write(tmp_path / "inbox-w1" / f"{n % 7}" / f"{n}.dcm",
                      SeriesInstanceUID="1.2.77", InstanceNumber=n)
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            for item in service_watchers:
                peak = max(peak, len(item.settler) + item._queue.qsize())
            await asyncio.sleep(0)

    service_watchers: list[service.Watcher] = []
    real_init = service.Watcher.__init__

    def init(self: service.Watcher, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        service_watchers.append(self)

    monkeypatch.setattr(service.Watcher, "__init__", init)
    sampler = asyncio.create_task(sample())
    try:
        await run_watcher(hub)
        await wait_outcomes(api, 300)
    finally:
        sampler.cancel()
    assert (await api.get("/api/series/1.2.77"))["instance_count"] == 300
    # The walk waits while 20 paths are pending, then adds at most one chunk of 10.
    assert 0 < peak < 30, peak


@pytest.mark.fault
@pytest.mark.parametrize("polling", [False, True])
async def test_a_folder_moved_in_whole_is_indexed(hub: RunningHub, api: Api, run_watcher,
                                                  tmp_path: Path, polling: bool) -> None:
    running = await run_watcher(hub, polling=polling, poll_interval=0.2)
    staging = tmp_path / "staging"
    for n in range(60):
        factory.write(staging / "a" / f"{n % 3}" / f"{n}.dcm", SeriesInstanceUID="1.2.88",
                      InstanceNumber=n)
    os.rename(staging / "a", running.inbox / "a")  # one event for the folder, none per file
    await wait_outcomes(api, 60)
    assert (await api.get("/api/series/1.2.88"))["instance_count"] == 60
    assert running.watcher.parsed == 60
