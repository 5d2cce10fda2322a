"""The watcher: folders in, records to the hub out.

    events ─┐
            ├─> settle ─> parse (process pool) ─> outbox ─> link ─> hub
    scan ───┘

The start-up scan finds what arrived while the watcher was away; watchdog
events find what arrives after. Both feed the settler, which releases a file
once it is complete. Files already delivered in the same version (path, size,
mtime) are skipped, so a restart sends nothing twice.

With `once` (``dicomhub import``) there are no events: the watcher walks its
folders, and returns when every file the walk found has an outcome the hub
acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from watchdog.observers.api import BaseObserver

from dicomhub.config import WatcherConfig, encryption_key
from dicomhub.errors import DicomhubError
from dicomhub.logs import keep_phi_out
from dicomhub.progress import Counts

from . import reader
from .backoff import backoff
from .events import Change, start_observer
from .link import Link, client_ssl
from .listener import Listener
from .settle import Settler
from .state import Outcome, State, StateError

log = logging.getLogger("dicomhub.watcher")

SCAN_CHUNK = 500
PARSE_CHUNK = 128
# Paths held in memory (settling or queued) before a walk waits for the parsers,
# and parse results before the parsers wait for the outbox: a folder of a million
# files streams through instead of being held at once.
PENDING_LIMIT = 5000
RESULTS_LIMIT = 2000
STATE_RETRY_MAX = 5.0  # seconds between attempts to write to a full or read-only state
DONE_POLL = 0.05  # seconds between checks, with `once`, that everything is acknowledged
# While results stream in, the outbox commits at most this often. A commit waits for
# the disk, and so does the hub's for the batch that follows it: one result at a
# time (the DICOM listener's) would cost two waits each.
GROUP_COMMIT = 0.005
_TEMP_SUFFIXES = (".tmp", ".part", "~")
_REJECTION = '{"kind":"rejection",'  # an outbox record of a rejection (record_text)


class HubUnreachable(DicomhubError):
    """With `attempts`: that many attempts in a row to reach a hub failed."""


def ignored(name: str) -> bool:
    """Hidden files and names that mark a file still being written are not read
    until they are renamed."""
    return name.startswith(".") or name.endswith(_TEMP_SUFFIXES)


class Watcher:
    def __init__(self, config: WatcherConfig, key: str, *, once: bool = False,
                 attempts: int = 0) -> None:
        """`once`: walk the folders, no events, no listener, and return from `run`
        when all is acknowledged. `attempts`: give up (HubUnreachable) after that
        many failed attempts in a row to reach a hub; 0 = never."""
        keep_phi_out()
        self.config, self.key = config, key
        self.once, self.attempts = once, attempts
        self.roots = [Path(r).resolve() for r in config.watch]
        self._prefixes = sorted(((str(r).rstrip(os.sep) + os.sep, r) for r in self.roots),
                                key=lambda item: -len(item[0]))
        self._state_prefix = str(config.state_dir) + os.sep
        self.state = State(config.state_dir, encryption_key(
            config.encryption_key_env, "watcher.encryption_key_env"))
        self.settler: Settler[str] = Settler(config.settle)
        self.workers = config.workers or os.cpu_count() or 1
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._results: list[Outcome] = []
        self._results_ready = asyncio.Event()
        self._room = asyncio.Event()  # set when the parsers took paths from the queue
        self._stored = asyncio.Event()  # set when results reached the outbox
        self._state_failing = False  # the last write to the state folder failed
        self.link: Link | None = None
        self.watcher_id = config.watcher_id
        self.scanned = asyncio.Event()  # set once the start-up scan has been queued
        self.observer: BaseObserver | None = None
        self.rescans = 0  # reconciliation walks completed
        self.listener: Listener | None = None
        # Counters for progress and summaries: plain integers, read a few times a second.
        self.found = 0  # files found by walks and events
        self.unchanged = 0  # of those, delivered before in the same version: not read
        self.parsed = 0
        self.rejections: collections.Counter[str] = collections.Counter()  # by reason

    # entry point ----------------------------------------------------------------

    async def run(self) -> None:
        """Watch until cancelled; with `once`, until all the walk found is acknowledged.
        Raises StateError (state folder or TLS files unusable) and, with `attempts`,
        HubUnreachable."""
        if not self.once:
            for root in self.roots:
                root.mkdir(parents=True, exist_ok=True)
        await self.state.open()
        # spawn, not fork: this process already runs threads (watchdog, SQLite). Not
        # forkserver either: its server outlives a watcher killed with SIGKILL, while
        # spawned workers are our children and die with us (PR_SET_PDEATHSIG).
        pool = ProcessPoolExecutor(self.workers, initializer=reader.init_worker,
                                   mp_context=multiprocessing.get_context("spawn"))
        observer = None
        tasks: list[asyncio.Task[None]] = []
        try:
            self.watcher_id = self.watcher_id or await self._default_id()
            self.link = Link(self.config.hub_urls, self.key, self.watcher_id,
                                     self.state, batch_size=self.config.batch_size,
                                     tls=self._tls(), delays=self._delays,
                                     refusal_is_final=self.once)
            # Start the parsers now, not on the first file: spawning one and importing
            # pydicom takes a few hundred milliseconds the first files should not wait.
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(pool, reader.warm_up)
                                   for _ in range(self.workers)))
            if self.config.dicom.enabled and not self.once:
                self.listener = self._listener(loop)
                await asyncio.to_thread(self.listener.start)
            if not self.once:
                # The listener hands over what it stores itself; files others put in
                # its folder are found by the reconciliation walks.
                observer = self.observer = start_observer(
                    self.roots, self._on_change, polling=self.config.polling,
                    poll_interval=self.config.poll_interval,
                    exclude=[self.listener.folder] if self.listener else [])
            tasks = [asyncio.create_task(c, name=n) for n, c in (
                ("link", self.link.run()),
                ("settle", self._settle_loop()),
                ("commit", self._commit_loop()),
                *((f"parse-{i}", self._parse_loop(pool)) for i in range(self.workers * 2)),
            )]
            log.info("watching %s as %s; %d records waiting for the hub",
                     ", ".join(map(str, self.roots)), self.watcher_id, self.state.backlog)
            for root in self.roots:
                await self._scan(root)
            self.scanned.set()
            if self.once:
                tasks.append(asyncio.create_task(self._until_done(), name="done"))
            elif self.config.rescan_interval > 0:
                tasks.append(asyncio.create_task(self._rescan_loop(), name="rescan"))
            # Only `done` ends without an exception; the others run until cancelled.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            if self.listener is not None:
                await asyncio.to_thread(self.listener.stop)
                self.listener.drain()  # what it stored last joins the results kept below
            if observer is not None:
                observer.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._results:
                with contextlib.suppress(Exception):
                    await self.state.put(self._results)  # keep what was parsed
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
            if observer is not None:
                await asyncio.to_thread(observer.join, 5)
            log.info("stopping: parsed %d files this run; %d records wait for the hub",
                     self.parsed, self.state.backlog)
            await self.state.close()

    # progress -------------------------------------------------------------------

    def pending(self) -> int:
        """Files and records not acknowledged yet: settling, queued or being read,
        read but not stored, and in the outbox. Outside a walk, a file found counts
        here until the hub acknowledges its record (twice for a moment, while its
        record is being stored): 0 means everything found has its outcome."""
        return (len(self.settler) + len(self._queued) + len(self._results)
                + self.state.backlog)

    def progress(self) -> Counts:
        """The counters as they are now (no I/O: cheap enough to call often)."""
        return Counts(scanned=self.found, unchanged=self.unchanged, parsed=self.parsed,
                      delivered=self.link.delivered if self.link else 0,
                      rejected=sum(self.rejections.values()), pending=self.pending())

    async def _until_done(self) -> None:
        """Return once the hub has welcomed us (with nothing to send, that still proves
        the hub and the key) and, the walk done, nothing is pending. Polled: the backlog
        shrinks inside the link, which announces nothing, and a check is cheap."""
        assert self.link is not None
        await self.link.connected.wait()
        await self.scanned.wait()
        while self.pending():
            await asyncio.sleep(DONE_POLL)

    def _delays(self) -> Iterator[float]:
        """Waits between rounds of attempts to reach the hubs; with `attempts`, the
        round after the last raises HubUnreachable."""
        delays = backoff(cap=self.config.reconnect_max)
        return _limited(delays, self.attempts) if self.attempts else delays

    def _listener(self, loop: asyncio.AbstractEventLoop) -> Listener:
        folder = Path(self.config.dicom_folder).resolve()
        root = self._root_of(str(folder))
        assert root is not None, "config checks that store_into is in a watched folder"
        label = root.name if len(self.roots) > 1 else ""

        def accept(outcome: Outcome) -> None:
            self._results.append(outcome)
            self._results_ready.set()

        return Listener(self.config.dicom, folder, root, label, loop, accept,
                        scratch=Path(self.config.state_dir).resolve())

    async def _rescan_loop(self) -> None:
        """Walk the folders again now and then: kernel events can be lost (an inotify
        queue overflow is dropped silently) and network shares send none for files
        other machines write. Files already delivered in the same version are
        skipped, so a rescan costs a walk and a lookup per file."""
        while True:
            await asyncio.sleep(self.config.rescan_interval)
            for root in self.roots:
                await self._scan(root)
            self.rescans += 1

    def _tls(self) -> ssl.SSLContext | None:
        c = self.config
        try:
            return client_ssl(c.hub_urls, c.ca_file, c.client_cert, c.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise StateError(f"cannot load the watcher's TLS files: {exc}") from None

    async def _default_id(self) -> str:
        """A stable id per state folder: the host name and a random suffix, kept."""
        watcher_id = await self.state.get_meta("watcher_id")
        if watcher_id is None:
            host = socket.gethostname().split(".")[0] or "watcher"
            watcher_id = f"{host}-{secrets.token_hex(3)}"
            await self.state.set_meta("watcher_id", watcher_id)
        return watcher_id

    # finding files ----------------------------------------------------------------

    def _root_of(self, path: str) -> Path | None:
        for prefix, root in self._prefixes:  # longest first: the innermost root wins
            if path.startswith(prefix) or path == prefix[:-1]:
                return root
        return None

    def _skipped(self, path: str, root: Path) -> bool:
        """Called for every file seen, so string slicing rather than os.path.relpath."""
        rel = path[len(str(root).rstrip(os.sep)) + 1:]
        if any(ignored(part) for part in rel.split(os.sep)):
            return True
        return path == self._state_prefix[:-1] or path.startswith(self._state_prefix)

    def _on_change(self, change: Change) -> None:
        root = self._root_of(change.path)
        if root is None or self._skipped(change.path, root):
            return
        if self.listener is not None and self.listener.busy(change.path):
            return  # received over DICOM: its record is in hand already
        if change.kind == "gone":
            self.settler.forget(change.path)
        elif change.kind == "dir":
            # A folder created or moved in. Its files need no walk of ours: watchdog
            # walks it itself and reports each file (inotify and polling alike), and
            # a second walk cost a tenth of this process's time on a large move.
            # Whatever both miss, the reconciliation walk finds.
            return
        else:
            self._observe(change.path, closed=change.kind == "closed")

    def _observe(self, path: str, closed: bool = False) -> None:
        st = _stat(path)
        if st is None:
            self.settler.forget(path)
            return
        if path not in self.settler and path not in self._queued:
            self.found += 1
        if closed:
            self.settler.closed(path, st.st_size, st.st_mtime, time.time())
        else:
            self.settler.observe(path, st.st_size, st.st_mtime, time.time())
        self._wake.set()

    async def _scan(self, top: Path) -> None:
        """Walk a folder (in a thread), skipping files delivered in this same version."""
        walker = _walk(top)
        while True:
            while len(self.settler) + self._queue.qsize() >= PENDING_LIMIT:
                self._room.clear()
                await self._room.wait()
            chunk = await asyncio.to_thread(next, walker, None)
            if chunk is None:
                return
            entries = []
            for path, size, mtime_ns, mtime in chunk:
                root = self._root_of(path)
                if root is not None and not self._skipped(path, root):
                    entries.append((path, size, mtime_ns, mtime))
            known = await self.state.unchanged(
                [(os.fsencode(p), size, mtime_ns) for p, size, mtime_ns, _ in entries])
            self.found += len(entries)
            self.unchanged += len(known)
            now = time.time()
            for path, size, _, mtime in entries:
                if os.fsencode(path) not in known:
                    self.settler.observe(path, size, mtime, now)
            self._wake.set()

    # settling and parsing -------------------------------------------------------------

    async def _settle_loop(self) -> None:
        while True:
            deadline = self.settler.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: see dicomhub.aio
                    await self._wake.wait()
            self._wake.clear()
            for path, _, _ in self.settler.due(time.time()):
                if path not in self._queued:
                    self._queued.add(path)
                    self._queue.put_nowait(path)

    async def _parse_loop(self, pool: ProcessPoolExecutor) -> None:
        """Take what is ready in chunks: one worker call and one memory lookup per
        chunk keeps the per-file cost low under a backlog; an idle watcher still
        takes a single file at once."""
        loop = asyncio.get_running_loop()
        while True:
            while len(self._results) >= RESULTS_LIMIT or self._state_failing:
                self._stored.clear()
                await self._stored.wait()
            chunk = [await self._queue.get()]
            while len(chunk) < PARSE_CHUNK and not self._queue.empty():
                chunk.append(self._queue.get_nowait())
            self._room.set()
            try:
                await self._parse(loop, pool, chunk)
            finally:
                self._queued.difference_update(chunk)

    async def _parse(self, loop: asyncio.AbstractEventLoop, pool: ProcessPoolExecutor,
                     paths: list[str]) -> None:
        todo: list[tuple[str, Path, os.stat_result]] = []
        for path in paths:
            root = self._root_of(path)
            before = _stat(path)
            if root is not None and before is not None:
                todo.append((path, root, before))
        known = await self.state.unchanged(
            [(os.fsencode(p), st.st_size, st.st_mtime_ns) for p, _, st in todo])
        todo = [item for item in todo if os.fsencode(item[0]) not in known]
        if not todo:
            return  # spurious events for versions already delivered
        several = len(self.roots) > 1
        results = await loop.run_in_executor(pool, reader.encode_files, [
            (path, str(root), root.name if several else "") for path, root, _ in todo])
        for (path, _, before), result in zip(todo, results, strict=True):
            after = _stat(path)
            if after is None or result is None:
                continue  # gone while we read it: nothing to report
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                self.settler.observe(path, after.st_size, after.st_mtime, time.time())
                self._wake.set()
                continue  # changed while we read it: wait until it settles again
            self.parsed += 1
            text, retry = result
            rejected = text.startswith(_REJECTION)
            if rejected:  # rare: decoding it costs nothing overall
                self.rejections[json.loads(text)["reason"]] += 1
            # With `once`, rejected files are read again by the next import (they are
            # few): its summary and exit status must still say they are there.
            remember = not retry and not (rejected and self.once)
            self._results.append(Outcome(os.fsencode(path), before.st_size,
                                         before.st_mtime_ns, text, remember=remember))
        self._results_ready.set()

    async def _commit_loop(self) -> None:
        """Move parse results into the outbox. When the state folder refuses writes
        (disk full, read-only), keep the results, let the parsers wait, and retry:
        the outbox already stored stays intact and keeps draining to the hub."""
        assert self.link is not None
        retries = None
        last_error = ""
        committed = -GROUP_COMMIT
        while True:
            await self._results_ready.wait()
            wait = group_delay(committed, time.monotonic(), len(self._results),
                               self.config.batch_size)
            if wait > 0:
                await asyncio.sleep(wait)
            self._results_ready.clear()
            batch = list(self._results)
            if not batch:
                continue
            try:
                await self.state.put(batch)
            except StateError as exc:
                if retries is None:
                    self._state_failing = True
                    retries = backoff(initial=1.0, cap=STATE_RETRY_MAX)
                    last_error = str(exc)
                    log.error("%s; reading new files is paused and the write is retried "
                              "until it succeeds; the outbox already stored is kept and "
                              "still sent", exc)
                elif str(exc) != last_error:
                    last_error = str(exc)
                    log.warning("still failing, now: %s", exc)
                await asyncio.sleep(next(retries))
                self._results_ready.set()
                continue
            if retries is not None:
                retries, self._state_failing = None, False
                log.warning("the state folder takes writes again; reading new files resumes")
            committed = time.monotonic()
            del self._results[:len(batch)]
            self._stored.set()
            self.link.wake()


def group_delay(committed: float, now: float, waiting: int, batch_size: int) -> float:
    """How long to gather results before the next commit: until GROUP_COMMIT after
    the last one, unless a batch is already waiting."""
    return 0.0 if waiting >= batch_size else max(0.0, committed + GROUP_COMMIT - now)


def _limited(delays: Iterator[float], attempts: int) -> Iterator[float]:
    """`delays`, asked for after each failed round of attempts, until `attempts`
    rounds have failed: then HubUnreachable."""
    for _ in range(attempts - 1):
        yield next(delays)
    raise HubUnreachable(f"{attempts} attempts in a row to connect to the hub failed")


def _stat(path: str) -> os.stat_result | None:
    """The file's stat, or its link's for a broken symlink (which the reader then
    reports as unreadable); None for anything gone or not a file."""
    try:
        st = os.stat(path)
    except OSError:
        return _link_stat(path)
    return st if stat.S_ISREG(st.st_mode) else None


def _link_stat(path: str) -> os.stat_result | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISLNK(st.st_mode) else None


def _walk(top: Path) -> Iterator[list[tuple[str, int, int, float]]]:
    """Yield chunks of (path, size, mtime_ns, mtime) for regular files under `top`.

    Symlinked folders are not followed, so a symlink loop cannot trap the walk.
    """
    chunk: list[tuple[str, int, int, float]] = []
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not ignored(entry.name):
                        stack.append(entry.path)
                    continue
                found: os.stat_result | None = entry.stat()
            except OSError:
                found = _link_stat(entry.path)  # a broken or looping symlink: report it
            if found is None:
                continue
            st = found
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                chunk.append((entry.path, st.st_size, st.st_mtime_ns, st.st_mtime))
                if len(chunk) >= SCAN_CHUNK:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk

