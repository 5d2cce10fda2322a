"""File-system events from watchdog, handed to asyncio.

watchdog calls handlers on its own thread; each event is passed to the loop
with `call_soon_threadsafe`, and everything else happens there.

Folders can be left out (the DICOM listener's: it hands over what it writes
there itself, and each event would cost watchdog's threads more than the whole
instance costs otherwise). With polling they are not walked; with inotify no
watch is added inside them, which needs watchdog 7's inotify classes: with
others, their events still come and the watcher recognises them as its own.
"""

from __future__ import annotations

import asyncio
import errno
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from watchdog.observers.polling import PollingObserverVFS


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
                   polling: bool, poll_interval: float,
                   exclude: Sequence[Path] = ()) -> BaseObserver:
    """Watch every root recursively but the `exclude` folders below them; events
    reach `deliver` on the running loop."""
    left_out = tuple(os.fsencode(folder) for folder in exclude
                     if any(root in folder.parents for root in roots))
    observer: BaseObserver
    if polling:
        observer = PollingObserverVFS(os.stat, _pruned_scandir(left_out),
                                      polling_interval=poll_interval)
    else:
        observer = _inotify_observer(left_out) or Observer()
    bridge = _Bridge(asyncio.get_running_loop(), deliver)
    for root in roots:
        observer.schedule(bridge, str(root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer


def _inside(path: bytes, folders: tuple[bytes, ...]) -> bool:
    return any(path == f or path.startswith(f + b"/") for f in folders)


def _pruned_scandir(left_out: tuple[bytes, ...]
                    ) -> Callable[[str | None], Iterator[os.DirEntry[str]]]:
    def scandir(path: str | None) -> Iterator[os.DirEntry[str]]:
        for entry in os.scandir(path):
            if not (left_out and _inside(os.fsencode(entry.path), left_out)):
                yield entry

    return scandir


def _inotify_observer(left_out: tuple[bytes, ...]) -> BaseObserver | None:
    """An inotify observer adding no watch inside `left_out`, or None when there is
    nothing to leave out or this watchdog lacks the classes it takes (7.x): its
    emitters accept an inotify instance, whose `add_callback` adds every watch, and
    a watch that cannot be added below a root is skipped."""
    if not left_out:
        return None
    try:
        from watchdog.observers.inotify import InotifyEmitter
        from watchdog.observers.inotify_c import InotifyFD
    except ImportError:
        return None
    if not hasattr(InotifyFD, "add_callback"):
        return None

    class PrunedFD(InotifyFD):
        def add_callback(self, path: bytes, *args: Any) -> Any:
            if _inside(path, left_out):
                raise OSError(errno.EPERM, "left out of the watch", os.fsdecode(path))
            return super().add_callback(path, *args)

    class PrunedObserver(BaseObserver):
        def __init__(self) -> None:
            self._fd = PrunedFD()
            self._fd.start()
            super().__init__(InotifyEmitter, inotify_fd=self._fd)

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self._fd.stop()
            self._fd.join()

    return PrunedObserver()
