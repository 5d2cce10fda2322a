"""Step 4: files renamed in one by one at a steady rate, each the first of a new
series; latency from the rename to the live client's receipt of its series."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import corpus
from .context import Context, StepOutput, Written, warm_up, write_corpus
from .figures import schedule, summary_ms
from .procs import Api, BenchError, Hub, start_hub, start_watcher
from .subscribers import FirstArrivals, Subscriber, close_all, connect_all

SETTLE = 0.0  # files are renamed into place whole, so nothing needs to settle
ARRIVAL_TIMEOUT = 30.0  # after the last rename, for the last series to be announced
LEAD_IN = 0.2  # seconds between planning the schedule and its first rename


LATENCY = ("from the rename to the live client's receipt of the first series.created "
           "or series.updated of the file's series; the settle interval (settle_s) is "
           "not included")


@dataclass
class Timed:
    """Rename-to-receipt latencies of the series that arrived, how many never did,
    and the rename rate achieved."""

    latencies: list[float]
    lost: int
    achieved_rate: float


def live_spec(ctx: Context) -> corpus.Spec:
    """--live-files files in as many series: each file is the first of its series."""
    count = ctx.options.live_files
    return corpus.Spec(corpus.new_root(), count, count, ctx.options.image_size)


async def live(ctx: Context) -> StepOutput:
    folder = ctx.work / "live"
    spec = live_spec(ctx)
    staged = write_corpus(folder / "staging", spec)
    hub = await start_hub(ctx.services, folder)
    watcher = await start_watcher(ctx.services, hub, settle=SETTLE)
    inbox = folder / "inbox"
    async with ctx.session() as http:
        api = Api(http, hub.url, hub.read_key)
        await warm_up(api, inbox, folder / "warm-up-staging", spec, [hub.service, watcher])
        timed = await rename_one_by_one(ctx, http, staged, inbox, hub)
    return ({"files": spec.count, **summary_ms(timed.latencies), "lost": timed.lost,
             "settle_s": SETTLE},
            {"achieved_files_per_second": round(timed.achieved_rate, 1),
             "latency": LATENCY})


async def rename_one_by_one(ctx: Context, http: aiohttp.ClientSession, staged: Written,
                            inbox: Path, feed: Hub) -> Timed:
    """Rename the staged files (each the first of its series) into `inbox` at
    --live-rate while a live client of `feed` waits for each series. BenchError when
    no series reaches it."""
    spec, rate = staged.spec, ctx.options.live_rate
    arrivals = FirstArrivals()
    client = Subscriber(arrivals)
    await connect_all(http, feed, [client])
    try:
        arrivals.expect([spec.series_uid(s) for s in range(spec.count)])
        ctx.say(f"renaming {spec.count} files in one by one at {rate:g} files/s")
        renamed = await _rename_steadily(staged.paths, spec, inbox, rate)
        await _all_arrived(arrivals, spec.count)
    finally:
        await close_all([client])
    latencies = [arrivals.arrived[uid] - at for uid, at in renamed.items()
                 if uid in arrivals.arrived]
    if not latencies:
        raise BenchError("no series reached the live client")
    times = sorted(renamed.values())
    achieved = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else rate
    return Timed(latencies, spec.count - len(latencies), achieved)


async def _rename_steadily(paths: list[Path], spec: corpus.Spec, inbox: Path,
                           rate: float) -> dict[str, float]:
    """Rename each file into `inbox` on a fixed schedule; when each landed, by series."""
    renamed: dict[str, float] = {}
    due = schedule(time.time() + LEAD_IN, rate, len(paths))
    for n, (path, at) in enumerate(zip(paths, due, strict=True)):
        await asyncio.sleep(max(0.0, at - time.time()))
        os.rename(path, inbox / path.name)
        renamed[spec.series_uid(spec.series_of(n))] = time.time()
    return renamed


async def _all_arrived(arrivals: FirstArrivals, count: int) -> None:
    """Wait until every awaited series has arrived, or ARRIVAL_TIMEOUT passes without
    a new one (those missing are then reported as lost)."""
    while len(arrivals.arrived) < count:
        arrivals.changed.clear()
        try:
            await asyncio.wait_for(arrivals.changed.wait(), ARRIVAL_TIMEOUT)
        except TimeoutError:
            return

