"""The hub and the watcher as real processes (`python -m dicomhub ...`), each with
its own config file, keys made by `dicomhub keys create`, logs in files.

Every process started here is registered in a `Services`, which stops them all
(SIGTERM, then SIGKILL) whatever happened, so a failed step leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from dicomhub.errors import DicomhubError

CLI = (sys.executable, "-m", "dicomhub")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
SQLITE_FILE = "hub.sqlite3"  # a hub's database unless told otherwise, in its folder
PARSER_MARKER = b"spawn_main"  # in the command line of a watcher's parser process


class BenchError(DicomhubError):
    """A step cannot go on; the message says why, for the table."""


def _environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The user's own dicomhub settings must not leak into the processes under test.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
    environ.update(extra or {})
    return environ


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-1500:].strip()
    return ""


@dataclass
class Service:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self) -> bool:
        """SIGTERM, then SIGKILL if it has not ended within STOP_TIMEOUT; True if it
        had to be killed."""
        if self.proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            return False
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            return True

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}: "
                             f"{_tail(self.log)}")


class Services:
    """Every process this run started, stopped together on the way out."""

    def __init__(self) -> None:
        self.running: list[Service] = []

    async def start(self, name: str, args: list[str], cwd: Path,
                    env: dict[str, str] | None = None) -> Service:
        log = cwd / f"{name}.log"
        with log.open("ab") as stderr:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                *CLI, *args, cwd=cwd, env=_environ(env), stdout=asyncio.subprocess.PIPE,
                stderr=stderr, stdin=asyncio.subprocess.DEVNULL)
        service = Service(name, proc, log)
        self.running.append(service)
        return service

    async def stop_all(self) -> list[str]:
        """Stop every process; the names of those that ignored SIGTERM and were killed.

        Newest first, one at a time: a watcher stops before its hub, as in production
        (a watcher whose hub vanishes while it stops can miss SIGTERM). A process
        leaves the list only once it has ended, so an interrupted call can be repeated.
        """
        killed = []
        while self.running:
            if await self.running[-1].stop():
                killed.append(self.running[-1].name)
            self.running.pop()
        return killed

    def kill_remaining(self) -> None:
        """Last resort once the event loop is gone (a second Ctrl-C): SIGKILL whatever
        was not seen to end."""
        for service in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(service.pid, signal.SIGKILL)
        self.running.clear()


async def run_cli(*args: str, cwd: Path) -> str:
    """Run a short dicomhub command and return its stdout; BenchError if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, cwd=cwd, env=_environ(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    except BaseException:  # cancelled or timed out: it must not outlive the run
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise BenchError(f"dicomhub {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


def write_hub_config(folder: Path, database: str = SQLITE_FILE) -> Path:
    """A hub on an ephemeral port; `database` a SQLite file in `folder` or a
    postgresql:// URL."""
    path = folder / "hub.toml"
    path.write_text(textwrap.dedent(f"""\
        [hub]
        host = "127.0.0.1"
        port = 0
        database = "{database}"
        log_level = "warning"
        """))
    return path


def write_watcher_config(folder: Path, hub_url: str, settle: float | None,
                         extra: str = "", watcher_id: str = "watcher") -> Path:
    """A watcher on `folder/inbox`; `settle` None keeps the default."""
    path = folder / "watcher.toml"
    ws_url = hub_url.replace("http", "ws", 1) + "/ws/ingest"
    text = textwrap.dedent(f"""\
        [watcher]
        hub_url = "{ws_url}"
        watch = ["inbox"]
        state_dir = "watcher-state"
        key_file = ""
        id = "{watcher_id}"
        log_level = "warning"
        """)
    if settle is not None:
        text += f"settle = {settle}\n"
    path.write_text(text + extra)
    return path


@dataclass
class Hub:
    service: Service
    folder: Path
    url: str
    read_key: str
    ingest_key: str


async def _first_line_matching(service: Service, pattern: str) -> re.Match[str]:
    assert service.proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            raw = await asyncio.wait_for(service.proc.stdout.readline(),
                                         max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise BenchError(f"{service.name} did not start within {START_TIMEOUT:.0f} s: "
                             f"{_tail(service.log)}") from None
        if not raw:
            await service.proc.wait()
            service.check_alive()
        if match := re.search(pattern, raw.decode(errors="replace")):
            return match


async def start_hub(services: Services, folder: Path, name: str = "hub",
                    database: str = SQLITE_FILE) -> Hub:
    """A hub in `folder` (made if missing) on `database` (as write_hub_config), with a
    new read and ingest key, listening on an ephemeral port. Hubs sharing a PostgreSQL
    database share their keys too, so each needs its own `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = write_hub_config(folder, database)
    keys = [(await run_cli("keys", "create", "--role", role, "--name",
                           f"bench-{name}-{role}",
                           "--config", str(config), cwd=folder)).strip()
            for role in ("read", "ingest")]
    service = await services.start(name, ["hub", "--config", str(config)], folder)
    url = (await _first_line_matching(service, r"listening on (http://\S+)")).group(1)
    return Hub(service, folder, url, keys[0], keys[1])


async def start_watcher(services: Services, hub: Hub, settle: float | None = None,
                        name: str = "watcher", extra: str = "") -> Service:
    """A watcher process on `hub.folder/inbox`, its id its `name`; returns once the
    hub sees it connected (its folders are then watched: it starts watching before it
    connects)."""
    config = write_watcher_config(hub.folder, hub.url, settle, extra, name)
    service = await services.start(name, ["watch", "--config", str(config)], hub.folder,
                                   env={"DICOMHUB_KEY": hub.ingest_key})
    async with aiohttp.ClientSession() as session:
        api = Api(session, hub.url, hub.read_key)

        async def connected() -> bool:
            service.check_alive()
            watchers = (await api.get("/api/watchers"))["items"]
            return any(w["watcher_id"] == name and w["connected"] for w in watchers)

        await poll(connected, START_TIMEOUT, "the watcher to connect")
    return service


class Api:
    """GET requests to one hub with one key, JSON answers."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str) -> None:
        self.session, self.url = session, url
        self.headers = {"Authorization": f"Bearer {key}"}

    async def get(self, path: str, **params: str | int) -> Any:
        async with self.session.get(self.url + path, params=params or None,
                                    headers=self.headers) as resp:
            if resp.status != 200:
                raise BenchError(f"GET {path} answered {resp.status}: {await resp.text()}")
            return await resp.json()


async def poll(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
               interval: float = 0.05) -> None:
    """Call `predicate` until it is true; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


# memory ---------------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2:].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def total_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time of several processes together; one that has ended counts nothing."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def children(pid: int, marker: bytes = b"") -> list[int]:
    """Processes whose parent is `pid` (and whose command line holds `marker`)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
            # The command name may hold spaces and parentheses: the ppid follows the last ')'.
            if int(stat[stat.rindex(b")") + 2:].split()[1]) != pid:
                continue
            if marker in Path(entry.path, "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # it ended while we looked
    return found
