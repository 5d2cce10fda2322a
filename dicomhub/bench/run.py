"""Runs the steps in order, each isolated: a failing step is reported and the run
goes on. Processes are stopped after every step and on the way out (Ctrl-C and
SIGTERM included); the work folder is removed unless --keep."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .context import Context, StepOutput
from .cstore import cstore
from .figures import render, rows, verdicts
from .ingest import e2e, fanout, make_corpus, reference
from .latency import live
from .machine import machine, versions
from .memory import watcher_memory
from .options import STEPS, Options
from .procs import STOP_TIMEOUT, BenchError, Services
from .reads import reads
from .scale import scale

Step = Callable[[Context], Awaitable[StepOutput]]

PLAN: dict[str, tuple[str, Step]] = {
    "corpus": ("writing the synthetic CT corpus", make_corpus),
    "reference": ("one loop of pydicom.dcmread(stop_before_pixels=True)", reference),
    "e2e": ("hub + watcher, one live client, the corpus renamed in at once", e2e),
    "live": ("latency of single files renamed in at a steady rate", live),
    "fanout": ("many live clients while a fresh corpus is ingested", fanout),
    "reads": ("/api/series against a large database", reads),
    "watcher": ("watcher memory on a folder of many waiting files", watcher_memory),
    "cstore": ("instances sent over DICOM to the watcher's listener", cstore),
    "scale": ("ingest and live latency on SQLite, PostgreSQL, and two hubs on one "
              "PostgreSQL", scale),
}
assert tuple(PLAN) == STEPS


class Progress:
    """Progress lines on stderr, with the seconds since the run began."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.began:7.1f} s] {message}", file=sys.stderr,
              flush=True)


def work_folder(options: Options) -> Path:
    """The folder this run works in, made new. BenchError for a non-empty --dir: the
    run removes its work folder, so it must not hold anything else."""
    if options.dir is None:
        return Path(tempfile.mkdtemp(prefix="dicomhub-bench-", dir=Path.cwd()))
    folder = options.dir.resolve()
    if folder.exists() and any(folder.iterdir()):
        raise BenchError(f"the work folder {str(folder)!r} is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def _step(ctx: Context, name: str) -> dict[str, Any]:
    label, function = PLAN[name]
    number = STEPS.index(name) + 1
    ctx.say(f"{number}/{len(STEPS)} {name}: {label}")
    started = time.perf_counter()
    result: dict[str, Any]
    try:
        figures, details = await function(ctx)
        result = {"status": "ok", "figures": figures, "details": details}
    except Exception as exc:  # one broken step must not cost the others
        if not isinstance(exc, BenchError):
            traceback.print_exc(file=sys.stderr)
        error = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        result = {"status": "failed", "error": error}
        ctx.say(f"{name}: failed: {error}")
    finally:
        stopping = time.perf_counter()
        killed = await ctx.services.stop_all()
        stopped_in = time.perf_counter() - stopping
    if killed:
        result["killed"] = killed
        ctx.say(f"{name}: {', '.join(killed)} did not stop within {STOP_TIMEOUT:.0f} s "
                "of SIGTERM and were killed")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["stop_seconds"] = round(stopped_in, 1)
    ctx.say(f"{name}: {result['status']} in {result['seconds']} s")
    return result


async def _steps(options: Options, work: Path, services: Services,
                 say: Progress) -> dict[str, Any]:
    ctx = Context(options, work, services, say)
    results: dict[str, Any] = {}
    try:
        for name in STEPS:
            results[name] = {"status": "skipped"} if name in options.skip \
                else await _step(ctx, name)
    finally:
        await ctx.services.stop_all()
    return results


async def _until_signalled(options: Options, work: Path, services: Services,
                           say: Progress) -> dict[str, Any]:
    # SIGTERM unwinds like Ctrl-C, so the processes under test are stopped either way.
    task = asyncio.ensure_future(_steps(options, work, services, say))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def _options_json(options: Options) -> dict[str, Any]:
    out = asdict(options)
    out["json"] = str(options.json)
    out["dir"] = None if options.dir is None else str(options.dir)
    out["skip"] = list(options.skip)
    return out


def main(options: Options) -> int:
    """Run the benchmark: progress on stderr, the table on stdout, the figures in
    options.json. 0 when every step ran, 1 when one failed, 2 on a bad work folder
    or JSON path, 130 when interrupted."""
    say = Progress()
    started = datetime.now(timezone.utc)
    try:
        if not options.json.resolve().parent.is_dir():
            raise BenchError(f"the folder of --json {str(options.json)!r} does not exist")
        work = work_folder(options)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"started": started.isoformat(timespec="seconds"),
                              "machine": machine(work), "versions": versions(),
                              "options": _options_json(options)}
    services = Services()
    steps: dict[str, Any] | None = None
    try:
        steps = asyncio.run(_until_signalled(options, work, services, say))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        services.kill_remaining()
        if options.keep:
            say(f"the work folder is kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if steps is None:
        say("interrupted: every process was stopped; no figures written")
        return 130
    report.update(seconds=round(time.monotonic() - say.began, 1), steps=steps,
                  targets=verdicts(steps))
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render(rows(steps)))
    for name, result in steps.items():
        if result["status"] == "failed":
            print(f"{name} failed: {result['error']}")
    say(f"figures written to {options.json}")
    return 1 if any(r["status"] == "failed" for r in steps.values()) else 0
