"""When does a receiving series become stable? (pure: the caller passes the time)

DICOM never says how many instances a series has, so a series is stable once
`stable_after` seconds pass without a new instance (Orthanc's StableAge).
A late instance reopens it; the caller then touches it again.
"""

from __future__ import annotations

import heapq


class StabilityTracker:
    def __init__(self, stable_after: float) -> None:
        self.stable_after = stable_after
        self._last: dict[str, float] = {}  # series UID -> time of newest instance
        self._heap: list[tuple[float, str]] = []  # (deadline, uid); stale entries skipped

    def __len__(self) -> int:
        return len(self._last)

    def touch(self, series_uid: str, last_seen: float) -> None:
        """A series received an instance at `last_seen` (or was loaded at start)."""
        previous = self._last.get(series_uid)
        if previous is not None and previous >= last_seen:
            return
        self._last[series_uid] = last_seen
        heapq.heappush(self._heap, (last_seen + self.stable_after, series_uid))

    def forget(self, series_uid: str) -> None:
        self._last.pop(series_uid, None)

    def next_deadline(self) -> float | None:
        """When the earliest series could become stable; None when nothing is receiving."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[str]:
        """Remove and return the series whose quiet period has passed by `now`."""
        ready: list[str] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return ready
            _, uid = heapq.heappop(self._heap)
            del self._last[uid]
            ready.append(uid)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            deadline, uid = heap[0]
            last = self._last.get(uid)
            if last is not None and last + self.stable_after == deadline:
                return
            heapq.heappop(heap)
