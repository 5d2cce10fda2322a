"""Faults with real processes: kills, outages, bursts, full and read-only disks.

Each test runs `dicomhub hub` and `dicomhub watch` as separate processes, does
something unkind to one of them, and then checks the promise: every instance
that landed in a watched folder is in the hub exactly once. Run these alone
with `pytest -m fault`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import Api, wait_for
from procs import (
    Service,
    all_changes,
    fill,
    hub_with_keys,
    mounted_tmpfs,
    outbox_size,
    peak_rss_mb,
    restart_hub,
    run_cli,
    without_root_file_access,
)

pytestmark = pytest.mark.fault


def drop_files(folder: Path, count: int, series: int, study: str, first: int = 0) -> None:
    """`count` small CT instances spread over `series` series of one study."""
    for n in range(first, first + count):
        s = n % series
        factory.write(folder / f"s{s}" / f"{n}.dcm", StudyInstanceUID=study,
                      SeriesInstanceUID=f"{study}.{s}", InstanceNumber=n)


async def start_watcher(tmp_path: Path, services: list[Service], url: str, key: str,
                        name: str = "watcher", extra: str = "",
                        preexec_fn: Callable[[], None] | None = None) -> Service:
    (tmp_path / "watcher.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = "{url.replace('http', 'ws', 1)}/ws/ingest"
        settle = 0.3
        workers = 2
        batch_size = 100
        reconnect_max = 1.0
        """) + extra)
    watcher = await Service.start("watch", "--config", "watcher.toml", cwd=tmp_path,
                                  env={"DICOMHUB_KEY": key}, name=name,
                                  preexec_fn=preexec_fn)
    services.append(watcher)
    return watcher


async def settled(api: Api, total: int, series: int) -> None:
    """Wait for `total` instances with every series stable, then check nothing doubled."""
    async def done() -> bool:
        stats = await api.get("/api/stats")
        return stats["instances"] >= total and stats["series_receiving"] == 0 \
            and await _outbox_empty(api)

    await wait_for(done, f"{total} instances indexed and every series stable")
    stats = await api.get("/api/stats")
    assert (stats["instances"], stats["files"], stats["series"], stats["rejections"]) \
        == (total, total, series, 0)
    counts = sorted(s["instance_count"] for s in await api.all("/api/series"))
    assert sum(counts) == total and len(counts) == series


async def _outbox_empty(api: Api) -> bool:
    watchers = (await api.get("/api/watchers"))["items"]
    return bool(watchers) and all(w["backlog"] == 0 for w in watchers)


# 1. The hub killed mid-ingest -----------------------------------------------------------


async def test_hub_killed_mid_ingest_loses_and_doubles_nothing(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, key, read_key = await hub_with_keys(tmp_path, services, "hub1")
    total, series = 5000, 10
    drop_files(tmp_path / "inbox", total, series, "1.2.5")
    await start_watcher(tmp_path, services, url, key)
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)

        async def under_way() -> bool:
            return (await api.get("/api/stats"))["instances"] >= 1000

        await wait_for(under_way, "ingest to be under way")
        assert await hub.stop(signal.SIGKILL) == -signal.SIGKILL
        with contextlib.closing(sqlite3.connect(tmp_path / "data" / "hub.sqlite3")) as db:
            stored = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        hub = await restart_hub(tmp_path, services, url, "hub2")
        await settled(api, total, series)
        print(f"hub kill: {stored} of {total} instances stored when killed")
        changes = await all_changes(api)
        seqs = [c["seq"] for c in changes]
        assert seqs == sorted(set(seqs))  # no gap in order, no seq twice
        # A series may go stable before the restart and reopen as its backlog arrives;
        # what matters is that each one ends stable, none stuck receiving.
        last = {c["series_instance_uid"]: c["kind"] for c in changes
                if c["kind"].startswith("series.")}
        assert list(last.values()) == ["series.stable"] * series
    assert await hub.stop() == 0


# 2. The watcher killed mid-ingest -------------------------------------------------------


async def test_watcher_killed_mid_ingest_resumes_without_reparsing(
        tmp_path: Path, services: list[Service]) -> None:
    _, url, key, read_key = await hub_with_keys(tmp_path, services)
    total, series = 3000, 6
    drop_files(tmp_path / "inbox", total, series, "1.2.6")
    first = await start_watcher(tmp_path, services, url, key, "watcher1")
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)

        async def under_way() -> bool:
            return (await api.get("/api/stats"))["instances"] >= 300

        await wait_for(under_way, "ingest to be under way")
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        with contextlib.closing(sqlite3.connect(tmp_path / "data" / "watcher" /
                                                "state.sqlite3")) as db:
            remembered = db.execute("SELECT count(*) FROM delivered").fetchone()[0]
        assert 0 < remembered < total  # killed in the middle, as intended
        print(f"watcher kill: {remembered} of {total} files parsed when killed")

        second = await start_watcher(tmp_path, services, url, key, "watcher2")
        await settled(api, total, series)
        assert await second.stop() == 0
    log = (tmp_path / "watcher2.log").read_text()
    parsed = int(re.search(r"parsed (\d+) files this run", log).group(1))
    assert parsed == total - remembered  # what the first run recorded was not read again


