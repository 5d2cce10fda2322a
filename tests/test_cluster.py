"""Two hubs on one PostgreSQL database, as a hospital group runs them: every change
reaches every live client in the log's order, a hub killed mid-ingest loses
nothing, and its watcher and the series timers move to the survivor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import TIMEOUT, Api, wait_for
from procs import Service, all_changes, run_cli, write_config

pytestmark = pytest.mark.asyncio

STABLE_AFTER = 1.0


class LiveClient:
    """A dashboard's view of /ws/live: the change seqs it received, in order. When
    its hub goes away it resumes on another with ?since=, as the dashboard does."""

    def __init__(self, http: aiohttp.ClientSession, key: str) -> None:
        self.http, self.key = http, key
        self.seqs: list[int] = []
        self.task: asyncio.Task[None] | None = None

    def follow(self, url: str) -> None:
        since = self.seqs[-1] if self.seqs else 0
        self.task = asyncio.create_task(self._read(f"{url}/ws/live?since={since}"))

    async def _read(self, url: str) -> None:
        async with self.http.ws_connect(url, headers={"Authorization": f"Bearer {self.key}"},
                                        heartbeat=None) as ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if "seq" in data and data.get("kind") != "stats":
                    self.seqs.append(int(data["seq"]))

    async def lost(self) -> None:
        """Wait until the connection has ended (its hub died)."""
        assert self.task is not None
        await asyncio.wait_for(self.task, TIMEOUT)


def drop(inbox: Path, name: str, study: str, series: int, count: int) -> None:
    """`count` instances of one series, each written aside and renamed in whole."""
    staging = inbox.parent / f"staging-{inbox.name}"
    staging.mkdir(exist_ok=True)
    for n in range(count):
        path = staging / f"{name}-{n}.dcm"
        factory.write(path, StudyInstanceUID=study, SeriesInstanceUID=f"{study}.{series}",
                      InstanceNumber=n + 1, PatientID=f"P{series}")
        os.rename(path, inbox / path.name)


async def test_two_hubs_share_the_log_and_survive_a_kill(
        tmp_path: Path, services: list[Service], pg_database: str) -> None:
    write_config(tmp_path, hub=f'database = "{pg_database}"')
    ingest = run_cli("keys", "create", "--role", "ingest", "--name", "w", cwd=tmp_path)
    read = run_cli("keys", "create", "--role", "read", "--name", "r", cwd=tmp_path)
    ingest_key, read_key = ingest.stdout.strip(), read.stdout.strip()

    async def start_hub(name: str) -> tuple[Service, str]:
        hub = await Service.start("hub", cwd=tmp_path, name=name)
        services.append(hub)
        return hub, (await hub.read_until(r"listening on (http://\S+)")).group(1)

    hub_a, url_a = await start_hub("hubA")
    await hub_a.logged(r"now runs the series stability timers")  # A leads
    hub_b, url_b = await start_hub("hubB")

    async def start_watcher(name: str, urls: list[str]) -> Path:
        inbox = tmp_path / f"inbox-{name}"
        inbox.mkdir()
        hubs = ", ".join(f'"{u.replace("http", "ws", 1)}/ws/ingest"' for u in urls)
        (tmp_path / f"{name}.toml").write_text(textwrap.dedent(f"""\
            [watcher]
            hub_url = [{hubs}]
            watch = ["{inbox}"]
            state_dir = "{tmp_path / f'state-{name}'}"
            settle = 0.2
            workers = 1
            reconnect_max = 1.0
            """))
        watcher = await Service.start("watch", "--config", f"{name}.toml", cwd=tmp_path,
                                      env={"DICOMHUB_KEY": ingest_key}, name=name)
        services.append(watcher)
        await watcher.logged(r"connected to")
        return inbox

    inbox1 = await start_watcher("w1", [url_a, url_b])  # sends to A, fails over to B
    inbox2 = await start_watcher("w2", [url_b, url_a])  # sends to B throughout

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
