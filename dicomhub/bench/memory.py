"""Step 7: a watcher started on a folder that already holds `--watcher-files` small
files; its peak memory, and its parser processes' apart, until all are indexed."""

from __future__ import annotations

import asyncio
import contextlib
import time

from . import corpus
from .context import Context, StepOutput, wait_instances, write_corpus
from .procs import PARSER_MARKER, Api, BenchError, children, cpu_seconds, peak_rss_mib, \
    start_hub, start_watcher, total_cpu_seconds

FILES_PER_SERIES = 500
SAMPLE_INTERVAL = 0.25
STATS_INTERVAL = 0.5  # counting 100,000 instances is not free: do not poll it hard


class PeakSampler:
    """VmHWM of a process and of each of its parser children, as seen so far."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.main = 0.0
        self.parsers: dict[int, float] = {}

    def sample(self) -> None:
        with contextlib.suppress(OSError, BenchError):
            self.main = max(self.main, peak_rss_mib(self.pid))
        for child in children(self.pid, PARSER_MARKER):
            with contextlib.suppress(OSError, BenchError):  # it may end as we read
                self.parsers[child] = max(self.parsers.get(child, 0.0), peak_rss_mib(child))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)


async def watcher_memory(ctx: Context) -> StepOutput:
    count = ctx.options.watcher_files
    folder = ctx.work / "watcher"
    spec = corpus.Spec(corpus.new_root(), count, max(1, count // FILES_PER_SERIES),
                       ctx.options.image_size, pixels=False)
    ctx.say(f"writing {count:,} small files into the folder to watch")
    started = time.perf_counter()
    written = write_corpus(folder / "inbox" / "waiting", spec)
    generated = time.perf_counter() - started
    hub = await start_hub(ctx.services, folder)
    ctx.say("starting the watcher on them")
    hub_cpu = cpu_seconds(hub.service.pid)
    launched = time.time()
    watcher = await start_watcher(ctx.services, hub)
    sampler = PeakSampler(watcher.pid)
    sampling = asyncio.create_task(sampler.run())
    try:
        async with ctx.session() as http:
            api = Api(http, hub.url, hub.read_key)
            done_at, _ = await wait_instances(api, count, [hub.service, watcher],
                                              STATS_INTERVAL)
        sampler.sample()
        cpu = {"hub": cpu_seconds(hub.service.pid) - hub_cpu,
               "watcher": cpu_seconds(watcher.pid),
               "parsers": total_cpu_seconds(sampler.parsers)}
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    if not sampler.parsers:
        raise BenchError("no parser process of the watcher was found")
    return ({"files": count, "files_per_second": round(count / (done_at - launched)),
             "main_peak_rss_mib": round(sampler.main, 1),
             "parser_peak_rss_mib": round(max(sampler.parsers.values()), 1),
             "parsers": len(sampler.parsers)},
            {"mean_file_bytes": round(corpus.size_bytes(written.paths[:1000])
                                      / min(count, 1000)),
             "generation_seconds": round(generated, 1),
             "seconds_from_launch": round(done_at - launched, 1),
             "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
             "parser_peaks_mib": sorted(round(v, 1) for v in sampler.parsers.values())})
