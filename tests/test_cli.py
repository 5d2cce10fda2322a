"""The `dicomhub` command as a user runs it: real processes, signals, files and sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import TIMEOUT, Api, wait_for

KEY_RE = re.compile(r"dhk_[A-Za-z0-9_-]{43}")
CLI = [sys.executable, "-m", "dicomhub"]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
    environ.update(env or {})
    return subprocess.run([*CLI, *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=TIMEOUT, input=stdin)


def write_config(folder: Path, hub: str = "", watcher: str = "") -> Path:
    path = folder / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [hub]
        port = 0
        stable_after = 1.0
        {hub}
        [watcher]
        settle = 0.3
        workers = 1
        {watcher}
        """))
    return path


class Service:
    """A dicomhub process whose stdout we read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc, self.log, self.lines = proc, log, []

    @classmethod
    async def start(cls, *args: str, cwd: Path, env: dict[str, str] | None = None,
                    name: str = "service") -> Service:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
        environ.update(env or {})
        log = cwd / f"{name}.log"
        with log.open("ab") as stderr:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                *CLI, *args, cwd=cwd, env=environ, stdout=asyncio.subprocess.PIPE,
                stderr=stderr)
        return cls(proc, log)

    async def read_until(self, pattern: str) -> re.Match[str]:
        assert self.proc.stdout is not None
        while True:
            for line in self.lines:
                if match := re.search(pattern, line):
                    return match
            raw = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
            if not raw:
                raise AssertionError(f"process ended before printing {pattern!r}; "
                                     f"log:\n{self.log.read_text()[-3000:]}")
            self.lines.append(raw.decode())

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT)


@pytest.fixture
async def services() -> AsyncIterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        if service.proc.returncode is None:
            service.proc.kill()
            await asyncio.wait_for(service.proc.wait(), TIMEOUT)


async def hub_with_keys(tmp_path: Path, services: list[Service],
                        name: str) -> tuple[Service, str, str, str]:
    """A hub process on a fresh config: (service, base URL, ingest key, read key)."""
    write_config(tmp_path)
    ingest = run_cli("keys", "create", "--role", "ingest", "--name", "w", cwd=tmp_path)
    read = run_cli("keys", "create", "--role", "read", "--name", "r", cwd=tmp_path)
    hub = await Service.start("hub", cwd=tmp_path, name=name)
    services.append(hub)
    url = (await hub.read_until(r"listening on (http://\S+)")).group(1)
    return hub, url, ingest.stdout.strip(), read.stdout.strip()


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    write_config(tmp_path)
    created = run_cli("keys", "create", "--role", "read", "--name", "alice", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert len(lines) == 1 and KEY_RE.fullmatch(lines[0])
    listed = run_cli("keys", "list", cwd=tmp_path)
    assert "alice" in listed.stdout and "read" in listed.stdout
    assert lines[0] not in listed.stdout and lines[0] not in listed.stderr
    again = run_cli("keys", "create", "--role", "admin", "--name", "alice", cwd=tmp_path)
    assert again.returncode == 2 and "alice" in again.stderr and again.stdout == ""
    assert run_cli("keys", "revoke", "alice", cwd=tmp_path).returncode == 0
    assert run_cli("keys", "revoke", "alice", cwd=tmp_path).returncode == 1
    bad_role = run_cli("keys", "create", "--role", "wizard", "--name", "x", cwd=tmp_path)
    assert bad_role.returncode == 2 and "wizard" in bad_role.stderr
    bad_name = run_cli("keys", "create", "--role", "read", "--name", "no spaces",
                       cwd=tmp_path)
    assert bad_name.returncode == 2 and "no spaces" in bad_name.stderr


def test_config_errors_name_the_key_and_value(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[hub]\nport = "abc"\n')
    result = run_cli("hub", cwd=tmp_path)
    assert result.returncode == 2
    assert "Config 'hub.port' has value 'abc'" in result.stderr
    other = tmp_path / "other.toml"
    other.write_text('[watcher]\nsettle = -1\n')
    result = run_cli("watch", "--config", str(other), cwd=tmp_path)
    assert result.returncode == 2 and "watcher.settle" in result.stderr
    result = run_cli("hub", cwd=tmp_path, env={"DICOMHUB_CONFIG": str(tmp_path / "nope.toml")})
    assert result.returncode == 2 and "nope.toml" in result.stderr


def test_watch_refuses_a_missing_or_malformed_key_before_starting(tmp_path: Path) -> None:
    write_config(tmp_path, watcher='key_file = "secret/ingest.key"')
    missing = run_cli("watch", cwd=tmp_path)
    assert missing.returncode == 2
    assert "$DICOMHUB_KEY" in missing.stderr and "secret/ingest.key" in missing.stderr
    assert not (tmp_path / "inbox").exists()  # nothing started
    malformed = run_cli("watch", cwd=tmp_path, env={"DICOMHUB_KEY": "abc"})
    assert malformed.returncode == 2
    assert "$DICOMHUB_KEY has value 'abc'" in malformed.stderr
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "ingest.key").write_text("dhk_short\n")
    from_file = run_cli("watch", cwd=tmp_path)
    assert from_file.returncode == 2 and "ingest.key" in from_file.stderr


@pytest.mark.asyncio
async def test_up_prints_the_read_key_once_and_indexes_the_inbox(
        tmp_path: Path, services: list[Service]) -> None:
    write_config(tmp_path)
    up = await Service.start("up", cwd=tmp_path, name="up1")
    services.append(up)
    link = (await up.read_until(r"dashboard\s+(http://\S+/login\?token=\S+)")).group(1)
    url = (await up.read_until(r"REST API\s+(http://\S+)/api/series")).group(1)
    key = (await up.read_until(KEY_RE.pattern)).group(0)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:  # one click, logged in
        async with browser.get(link) as resp:
            assert resp.status == 200 and str(resp.url) == url + "/"
        async with browser.get(url + "/api/session") as resp:
            assert resp.status == 200 and (await resp.json())["role"] == "read"
    assert (tmp_path / "data" / "hub.sqlite3").exists()
    key_file = tmp_path / "data" / "watcher" / "ingest.key"
    assert key_file.stat().st_mode & 0o077 == 0  # the ingest key is private
    ds = factory.write(tmp_path / "inbox" / "a.dcm")
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, key)

        async def indexed() -> bool:
            return (await api.get("/api/stats"))["instances"] == 1

        await wait_for(indexed, "the dropped file to be indexed")
        assert await up.stop() == 0

        again = await Service.start("up", cwd=tmp_path, name="up2")
        services.append(again)
        url = (await again.read_until(r"REST API\s+(http://\S+)/api/series")).group(1)
        await again.read_until(r"watching")
        await again.read_until(r"keys create|dhk_")
        assert not any(KEY_RE.search(line) for line in again.lines)
        api = Api(http, url, key)  # the first read key still works
        series = await api.get(f"/api/series/{ds.SeriesInstanceUID}")
        assert series["instance_count"] == 1
        assert await again.stop(signal.SIGINT) == 0


@pytest.mark.asyncio
async def test_hub_killed_mid_ingest_loses_and_doubles_nothing(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, key, read_key = await hub_with_keys(tmp_path, services, "hub1")
    port = url.rsplit(":", 1)[1]
    total, series_count = 2000, 8
    for n in range(total):
        factory.write(tmp_path / "inbox" / f"{n % series_count}" / f"{n}.dcm",
                      SeriesInstanceUID=f"1.2.5.{n % series_count}", StudyInstanceUID="1.2.5",
                      InstanceNumber=n)
    (tmp_path / "watcher.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = "ws://127.0.0.1:{port}/ws/ingest"
        settle = 0.3
        batch_size = 50
        """))
    watcher = await Service.start("watch", "--config", "watcher.toml", cwd=tmp_path,
                                  env={"DICOMHUB_KEY": key.strip()}, name="watcher")
    services.append(watcher)
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key.strip())

        async def started() -> bool:
            return (await api.get("/api/stats"))["instances"] >= 200

        await wait_for(started, "ingest to be under way")
        assert await hub.stop(signal.SIGKILL) == -signal.SIGKILL
        (tmp_path / "restart.toml").write_text(
            (tmp_path / "config.toml").read_text().replace("port = 0", f"port = {port}"))
        hub = await Service.start("hub", "--config", "restart.toml", cwd=tmp_path, name="hub2")
        services.append(hub)
        await hub.read_until(r"listening on")

        async def done() -> bool:
            stats = await api.get("/api/stats")
            return stats["instances"] >= total and stats["series_receiving"] == 0

        await wait_for(done, "every instance indexed and every series stable")
        stats = await api.get("/api/stats")
        assert (stats["instances"], stats["files"], stats["series"]) == (total, total,
                                                                         series_count)
        counts = [s["instance_count"] for s in await api.all("/api/series")]
        assert counts == [total // series_count] * series_count
        changes, since = [], 0
        while True:
            page = await api.get("/api/changes", since=since, limit=1000)
            changes += page["changes"]
            since = page["last"]
            if page["done"]:
                break
        assert [c["seq"] for c in changes] == sorted({c["seq"] for c in changes})
        # Each series ends stable (a restart may legitimately reopen one that went
        # stable while the watcher's backlog was still arriving).
        last_kind = {c["series_instance_uid"]: c["kind"] for c in changes
                     if c["kind"].startswith("series.")}
        assert list(last_kind.values()) == ["series.stable"] * series_count
    assert await watcher.stop() == 0
    assert await hub.stop() == 0


@pytest.mark.asyncio
async def test_a_busy_port_is_a_clear_error(tmp_path: Path, services: list[Service]) -> None:
    write_config(tmp_path)
    first = await Service.start("hub", cwd=tmp_path, name="first")
    services.append(first)
    port = (await first.read_until(r"listening on http://127.0.0.1:(\d+)")).group(1)
    (tmp_path / "second.toml").write_text(f"[hub]\nport = {port}\n")
    second = run_cli("hub", "--config", "second.toml", cwd=tmp_path)
    assert second.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.asyncio
async def test_watcher_killed_mid_ingest_resumes_without_reparsing(
        tmp_path: Path, services: list[Service]) -> None:
    import sqlite3

    _, url, key, read_key = await hub_with_keys(tmp_path, services, "hub")
    total = 1500
    for n in range(total):
        factory.write(tmp_path / "inbox" / f"{n % 5}" / f"{n}.dcm",
                      SeriesInstanceUID=f"1.2.6.{n % 5}", StudyInstanceUID="1.2.6")
    (tmp_path / "watcher.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = "{url.replace('http', 'ws', 1)}/ws/ingest"
        settle = 0.3
        workers = 1
        batch_size = 50
        """))
    env = {"DICOMHUB_KEY": key.strip()}
    first = await Service.start("watch", "--config", "watcher.toml", cwd=tmp_path, env=env,
                                name="watcher1")
    services.append(first)
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key.strip())

        async def started() -> bool:
            return (await api.get("/api/stats"))["instances"] >= 100

        await wait_for(started, "ingest to be under way")
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        state = sqlite3.connect(tmp_path / "data" / "watcher" / "state.sqlite3")
        try:
            remembered = state.execute("SELECT count(*) FROM delivered").fetchone()[0]
        finally:
            state.close()
        assert 0 < remembered < total  # killed in the middle, as intended

        second = await Service.start("watch", "--config", "watcher.toml", cwd=tmp_path,
                                     env=env, name="watcher2")
        services.append(second)

        async def done() -> bool:
            return (await api.get("/api/stats"))["instances"] >= total

        await wait_for(done, "every instance indexed after the restart")
        await wait_for(lambda: _outbox_empty(api), "the outbox to drain")
        stats = await api.get("/api/stats")
        assert (stats["instances"], stats["files"], stats["series"]) == (total, total, 5)
        assert await second.stop() == 0
    log = (tmp_path / "watcher2.log").read_text()
    parsed = int(re.search(r"parsed (\d+) files this run", log).group(1))
    assert parsed == total - remembered  # what the first run recorded was not read again


async def _outbox_empty(api: Api) -> bool:
    watchers = (await api.get("/api/watchers"))["items"]
    return bool(watchers) and watchers[0]["backlog"] == 0
