"""Step 6: REST reads against a hub whose database holds `--series-db` series,
built directly through the store (one instance per series) rather than ingested."""

from __future__ import annotations

import random
import time
from pathlib import Path

import aiohttp

from dicomhub.protocol import InstanceRecord

from . import corpus
from .context import Context, StepOutput
from .figures import percentile
from .procs import SQLITE_FILE, BenchError, Hub, start_hub

REQUESTS = 300
WARMUP_REQUESTS = 10
BATCH = 1000  # records per store transaction, as the largest watcher batch
SERIES_PER_STUDY = 5
SERIES_PER_PATIENT = 50
WATCHER_ID = "bench-generated"


def _record(root: str, n: int, patients: int, now: float) -> InstanceRecord:
    study = n // SERIES_PER_STUDY
    return InstanceRecord(
        path=f"generated/{n}.dcm", size=1024, mtime=now,
        sop_instance_uid=corpus.uid(root, corpus.INSTANCE, n),
        series_instance_uid=corpus.uid(root, corpus.SERIES, n),
        study_instance_uid=corpus.uid(root, corpus.STUDY, study),
        sop_class_uid=str(corpus.CT_IMAGE_STORAGE), patient_id=corpus.patient_id(study % patients),
        patient_name="Bench^Synthetic", modality="CT", study_date="20240102",
        study_description="Synthetic benchmark study", series_number=n % SERIES_PER_STUDY + 1,
        series_description="Axial 1.0 mm", instance_number=1, rows=512, columns=512)


async def build_database(path: Path, count: int, patients: int) -> None:
    """A hub database with `count` stable series of one instance each, spread over
    `patients` patients, written a day in the past."""
    from hub.sqlite_store import SQLiteStore  # the hub's own store, as it would write

    root = corpus.new_root()
    now = time.time() - 86400
    store = SQLiteStore(path)
    await store.open()
    try:
        for start in range(0, count, BATCH):
            records = [_record(root, n, patients, now)
                       for n in range(start, min(count, start + BATCH))]
            await store.ingest(WATCHER_ID, records, now)
        # Stable, as an archive's old series are: the hub then has no timers to run.
        for start in range(0, count, BATCH):
            uids = [corpus.uid(root, corpus.SERIES, n)
                    for n in range(start, min(count, start + BATCH))]
            await store.mark_stable(uids, now, 0.0)
    finally:
        await store.close()


async def _timed(session: aiohttp.ClientSession, hub: Hub,
                 queries: list[dict[str, str]]) -> tuple[list[float], int]:
    """Seconds per request, in order, and the items the answers held."""
    seconds, items = [], 0
    headers = {"Authorization": f"Bearer {hub.read_key}"}
    for params in queries:
        started = time.perf_counter()
        async with session.get(hub.url + "/api/series", params=params,
                               headers=headers) as resp:
            body = await resp.json()
        seconds.append(time.perf_counter() - started)
        if resp.status != 200:
            raise BenchError(f"/api/series answered {resp.status}: {body}")
        items += len(body["items"])
    return seconds, items


async def reads(ctx: Context) -> StepOutput:
    count = ctx.options.series_db
    patients = max(1, count // SERIES_PER_PATIENT)
    folder = ctx.work / "reads"
    folder.mkdir(parents=True)
    ctx.say(f"building a database of {count:,} series for {patients:,} patients")
    started = time.perf_counter()
    await build_database(folder / SQLITE_FILE, count, patients)
    built = time.perf_counter() - started
    hub = await start_hub(ctx.services, folder)
    rng = random.Random(0)
    by_patient = [{"limit": "100", "patient_id": corpus.patient_id(rng.randrange(patients))}
                  for _ in range(WARMUP_REQUESTS + REQUESTS)]
    plain = [{"limit": "100"}] * (WARMUP_REQUESTS + REQUESTS)
    # One connection, kept alive: the time is the hub's, not the TCP handshake's.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        ctx.say(f"{REQUESTS} requests each of /api/series and /api/series?patient_id=")
        plain_s, plain_items = await _timed(http, hub, plain)
        patient_s, patient_items = await _timed(http, hub, by_patient)
    if not plain_items or not patient_items:
        raise BenchError("the reads found no series")
    plain_s, patient_s = plain_s[WARMUP_REQUESTS:], patient_s[WARMUP_REQUESTS:]
    ms = 1000
    return ({"series": count, "patients": patients,
             "series_p50_ms": round(percentile(plain_s, 50) * ms, 2),
             "series_p99_ms": round(percentile(plain_s, 99) * ms, 2),
             "series_by_patient_p50_ms": round(percentile(patient_s, 50) * ms, 2),
             "series_by_patient_p99_ms": round(percentile(patient_s, 99) * ms, 2)},
            {"database_build_seconds": round(built, 1), "requests_each": REQUESTS,
             "warm_up_requests_each": WARMUP_REQUESTS, "limit": 100})
