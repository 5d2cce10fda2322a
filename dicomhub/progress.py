"""Progress of long work: counters over time in; rate, time left and one line out.

The core is pure (the caller passes the time, as with the settler):

    Counts ──> Meter ──> Reading ──> describe() ──> "scanned 1,203, parsed ..."
    Counts ──> Burst        (a terminal: show once work has waited `show_after` s)
    Counts ──> LogSchedule  (no terminal: a line every `interval` s while there is work)

The edge, `while_running`, reads the counters a few times a second while some
work runs and draws them with rich on a terminal (stderr), or logs them through
the `dicomhub.watcher.progress` logger every DICOMHUB_PROGRESS_INTERVAL seconds
(default 10) elsewhere. Only counts are shown: never a path or anything read from a file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO, TypeVar

from .aio import stop_task
from .errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

log = logging.getLogger("dicomhub.watcher.progress")

T = TypeVar("T")

ENV_INTERVAL = "DICOMHUB_PROGRESS_INTERVAL"
LOG_INTERVAL = 10.0  # seconds between progress lines in a log
REFRESH = 0.25  # seconds between reads of the counters for a terminal
SHOW_AFTER = 1.0  # a terminal shows progress once work has waited this long
RATE_WINDOW = 10.0  # the rate is measured over this many seconds


@dataclass(frozen=True, slots=True)
class Counts:
    """The watcher's counters at one moment (since it started)."""

    scanned: int = 0  # files found by walks and events
    unchanged: int = 0  # of those, delivered before in the same version: not read again
    parsed: int = 0  # files read
    delivered: int = 0  # records the hub acknowledged
    rejected: int = 0  # rejection records produced
    pending: int = 0  # files and records not acknowledged yet (settling, queued, outbox)

    def moved_since(self, before: Counts) -> bool:
        """Whether work was done since `before`: files read or records delivered.
        Walks alone do not count: a reconciliation walk that finds nothing new is idle."""
        return (self.parsed, self.delivered, self.rejected) != \
            (before.parsed, before.delivered, before.rejected)


@dataclass(frozen=True, slots=True)
class Reading:
    counts: Counts
    rate: float | None  # records delivered per second, None until there are two samples
    eta: float | None  # seconds until nothing is pending at that rate; None if unknown


class Meter:
    """The delivery rate over the last `window` seconds, and the time left at it."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def read(self, counts: Counts, now: float) -> Reading:
        samples = self._samples
        samples.append((now, counts.delivered))
        # Keep the newest sample at or before the window's start as the reference.
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()
        then, delivered_then = samples[0]
        rate = (counts.delivered - delivered_then) / (now - then) if now > then else None
        if counts.pending == 0:
            eta: float | None = 0.0
        elif rate:
            eta = counts.pending / rate
        else:
            eta = None  # nothing delivered lately (hub down, files settling): unknown
        return Reading(counts, rate, eta)


def clock(seconds: float) -> str:
    """`seconds` as m:ss, or h:mm:ss from an hour on (rounded up: 0.2 s left is 0:01)."""
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def describe(reading: Reading) -> str:
    """The progress line: counts, rate and time left; nothing from any file."""
    c = reading.counts
    scanned = f"scanned {c.scanned:,}"
    if c.unchanged:
        scanned += f" ({c.unchanged:,} delivered before)"
    rate = "- files/s" if reading.rate is None else f"{reading.rate:,.0f} files/s"
    eta = "-" if reading.eta is None else clock(reading.eta)
    return (f"{scanned}, parsed {c.parsed:,}, delivered {c.delivered:,}, "
            f"rejected {c.rejected:,}, pending {c.pending:,}; {rate}, ETA {eta}")


class Burst:
    """When a terminal shows progress: from `show_after` seconds into a stretch of
    pending work (a single file dropped in goes by unannounced) until none is left.
    Also where the stretch began, for a bar of its own share done."""

    def __init__(self, show_after: float = SHOW_AFTER) -> None:
        self.show_after = show_after
        self._since: float | None = None
        self._base = 0  # records delivered when the stretch began
        self._shown = False

    def update(self, counts: Counts, now: float) -> bool:
        """Whether progress is to be shown now."""
        if counts.pending == 0:
            self._since, self._shown = None, False
            return False
        if self._since is None:
            self._since, self._base = now, counts.delivered
        self._shown = self._shown or now - self._since >= self.show_after
        return self._shown

    def share_done(self, counts: Counts) -> float:
        """Of the work seen in this stretch, the share delivered (0 to 1)."""
        if counts.pending == 0:
            return 1.0
        done = max(0, counts.delivered - self._base)
        return done / (done + counts.pending)


class LogSchedule:
    """When a log gets a progress line: at most every `interval` seconds, and only
    while work is pending or when work was done since the last line (so one line
    closes a stretch of work). An idle watcher logs nothing."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self._at = now
        self._last = Counts()

    def due(self, counts: Counts, now: float) -> bool:
        if now - self._at < self.interval:
            return False
        if counts.pending == 0 and not counts.moved_since(self._last):
            return False
        self._at, self._last = now, counts
        return True


