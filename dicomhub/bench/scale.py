"""Step 9: the ingest of e2e and the latency of live, measured in one run on three
configurations, each on fresh hubs and a fresh database:

    sqlite  one hub on SQLite, one watcher
    pg1     one hub on PostgreSQL, one watcher
    pg2     two hubs on one PostgreSQL database, a watcher on each given half the
            corpus, both halves renamed in at the same moment

Then, on the same hubs, files renamed in one by one as in live; in pg2 they go to
hub A's watcher while the live client listens to hub B, so each change reaches it
through the database. PostgreSQL runs as a throwaway cluster (pgcluster.py) with
fsync on, in the work folder when its server can reach it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import corpus, pgcluster
from .context import Context, Details, Figures, StepOutput, Written, write_corpus
from .figures import summary_ms
from .ingest import CORPUS_SERIES, Drop, Site, drop
from .latency import LATENCY, SETTLE, Timed, rename_one_by_one
from .machine import file_system
from .procs import PARSER_MARKER, SQLITE_FILE, START_TIMEOUT, Api, BenchError, children, \
    cpu_seconds, start_hub, start_watcher, total_cpu_seconds

NOT_INSTALLED = "PostgreSQL is not installed (apt-get install postgresql)"
# Each configuration: its name and how many hubs share its database.
CONFIGURATIONS = (("sqlite", 1), ("pg1", 1), ("pg2", 2))
SETTINGS = ("server_version", "fsync", "synchronous_commit")


@dataclass
class Measured:
    hubs: int
    ingest: Drop
    live: Timed


async def scale(ctx: Context) -> StepOutput:
    folder = ctx.work / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    parent = folder if _reachable(folder, ctx.work) else None
    cluster = _start_cluster(parent)
    try:
        settings = {name: cluster.sql(f"SHOW {name}").strip() for name in SETTINGS}
        measured: dict[str, Measured] = {}
        for name, hubs in CONFIGURATIONS:
            database = SQLITE_FILE if name == "sqlite" else cluster.url(cluster.create_database())
            postgres = None if name == "sqlite" else cluster
            measured[name] = await _measure(ctx, folder / name, name, hubs, database, postgres)
            await ctx.services.stop_all()  # the next configuration has the machine to itself
    finally:
        try:
            await ctx.services.stop_all()  # the hubs before their database
        finally:
            cluster.stop()
    return _figures(ctx, measured), {
        "postgresql": settings["server_version"], "fsync": settings["fsync"],
        "synchronous_commit": settings["synchronous_commit"],
        "postgresql_file_system": file_system(cluster.folder.parent),
        "postgresql_in_work_folder": parent is not None,
        **{name: _details(name, m) for name, m in measured.items()}}


def _start_cluster(parent: Path | None) -> pgcluster.Cluster:
    """A running cluster; BenchError, saying why, when there can be none."""
    # Blocking on purpose: were the step cancelled while the cluster was being made in
    # another thread, nothing would be left to stop it.
    try:
        cluster = pgcluster.start(START_TIMEOUT, parent)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"PostgreSQL's {Path(exc.cmd[0]).name} failed: "
                         f"{exc.stderr.strip()[-500:]}") from None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"PostgreSQL did not start: {exc}") from None
    if cluster is None:
        raise BenchError(NOT_INSTALLED)
    return cluster


def _reachable(folder: Path, work: Path) -> bool:
    """Whether the PostgreSQL server can keep its cluster in `folder` (inside the work
    folder), on the disk the SQLite hub writes to; if not, it goes to the system's
    temporary folder."""
    if os.geteuid() != 0:
        return True
    # As root, the server runs as the postgres user. The run made its work folder
    # private; letting others pass through it (not list it) is enough.
    work.chmod(work.stat().st_mode | 0o001)
    return all(f.stat().st_mode & 0o001 for f in (folder, *folder.parents))


async def _measure(ctx: Context, folder: Path, name: str, hubs: int, database: str,
                   postgres: pgcluster.Cluster | None) -> Measured:
    """`hubs` hubs on `database`, a watcher on each, the corpus dealt out to them and
    renamed in at once; then the live files renamed one by one into the first hub's
    watcher while a live client listens to the last hub."""
    spec = corpus.Spec(corpus.new_root(), ctx.options.scale_files, CORPUS_SERIES,
                       ctx.options.image_size)
    live = corpus.Spec(corpus.new_root(), ctx.options.scale_live_files,
                       ctx.options.scale_live_files, ctx.options.image_size)
    ctx.say(f"{name}: writing {spec.count:,} files, and {live.count} for the live part")
    written = write_corpus(folder / "staging", spec)
    staged = write_corpus(folder / "live-staging", live)
    suffixes = [""] if hubs == 1 else [chr(ord("A") + n) for n in range(hubs)]
    parts = _deal(written, [folder / f"staging{s}" for s in suffixes]) if hubs > 1 \
        else [written]
    # What was just written is still being flushed: each configuration starts with a
    # clean page cache, so none of them pays for the writeback of another's files.
    await asyncio.to_thread(os.sync)
    sites: list[Site] = []
    for suffix, part in zip(suffixes, parts, strict=True):
        hub = await start_hub(ctx.services, folder / f"hub{suffix}", f"{name}-hub{suffix}",
                              database)
        watcher = await start_watcher(ctx.services, hub, settle=SETTLE,
                                      name=f"{name}-watcher{suffix}")
        sites.append((hub, watcher, part))
    first, feed = sites[0][0], sites[-1][0]
    async with ctx.session() as http:
        api = Api(http, first.url, first.read_key)
        ingest = await drop(ctx, api, sites, lambda: _cpu(sites, postgres))
        ctx.say(f"{name}: {ingest.files_per_second:,.0f} files/s")
        timed = await rename_one_by_one(ctx, http, staged, first.folder / "inbox", feed)
    return Measured(hubs, ingest, timed)


def _deal(written: Written, folders: Sequence[Path]) -> list[Written]:
    """The corpus's files dealt out in order into `folders`, nearly equal shares, each
    in its series folder; untimed, before the ingest."""
    count, shares = len(written.paths), len(folders)
    parts = []
    for n, folder in enumerate(folders):
        moved = []
        for path in written.paths[n * count // shares:(n + 1) * count // shares]:
            target = folder / path.relative_to(written.folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
            moved.append(target)
        folder.mkdir(parents=True, exist_ok=True)  # even for an empty share
        parts.append(Written(written.spec, folder, moved, written.finished))
    return parts


def _cpu(sites: Sequence[Site], postgres: pgcluster.Cluster | None) -> dict[str, float]:
    """CPU seconds so far of each hub, watcher and its parsers, the PostgreSQL server
    (its postmaster and every backend now running) and this process."""
    used: dict[str, float] = {}
    for hub, watcher, _ in sites:
        used[hub.service.name] = cpu_seconds(hub.service.pid)
        used[watcher.name] = cpu_seconds(watcher.pid)
        used[f"{watcher.name} parsers"] = total_cpu_seconds(children(watcher.pid,
                                                                     PARSER_MARKER))
    if postgres is not None:
        used["postgresql"] = total_cpu_seconds([postgres.pid, *children(postgres.pid)])
    used["bench"] = time.process_time()
    return used


def _figures(ctx: Context, measured: dict[str, Measured]) -> Figures:
    figures: Figures = {"files": ctx.options.scale_files,
                        "live_files": ctx.options.scale_live_files}
    fps = {name: m.ingest.files_per_second for name, m in measured.items()}
    for name, value in fps.items():
        figures[f"{name}_files_per_second"] = round(value)
    figures["pg1_ratio_to_sqlite"] = round(fps["pg1"] / fps["sqlite"], 2)
    figures["pg2_ratio_to_pg1"] = round(fps["pg2"] / fps["pg1"], 2)
    for name, m in measured.items():
        latency = summary_ms(m.live.latencies)
        figures[f"{name}_live_p50_ms"] = latency["p50_ms"]
        figures[f"{name}_live_p99_ms"] = latency["p99_ms"]
        figures[f"{name}_live_lost"] = m.live.lost
    return figures


def _details(name: str, m: Measured) -> Details:
    live: dict[str, Any] = {**summary_ms(m.live.latencies), "lost": m.live.lost,
                            "achieved_files_per_second": round(m.live.achieved_rate, 1),
                            "settle_s": SETTLE, "latency": LATENCY}
    if m.hubs > 1:
        live["latency"] += ("; the files go to hub A's watcher and the live client is on "
                            "hub B, so each change crosses hubs through the database "
                            "(NOTIFY, then hub B reads the change log)")
    return {"hubs": m.hubs, "database": "SQLite" if name == "sqlite" else "PostgreSQL",
            **m.ingest.details(), "live": live}
