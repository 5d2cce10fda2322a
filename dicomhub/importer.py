"""`dicomhub import DIR`: read a folder once, wait until the hub has acknowledged
an outcome for every file, print a summary and exit.

It is the watcher without events (`Watcher(once=True)`): the same reading,
outbox and link, on a state folder of its own under [watcher] state_dir
(`import-<hash of DIR>`). So it never touches a running watcher's outbox, and
importing the same folder again skips what an earlier import delivered.

Exit codes: 0 every file indexed; 1 some files rejected; 2 an error (one line:
folder missing, no or bad key, no hub reached in --attempts attempts);
130 interrupted, with what was read kept in the outbox for the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import progress
from .cli import _until_signalled, _watcher_key
from .config import WatcherConfig, load
from .errors import DicomhubError

if TYPE_CHECKING:  # imported when used: every command loads this module for its arguments
    from watcher.service import Watcher

HELP = ("import a folder once: read every file, wait until the hub has acknowledged "
        "each outcome, print a summary (exit 0, or 1 if files were rejected)")
DEFAULT_ATTEMPTS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="the folder to import, recursively")
    parser.add_argument("--attempts", type=_positive_int, default=DEFAULT_ATTEMPTS,
                        metavar="N", help="give up after N failed attempts in a row to "
                                          f"reach the hub (default {DEFAULT_ATTEMPTS})")


def main(args: argparse.Namespace) -> int:
    """Raises DicomhubError (exit 2) for what a user can fix."""
    config = load(getattr(args, "config", None))
    folder = _folder(args.folder)
    key = _watcher_key(config.watcher, os.environ)
    verbose = bool(getattr(args, "log_level", None) or getattr(args, "debug", False))
    started = time.monotonic()
    with _import_logging(verbose) as trouble:
        watcher, finished = asyncio.run(
            _run(import_config(config.watcher, folder), key, args.attempts, trouble))
    seconds = time.monotonic() - started
    if not finished:
        print(f"interrupted after {seconds:.1f} s: {watcher.parsed} files read; "
              f"{watcher.state.backlog} records wait in the outbox for the next import "
              "of this folder", file=sys.stderr)
        return 130
    summary = summarize(watcher, seconds)
    assert watcher.link is not None
    print("\n".join(summary_lines(summary, rejections_url(watcher.link.url,
                                                          watcher.watcher_id))))
    return 1 if summary.rejected else 0


def import_config(config: WatcherConfig, folder: Path) -> WatcherConfig:
    """The watcher's config for importing `folder`: a state folder and a watcher id
    of its own, derived from the folder's path and the hubs, so that a re-run finds
    them again, and an import of the same folder into another hub starts afresh."""
    place = "\0".join((str(folder), *config.hub_urls))
    digest = hashlib.sha256(os.fsencode(place)).hexdigest()[:12]
    base = config.watcher_id or socket.gethostname().split(".")[0] or "watcher"
    return replace(config, watch=(folder,), state_dir=config.state_dir / f"import-{digest}",
                   watcher_id=f"{base[:100]}-import-{digest}", rescan_interval=0.0)


async def _run(config: WatcherConfig, key: str, attempts: int,
               trouble: _LinkTrouble) -> tuple[Watcher, bool]:
    """The watcher once it has returned, and whether it finished (False: a signal
    stopped it first). Raises DicomhubError when the hub cannot be reached."""
    from watcher.service import HubUnreachable, Watcher

    watcher = Watcher(config, key, once=True, attempts=attempts)
    finished = False

    async def work() -> None:
        nonlocal finished
        await progress.while_running(watcher.run(), watcher.progress, always=True)
        finished = True

    try:
        await _until_signalled(work())
    except HubUnreachable as exc:
        kept = watcher.state.backlog
        raise DicomhubError(
            f"{exc}; the last: {trouble.last or 'no answer'}"
            + (f" ({kept} records wait in the outbox for the next import)" if kept else "")
        ) from None
    return watcher, finished


# the summary (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    found: int  # files the walk found
    unchanged: int  # of those, delivered by an earlier import: not read again
    # (rejected files are read again by every import: see Watcher._parse)
    read: int
    indexed: int  # new instances in the hub
    duplicates: int  # instances the hub had already (or outcomes it had already)
    rejected: int
    reasons: Mapping[str, int]  # rejections read this run, by reason
    earlier: int  # records an interrupted import had left in the outbox, sent first
    seconds: float


def summarize(watcher: Watcher, seconds: float) -> Summary:
    link = watcher.link
    assert link is not None, "the watcher ran"
    reasons = dict(watcher.rejections)
    # A rejection the hub already held (a file rejected by an earlier import, read
    # again) counts there as a duplicate; here it is a rejection.
    held = max(0, sum(reasons.values()) - link.rejected)
    return Summary(found=watcher.found, unchanged=watcher.unchanged, read=watcher.parsed,
                   indexed=link.stored, duplicates=max(0, link.duplicates - held),
                   rejected=link.rejected + held, reasons=reasons,
                   earlier=max(0, link.delivered - watcher.parsed), seconds=seconds)


def summary_lines(s: Summary, rejections: str) -> list[str]:
    """The summary as printed: counts only, never a path."""
    rate = s.read / s.seconds if s.seconds > 0 else 0.0
    why = ", ".join(f"{reason} {count}" for reason, count in
                    sorted(s.reasons.items(), key=lambda item: (-item[1], item[0])))
    other = s.rejected - sum(s.reasons.values())
    if other > 0:
        why = ", ".join(filter(None, [why, f"at the hub {other}"]))
    rows = [("found", s.found, "files"),
            ("already done", s.unchanged, "delivered by an earlier import: not read again"),
            ("read", s.read, f"{rate:,.0f} files/s"),
            ("indexed", s.indexed, "new instances"),
            ("duplicates", s.duplicates, "already in the hub"),
            ("rejected", s.rejected, why)]
    lines = [f"import finished in {s.seconds:.1f} s"]
    lines += [f"  {name:<13}{count:>8,}  {note}".rstrip() for name, count, note in rows]
    if s.earlier:
        lines.append(f"  ({s.earlier:,} records left by an interrupted import were "
                     "delivered first)")
    if s.rejected:
        lines.append(f"{s.rejected:,} files rejected: see {rejections}")
    return lines


def rejections_url(hub_url: str, watcher_id: str) -> str:
    """The hub's /api/rejections for this import, from its ingest URL."""
    parts = urllib.parse.urlsplit(hub_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.removesuffix("/ws/ingest")  # a proxy may serve the hub under a prefix
    return urllib.parse.urlunsplit((scheme, parts.netloc.rpartition("@")[2],
                                    f"{path}/api/rejections",
                                    urllib.parse.urlencode({"watcher_id": watcher_id}), ""))


# the edges: arguments, folder, logging ----------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _folder(text: str) -> Path:
    folder = Path(text).expanduser()
    if not folder.exists():
        raise DicomhubError(f"folder {text!r} does not exist")
    if not folder.is_dir():
        raise DicomhubError(f"{text!r} is not a folder")
    try:
        with os.scandir(folder):
            pass
    except OSError as exc:
        raise DicomhubError(f"folder {text!r} cannot be read: {exc.strerror}") from None
    return folder.resolve()


class _LinkTrouble(logging.Filter):
    """Keeps the link's last report of a failed attempt to reach the hub, and (unless
    `verbose`) holds the reports back: the import ends with one line naming the
    last, rather than printing a line per attempt."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.module == "link" and record.levelno >= logging.WARNING:
            self.last = record.getMessage()
            return self.verbose
        return True


@contextlib.contextmanager
def _import_logging(verbose: bool) -> Iterator[_LinkTrouble]:
    """The import speaks through its progress and its summary: unless a log level
    was asked for, the watcher's log holds warnings and errors only."""
    root, progress_log = logging.getLogger(), logging.getLogger(progress.log.name)
    watcher_log = logging.getLogger("dicomhub.watcher")
    trouble = _LinkTrouble(verbose)
    level = root.level
    if not verbose:
        root.setLevel(logging.WARNING)
        progress_log.setLevel(logging.INFO)
    watcher_log.addFilter(trouble)
    try:
        yield trouble
    finally:
        watcher_log.removeFilter(trouble)
        root.setLevel(level)
        progress_log.setLevel(logging.NOTSET)