def log_interval(environ: Mapping[str, str]) -> float:
    """Seconds between progress lines in a log, from $DICOMHUB_PROGRESS_INTERVAL."""
    text = environ.get(ENV_INTERVAL, "")
    if not text:
        return LOG_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"${ENV_INTERVAL} has value {text!r}: not a positive number "
                          "of seconds")
    return value


# the edge: a terminal or a log ---------------------------------------------------------


async def while_running(work: Awaitable[T], read: Callable[[], Counts], *,
                        always: bool = False, environ: Mapping[str, str] = os.environ,
                        stream: TextIO | None = None) -> T:
    """Await `work`, showing the progress `read` returns on `stream` (default stderr):
    on a terminal a live line, during stretches of work (see Burst) or, with `always`,
    from start to end; elsewhere log lines. `read` is called a few times a second and
    must be cheap. Raises ConfigError for a bad $DICOMHUB_PROGRESS_INTERVAL before
    `work` starts."""
    interval = log_interval(environ)
    out = stream if stream is not None else sys.stderr
    shown = _terminal(read, always, out) if out.isatty() else _log_lines(read, interval)
    reporter = asyncio.create_task(shown, name="progress")
    try:
        return await work
    finally:
        await stop_task(reporter)


async def _log_lines(read: Callable[[], Counts], interval: float) -> None:
    meter = Meter(window=max(interval, RATE_WINDOW))
    schedule = LogSchedule(interval, time.monotonic())
    while True:
        await asyncio.sleep(interval)
        counts, now = read(), time.monotonic()
        reading = meter.read(counts, now)
        if schedule.due(counts, now):
            log.info("%s", describe(reading))


async def _terminal(read: Callable[[], Counts], always: bool, out: TextIO) -> None:
    from rich.console import Console

    console = Console(file=out)
    meter, burst = Meter(), Burst()
    live: Live | None = None
    try:
        while True:
            counts, now = read(), time.monotonic()
            reading = meter.read(counts, now)
            share = burst.share_done(counts)
            if burst.update(counts, now) or always:
                live = live or _start_live(console)
                live.update(_line(reading, share), refresh=True)
            elif live is not None:  # the work is done: leave its last line standing
                live.update(_line(reading, share), refresh=True)
                _stop_live(live)
                live = None
            await asyncio.sleep(REFRESH)
    finally:
        if live is not None:
            counts = read()
            live.update(_line(meter.read(counts, time.monotonic()), burst.share_done(counts)),
                        refresh=True)
            _stop_live(live)


def _line(reading: Reading, share: float) -> RenderableType:
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=1000, completed=round(share * 1000), width=20),
                 Text(describe(reading)))
    return grid


def _start_live(console: Console) -> Live:
    """A live display on the console that keeps log lines above it: without a
    refresh thread of its own (we refresh it), with stderr (where logs go) passed
    through it."""
    from rich.live import Live

    live = Live(console=console, auto_refresh=False, transient=False,
                redirect_stdout=False, redirect_stderr=True)
    live.start()
    _point_log_handlers(sys.stderr, getattr(sys.stderr, "rich_proxied_file", None))
    return live


def _stop_live(live: Live) -> None:
    proxy = sys.stderr
    live.stop()
    _point_log_handlers(sys.stderr, proxy)


def _point_log_handlers(to: TextIO, from_: object) -> None:
    """Log handlers that write to `from_` write to `to` instead: logging's handlers
    hold the stream they were given, so rich's redirection alone misses them and
    its line would be torn by each log line."""
    if from_ is None or to is from_:
        return
    for handler in _stream_handlers():
        if handler.stream is from_:
            handler.setStream(to)


def _stream_handlers() -> Iterator[logging.StreamHandler[TextIO]]:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            yield handler
