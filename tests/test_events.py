"""Watchdog events reduced to what the watcher acts on (pure), and folders left out
of the watch (real observers on real folders)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from conftest import TIMEOUT
from watcher.events import Change, start_observer, translate


@pytest.mark.parametrize(("event", "changes"), [
    (FileCreatedEvent("/in/a.dcm"), [Change("file", "/in/a.dcm")]),
    (FileModifiedEvent("/in/a.dcm"), [Change("file", "/in/a.dcm")]),
    (FileAttribEvent("/in/a.dcm"), [Change("file", "/in/a.dcm")]),  # chmod: readable now?
    (FileClosedEvent("/in/a.dcm"), [Change("closed", "/in/a.dcm")]),
    (FileDeletedEvent("/in/a.dcm"), [Change("gone", "/in/a.dcm")]),
    (FileMovedEvent("/in/a.tmp", "/in/a.dcm"),
     [Change("gone", "/in/a.tmp"), Change("file", "/in/a.dcm")]),
    (DirCreatedEvent("/in/s"), [Change("dir", "/in/s")]),
    (DirMovedEvent("/x/s", "/in/s"), [Change("dir", "/in/s")]),
    (FileOpenedEvent("/in/a.dcm"), []),
    (FileClosedNoWriteEvent("/in/a.dcm"), []),
    (DirModifiedEvent("/in"), []),
    (DirDeletedEvent("/in/s"), []),
])
def test_translate(event: FileSystemEvent, changes: list[Change]) -> None:
    assert translate(event) == changes


def test_byte_paths_become_text() -> None:
    assert translate(FileCreatedEvent(b"/in/\xff.dcm")) == [Change("file", "/in/\udcff.dcm")]


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
async def test_a_folder_left_out_raises_no_events(tmp_path: Path, polling: bool) -> None:
    root = tmp_path / "inbox"
    left_out = root / "dicom"
    (left_out / "1.2").mkdir(parents=True)
    changes: list[Change] = []
    seen = {name: asyncio.Event() for name in ("ready.dcm", "marker.dcm", "last.dcm")}

    def deliver(change: Change) -> None:
        changes.append(change)
        if (name := Path(change.path).name) in seen:
            seen[name].set()

    observer = start_observer([root], deliver, polling=polling, poll_interval=0.1,
                              exclude=[left_out])
    try:
        # Watching has begun (watches added, first snapshot taken) once a file
        # written after the start is reported; a busy machine can take a while.
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not seen["ready.dcm"].is_set():
            assert asyncio.get_running_loop().time() < deadline, "no event at all"
            (root / "ready.dcm").write_bytes(b"r")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen["ready.dcm"].wait(), 0.5)
        (left_out / "1.2" / "a.dcm").write_bytes(b"a")  # in a folder there at the start
        (left_out / "3.4" / "5.6").mkdir(parents=True)  # and in folders made since
        (left_out / "3.4" / "5.6" / "b.dcm").write_bytes(b"b")
        (root / "elsewhere").mkdir()
        (root / "elsewhere" / "marker.dcm").write_bytes(b"m")
        await asyncio.wait_for(seen["marker.dcm"].wait(), TIMEOUT)
        # Events are delivered in order: what the changes above raised (with polling,
        # in any order within one snapshot) is all here once a later file's is.
        (root / "elsewhere" / "last.dcm").write_bytes(b"l")
        await asyncio.wait_for(seen["last.dcm"].wait(), TIMEOUT)
    finally:
        observer.stop()
        await asyncio.to_thread(observer.join, TIMEOUT)
    assert not [c for c in changes if c.path.startswith(str(left_out))], changes
    assert Change("dir", str(root / "elsewhere")) in changes
