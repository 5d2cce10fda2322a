"""The `dicomhub` command as a user runs it: real processes, signals, files and sockets."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import TIMEOUT, Api, wait_for
from dicomhub import keys
from procs import (
    KEY_RE,
    Service,
    config_with_keys,
    hub_with_keys,
    outbox_size,
    restart_hub,
    run_cli,
    write_config,
)

TEXT_EVENT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ +[\w.]+: ")


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a command that failed as a user's error should."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def events_only(log: Path) -> list[str]:
    """A text log's lines, checked to be one event each: no traceback, no stray output."""
    lines = log.read_text().splitlines()
    stray = [line for line in lines if not TEXT_EVENT.match(line)]
    assert not stray, stray
    return lines


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
    line = one_error_line(second)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "[hub] port" in line
    both = run_cli("up", "--config", "second.toml", cwd=tmp_path)
    assert f"cannot listen on 127.0.0.1:{port}" in one_error_line(both)


# user errors: one line, exit 2 -----------------------------------------------------------


def test_every_user_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    key = {"DICOMHUB_KEY": keys.generate()}
    (tmp_path / "config.toml").write_text("[hub]\nport = 0\nbogus = 1\n")
    for command in (["hub"], ["watch"], ["up"], ["keys", "list"], ["status"]):
        line = one_error_line(run_cli(*command, cwd=tmp_path, env=key))
        assert "Config 'hub' has unknown key(s): bogus" in line, command

    (tmp_path / "afile").write_text("a file where a folder should be")
    write_config(tmp_path, watcher='watch = ["afile/inbox"]')
    line = one_error_line(run_cli("watch", cwd=tmp_path, env=key))
    assert f"{tmp_path / 'afile' / 'inbox'}" in line and "Not a directory" in line

    (tmp_path / "keydir").mkdir()
    write_config(tmp_path, watcher='key_file = "keydir"')
    line = one_error_line(run_cli("watch", cwd=tmp_path))
    assert "[watcher] key_file" in line and "cannot be read" in line

    line = one_error_line(run_cli("watch", cwd=tmp_path, env={"DICOMHUB_KEY": "dhk_x"}))
    assert "$DICOMHUB_KEY" in line


SIMULATED_BUG = textwrap.dedent("""\
    import sys
    import hub.app

    async def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    hub.app.start = broken
    from dicomhub.cli import main
    sys.exit(main(sys.argv[1:]))
    """)


