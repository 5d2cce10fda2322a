"""Shared fixtures: real hubs on ephemeral ports, real watchers on temp folders.

Waits are on conditions with one deadline constant (TIMEOUT, scaled by
$DICOMHUB_TEST_TIMEOUT for slow machines), never on guessed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the test helpers (factory, strategies)

from dicomhub.bench import pgcluster  # noqa: E402
from dicomhub import keys  # noqa: E402
from dicomhub.config import HubConfig, WatcherConfig  # noqa: E402
from hub.app import start  # noqa: E402
from hub.auth import STORE_KEY  # noqa: E402
from hub.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0 * float(os.environ.get("DICOMHUB_TEST_TIMEOUT_SCALE", "1"))


def samples_folder() -> Path | None:
    folder = Path(os.environ.get("DICOMHUB_SAMPLES", REPO.parent / "shared" / "dicom-samples"))
    return folder if (folder / "MANIFEST.tsv").is_file() else None


@pytest.fixture
def samples() -> Path:
    folder = samples_folder()
    if folder is None:
        pytest.skip("sample DICOM folder not found: set DICOMHUB_SAMPLES to a folder "
                    "holding MANIFEST.tsv and files/")
    return folder


def manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "MANIFEST.tsv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


async def wait_for(predicate: Callable[[], Awaitable[Any]], what: str,
                   timeout: float = TIMEOUT, interval: float = 0.05) -> Any:
    """Poll an async predicate until it returns something truthy, or fail saying what."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class RunningHub:
    url: str
    store: Store
    runner: Any
    config: HubConfig

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws/ingest"

    async def key(self, role: str, name: str | None = None) -> str:
        key = keys.generate()
        await self.store.create_key(name or f"{role}-{key[-6:]}", role, keys.digest(key),
                                    time.time())
        return key

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_hub(tmp_path: Path, **overrides: Any) -> RunningHub:
    config = HubConfig(host="127.0.0.1", port=0, database=tmp_path / "hub.sqlite3",
                       stable_after=30.0)
    config = replace(config, **overrides)
    runner, url = await start(config)
    return RunningHub(url, runner.app[STORE_KEY], runner, config)


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[RunningHub]:
    running = await start_hub(tmp_path)
    yield running
    await running.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[pgcluster.Cluster]:
    """One throwaway PostgreSQL cluster for the session; skips if none is installed."""
    cluster = pgcluster.start(TIMEOUT)
    if cluster is None:
        pytest.skip(pgcluster.SKIP_REASON)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_database(postgres: pgcluster.Cluster) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = postgres.create_database()
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Api:
    """A small REST client bound to one hub and one key."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str) -> None:
        self.session, self.base, self.key = session, base, key

    async def get(self, path: str, **params: Any) -> Any:
        async with self.session.get(self.base + path, params=params or None,
                                    headers={"Authorization": f"Bearer {self.key}"}) as resp:
            body = await resp.json()
            assert resp.status == 200, (resp.status, body)
            return body

    async def all(self, path: str, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = await self.get(path, limit=1000, **params,
                                  **({"cursor": cursor} if cursor else {}))
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items


@pytest.fixture
async def api(hub: RunningHub, http: aiohttp.ClientSession) -> Api:
    return Api(http, hub.url, await hub.key("read"))


@dataclass
class RunningWatcher:
    inbox: Path
    watcher: Any
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def run_watcher(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningWatcher]]]:
    from watcher.service import Watcher

    running: list[RunningWatcher] = []

    async def run(hub: RunningHub, name: str = "w1", **overrides: Any) -> RunningWatcher:
        inbox = tmp_path / f"inbox-{name}"
        config = WatcherConfig(hub_url=hub.ws_url, watch=(inbox,),
                               state_dir=tmp_path / f"state-{name}", settle=0.5,
                               key_file=None, watcher_id=name, workers=1)
        config = replace(config, **overrides)
        watcher = Watcher(config, await hub.key("ingest"))
        task = asyncio.create_task(watcher.run())
        await wait_for(_ready(watcher, task), "the watcher to connect and finish its scan")
        result = RunningWatcher(config.watch[0], watcher, task)
        running.append(result)
        return result

    yield run
    for item in running:
        await item.stop()


def _ready(watcher: Any, task: asyncio.Task[None]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        if task.done():
            task.result()  # raise what killed it
        return watcher.scanned.is_set() and watcher.link is not None \
            and watcher.link.connected.is_set()

    return check


@pytest.fixture
async def services() -> AsyncIterator[list[Any]]:
    started: list[Any] = []
    yield started
    for service in started:
        if service.proc.returncode is None:
            service.proc.kill()
            await asyncio.wait_for(service.proc.wait(), TIMEOUT)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (watchdog observers, store threads)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
                  and not t.name.startswith(("asyncio_", "QueueFeederThread"))]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
