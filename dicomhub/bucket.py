"""A token bucket (pure: the caller passes the time): the hub limits each
watcher's messages with one, and the watcher paces itself with another."""

from __future__ import annotations


class TokenBucket:
    """At most `rate` events a second on average, `burst` at once (pure)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, now

    def take(self, now: float) -> bool:
        """Spend one token; False when none is left (the caller refuses the event)."""
        self.tokens, self.updated = self._available(now), now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def delay(self, now: float) -> float:
        """Seconds until `take` would succeed; 0 when it would now."""
        tokens = self._available(now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _available(self, now: float) -> float:
        return min(self.burst, self.tokens + (now - self.updated) * self.rate)