def test_an_internal_error_is_one_line_and_its_traceback_with_debug(tmp_path: Path) -> None:
    write_config(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", SIMULATED_BUG, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=TIMEOUT)

    line = one_error_line(run("hub"))
    assert line == "error: internal error: RuntimeError: simulated bug " \
                   "(run with --debug for details)"
    debug = run("hub", "--debug", "--log-level", "info")
    assert debug.returncode == 2
    assert debug.stderr.startswith("Traceback (most recent call last)")
    assert 'File "<string>", line 5, in broken' in debug.stderr
    assert debug.stderr.splitlines()[-1] == "error: internal error: RuntimeError: simulated bug"
    as_json = run("hub", "--debug", "--log-level", "info", "--log-format", "json")
    [line] = as_json.stderr.splitlines()
    event = json.loads(line)
    assert event["error"] == "RuntimeError: simulated bug" and "broken" in event["traceback"]


@pytest.mark.asyncio
async def test_a_watcher_with_a_refused_key_says_so_in_one_line(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, _, _ = await hub_with_keys(tmp_path, services)
    write_config(tmp_path, watcher=f'hub_url = "{url.replace("http", "ws", 1)}/ws/ingest"')
    watcher = await Service.start("watch", cwd=tmp_path, env={"DICOMHUB_KEY": keys.generate()},
                                  name="watcher")
    services.append(watcher)
    await watcher.logged(r"refused the ingest key \(HTTP 401\): check \$DICOMHUB_KEY")
    assert await watcher.stop() == 0
    events_only(watcher.log)


# signals ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sigterm_stops_the_hub_cleanly_and_live_clients_see_1001(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, _, read_key = await hub_with_keys(tmp_path, services)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws", 1) + "/ws/live",
                                   headers={"Authorization": f"Bearer {read_key}"}) as ws:
            first = await ws.receive_json(timeout=TIMEOUT)
            assert first["kind"] == "live"
            hub.proc.send_signal(signal.SIGTERM)
            while True:
                msg = await ws.receive(timeout=TIMEOUT)
                if msg.type != aiohttp.WSMsgType.TEXT:  # stats messages may come first
                    break
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (1001, "hub shutting down")
    assert await asyncio.wait_for(hub.proc.wait(), TIMEOUT) == 0
    assert any("SIGTERM received: stopping" in line for line in events_only(hub.log))


@pytest.mark.asyncio
async def test_sigterm_stops_a_watcher_with_its_outbox_intact(
        tmp_path: Path, services: list[Service]) -> None:
    ingest_key, read_key = config_with_keys(tmp_path)
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    with socket.socket() as sock:  # the hub's port, bound but not listening: refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        (tmp_path / "watch.toml").write_text(textwrap.dedent(f"""\
            [watcher]
            hub_url = "ws://127.0.0.1:{port}/ws/ingest"
            watch = ["{inbox}"]
            state_dir = "{state}"
            settle = 0.2
            workers = 1
            reconnect_max = 0.5
            """))
        env = {"DICOMHUB_KEY": ingest_key}
        watcher = await Service.start("watch", "--config", "watch.toml", cwd=tmp_path,
                                      env=env, name="watcher1")
        services.append(watcher)
        await watcher.logged(rf"connection to the hub at ws://127.0.0.1:{port}/ws/ingest "
                             "lost or refused")
        for n in range(3):
            factory.write(inbox / f"{n}.dcm", StudyInstanceUID="1.2.3.9",
                          SeriesInstanceUID="1.2.3.9.1", InstanceNumber=n)

        async def held() -> bool:
            return outbox_size(state) == 3

        await wait_for(held, "three records in the outbox")
        assert await watcher.stop() == 0
        assert "3 records wait for the hub" in events_only(watcher.log)[-1]
        assert outbox_size(state) == 3
    await restart_hub(tmp_path, services, f"http://127.0.0.1:{port}", "hub")
    again = await Service.start("watch", "--config", "watch.toml", cwd=tmp_path, env=env,
                                name="watcher2")
    services.append(again)
    async with aiohttp.ClientSession() as http:
        api = Api(http, f"http://127.0.0.1:{port}", read_key)

        async def delivered() -> bool:
            return (await api.get("/api/stats"))["instances"] == 3

        await wait_for(delivered, "the three held records to reach the hub")
    assert await again.stop() == 0


# keys take effect without a restart ---------------------------------------------------------


@pytest.mark.asyncio
async def test_keys_made_and_revoked_with_the_cli_apply_at_once(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, _, _ = await hub_with_keys(tmp_path, services)
    made = run_cli("keys", "create", "--role", "read", "--name", "late", cwd=tmp_path)
    key = made.stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/api/stats", headers=headers) as resp:
            assert resp.status == 200  # no restart, no reload
        async with http.ws_connect(url.replace("http", "ws", 1) + "/ws/live",
                                   headers=headers) as ws:
            assert (await ws.receive_json(timeout=TIMEOUT))["kind"] == "live"
            assert run_cli("keys", "revoke", "late", cwd=tmp_path).returncode == 0
            async with http.get(url + "/api/stats", headers=headers) as resp:
                assert resp.status == 401  # refused at once
            while True:  # and the open socket is closed (checked every 2 s)
                msg = await ws.receive(timeout=TIMEOUT)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4401)
    assert await hub.stop() == 0
