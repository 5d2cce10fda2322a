"""Is this file complete yet? (pure: the caller passes the time)

A file is ready when its size and mtime have not changed for `settle` seconds,
or as soon as the kernel says the writer closed it (inotify's close-write).
The quiet period counts from the file's own mtime when that is in the past:
a file that has not been modified for `settle` seconds is ready at once, so
the files already in a folder, or moved in whole, do not wait. A mtime in the
future (a clock ahead on a file server) counts from when we first saw it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Seen:
    size: int
    mtime: float
    ready_at: float
    seen_at: float


class Settler(Generic[K]):
    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._files: dict[K, _Seen] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = 0  # tie-breaker: keys need not be comparable

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def observe(self, key: K, size: int, mtime: float, now: float) -> None:
        """Record what a stat of the file showed at `now`."""
        seen = self._files.get(key)
        if seen is not None and seen.size == size and seen.mtime == mtime:
            return  # unchanged: its quiet period keeps running
        since = min(mtime, now)
        if seen is not None:
            # It changed after we last looked, whatever its mtime says (coarse
            # timestamps on FAT/SMB, or an mtime set back by `cp -p`).
            since = max(since, seen.seen_at)
        self._schedule(key, _Seen(size, mtime, since + self.settle, now))

    def closed(self, key: K, size: int, mtime: float, now: float) -> None:
        """The writer closed the file: no need to wait for the quiet period."""
        self._schedule(key, _Seen(size, mtime, now, now))

    def forget(self, key: K) -> None:
        self._files.pop(key, None)

    def next_deadline(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[K, int, float]]:
        """Remove and return (key, size, mtime) of every file ready by `now`."""
        ready: list[tuple[K, int, float]] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return ready
            _, _, key = heapq.heappop(self._heap)
            seen = self._files.pop(key)
            ready.append((key, seen.size, seen.mtime))

    def _schedule(self, key: K, seen: _Seen) -> None:
        self._files[key] = seen
        self._order += 1
        heapq.heappush(self._heap, (seen.ready_at, self._order, key))

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            ready_at, _, key = heap[0]
            seen = self._files.get(key)
            if seen is not None and seen.ready_at == ready_at:
                return
            heapq.heappop(heap)
