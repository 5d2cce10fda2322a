"""When does a series become stable? hub/stability.py StabilityTracker with a fake clock."""

from __future__ import annotations

import pytest

from hub.stability import StabilityTracker

AFTER = 10.0


@pytest.fixture
def tracker() -> StabilityTracker:
    return StabilityTracker(AFTER)


def test_a_series_is_due_after_stable_after(tracker: StabilityTracker) -> None:
    tracker.touch("1.2.3", 100.0)
    assert len(tracker) == 1
    assert tracker.next_deadline() == 110.0
    assert tracker.due(109.999) == []
    assert tracker.due(110.0) == ["1.2.3"]
    assert len(tracker) == 0
    assert tracker.due(1000.0) == []  # reported once
    assert tracker.next_deadline() is None


def test_touch_postpones(tracker: StabilityTracker) -> None:
    tracker.touch("s", 100.0)
    tracker.touch("s", 105.0)  # a new instance arrived
    assert len(tracker) == 1
    assert tracker.next_deadline() == 115.0
    assert tracker.due(110.0) == []  # the first deadline is stale
    assert tracker.due(115.0) == ["s"]
    assert tracker.due(200.0) == []


def test_an_older_or_equal_touch_is_ignored(tracker: StabilityTracker) -> None:
    tracker.touch("s", 100.0)
    tracker.touch("s", 90.0)  # e.g. loaded from the store after a newer live instance
    tracker.touch("s", 100.0)
    assert tracker.next_deadline() == 110.0
    assert tracker.due(110.0) == ["s"]
    assert tracker.due(200.0) == []


def test_a_late_instance_reopens_a_stable_series(tracker: StabilityTracker) -> None:
    tracker.touch("s", 100.0)
    assert tracker.due(110.0) == ["s"]
    tracker.touch("s", 120.0)
    assert tracker.next_deadline() == 130.0
    assert tracker.due(130.0) == ["s"]


def test_a_touch_older_than_a_reported_one_still_reopens(tracker: StabilityTracker) -> None:
    tracker.touch("s", 100.0)
    assert tracker.due(110.0) == ["s"]
    tracker.touch("s", 50.0)  # nothing remembered after due(): it is receiving again
    assert tracker.due(60.0) == ["s"]


def test_next_deadline(tracker: StabilityTracker) -> None:
    assert tracker.next_deadline() is None
    tracker.touch("b", 20.0)
    tracker.touch("a", 10.0)
    assert tracker.next_deadline() == 20.0
    tracker.touch("a", 30.0)  # a moves behind b
    assert tracker.next_deadline() == 30.0
    assert tracker.due(30.0) == ["b"]
    assert tracker.next_deadline() == 40.0


def test_forget(tracker: StabilityTracker) -> None:
    tracker.touch("a", 10.0)
    tracker.touch("b", 15.0)
    tracker.forget("a")
    tracker.forget("unknown")  # no error
    assert len(tracker) == 1
    assert tracker.next_deadline() == 25.0
    assert tracker.due(100.0) == ["b"]
    assert tracker.next_deadline() is None


def test_forget_then_touch_again_reports_once(tracker: StabilityTracker) -> None:
    tracker.touch("a", 10.0)
    tracker.forget("a")
    tracker.touch("a", 10.0)  # same deadline as the forgotten heap entry
    assert tracker.due(100.0) == ["a"]
    assert tracker.due(200.0) == []


def test_many_series_become_stable_in_deadline_order(tracker: StabilityTracker) -> None:
    last_seen = {f"1.2.{i}": float((i * 37) % 500) for i in range(500)}
    for uid, when in last_seen.items():
        tracker.touch(uid, when)
    assert len(tracker) == 500
    early = tracker.due(200.0)
    assert early == sorted((u for u, t in last_seen.items() if t + AFTER <= 200.0),
                           key=last_seen.__getitem__)
    late = tracker.due(1000.0)
    assert sorted(early + late) == sorted(last_seen)
    assert [last_seen[u] for u in late] == sorted(last_seen[u] for u in late)
    assert len(tracker) == 0


def test_many_touches_of_one_series_leave_one_entry(tracker: StabilityTracker) -> None:
    for t in range(1000):
        tracker.touch("busy", float(t))
        tracker.touch("quiet", 0.0)
    assert len(tracker) == 2
    assert tracker.due(10.0) == ["quiet"]
    assert tracker.due(1008.0) == []
    assert tracker.due(1009.0) == ["busy"]
    assert tracker.next_deadline() is None
