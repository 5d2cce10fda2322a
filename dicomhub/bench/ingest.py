"""Steps 1-3 and 5: the corpus, the single-loop reference, end-to-end ingest with
one live client, and the same ingest with many live clients (fan-out)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pydicom

from dicomhub.config import WatcherConfig

from . import corpus
from .context import Context, Details, Figures, StepOutput, Written, older_than, \
    wait_instances, warm_up, write_corpus
from .figures import epoch, percentile, summary_ms
from .procs import PARSER_MARKER, Api, BenchError, Hub, Service, children, cpu_seconds, \
    peak_rss_mib, poll, start_hub, start_watcher, total_cpu_seconds
from .subscribers import SeqTimes, Subscriber, close_all, connect_all

CORPUS_SERIES = 10
STATS_INTERVAL = 0.02  # how often the end of an ingest is polled for
DELIVERY_TIMEOUT = 60.0  # after the last instance, for the live clients to catch up


def _iso(ts: float) -> str:
    """As the hub writes times: ISO 8601 UTC with milliseconds and a Z."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


async def make_corpus(ctx: Context) -> StepOutput:
    spec = corpus.Spec(corpus.new_root(), ctx.options.files, CORPUS_SERIES,
                       ctx.options.image_size)
    started = time.perf_counter()
    ctx.corpus = write_corpus(ctx.work / "staging", spec)
    seconds = time.perf_counter() - started
    size = corpus.size_bytes(ctx.corpus.paths)
    return ({"files": spec.count, "series": spec.series_count,
             "mean_file_kib": round(size / spec.count / 1024, 1),
             "written_files_per_second": round(spec.count / seconds)},
            {"folder_layout": "one folder per series", "bytes": size})


async def reference(ctx: Context) -> StepOutput:
    if ctx.corpus is None:
        raise BenchError("needs the corpus (step corpus)")
    paths = ctx.corpus.paths
    for path in paths:  # untimed: warms the page cache, as the watcher will find it
        pydicom.dcmread(path, stop_before_pixels=True)
    started = time.perf_counter()
    for path in paths:
        pydicom.dcmread(path, stop_before_pixels=True)
    seconds = time.perf_counter() - started
    ctx.reference_fps = len(paths) / seconds
    return ({"files_per_second": round(ctx.reference_fps)},
            {"seconds": round(seconds, 3), "files": len(paths), "processes": 1})


# A hub, its watcher and the corpus that watcher is given.
Site = tuple[Hub, Service, Written]


@dataclass
class Drop:
    """One timed ingest: whole folders renamed into the inboxes, until all indexed."""

    files: int
    seq_before: int
    renamed_at: float
    done_at: float
    last_seq: int
    cpu: dict[str, float]  # CPU seconds each party used meanwhile

    @property
    def files_per_second(self) -> float:
        return self.files / (self.done_at - self.renamed_at)

    def details(self) -> Details:
        return {"renamed_at": _iso(self.renamed_at), "last_instance_at": _iso(self.done_at),
                "seconds": round(self.done_at - self.renamed_at, 3),
                "cpu_seconds": {k: round(v, 2) for k, v in self.cpu.items()}}


def _cpu(hub: Hub, watcher: Service) -> dict[str, float]:
    """CPU time so far of the hub, the watcher, its parsers and this process (whose
    live clients share the machine with them)."""
    return {"hub": cpu_seconds(hub.service.pid), "watcher": cpu_seconds(watcher.pid),
            "parsers": total_cpu_seconds(children(watcher.pid, PARSER_MARKER)),
            "bench": time.process_time()}


async def drop(ctx: Context, api: Api, sites: Sequence[Site],
               cpu: Callable[[], dict[str, float]]) -> Drop:
    """Warm every site's watcher up, then rename each site's corpus into its watcher's
    inbox, back to back, and wait until `api`'s hub counts every instance: the sites
    must share one database. `cpu` gives the CPU seconds used so far by each party.
    BenchError as wait_instances."""
    watched = [service for hub, watcher, _ in sites for service in (hub.service, watcher)]
    before = 0
    for hub, _, written in sites:
        before = await warm_up(api, hub.folder / "inbox", hub.folder / "warm-up-staging",
                               written.spec, watched)
    for _, _, written in sites:
        await older_than(written, WatcherConfig().settle)
    files = sum(len(written.paths) for _, _, written in sites)
    where = "the watched folder" if len(sites) == 1 else f"{len(sites)} watched folders"
    ctx.say(f"renaming {files:,} files into {where} at once")
    seq_before = (await api.get("/api/stats"))["last_seq"]
    cpu_before = cpu()
    renamed_at = time.time()
    for hub, _, written in sites:  # each corpus at once, as a mover does
        os.rename(written.folder, hub.folder / "inbox" / "corpus")
    done_at, stats = await wait_instances(api, before + files, watched, STATS_INTERVAL)
    used = {k: v - cpu_before[k] for k, v in cpu().items()}
    return Drop(files, seq_before, renamed_at, done_at, stats["last_seq"], used)


