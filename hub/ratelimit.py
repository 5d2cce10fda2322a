"""Failed authentication attempts, limited per client address (pure: the caller
passes the time).

After `limit` failures within `window` seconds an address is refused (429)
until the oldest of them leaves the window, so guessing keys from one place
runs at a few attempts a minute, while a watcher retrying with a revoked key
(a few times a minute at most) never trips it.
"""

from __future__ import annotations

from collections import deque

MAX_ADDRESSES = 10_000  # memory bound: forget the quietest addresses beyond this


class FailureLimiter:
    def __init__(self, limit: int = 20, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        times = self._prune(address, now)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window - now)

    def failure(self, address: str, now: float) -> None:
        times = self._prune(address, now)
        if times is None:
            if len(self._failures) >= MAX_ADDRESSES:
                self._forget_oldest()
            times = self._failures[address] = deque(maxlen=self.limit)
        times.append(now)

    def _prune(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def _forget_oldest(self) -> None:
        oldest = min(self._failures, key=lambda a: self._failures[a][-1])
        del self._failures[oldest]
