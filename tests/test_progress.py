"""The pure part of progress: rate, time left, the line, and when to show or log it,
all on a fake clock (plain numbers passed as `now`)."""

from __future__ import annotations

import pytest

from dicomhub.errors import ConfigError
from dicomhub.progress import (
    Burst,
    Counts,
    LogSchedule,
    Meter,
    Reading,
    clock,
    describe,
    log_interval,
)


def test_rate_is_deliveries_over_the_window_and_eta_is_pending_over_rate() -> None:
    meter = Meter(window=10.0)
    first = meter.read(Counts(scanned=1000, pending=1000), now=100.0)
    assert first.rate is None and first.eta is None  # one sample: no rate yet
    second = meter.read(Counts(scanned=1000, delivered=200, pending=800), now=102.0)
    assert second.rate == pytest.approx(100.0) and second.eta == pytest.approx(8.0)
    # Samples older than the window stop counting: the rate follows the recent pace.
    meter.read(Counts(scanned=1000, delivered=400, pending=600), now=106.0)
    meter.read(Counts(scanned=1000, delivered=500, pending=500), now=112.0)
    late = meter.read(Counts(scanned=1000, delivered=520, pending=480), now=117.0)
    assert late.rate == pytest.approx((520 - 400) / (117.0 - 106.0))
    assert late.eta == pytest.approx(480 / late.rate)


def test_no_deliveries_means_no_eta_and_nothing_pending_means_done() -> None:
    meter = Meter()
    meter.read(Counts(parsed=50, pending=50), now=0.0)
    stalled = meter.read(Counts(parsed=50, pending=50), now=5.0)  # hub down
    assert stalled.rate == 0.0 and stalled.eta is None
    done = meter.read(Counts(parsed=50, delivered=50), now=6.0)
    assert done.eta == 0.0


def test_the_line_holds_the_counts_the_rate_and_the_eta() -> None:
    counts = Counts(scanned=12_345, unchanged=45, parsed=10_000, delivered=9_000,
                    rejected=3, pending=3_300)
    assert describe(Reading(counts, rate=412.4, eta=8.01)) == (
        "scanned 12,345 (45 delivered before), parsed 10,000, delivered 9,000, "
        "rejected 3, pending 3,300; 412 files/s, ETA 0:09")
    assert describe(Reading(Counts(scanned=2, pending=2), rate=None, eta=None)) == (
        "scanned 2, parsed 0, delivered 0, rejected 0, pending 2; - files/s, ETA -")


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0:00"), (0.2, "0:01"), (59.0, "0:59"), (61.5, "1:02"), (3600.0, "1:00:00"),
    (3725.0, "1:02:05"), (100 * 3600.0, "100:00:00"),
])
def test_clock(seconds: float, text: str) -> None:
    assert clock(seconds) == text


def test_a_terminal_shows_a_stretch_of_work_once_it_lasts_and_until_it_ends() -> None:
    burst = Burst(show_after=1.0)
    assert not burst.update(Counts(), now=0.0)  # idle
    assert not burst.update(Counts(delivered=100, pending=1), now=10.0)  # one file: quiet
    assert not burst.update(Counts(delivered=100, pending=400), now=10.5)
    assert burst.update(Counts(delivered=200, pending=300), now=11.0)
    # The bar counts this stretch only: 100 delivered of the 400 it has seen.
    assert burst.share_done(Counts(delivered=200, pending=300)) == pytest.approx(0.25)
    assert burst.update(Counts(delivered=450, pending=50), now=11.5)
    assert burst.share_done(Counts(delivered=500)) == 1.0
    assert not burst.update(Counts(delivered=500), now=12.0)  # done: hidden
    assert not burst.update(Counts(delivered=500, pending=5), now=20.0)  # a new stretch waits
    assert burst.update(Counts(delivered=503, pending=2), now=21.0)


def test_a_log_gets_a_line_every_interval_while_there_is_work_and_none_when_idle() -> None:
    schedule = LogSchedule(interval=10.0, now=0.0)
    assert not schedule.due(Counts(scanned=5, pending=5), now=9.9)  # too soon
    assert schedule.due(Counts(scanned=5, parsed=2, pending=5), now=10.0)
    assert not schedule.due(Counts(scanned=5, parsed=5, pending=3), now=15.0)
    assert schedule.due(Counts(scanned=5, parsed=5, delivered=2, pending=3), now=20.0)
    # Work pending but nothing moved (hub down): still a line each interval.
    assert schedule.due(Counts(scanned=5, parsed=5, delivered=2, pending=3), now=30.0)
    # The work ended between lines: one line closes it, then silence.
    assert schedule.due(Counts(scanned=5, parsed=5, delivered=5), now=40.0)
    assert not schedule.due(Counts(scanned=5, parsed=5, delivered=5), now=50.0)
    # A reconciliation walk that finds nothing new is not work.
    assert not schedule.due(Counts(scanned=105, unchanged=100, parsed=5, delivered=5),
                            now=60.0)


def test_the_log_interval_comes_from_the_environment_or_defaults_to_ten_seconds() -> None:
    assert log_interval({}) == 10.0
    assert log_interval({"DICOMHUB_PROGRESS_INTERVAL": "0.25"}) == 0.25
    for bad in ("abc", "0", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=f"DICOMHUB_PROGRESS_INTERVAL has value '{bad}'"):
            log_interval({"DICOMHUB_PROGRESS_INTERVAL": bad})
