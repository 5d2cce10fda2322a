"""When is a file complete? watcher/settle.py Settler, driven by a fake clock (plain floats)."""

from __future__ import annotations

import pytest

from watcher.settle import Settler

SETTLE = 2.0


@pytest.fixture
def settler() -> Settler[str]:
    return Settler(SETTLE)


def test_unchanged_file_becomes_due_after_settle(settler: Settler[str]) -> None:
    # first seen while being written: mtime == now
    settler.observe("a.dcm", 100, mtime=1000.0, now=1000.0)
    assert "a.dcm" in settler and len(settler) == 1
    assert settler.next_deadline() == 1000.0 + SETTLE
    settler.observe("a.dcm", 100, mtime=1000.0, now=1001.0)  # unchanged
    assert settler.due(1001.999) == []
    assert settler.due(1002.0) == [("a.dcm", 100, 1000.0)]
    assert "a.dcm" not in settler and len(settler) == 0
    assert settler.due(5000.0) == []  # reported once
    assert settler.next_deadline() is None


def test_unchanged_observations_do_not_postpone(settler: Settler[str]) -> None:
    settler.observe("a", 1, mtime=10.0, now=10.0)
    for now in (10.5, 11.0, 11.5, 11.9):
        settler.observe("a", 1, mtime=10.0, now=now)
        assert settler.next_deadline() == 12.0
    assert settler.due(12.0) == [("a", 1, 10.0)]


def test_a_change_restarts_the_wait(settler: Settler[str]) -> None:
    settler.observe("a", 100, mtime=10.0, now=10.0)
    settler.observe("a", 200, mtime=11.5, now=11.5)  # grew: written again
    assert settler.next_deadline() == 13.5
    assert settler.due(12.0) == []  # the first deadline no longer counts
    assert settler.due(13.4) == []
    assert settler.due(13.5) == [("a", 200, 11.5)]  # the newest size and mtime


def test_an_mtime_only_change_restarts_the_wait(settler: Settler[str]) -> None:
    settler.observe("a", 100, mtime=10.0, now=10.0)
    settler.observe("a", 100, mtime=11.0, now=11.0)  # rewritten, same size
    assert settler.due(12.0) == []
    assert settler.due(13.0) == [("a", 100, 11.0)]


def test_a_size_change_with_the_same_mtime_restarts_the_wait() -> None:
    settler: Settler[str] = Settler(5.0)
    settler.observe("a", 100, mtime=100.0, now=103.0)  # due at 105
    settler.observe("a", 200, mtime=100.0, now=104.0)  # grew between 103 and 104
    # it changed less than 3 s ago at 106: not quiet for 5 s yet
    assert settler.due(106.0) == []


def test_an_old_file_is_due_at_once(settler: Settler[str]) -> None:
    settler.observe("old.dcm", 10, mtime=500.0, now=1000.0)
    assert settler.next_deadline() == 500.0 + SETTLE
    assert settler.due(1000.0) == [("old.dcm", 10, 500.0)]


def test_a_recent_mtime_counts_from_the_mtime(settler: Settler[str]) -> None:
    settler.observe("a", 10, mtime=999.5, now=1000.0)  # written half a second ago
    assert settler.next_deadline() == 999.5 + SETTLE
    assert settler.due(1001.4) == []
    assert settler.due(1001.5) == [("a", 10, 999.5)]


def test_an_mtime_exactly_settle_old_is_due_now(settler: Settler[str]) -> None:
    settler.observe("a", 10, mtime=1000.0 - SETTLE, now=1000.0)
    assert settler.due(1000.0) == [("a", 10, 1000.0 - SETTLE)]


def test_a_future_mtime_counts_from_first_sight(settler: Settler[str]) -> None:
    settler.observe("ahead", 10, mtime=5000.0, now=1000.0)  # file server clock ahead
    assert settler.next_deadline() == 1000.0 + SETTLE
    settler.observe("ahead", 10, mtime=5000.0, now=1001.0)  # unchanged: no restart
    assert settler.due(1001.9) == []
    assert settler.due(1002.0) == [("ahead", 10, 5000.0)]


def test_a_changed_future_mtime_counts_from_the_change(settler: Settler[str]) -> None:
    settler.observe("ahead", 10, mtime=5000.0, now=1000.0)
    settler.observe("ahead", 20, mtime=5001.0, now=1001.5)
    assert settler.due(1002.0) == []
    assert settler.due(1003.5) == [("ahead", 20, 5001.0)]


def test_closed_makes_a_file_due_immediately(settler: Settler[str]) -> None:
    settler.observe("a", 10, mtime=1000.0, now=1000.0)
    settler.closed("a", 30, mtime=1000.2, now=1000.2)
    assert settler.next_deadline() == 1000.2
    assert settler.due(1000.2) == [("a", 30, 1000.2)]