# 3. A long hub outage ------------------------------------------------------------------


async def test_a_long_hub_outage_fills_the_outbox_and_loses_nothing(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, key, read_key = await hub_with_keys(tmp_path, services, "hub1")
    watcher = await start_watcher(tmp_path, services, url, key)
    await watcher.logged(r"connected to")
    state_dir = tmp_path / "data" / "watcher"
    inbox = tmp_path / "inbox"
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)
        drop_files(inbox, 100, 4, "1.2.7")

        async def first_delivered() -> bool:
            return (await api.get("/api/stats"))["instances"] == 100

        await wait_for(first_delivered, "the first files to be indexed")
        assert await hub.stop() == 0  # the port is closed from here on
        # Files keep arriving in waves while the watcher retries, its wait between
        # attempts growing to its cap: each wave lands in the outbox, none is lost.
        waves, per_wave = 5, 600
        for wave in range(waves):
            drop_files(inbox, per_wave, 4, "1.2.7", first=100 + wave * per_wave)
            expected = (wave + 1) * per_wave

            async def stored(expected: int = expected) -> bool:
                return outbox_size(state_dir) == expected

            await wait_for(stored, f"{expected} records waiting in the outbox")
            assert watcher.proc.returncode is None

        async def kept_trying() -> int:
            found = len(re.findall(r"reconnecting in", watcher.log.read_text()))
            return found if found >= 12 else 0

        # It keeps trying, at its capped pace, and stays up however long this lasts.
        attempts = await wait_for(kept_trying, "a dozen attempts to reach the hub")
        assert watcher.proc.returncode is None
        rss = peak_rss_mb(watcher.proc.pid)
        hub = await restart_hub(tmp_path, services, url, "hub2")
        await settled(api, 100 + waves * per_wave, 4)
        assert outbox_size(state_dir) == 0
    print(f"outage: {waves * per_wave} records held in the outbox, watcher peak RSS "
          f"{rss:.0f} MiB, {attempts} reconnection attempts")
    assert await watcher.stop() == 0
    assert await hub.stop() == 0


# 4. A burst of 10,000 files -------------------------------------------------------------


async def test_a_burst_of_ten_thousand_files_streams_through(
        tmp_path: Path, services: list[Service]) -> None:
    _, url, key, read_key = await hub_with_keys(tmp_path, services)
    watcher = await start_watcher(tmp_path, services, url, key)
    await watcher.logged(r"connected to")
    staging = tmp_path / "staging"
    total, series = 10_000, 20
    drop_files(staging, total, series, "1.2.8")
    idle = peak_rss_mb(watcher.proc.pid)
    inbox = tmp_path / "inbox"

    def burst() -> None:  # one rename per file, as fast as the kernel takes them
        for folder in staging.iterdir():
            (inbox / folder.name).mkdir(parents=True, exist_ok=True)
            for path in folder.iterdir():
                path.rename(inbox / folder.name / path.name)

    await asyncio.to_thread(burst)
    async with aiohttp.ClientSession() as http:
        await settled(Api(http, url, read_key), total, series)
    peak = peak_rss_mb(watcher.proc.pid)
    print(f"burst: {total} files, watcher RSS {idle:.0f} MiB idle, {peak:.0f} MiB peak")
    assert peak - idle < 60, (idle, peak)
    assert await watcher.stop() == 0


# 5. A full or read-only state folder --------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs for the watcher's state folder, so the test can fill it for real.
    Mounting needs root (CI runs as root)."""
    # Room for SQLite's write-ahead log, which grows to 4 MiB (1,000 pages) before its
    # first checkpoint: a smaller disk could fill before the test fills it.
    with mounted_tmpfs(tmp_path / "disk", "32m") as mount:
        yield mount


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


async def test_a_full_state_folder_pauses_reading_and_loses_nothing(
        tmp_path: Path, services: list[Service], small_disk: Path) -> None:
    _, url, key, read_key = await hub_with_keys(tmp_path, services)
    watcher = await start_watcher(tmp_path, services, url, key,
                                  extra=f'state_dir = "{small_disk / "state"}"\n')
    await watcher.logged(r"connected to")
    inbox = tmp_path / "inbox"
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)
        drop_files(inbox, 200, 2, "1.2.9")
        await wait_for(lambda: _count(api, 200), "the first files to be indexed")
        ballast = fill(small_disk)
        drop_files(inbox, 300, 2, "1.2.9", first=200)
        error = await watcher.logged(r"ERROR.*cannot write to the state folder[^\n]*")
        assert "database or disk is full" in error.group(0)
        assert "Traceback" not in watcher.log.read_text()
        assert watcher.proc.returncode is None
        # What was stored stays. (SQLite may still fill space its files already hold,
        # so some of the new files can get through before the error.)
        assert (await api.get("/api/stats"))["instances"] >= 200
        ballast.unlink(missing_ok=True)
        ballast.with_name("crumbs").unlink(missing_ok=True)

        async def indexed() -> bool:
            stats = await api.get("/api/stats")
            return stats["instances"] >= 500 and stats["series_receiving"] == 0

        # Every instance arrives once space returns. (Acknowledged records that the
        # full disk kept from being deleted may linger in the outbox: resent, they
        # count once, so the outbox's own drain is not part of this promise.)
        await wait_for(indexed, "every instance indexed once space returned")
        stats = await api.get("/api/stats")
        assert (stats["instances"], stats["files"], stats["rejections"]) == (500, 500, 0)
        assert "state folder takes writes again" in watcher.log.read_text()
    assert await watcher.stop() == 0


async def _count(api: Api, instances: int) -> bool:
    return bool((await api.get("/api/stats"))["instances"] == instances)


@pytest.fixture
def fragile_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A small ext4 file system on a loop device, mounted errors=remount-ro, so the
    test can make the kernel turn it read-only under open files, as it does after a
    disk error. Needs root, loop devices and mkfs.ext4."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and mkfs.ext4 to make a file system fail")
    image, mount = tmp_path / "disk.img", tmp_path / "ext4"
    mount.mkdir()
    with image.open("wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    result = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {result.stderr.strip()}")
    try:
        yield image, mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fail_disk(mount: Path) -> None:
    """Make ext4 record an error: with errors=remount-ro it goes read-only at once."""
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount)], check=True,
                            capture_output=True, text=True).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip("this kernel cannot inject an ext4 error")
    trigger.write_text("1")


async def test_a_state_folder_gone_read_only_keeps_what_it_stored(
        tmp_path: Path, services: list[Service],
        fragile_disk: tuple[Path, Path]) -> None:
    image, mount = fragile_disk
    _, url, key, read_key = await hub_with_keys(tmp_path, services)
    extra = f'state_dir = "{mount / "state"}"\n'
    watcher = await start_watcher(tmp_path, services, url, key, "watcher1", extra=extra)
    await watcher.logged(r"connected to")
    inbox = tmp_path / "inbox"
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)
        drop_files(inbox, 200, 2, "1.2.10")
        await wait_for(lambda: _count(api, 200), "the first files to be indexed")
        fail_disk(mount)
        drop_files(inbox, 300, 2, "1.2.10", first=200)
        error = await watcher.logged(r"ERROR.*cannot write to the state folder[^\n]*")
        assert "Read-only file system" in error.group(0)
        assert "Traceback" not in watcher.log.read_text()
        assert watcher.proc.returncode is None
        assert (await api.get("/api/stats"))["instances"] == 200
        # The kernel will not make it writable again while mounted: the operator
        # stops the watcher, repairs the disk and starts it again.
        assert await watcher.stop() == 0
        subprocess.run(["umount", str(mount)], check=True)
        subprocess.run(["e2fsck", "-f", "-y", str(image)], capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
        again = await start_watcher(tmp_path, services, url, key, "watcher2", extra=extra)
        await settled(api, 500, 2)
    assert await again.stop() == 0


async def test_a_read_only_state_folder_at_start_is_one_clear_line(
        tmp_path: Path, small_disk: Path) -> None:
    remount(small_disk, "ro")
    (tmp_path / "watcher.toml").write_text(
        f'[watcher]\nstate_dir = "{small_disk / "state"}"\nkey_file = ""\n')
    result = run_cli("watch", "--config", "watcher.toml", cwd=tmp_path,
                     env={"DICOMHUB_KEY": "dhk_" + "a" * 43})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(small_disk / "state") in lines[0] and "Read-only file system" in lines[0]


# 6. A file the watcher may not read ----------------------------------------------------


async def test_an_unreadable_file_is_rejected_then_indexed_once_readable(
        tmp_path: Path, services: list[Service]) -> None:
    _, url, key, read_key = await hub_with_keys(tmp_path, services)
    inbox = tmp_path / "inbox"
    secret = inbox / "secret.dcm"
    ds = factory.write(secret)
    secret.chmod(0)
    factory.write(inbox / "open.dcm", StudyInstanceUID=ds.StudyInstanceUID,
                  SeriesInstanceUID=ds.SeriesInstanceUID)
    watcher = await start_watcher(tmp_path, services, url, key,
                                  preexec_fn=without_root_file_access)
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)

        async def rejected() -> list[dict[str, str]]:
            return (await api.get("/api/rejections"))["items"]

        [rejection] = await wait_for(rejected, "the unreadable file to be rejected")
        assert (rejection["path"], rejection["reason"]) == ("secret.dcm", "unreadable")
        assert rejection["detail"] == "cannot read the file: permission denied"
        assert (await api.get("/api/stats"))["instances"] == 1
        assert watcher.proc.returncode is None

        secret.chmod(0o644)  # fixed by an administrator: read again, indexed, cleared

        async def indexed() -> bool:
            stats = await api.get("/api/stats")
            return stats["instances"] == 2 and stats["rejections"] == 0

        await wait_for(indexed, "the file to be indexed once readable")
    assert await watcher.stop() == 0
