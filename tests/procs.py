"""Real dicomhub processes for the tests: the CLI run as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import factory
from conftest import TIMEOUT, Api, wait_for

PR_CAPBSET_DROP = 24
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
                    name: str = "service",
                    preexec_fn: Callable[[], None] | None = None) -> Service:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
        environ.update(env or {})
        log = cwd / f"{name}.log"
        with log.open("ab") as stderr:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                *CLI, *args, cwd=cwd, env=environ, stdout=asyncio.subprocess.PIPE,
                stderr=stderr, preexec_fn=preexec_fn)
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

    async def logged(self, pattern: str) -> re.Match[str]:
        """Wait until the process's log (stderr) holds a line matching `pattern`."""
        async def found() -> re.Match[str] | None:
            if self.proc.returncode is not None:
                raise AssertionError(f"process ended before logging {pattern!r}; "
                                     f"log:\n{self.log.read_text()[-3000:]}")
            return re.search(pattern, self.log.read_text(errors="replace"))

        match: re.Match[str] = await wait_for(found, f"the log to show {pattern!r}")
        return match

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT)


def config_with_keys(tmp_path: Path, hub: str = "") -> tuple[str, str]:
    """A fresh config.toml (`hub`: extra [hub] lines) and an (ingest, read) key pair
    made in its database with the CLI."""
    write_config(tmp_path, hub=hub)
    ingest = run_cli("keys", "create", "--role", "ingest", "--name", "w", cwd=tmp_path)
    read = run_cli("keys", "create", "--role", "read", "--name", "r", cwd=tmp_path)
    return ingest.stdout.strip(), read.stdout.strip()


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (e.g. "32m") on a new folder `mount`, unmounted after.
    Mounting needs root (CI runs as root); elsewhere the test is skipped."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write a ballast file until the file system is full (it may be full already:
    the watcher's SQLite files grow too)."""
    ballast = folder / "ballast"
    try:
        with ballast.open("wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    with contextlib.suppress(OSError):
        ballast.with_name("crumbs").write_bytes(b"\0" * 4096)  # the last partial page
    return ballast


async def hub_with_keys(tmp_path: Path, services: list[Service],
                        name: str = "hub") -> tuple[Service, str, str, str]:
    """A hub process on a fresh config: (service, base URL, ingest key, read key)."""
    ingest, read = config_with_keys(tmp_path)
    hub = await Service.start("hub", cwd=tmp_path, name=name)
    services.append(hub)
    url = (await hub.read_until(r"listening on (http://\S+)")).group(1)
    return hub, url, ingest, read


async def restart_hub(tmp_path: Path, services: list[Service], url: str,
                      name: str) -> Service:
    """The hub again, on the port the watcher knows."""
    port = url.rsplit(":", 1)[1]
    (tmp_path / "restart.toml").write_text(
        (tmp_path / "config.toml").read_text().replace("port = 0", f"port = {port}"))
    hub = await Service.start("hub", "--config", "restart.toml", cwd=tmp_path, name=name)
    services.append(hub)
    await hub.read_until(r"listening on")
    return hub


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def outbox_size(state_dir: Path) -> int:
    """Records in a watcher's outbox, read beside the running watcher (WAL allows it)."""
    con = sqlite3.connect(f"file:{state_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        con.close()


async def all_changes(api: Api) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    since = 0
    while True:
        page = await api.get("/api/changes", since=since, limit=1000)
        changes += page["changes"]
        since = page["last"]
        if page["done"]:
            return changes


def without_root_file_access() -> None:
    """In the child before exec: drop the capabilities that let root read any file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so permissions apply to it as to anyone.
    Root's capabilities after exec are capped by this bounding set."""
    if os.geteuid() != 0:
        return  # an ordinary user is bound by permissions already
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot drop a capability")


# several hubs -----------------------------------------------------------------------


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
        try:
            await self._receive(url)
        except (aiohttp.ClientError, ConnectionError):
            pass  # its hub died mid-frame (a reset): the connection has ended all the same

    async def _receive(self, url: str) -> None:
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


async def start_hub(tmp_path: Path, services: list[Service], name: str) -> tuple[Service, str]:
    """A hub process on tmp_path/config.toml: (service, base URL)."""
    hub = await Service.start("hub", cwd=tmp_path, name=name)
    services.append(hub)
    return hub, (await hub.read_until(r"listening on (http://\S+)")).group(1)


async def start_watcher(tmp_path: Path, services: list[Service], name: str,
                        hub_urls: list[str], key: str) -> Path:
    """A watcher process on a new inbox, sending to `hub_urls` (http:// base URLs or
    ws:// ingest URLs) in turn; returns the inbox once it is connected."""
    inbox = tmp_path / f"inbox-{name}"
    inbox.mkdir()
    urls = [u if u.startswith("ws") else u.replace("http", "ws", 1) + "/ws/ingest"
            for u in hub_urls]
    (tmp_path / f"{name}.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = [{", ".join(f'"{u}"' for u in urls)}]
        watch = ["{inbox}"]
        state_dir = "{tmp_path / f'state-{name}'}"
        settle = 0.2
        workers = 1
        reconnect_max = 1.0
        """))
    watcher = await Service.start("watch", "--config", f"{name}.toml", cwd=tmp_path,
                                  env={"DICOMHUB_KEY": key}, name=name)
    services.append(watcher)
    await watcher.logged(r"connected to")
    return inbox