def test_closed_for_a_file_never_observed(settler: Settler[str]) -> None:
    settler.closed("new", 5, mtime=7.0, now=7.0)
    assert "new" in settler
    assert settler.due(7.0) == [("new", 5, 7.0)]


def test_an_unchanged_observation_after_closed_keeps_it_due(settler: Settler[str]) -> None:
    settler.closed("a", 5, mtime=7.0, now=7.0)
    settler.observe("a", 5, mtime=7.0, now=7.1)
    assert settler.due(7.1) == [("a", 5, 7.0)]


def test_a_write_after_closed_restarts_the_wait(settler: Settler[str]) -> None:
    settler.closed("a", 5, mtime=7.0, now=7.0)
    settler.observe("a", 9, mtime=7.5, now=7.5)  # reopened and appended before we read it
    assert settler.due(7.5) == []
    assert settler.due(9.5) == [("a", 9, 7.5)]


def test_forget(settler: Settler[str]) -> None:
    settler.observe("a", 1, mtime=10.0, now=10.0)
    settler.observe("b", 1, mtime=11.0, now=11.0)
    settler.forget("a")
    settler.forget("never-seen")  # no error
    assert "a" not in settler and len(settler) == 1
    assert settler.next_deadline() == 13.0  # a's deadline (12) is gone
    assert settler.due(100.0) == [("b", 1, 11.0)]


def test_forget_then_observe_again_reports_once(settler: Settler[str]) -> None:
    settler.observe("a", 1, mtime=10.0, now=10.0)
    settler.forget("a")
    settler.observe("a", 1, mtime=10.0, now=10.5)  # same deadline as the forgotten entry
    assert settler.due(100.0) == [("a", 1, 10.0)]
    assert settler.due(200.0) == []
    assert len(settler) == 0


def test_next_deadline_follows_the_earliest_live_file(settler: Settler[str]) -> None:
    assert settler.next_deadline() is None
    settler.observe("late", 1, mtime=20.0, now=20.0)
    settler.observe("early", 1, mtime=10.0, now=20.0)
    assert settler.next_deadline() == 12.0
    settler.observe("early", 2, mtime=21.0, now=21.0)  # changed: now the later one
    assert settler.next_deadline() == 22.0
    settler.closed("late", 1, mtime=20.0, now=21.5)
    assert settler.next_deadline() == 21.5
    assert settler.due(21.5) == [("late", 1, 20.0)]
    assert settler.next_deadline() == 23.0
    assert settler.due(23.0) == [("early", 2, 21.0)]
    assert settler.next_deadline() is None


def test_many_files_come_out_in_deadline_order() -> None:
    settler: Settler[int] = Settler(1.0)
    mtimes = [(i * 7919) % 1000 / 10.0 for i in range(1000)]  # a fixed shuffle of 0..99.9
    for key, mtime in enumerate(mtimes):
        settler.observe(key, key, mtime=mtime, now=100.0)
    assert len(settler) == 1000
    first = settler.due(50.0)
    assert [k for k, _, _ in first] == sorted(
        (k for k, m in enumerate(mtimes) if m + 1.0 <= 50.0), key=lambda k: mtimes[k])
    rest = settler.due(101.0)
    assert len(first) + len(rest) == 1000
    deadlines = [m for _, _, m in first + rest]
    assert deadlines == sorted(deadlines)
    assert all(size == key for key, size, _ in first + rest)
    assert len(settler) == 0


def test_ties_come_out_in_arrival_order_and_keys_need_not_be_comparable() -> None:
    class Key:  # hashable, not orderable
        def __init__(self, name: str) -> None:
            self.name = name

    settler: Settler[Key] = Settler(1.0)
    keys = [Key(str(i)) for i in range(20)]
    for key in keys:
        settler.observe(key, 0, mtime=5.0, now=5.0)
    assert [k for k, _, _ in settler.due(6.0)] == keys


def test_repeated_changes_leave_one_entry_per_file(settler: Settler[str]) -> None:
    for step in range(100):
        settler.observe("growing", step, mtime=float(step), now=float(step))
    assert len(settler) == 1
    assert settler.due(98.0 + SETTLE) == []
    assert settler.due(99.0 + SETTLE) == [("growing", 99, 99.0)]
    assert settler.next_deadline() is None


def test_zero_settle_is_due_immediately() -> None:
    settler: Settler[str] = Settler(0.0)
    settler.observe("a", 1, mtime=10.0, now=10.0)
    assert settler.due(10.0) == [("a", 1, 10.0)]



def test_results_streaming_in_are_committed_together() -> None:
    from watcher.service import GROUP_COMMIT, group_delay

    # After a commit at t=10, results wait until GROUP_COMMIT has passed...
    assert group_delay(10.0, 10.001, 1, 200) == pytest.approx(GROUP_COMMIT - 0.001)
    # ...unless a batch is full, or the last commit is long past.
    assert group_delay(10.0, 10.001, 200, 200) == 0.0
    assert group_delay(10.0, 11.0, 1, 200) == 0.0
