"""Logging: one event per line, human-readable or JSON, and patient data kept out.

Every logger (dicomhub.*, dicomhub.access for the access log, aiohttp.*, asyncio,
the libraries below) propagates to the root logger, which has exactly one
handler with one of these formatters. Each event has the same keys:

    time      ISO 8601 UTC with milliseconds ("2026-11-29T06:01:02.345Z")
    level     debug, info, warning, error or critical
    logger    the logger's name ("dicomhub.hub", "dicomhub.access", ...)
    message   the message, on one line
    error     when the event carries an exception: "Type: message"
    traceback with `debug` only: the exception's traceback

The text format shows them as ``time LEVEL logger: message (error: ...)`` and,
with `debug`, the traceback on the lines after; the JSON format as one object
per line, its traceback (with `debug`) a field of that line.

dicomhub's own messages carry UIDs and counts only. Some libraries log more at
debug level: watchdog logs file paths (folder names often hold patient names),
aiosqlite logs SQL parameters (patient IDs). Those loggers are held at WARNING
whatever level the user asks for.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

PHI_UNSAFE = ("watchdog", "aiosqlite", "websockets", "pynetdicom")  # pynetdicom dumps data sets
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")


def keep_phi_out() -> None:
    for name in PHI_UNSAFE:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def one_line(text: str) -> str:
    """`text` with its line breaks folded, so that an event stays one line."""
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def describe(exc: BaseException) -> str:
    """An exception as "Type: message", on one line."""
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fields(record: logging.LogRecord, debug: bool) -> dict[str, Any]:
    """The event's keys (see the module docstring), in a stable order."""
    when = datetime.fromtimestamp(record.created, UTC)
    event: dict[str, Any] = {
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "message": one_line(record.getMessage()),
    }
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        event["error"] = describe(exc)
    if debug and (exc is not None or record.stack_info):
        lines = traceback.format_exception(exc) if exc is not None else []
        if record.stack_info:
            lines.append(record.stack_info)
        event["traceback"] = "".join(lines).rstrip("\n")
    return event


class TextFormatter(logging.Formatter):
    """``2026-11-29T06:01:02.345Z INFO    dicomhub.hub: message (error: ...)``"""

    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        event = fields(record, self.debug)
        line = (f"{event['time']} {event['level'].upper():<7} {event['logger']}: "
                f"{event['message']}")
        if "error" in event:
            line += f" (error: {event['error']})"
        if "traceback" in event:
            line += "\n" + event["traceback"]
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the keys of `fields`."""

    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields(record, self.debug), ensure_ascii=False)


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"
    debug: bool = False  # tracebacks in the log and on fatal errors


def setup(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Send every logger's events through one handler on `stream` (stderr), in
    `settings.format`, at `settings.level`. Calling it again replaces the handler."""
    if settings.format not in FORMATS:
        raise ValueError(f"log format {settings.format!r} is not one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter_class = JsonFormatter if settings.format == "json" else TextFormatter
    handler.setFormatter(formatter_class(settings.debug))
    root.addHandler(handler)
    root.setLevel(getattr(logging, settings.level.upper()))
    logging.captureWarnings(True)  # warnings.warn(...) too: same handler, same format
    for name in ("aiohttp.access", "dicomhub.access", "aiohttp.server", "asyncio"):
        # Whatever a library did to its logger, its events go through our handler.
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True
    threading.excepthook = _thread_died  # not a bare traceback on stderr
    keep_phi_out()
    # websockets logs every failed handshake with its traceback; our link says it better.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)


def _thread_died(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("dicomhub").error(
        "thread %s stopped by an unexpected error", name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
        if args.exc_value is not None else None)


def fatal(settings: LogSettings, message: str, exc: BaseException | None = None,
          stream: TextIO | None = None) -> None:
    """Report why the command stops, as one line on stderr: ``error: message`` in
    the text format, an error event in the JSON format. With `settings.debug`,
    `exc`'s traceback follows (text) or rides along (JSON)."""
    out = stream or sys.stderr
    if settings.format == "json":
        record = logging.LogRecord("dicomhub", logging.ERROR, __file__, 0, "%s", (message,),
                                   (type(exc), exc, exc.__traceback__)
                                   if exc is not None and settings.debug else None)
        print(JsonFormatter(settings.debug).format(record), file=out, flush=True)
        return
    if exc is not None and settings.debug:
        traceback.print_exception(exc, file=out)
    print(f"error: {one_line(message)}", file=out, flush=True)
