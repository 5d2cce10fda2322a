"""Reconnect delays: exponential with full jitter (pure; the random source is injectable).

Jitter keeps many watchers that lost the same hub from reconnecting in
lockstep when it comes back (RFC 6455 §7.2.3 asks clients to randomise).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator


def backoff(initial: float = 0.5, factor: float = 2.0, cap: float = 30.0,
            uniform: Callable[[float, float], float] = random.uniform) -> Iterator[float]:
    """Yield delays: each drawn from [ceiling/2, ceiling], the ceiling doubling up to `cap`."""
    ceiling = initial
    while True:
        yield uniform(ceiling / 2, ceiling)
        ceiling = min(cap, ceiling * factor)
