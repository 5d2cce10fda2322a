"""Failed-authentication limits: the pure limiter with a fake clock, then the hub."""

from __future__ import annotations

import aiohttp
import pytest

from conftest import RunningHub
from hub.ratelimit import FailureLimiter


def test_an_address_is_refused_after_limit_failures_until_the_window_moves() -> None:
    limiter = FailureLimiter(limit=3, window=60.0)
    for t in (0.0, 10.0, 20.0):
        assert limiter.retry_after("10.0.0.1", t) == 0.0
        limiter.failure("10.0.0.1", t)
    assert limiter.retry_after("10.0.0.1", 30.0) == 30.0  # the first failure ages out at 60
    assert limiter.retry_after("10.0.0.2", 30.0) == 0.0  # other addresses are not affected
    assert limiter.retry_after("10.0.0.1", 60.0) == 0.0
    limiter.failure("10.0.0.1", 61.0)
    assert limiter.retry_after("10.0.0.1", 61.0) == 9.0  # 10, 20, 61: wait for 10 to go


def test_memory_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import hub.ratelimit

    monkeypatch.setattr(hub.ratelimit, "MAX_ADDRESSES", 5)
    limiter = FailureLimiter(limit=2, window=60.0)
    for n in range(20):
        limiter.failure(f"10.0.0.{n}", float(n))
    assert len(limiter._failures) == 5
    assert limiter.retry_after("10.0.0.19", 20.0) == 0.0  # one failure: still allowed


@pytest.mark.asyncio
async def test_hub_answers_429_after_repeated_bad_keys(hub: RunningHub,
                                                       http: aiohttp.ClientSession) -> None:
    good = await hub.key("read")
    bad = {"Authorization": "Bearer dhk_" + "z" * 43}
    statuses = []
    for _ in range(21):
        async with http.get(hub.url + "/api/series", headers=bad) as resp:
            statuses.append(resp.status)
    assert statuses[:20] == [401] * 20 and statuses[20] == 429
    async with http.get(hub.url + "/api/series",
                        headers={"Authorization": f"Bearer {good}"}) as resp:
        assert resp.status == 429  # the address is held back, whatever key it tries now
        assert int(resp.headers["Retry-After"]) > 0
        assert "too many failed" in (await resp.json())["message"]
    async with http.post(hub.url + "/api/session", json={"key": good}) as resp:
        assert resp.status == 429
    async with http.get(hub.url + "/api/health") as resp:
        assert resp.status == 200  # health stays open


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    from dicomhub.bucket import TokenBucket

    bucket = TokenBucket(rate=10.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False  # half a token back
    assert bucket.take(0.1) is True  # one token after 0.1 s at 10/s
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_token_bucket_says_how_long_until_the_next_token() -> None:
    from dicomhub.bucket import TokenBucket

    bucket = TokenBucket(rate=10.0, burst=2.0, now=0.0)
    assert bucket.delay(0.0) == 0.0
    bucket.take(0.0)
    bucket.take(0.0)
    assert bucket.delay(0.0) == pytest.approx(0.1)
    assert bucket.delay(0.04) == pytest.approx(0.06)
    assert bucket.delay(0.1) == 0.0 and bucket.take(0.1)
