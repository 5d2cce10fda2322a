"""The `dicomhub` command as a user runs it: real processes, signals, files and sockets."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import Api, wait_for
from procs import KEY_RE, Service, run_cli, write_config


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
