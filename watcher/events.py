"""File-system events from watchdog, handed to asyncio.

watchdog calls handlers on its own thread; each event is passed to the loop
with `call_soon_threadsafe`, and everything else happens there.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    FileAttribEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver


@dataclass(frozen=True, slots=True)
class Change:
    """What happened, reduced to what the watcher acts on."""

    kind: str  # "file" (look at it), "closed" (writer done), "gone", "dir" (scan it)
    path: str


def translate(event: FileSystemEvent) -> list[Change]:
    """Map one watchdog event to the watcher's changes (pure)."""
    src = os.fsdecode(event.src_path)
    if isinstance(event, FileMovedEvent):
        # A rename inside the tree: the old name is gone, the new one is a file to read.
        return [Change("gone", src), Change("file", os.fsdecode(event.dest_path))]
    if isinstance(event, DirMovedEvent):
        return [Change("dir", os.fsdecode(event.dest_path))]
    if isinstance(event, FileClosedEvent):
        return [Change("closed", src)]
    if isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileAttribEvent)):
        # Attributes too: a file made readable (chmod) after it was rejected as
        # unreadable must be read again; for one already delivered it costs a lookup.
        return [Change("file", src)]
    if isinstance(event, FileDeletedEvent):
        return [Change("gone", src)]
    if isinstance(event, DirCreatedEvent):
        return [Change("dir", src)]
    return []


class _Bridge(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[Change], None]) -> None:
        self.loop, self.deliver = loop, deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        for change in translate(event):
            try:
                self.loop.call_soon_threadsafe(self.deliver, change)
            except RuntimeError:
                return  # the loop is closing: the start-up scan catches up next time


# watchdog 7's inotify emitter re-registers the watch of a folder created during a
# recursive copy and warns about it on its own thread; the watch is still correct.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


def start_observer(roots: Sequence[Path], deliver: Callable[[Change], None], *,
                   polling: bool, poll_interval: float) -> BaseObserver:
    """Watch every root recursively; events reach `deliver` on the running loop."""
    observer: BaseObserver = PollingObserver(timeout=poll_interval) if polling else Observer()
    bridge = _Bridge(asyncio.get_running_loop(), deliver)
    for root in roots:
        observer.schedule(bridge, str(root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer
