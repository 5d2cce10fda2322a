"""`dicomhub status` against a real hub process, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import Api, wait_for
from dicomhub import keys
from dicomhub.status import Snapshot, ago, render, summarize
from procs import Service, hub_with_keys, run_cli, start_watcher

pytestmark = pytest.mark.slow


async def status(tmp_path: Path, *args: str, key: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
    env = {"DICOMHUB_KEY": key} if key is not None else None
    return await asyncio.to_thread(run_cli, "status", "--interval", "0.2", *args,
                                   cwd=tmp_path, env=env)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


async def test_status_shows_watchers_series_and_rejections(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, ingest_key, read_key = await hub_with_keys(tmp_path, services)
    inbox = await start_watcher(tmp_path, services, "w1", [url], ingest_key)
    study = "1.2.826.0.1.3680043.8.498.77"
    for n in (1, 2):
        factory.write(inbox / f"{n}.dcm", StudyInstanceUID=study,
                      SeriesInstanceUID=f"{study}.1", InstanceNumber=n)
    (inbox / "notes.txt").write_text("not an instance")
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)

        async def settled() -> bool:  # everything in, and the series stable (1 s)
            stats = await api.get("/api/stats")
            return (stats["instances"], stats["rejections"], stats["series_receiving"]) \
                == (2, 1, 0)

        await wait_for(settled, "two instances, one rejection and a stable series")

    text = await status(tmp_path, "--hub", url, key=read_key)
    assert text.returncode == 0, text.stderr
    assert text.stderr == ""
    out = text.stdout
    assert f"hub          {url}" in out
    assert "watchers     1 connected, 0 disconnected" in out
    assert "series       0 receiving, 1 stable" in out
    assert "indexed      2 instances in 1 series, 1 studies, 1 patients" in out
    assert "rejections   1; the newest 1 by reason:" in out
    assert "  not_dicom          1   newest " in out
    assert "notes.txt" in out
    assert "files/s" in out

    (tmp_path / "read.key").write_text(read_key + "\n")
    as_json = await status(tmp_path, "--hub", url, "--key-file", "read.key", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["watchers"]["connected"] == 1
    [watcher] = report["watchers"]["items"]
    assert watcher["connected"] and watcher["backlog"] == 0
    assert watcher["seconds_since_contact"] >= 0
    assert f"  {watcher['watcher_id']}" in out  # the text named the same watcher
    assert report["series"] == {"receiving": 0, "stable": 1, "total": 1}
    assert report["counts"]["instances"] == 2
    assert report["rejections"]["total"] == 1
    assert [(r["reason"], r["count"]) for r in report["rejections"]["by_reason"]] \
        == [("not_dicom", 1)]
    assert report["rejections"]["newest"][0]["path"] == "notes.txt"
    assert report["ingest"]["files_per_second"] >= 0

    # Without --hub: the config's own hub (its database is here), on the port it took.
    port = url.rsplit(":", 1)[1]
    (tmp_path / "status.toml").write_text(f"[hub]\nport = {port}\n")
    derived = await status(tmp_path, "--config", "status.toml", "--json", key=read_key)
    assert derived.returncode == 0, derived.stderr
    assert json.loads(derived.stdout)["hub"]["url"] == url


async def test_a_refused_key_is_one_line_and_exit_2(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, ingest_key, read_key = await hub_with_keys(tmp_path, services)
    unknown = one_error_line(await status(tmp_path, "--hub", url, key=keys.generate()))
    assert "refused the key from $DICOMHUB_KEY (unknown or revoked)" in unknown
    assert "keys create --role read" in unknown
    wrong_role = one_error_line(await status(tmp_path, "--hub", url, key=ingest_key))
    assert "'ingest'" in wrong_role and "read key" in wrong_role
    malformed = one_error_line(await status(tmp_path, "--hub", url, key="dhk_oops"))
    assert "$DICOMHUB_KEY" in malformed
    (tmp_path / "keydir").mkdir()  # a key file that cannot be read
    unreadable = one_error_line(await status(tmp_path, "--hub", url, "--key-file", "keydir"))
    assert "--key-file 'keydir' cannot be read" in unreadable
    no_key = one_error_line(await status(tmp_path, "--hub", url))
    assert "--key-file" in no_key and "$DICOMHUB_KEY" in no_key


async def test_no_hub_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as sock:  # bound, not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        line = one_error_line(await status(tmp_path, "--hub", url, key=keys.generate()))
    assert f"cannot reach the hub at {url}" in line and "--hub" in line
    (tmp_path / "config.toml").write_text('[watcher]\nhub_url = "ws://127.0.0.1:9/ws/ingest"\n')
    derived = one_error_line(await status(tmp_path, key=keys.generate()))
    assert "http://127.0.0.1:9" in derived  # a watcher's config: its hub, made http


def test_ago_reads_like_speech() -> None:
    assert [ago(s) for s in (None, 0.4, 59, 60, 3599, 3600, 86400 * 3)] == [
        "never", "0 s ago", "59 s ago", "1 min ago", "59 min ago", "1 h ago", "3 d ago"]


def test_rendered_names_cannot_drive_the_terminal() -> None:
    stats = {"patients": 1, "studies": 1, "series": 2, "series_receiving": 1,
             "instances": 3, "files": 3, "rejections": 1, "last_seq": 9}
    snap = Snapshot("http://hub", "0.1.0", stats, {**stats, "files": 5}, 2.0,
                    [{"watcher_id": "w\x1b]0;owned\x07", "connected": False, "backlog": 4,
                      "last_seen": "2026-01-01T00:00:00.000Z"}],
                    [{"time": "2026-01-01T00:00:01.000Z", "reason": "not_dicom",
                      "detail": "", "path": "Doe^Jane/\x1b[2Jnote\n.txt", "watcher_id": "w"}])
    status = summarize(snap, datetime(2026, 1, 1, 0, 1, tzinfo=UTC))
    text = render(status)
    assert "\x1b" not in text and "\x07" not in text
    assert "Doe^Jane/\\x1b[2Jnote\\n.txt" in text
    assert "1 receiving, 1 stable" in text and "1.0 files/s" in text
    assert "disconnected backlog 4" in text and "last contact 1 min ago" in text
