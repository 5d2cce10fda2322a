"""GET /metrics on a real hub fed by a real watcher: who may read it, what the
numbers say after a delivery, and that no patient data reaches it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import factory
from conftest import TIMEOUT, RunningHub, wait_for

pytestmark = pytest.mark.asyncio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def scrape_text(hub: RunningHub, http: aiohttp.ClientSession, key: str) -> str:
    async with http.get(hub.url + "/metrics", headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return await resp.text()


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(hub: RunningHub, http: aiohttp.ClientSession, key: str) -> Samples:
    return parse(await scrape_text(hub, http, key))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def records(samples: Samples) -> dict[str, float]:
    return {outcome: value(samples, "dicomhub_ingest_records_total", outcome=outcome)
            for outcome in ("stored", "duplicate", "rejected")}


async def test_metrics_need_a_read_key(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.url + "/metrics") as resp:
        assert resp.status == 401
    async with http.get(hub.url + "/metrics", headers=bearer(await hub.key("ingest"))) as resp:
        assert resp.status == 403
    samples = await scrape(hub, http, await hub.key("read"))
    assert records(samples) == {"stored": 0, "duplicate": 0, "rejected": 0}
    assert value(samples, "dicomhub_watchers_connected") == 0
    assert ("process_cpu_seconds_total", frozenset()) in samples  # the standard collectors
    assert any(name == "python_info" for name, _ in samples)


async def test_counts_after_a_watcher_delivers_and_no_phi(
        hub: RunningHub, http: aiohttp.ClientSession, run_watcher, tmp_path: Path) -> None:
    key = await hub.key("read")
    running = await run_watcher(hub)
    inbox, staging = running.inbox, tmp_path / "staging"
    staging.mkdir()
    ward = "Ward-Quillfeather"  # a folder name: paths can name patients

    def deliver(source: Path, name: str) -> None:
        """Move a finished file in at once, so the watcher never sees half of it."""
        (inbox / ward).mkdir(exist_ok=True)
        os.rename(source, inbox / ward / name)

    written = []
    for n in range(3):
        written.append(factory.write(
            staging / f"scan-{n}.dcm", PatientName=f"Quillfeather^Ottoline{n}",
            PatientID=f"MRN-90817{n}", AccessionNumber=f"ACC-55123{n}"))
        shutil.copy(staging / f"scan-{n}.dcm", staging / f"keep-{n}.dcm")
        deliver(staging / f"scan-{n}.dcm", f"scan-{n}.dcm")
    (staging / "garbage.dcm").write_text("this is not an image\n" * 20)
    deliver(staging / "garbage.dcm", "garbage.dcm")
    deliver(staging / "keep-0.dcm", "copy-of-scan-0.dcm")

    async def delivered() -> Samples | None:
        samples = await scrape(hub, http, key)
        return samples if sum(records(samples).values()) >= 5 else None

    samples = await wait_for(delivered, "5 records to be acknowledged")
    assert records(samples) == {"stored": 3, "duplicate": 1, "rejected": 1}
    batches = value(samples, "dicomhub_ingest_batches_total")
    assert batches >= 1
    assert value(samples, "dicomhub_ingest_latency_seconds_count") == batches
    assert value(samples, "dicomhub_database_latency_seconds_count", operation="ingest") \
        == batches
    assert value(samples, "dicomhub_watchers_connected") == 1
    assert value(samples, "dicomhub_live_clients_connected") == 0

    live = await http.ws_connect(hub.url + "/ws/live", headers=bearer(key))
    assert json.loads((await live.receive(timeout=TIMEOUT)).data)["kind"] == "live"

    async def idle() -> Samples | None:
        samples = await scrape(hub, http, key)
        return samples if value(samples, "dicomhub_change_log_lag") == 0 else None

    samples = await wait_for(idle, "the live feed to publish every change")
    assert value(samples, "dicomhub_live_clients_connected") == 1
    await live.close()

    text = await scrape_text(hub, http, key)
    secrets = [str(inbox), ward, "scan-", "garbage", "copy-of"]
    for ds in written:
        secrets += [str(ds.PatientName), "Quillfeather", "Ottoline", ds.PatientID,
                    ds.AccessionNumber, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                    ds.SOPInstanceUID]
    assert [s for s in secrets if s in text] == []


async def test_a_client_cut_off_for_falling_behind_is_counted(
        hub: RunningHub, http: aiohttp.ClientSession) -> None:
    from hub.feed import QUEUE_LIMIT
    from hub.live import CLOSE_TOO_SLOW, FEED_KEY
    from hub.store import Change

    key = await hub.key("read")
    ws = await http.ws_connect(hub.url + "/ws/live", headers=bearer(key))
    assert json.loads((await ws.receive(timeout=TIMEOUT)).data)["kind"] == "live"
    # One burst larger than a client's queue: nothing can drain between the puts,
    # so this client overflows however fast it reads.
    now = time.time()
    hub.runner.app[FEED_KEY].publish([Change(seq, now, "series.updated", {})
                                      for seq in range(1, QUEUE_LIMIT + 2)])
    while True:
        msg = await ws.receive(timeout=TIMEOUT)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == CLOSE_TOO_SLOW

    async def gone() -> Samples | None:
        samples = await scrape(hub, http, key)
        return samples if value(samples, "dicomhub_live_clients_connected") == 0 else None

    samples = await wait_for(gone, "the cut-off client to be let go")
    assert value(samples, "dicomhub_live_clients_dropped_total") == 1
