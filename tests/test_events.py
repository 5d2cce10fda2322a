"""Watchdog events reduced to what the watcher acts on (pure)."""

from __future__ import annotations

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

from watcher.events import Change, translate


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
