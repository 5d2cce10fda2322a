"""`dicomhub import DIR` and progress, as a user meets them: the real CLI in a
subprocess against a real hub process, exit codes, the summary, and progress on a
pseudo-terminal or, without one, in the log."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import TIMEOUT, Api, wait_for
from dicomhub import keys
from dicomhub.config import load
from dicomhub.importer import Summary, import_config, rejections_url, summary_lines
from procs import CLI, Service, hub_with_keys, outbox_size, restart_hub, run_cli

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
ROWS = re.compile(r"^  (found|already done|read|indexed|duplicates|rejected) +([\d,]+)",
                  re.MULTILINE)


def fill(folder: Path, count: int, series: int = 1) -> None:
    """`count` instances of one series, written before the import starts."""
    study = "1.2.826.0.1.3680043.99"
    for n in range(count):
        factory.write(folder / f"img-{n:04}.dcm", StudyInstanceUID=study,
                      SeriesInstanceUID=f"{study}.{series}", InstanceNumber=n + 1)


def write_config(tmp_path: Path, hub_url: str) -> Path:
    """A config whose [watcher] sends to `hub_url` (http:// base or ws:// ingest URL)."""
    ws = hub_url if hub_url.startswith("ws") else hub_url.replace("http", "ws", 1) + "/ws/ingest"
    path = tmp_path / "import.toml"
    path.write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = "{ws}"
        state_dir = "{tmp_path / 'state'}"
        settle = 0.3
        workers = 1
        reconnect_max = 0.5
        """))
    return path


def summary(stdout: str) -> dict[str, int]:
    return {name: int(count.replace(",", "")) for name, count in ROWS.findall(stdout)}


def counts(found: int, done: int, read: int, indexed: int, duplicates: int,
           rejected: int) -> dict[str, int]:
    return {"found": found, "already done": done, "read": read, "indexed": indexed,
            "duplicates": duplicates, "rejected": rejected}


@contextmanager
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused while we hold it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_the_summary_counts_and_points_to_the_rejections() -> None:
    lines = summary_lines(Summary(found=1_210, unchanged=200, read=1_010, indexed=1_000,
                                  duplicates=4, rejected=6, reasons={"empty": 1, "not_dicom": 3},
                                  earlier=12, seconds=2.0),
                          "http://hub/api/rejections?watcher_id=w")
    assert lines[0] == "import finished in 2.0 s"
    assert summary("\n".join(lines)) == counts(1_210, 200, 1_010, 1_000, 4, 6)
    assert "505 files/s" in lines[3]
    assert lines[6].endswith("not_dicom 3, empty 1, at the hub 2")
    assert "12 records left by an interrupted import" in lines[7]
    assert lines[8] == "6 files rejected: see http://hub/api/rejections?watcher_id=w"


def test_the_rejections_url_is_the_hubs_own_from_its_ingest_url() -> None:
    assert rejections_url("ws://127.0.0.1:8080/ws/ingest", "pc-import-ab") == \
        "http://127.0.0.1:8080/api/rejections?watcher_id=pc-import-ab"
    assert rejections_url("wss://u:secret@hub.example.org/dicomhub/ws/ingest", "a b") == \
        "https://hub.example.org/dicomhub/api/rejections?watcher_id=a+b"


@pytest.mark.asyncio
async def test_import_sums_up_exits_1_on_rejections_and_a_rerun_sends_nothing(
        tmp_path: Path, services: list[Service], http: aiohttp.ClientSession) -> None:
    _, url, ingest, read = await hub_with_keys(tmp_path, services)
    api = Api(http, url, read)
    config = str(write_config(tmp_path, url))
    mixed = tmp_path / "mixed"
    fill(mixed, 300)
    for n in range(3):
        (mixed / f"junk-{n}.dcm").write_text("not a DICOM file\n")

    result = run_cli("import", str(mixed), "--config", config, cwd=tmp_path,
                     env={"DICOMHUB_KEY": ingest})
    assert result.returncode == 1, result.stderr
    assert summary(result.stdout) == counts(303, 0, 303, 300, 0, 3), result.stdout
    assert "not_dicom 3" in result.stdout and result.stderr == ""
    link = re.search(r"3 files rejected: see (http://\S+)", result.stdout)
    assert link is not None, result.stdout
    async with http.get(link.group(1), headers={"Authorization": f"Bearer {read}"}) as resp:
        rejected = (await resp.json())["items"]
    assert sorted(r["path"] for r in rejected) == ["junk-0.dcm", "junk-1.dcm", "junk-2.dcm"]
    stats = await api.get("/api/stats")
    assert (stats["instances"], stats["rejections"]) == (300, 3)
    # Counts only: no patient data, no file names.
    assert "Test^Patient" not in result.stdout and "img-0000" not in result.stdout

    # Again: the indexed files are not read or sent again; the rejected ones are
    # read again (they are few), so the exit status still reports them.
    again = run_cli("import", str(mixed), "--config", config, cwd=tmp_path,
                    env={"DICOMHUB_KEY": ingest})
    assert again.returncode == 1, again.stderr
    assert summary(again.stdout) == counts(303, 300, 3, 0, 0, 3), again.stdout

    good = tmp_path / "good"
    fill(good, 40, series=2)
    first = run_cli("import", str(good), "--config", config, cwd=tmp_path,
                    env={"DICOMHUB_KEY": ingest})
    assert first.returncode == 0, first.stderr
    assert summary(first.stdout) == counts(40, 0, 40, 40, 0, 0), first.stdout
    assert "rejected: see" not in first.stdout
    rerun = run_cli("import", str(good), "--config", config, cwd=tmp_path,
                    env={"DICOMHUB_KEY": ingest})
    assert rerun.returncode == 0, rerun.stderr
    assert summary(rerun.stdout) == counts(40, 40, 0, 0, 0, 0), rerun.stdout
    stats = await api.get("/api/stats")
    assert (stats["instances"], stats["rejections"]) == (340, 3)
    # Nothing was sent by the re-runs: the hub counted each file once.
    watchers = {w["watcher_id"]: w for w in (await api.get("/api/watchers"))["items"]}
    assert sorted(w["instances"] for w in watchers.values()) == [40, 300]


def test_import_of_a_missing_folder_or_without_a_key_is_one_line_and_exit_2(
        tmp_path: Path) -> None:
    config = str(write_config(tmp_path, "ws://127.0.0.1:9/ws/ingest"))
    missing = run_cli("import", str(tmp_path / "nowhere"), "--config", config, cwd=tmp_path,
                      env={"DICOMHUB_KEY": keys.generate()})
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.splitlines() == [f"error: folder '{tmp_path / 'nowhere'}' does "
                                           "not exist"]
    (tmp_path / "empty").mkdir()
    keyless = run_cli("import", str(tmp_path / "empty"), "--config", config, cwd=tmp_path)
    assert keyless.returncode == 2 and len(keyless.stderr.splitlines()) == 1
    assert "no ingest key" in keyless.stderr


@pytest.mark.asyncio
async def test_import_gives_up_on_a_hub_that_is_down_stops_on_ctrl_c_and_resumes(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, ingest, _ = await hub_with_keys(tmp_path, services)
    with refused_port() as port:
        down = str(write_config(tmp_path, f"ws://127.0.0.1:{port}/ws/ingest"))
        (tmp_path / "few").mkdir()
        fill(tmp_path / "few", 5)
        started = time.monotonic()
        result = run_cli("import", str(tmp_path / "few"), "--config", down, "--attempts",
                         "2", cwd=tmp_path, env={"DICOMHUB_KEY": ingest})
        elapsed = time.monotonic() - started
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: 2 attempts in a row to connect to the hub failed; "
                           "the last: connection to the hub at ") and "refused" in line
    assert elapsed < 15, elapsed

    # A key the hub does not know: refused at the first attempt (retrying cannot fix
    # a key), one line naming the cause.
    config = str(write_config(tmp_path, url))
    started = time.monotonic()
    refused = run_cli("import", str(tmp_path / "few"), "--config", config,
                      cwd=tmp_path, env={"DICOMHUB_KEY": keys.generate()})
    assert refused.returncode == 2 and refused.stdout == ""
    line, = refused.stderr.splitlines()
    assert "refused the ingest key (HTTP 401)" in line, line
    assert time.monotonic() - started < 10  # not --attempts (5) rounds of backoff

    # Ctrl-C while the hub is away: exit 130, and what was read waits in the outbox.
    await hub.stop()
    folder = tmp_path / "interrupted"
    fill(folder, 20, series=3)
    running = await Service.start(
        "import", str(folder), "--config", config, "--attempts", "1000", cwd=tmp_path,
        env={"DICOMHUB_KEY": ingest, "DICOMHUB_PROGRESS_INTERVAL": "0.1"}, name="import")
    services.append(running)
    await running.logged(r"scanned 20, parsed 20, delivered 0, rejected 0, pending 20;")
    assert await running.stop(signal.SIGINT) == 130
    assert re.search(r"interrupted after [\d.]+ s: 20 files read; 20 records wait in the "
                     "outbox", running.log.read_text())
    state = import_config(load(config).watcher, folder.resolve()).state_dir
    assert outbox_size(state) == 20

    # The hub is back: the next import delivers the outbox and reads nothing again.
    await restart_hub(tmp_path, services, url, "hub2")
    resumed = run_cli("import", str(folder), "--config", config, cwd=tmp_path,
                      env={"DICOMHUB_KEY": ingest})
    assert resumed.returncode == 0, resumed.stderr
    assert summary(resumed.stdout) == counts(20, 20, 0, 20, 0, 0), resumed.stdout
    assert "20 records left by an interrupted import were delivered first" in resumed.stdout


def run_on_terminal(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal 200 columns wide: its exit code,
    its stdout, and what the terminal received, ANSI codes removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
    environ.update(env, TERM="xterm-256color")
    try:
        with subprocess.Popen([*CLI, *args], cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=slave) as proc:
            os.close(slave)
            slave = -1
            screen = _read_until_closed(master)
            assert proc.stdout is not None
            stdout = proc.stdout.read().decode()
            code = proc.wait(TIMEOUT)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return code, stdout, ANSI.sub("", screen.decode(errors="replace"))


def _read_until_closed(master: int) -> bytes:
    """Everything the child writes to the terminal, until it closes it (exits)."""
    deadline = time.monotonic() + TIMEOUT
    received = b""
    while True:
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"the terminal stayed open; got: {received[-2000:]!r}")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every descriptor of the terminal's other side is closed
            return received
        if not chunk:
            return received
        received += chunk


@pytest.mark.asyncio
async def test_progress_is_drawn_on_a_terminal(tmp_path: Path,
                                               services: list[Service]) -> None:
    _, url, ingest, _ = await hub_with_keys(tmp_path, services)
    folder = tmp_path / "scans"
    fill(folder, 150)
    (folder / "junk.dcm").write_text("no DICOM here\n")
    code, stdout, screen = await asyncio.to_thread(
        run_on_terminal, "import", str(folder), "--config",
        str(write_config(tmp_path, url)), cwd=tmp_path, env={"DICOMHUB_KEY": ingest})
    assert code == 1, screen
    lines = [part.strip() for part in re.split(r"[\r\n]", screen) if part.strip()]
    final = "scanned 151, parsed 151, delivered 151, rejected 1, pending 0;"
    assert any(final in line for line in lines), lines[-5:]
    assert re.search(r"[\d,]+ files/s, ETA 0:00", screen), lines[-5:]
    assert "Test^Patient" not in screen and "img-0" not in screen
    assert summary(stdout) == counts(151, 0, 151, 150, 0, 1), stdout


@pytest.mark.asyncio
async def test_without_a_terminal_progress_is_a_log_line_every_interval(
        tmp_path: Path, services: list[Service]) -> None:
    """`watch` on a folder that holds files already, its hub away: the work waits,
    so a line is due every interval."""
    folder = tmp_path / "inbox"
    fill(folder, 12)
    with refused_port() as port:
        config = write_config(tmp_path, f"ws://127.0.0.1:{port}/ws/ingest")
        config.write_text(config.read_text() + f'watch = ["{folder}"]\n')
        watcher = await Service.start(
            "watch", "--config", str(config), cwd=tmp_path, name="watch",
            env={"DICOMHUB_KEY": keys.generate(), "DICOMHUB_PROGRESS_INTERVAL": "0.1"})
        services.append(watcher)
        line = (r"INFO +dicomhub\.watcher\.progress: scanned 12, parsed 12, delivered 0, "
                r"rejected 0, pending 12; \S+ files/s, ETA -")

        async def lines() -> bool:
            return len(re.findall(line, watcher.log.read_text())) >= 3

        await wait_for(lines, "three progress lines in the log")
        assert await watcher.stop() == 0
    assert "Test^Patient" not in watcher.log.read_text()
