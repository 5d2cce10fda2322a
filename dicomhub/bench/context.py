"""What the steps share: the options, the work folder, the processes, earlier results."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from . import corpus
from .options import Options
from .procs import Api, BenchError, Service, Services

# A step gives its figures (numbers, shown in the table) and details (anything else).
Figures = dict[str, float | int]
Details = dict[str, Any]
StepOutput = tuple[Figures, Details]

STALL_SECONDS = 120.0  # no new instance for this long: the pipeline is stuck
WARMUP_FILES = 64


@dataclass
class Written:
    """A corpus on disk: its spec, its top folder and when its last file was written."""

    spec: corpus.Spec
    folder: Path
    paths: list[Path]
    finished: float


@dataclass
class Context:
    options: Options
    work: Path
    services: Services
    say: Callable[[str], None]
    corpus: Written | None = None
    reference_fps: float | None = None
    e2e_fps: float | None = None

    def session(self) -> aiohttp.ClientSession:
        # No connection limit: the fan-out step holds hundreds of sockets at once.
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def write_corpus(folder: Path, spec: corpus.Spec) -> Written:
    paths = corpus.write(folder, spec)
    return Written(spec, folder, paths, time.time())


async def wait_instances(api: Api, expected: int, watched: Sequence[Service],
                         interval: float) -> tuple[float, dict[str, int]]:
    """Poll /api/stats until it counts `expected` instances; returns when that answer
    came and the stats. BenchError when a file is rejected, a process ends, or the
    count stops moving for STALL_SECONDS."""
    seen, moved = -1, time.monotonic()
    while True:
        stats: dict[str, int] = await api.get("/api/stats")
        reported = time.time()
        if stats["instances"] >= expected:
            return reported, stats
        if stats["rejections"]:
            raise BenchError(f"{stats['rejections']} files were rejected (see /api/rejections)")
        if stats["instances"] != seen:
            seen, moved = stats["instances"], time.monotonic()
        elif time.monotonic() - moved > STALL_SECONDS:
            raise BenchError(f"stuck at {seen:,} of {expected:,} instances for "
                             f"{STALL_SECONDS:.0f} s")
        for service in watched:
            service.check_alive()
        await asyncio.sleep(interval)


async def warm_up(api: Api, inbox: Path, staging: Path, spec: corpus.Spec,
                  watched: Sequence[Service]) -> int:
    """Drop a few files first so the parser processes exist before timing starts, as
    they do in a watcher that has been running. Returns the instances then indexed."""
    warm = write_corpus(staging, corpus.Spec(corpus.new_root(), WARMUP_FILES, 2,
                                             spec.image_size, spec.pixels))
    inbox.mkdir(parents=True, exist_ok=True)
    os.rename(warm.folder, inbox / "warm-up")
    before = (await api.get("/api/stats"))["instances"]
    await wait_instances(api, before + WARMUP_FILES, watched, 0.05)
    return int(before) + WARMUP_FILES


async def older_than(written: Written, seconds: float) -> None:
    """Wait until the corpus's newest file is `seconds` old, so that a watcher with
    that settle interval treats the folder as moved in whole, as it is."""
    await asyncio.sleep(max(0.0, written.finished + seconds + 0.05 - time.time()))
