"""Two hubs on one PostgreSQL database, as a hospital group runs them: every change
reaches every live client in the log's order, a hub killed mid-ingest loses
nothing, and its watcher and the series timers move to the survivor."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

from conftest import Api, wait_for
from procs import (
    LiveClient,
    Service,
    all_changes,
    config_with_keys,
    drop,
    start_hub,
    start_watcher,
)

pytestmark = pytest.mark.asyncio

STABLE_AFTER = 1.0


async def test_two_hubs_share_the_log_and_survive_a_kill(
        tmp_path: Path, services: list[Service], pg_database: str) -> None:
    ingest_key, read_key = config_with_keys(tmp_path, f'database = "{pg_database}"')
    hub_a, url_a = await start_hub(tmp_path, services, "hubA")
    await hub_a.logged(r"now runs the series stability timers")  # A leads
    hub_b, url_b = await start_hub(tmp_path, services, "hubB")
    # w1 sends to A and fails over to B; w2 sends to B throughout.
    inbox1 = await start_watcher(tmp_path, services, "w1", [url_a, url_b], ingest_key)
    inbox2 = await start_watcher(tmp_path, services, "w2", [url_b, url_a], ingest_key)

    async with aiohttp.ClientSession() as http:
        client_a, client_b = LiveClient(http, read_key), LiveClient(http, read_key)
        client_a.follow(url_a)
        client_b.follow(url_b)
        api_b = Api(http, url_b, read_key)

        # First wave: 3 series through each hub; A is killed once it has stored some.
        for s in range(3):
            drop(inbox1, f"a{s}", "1.2.826.0.1.3680043.8.1055.50", s, 100)
            drop(inbox2, f"b{s}", "1.2.826.0.1.3680043.8.1055.51", s, 100)

        async def some_stored() -> bool:
            return (await api_b.get("/api/stats"))["instances"] >= 200

        await wait_for(some_stored, "some instances stored through both hubs")
        assert await hub_a.stop(signal.SIGKILL) == -signal.SIGKILL
        await client_a.lost()
        client_a.follow(url_b)  # the load balancer now sends the dashboard to B

        # Second wave, after the kill: new series through both watchers.
        for s in range(3, 5):
            drop(inbox1, f"a{s}", "1.2.826.0.1.3680043.8.1055.50", s, 50)
            drop(inbox2, f"b{s}", "1.2.826.0.1.3680043.8.1055.51", s, 50)
        total, series = 2 * (300 + 100), 10

        async def all_stable() -> bool:
            stats = await api_b.get("/api/stats")
            stable = await api_b.get("/api/series", status="stable", limit=100)
            return stats["instances"] == total and len(stable["items"]) == series

        await wait_for(all_stable, "every instance indexed and every series stable")
        stats = await api_b.get("/api/stats")
        assert (stats["instances"], stats["files"], stats["rejections"]) == (total, total, 0)
        # Both watchers show connected: A's death, swept by B, is not theirs.
        watchers = (await api_b.get("/api/watchers"))["items"]
        assert [w["connected"] for w in watchers] == [True, True]

        log = await all_changes(api_b)
        seqs = [c["seq"] for c in log]
        assert seqs == sorted(set(seqs))

        async def both_caught_up() -> bool:
            return all(c.seqs and c.seqs[-1] >= seqs[-1] for c in (client_a, client_b))

        await wait_for(both_caught_up, "both live clients to reach the end of the log")
        # Every change, once, in the log's order, whichever hub committed it and
        # whichever hub the client was connected to.
        assert client_b.seqs == seqs
        assert client_a.seqs == seqs

    # The timers moved to B; no series became stable twice without a new instance.
    await hub_b.logged(r"now runs the series stability timers")
    events: dict[str, list[str]] = defaultdict(list)
    for change in log:
        if change["kind"].startswith("series."):
            events[change["series_instance_uid"]].append(change["kind"])
    assert len(events) == series
    for kinds in events.values():
        assert kinds[-1] == "series.stable", kinds
        for previous, current in zip(kinds, kinds[1:], strict=False):
            assert (previous, current) != ("series.stable", "series.stable"), kinds
    w1_log = (tmp_path / "w1.log").read_text()
    assert "failing over from" in w1_log
