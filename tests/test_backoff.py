"""Reconnect delays (watcher/backoff.py): exponential, capped, with jitter."""

from __future__ import annotations

import inspect
import random
from itertools import islice

import pytest

from watcher.backoff import backoff


def take(n: int, **kwargs: object) -> list[float]:
    return list(islice(backoff(**kwargs), n))  # type: ignore[arg-type]


def highest(lo: float, hi: float) -> float:
    return hi


def lowest(lo: float, hi: float) -> float:
    return lo


def test_upper_bound_sequence_doubles_to_the_cap() -> None:
    assert take(10, uniform=highest) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_lower_bound_sequence_is_half_the_ceiling() -> None:
    assert take(9, uniform=lowest) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]


def test_uniform_is_asked_for_half_ceiling_to_ceiling() -> None:
    calls: list[tuple[float, float]] = []

    def record(lo: float, hi: float) -> float:
        calls.append((lo, hi))
        return (lo + hi) / 2

    delays = take(8, uniform=record)
    assert calls == [(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0),
                     (8.0, 16.0), (15.0, 30.0), (15.0, 30.0)]
    assert delays == [(lo + hi) / 2 for lo, hi in calls]


def test_custom_initial_factor_and_cap() -> None:
    assert take(6, initial=1.0, factor=3.0, cap=10.0, uniform=highest) == \
        [1.0, 3.0, 9.0, 10.0, 10.0, 10.0]
    assert take(4, initial=2.0, factor=1.5, cap=100.0, uniform=lowest) == \
        [1.0, 1.5, 2.25, 3.375]


def test_the_cap_holds_forever() -> None:
    delays = take(500, uniform=highest)
    assert max(delays) == 30.0
    assert delays[-100:] == [30.0] * 100


def test_each_generator_starts_over() -> None:
    first = backoff(uniform=highest)
    assert list(islice(first, 5)) == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert next(backoff(uniform=highest)) == 0.5
    assert next(first) == 16.0  # the first one went on by itself


@pytest.mark.parametrize("seed", range(5))
def test_random_jitter_stays_in_half_ceiling_to_ceiling(seed: int) -> None:
    rng = random.Random(seed)
    delays = take(40, uniform=rng.uniform)
    ceilings = take(40, uniform=highest)
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0
    # jitter really varies once capped: watchers must not reconnect in lockstep
    assert len(set(delays[10:])) > 1


def test_the_default_random_source_is_random_uniform() -> None:
    assert inspect.signature(backoff).parameters["uniform"].default is random.uniform