async def e2e(ctx: Context) -> StepOutput:
    if ctx.corpus is None:
        raise BenchError("needs the corpus (step corpus)")
    written = ctx.corpus
    hub = await start_hub(ctx.services, ctx.work / "e2e")
    watcher = await start_watcher(ctx.services, hub)
    async with ctx.session() as http:
        api = Api(http, hub.url, hub.read_key)
        collector = SeqTimes()
        client = Subscriber(collector)
        try:
            await connect_all(http, hub, [client])
            timed = await drop(ctx, api, [(hub, watcher, written)], lambda: _cpu(hub, watcher))
        finally:
            await close_all([client])
    ctx.e2e_fps = timed.files_per_second
    figures: Figures = {"files": timed.files,
                        "files_per_second": round(timed.files_per_second)}
    if ctx.reference_fps:
        figures["ratio_to_reference"] = round(timed.files_per_second / ctx.reference_fps, 2)
    return figures, {**timed.details(), "live_clients": 1,
                     "live_messages": len(collector.seqs),
                     "hub_peak_rss_mib": round(peak_rss_mib(hub.service.pid), 1)}


async def fanout(ctx: Context) -> StepOutput:
    count = ctx.options.clients
    folder = ctx.work / "fanout"
    spec = corpus.Spec(corpus.new_root(), ctx.options.files, CORPUS_SERIES,
                       ctx.options.image_size)
    ctx.say(f"writing a fresh corpus of {spec.count:,} files (new UIDs)")
    written = write_corpus(folder / "staging", spec)
    hub = await start_hub(ctx.services, folder)
    watcher = await start_watcher(ctx.services, hub)
    collectors = [SeqTimes() for _ in range(count)]
    clients = [Subscriber(c) for c in collectors]
    async with ctx.session() as http:
        api = Api(http, hub.url, hub.read_key)
        ctx.say(f"connecting {count} live clients")
        try:
            await connect_all(http, hub, clients)
            timed = await drop(ctx, api, [(hub, watcher, written)],
                               lambda: _cpu(hub, watcher))
            await _caught_up(clients, collectors, timed.last_seq)
            hub_peak = peak_rss_mib(hub.service.pid)
            expected = await _change_seqs(api, min(c.start_seq or 0 for c in clients),
                                          timed.last_seq)
        finally:
            await close_all(clients)
    lost = sum(_lost(c, s, expected) for c, s in zip(collectors, clients, strict=True))
    delays = [arrived - epoch(text)
              for c in collectors
              for seq, text, arrived in zip(c.seqs, c.times, c.arrivals, strict=True)
              if timed.seq_before < seq <= timed.last_seq]
    if not delays:
        raise BenchError("no change message reached any live client")
    figures: Figures = {
        "clients": count, "lost_messages": lost,
        "delivery_p50_ms": round(percentile(delays, 50) * 1000, 1),
        "delivery_p99_ms": round(percentile(delays, 99) * 1000, 1),
        "ingest_files_per_second": round(timed.files_per_second)}
    if ctx.e2e_fps:
        figures["ingest_ratio_to_e2e"] = round(timed.files_per_second / ctx.e2e_fps, 2)
    figures["hub_peak_rss_mib"] = round(hub_peak, 1)
    return figures, {**timed.details(), "delivery": summary_ms(delays),
                     "messages_checked_per_client": len(expected),
                     "clients_cut_off": sum(c.close_code not in (None, 1000) for c in clients)}


async def _caught_up(clients: list[Subscriber], collectors: list[SeqTimes],
                     last_seq: int) -> None:
    """Wait until every client still connected has received up to `last_seq`; a
    client that never does is counted as losing messages, not as a failed step."""
    async def done() -> bool:
        return all(c.last_seq >= last_seq or s.close_code is not None
                   for c, s in zip(collectors, clients, strict=True))

    try:
        await poll(done, DELIVERY_TIMEOUT, "the live clients to catch up")
    except BenchError:
        pass


async def _change_seqs(api: Api, since: int, last: int) -> list[int]:
    """The seqs the hub's change log holds in (since, last]: what clients must have."""
    seqs: list[int] = []
    while since < last:
        page = await api.get("/api/changes", since=since, limit=1000)
        seqs += [c["seq"] for c in page["changes"] if c["seq"] <= last]
        if page["done"] or page["last"] <= since:
            break
        since = page["last"]
    return seqs


def _lost(collector: SeqTimes, client: Subscriber, expected: list[int]) -> int:
    start = client.start_seq or 0
    received = set(collector.seqs)
    return sum(1 for seq in expected if seq > start and seq not in received)
