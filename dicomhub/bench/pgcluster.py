"""A throwaway PostgreSQL cluster for the tests and the benchmark, made with the
installed binaries.

initdb into a temporary folder, then one postmaster on 127.0.0.1 (and a unix
socket in that folder) with fsync on. PostgreSQL refuses to run as root, so when
the caller is root, the server runs as the unprivileged `postgres` user that the
Debian package creates. Local connections are trusted: no passwords.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

SKIP_REASON = "PostgreSQL is not installed (apt-get install postgresql; CI does)"
SUPERUSER = "postgres"
STARTS = 5  # attempts to find a free port (another process may take the one we picked)


def bin_dir() -> Path | None:
    """The newest installed server binaries (Debian's layout, else $PATH), or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p)] or [0])
        return Path(newest).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _locale() -> str:
    """A non-C default collation if there is one: the schema must not depend on it."""
    try:
        names = subprocess.run(["locale", "-a"], capture_output=True, text=True,
                               check=False).stdout.split()
    except OSError:
        names = []
    return "en_US.UTF-8" if {"en_US.utf8", "en_US.UTF-8"} & set(names) else "C.UTF-8"


@dataclass
class Cluster:
    bin: Path
    folder: Path
    port: int
    os_user: str | None  # who runs the server (None: whoever runs the tests)
    timeout: float

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def pid(self) -> int:
        """The postmaster's process id (its backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def url(self, database: str, password: str | None = None) -> str:
        auth = SUPERUSER if password is None else f"{SUPERUSER}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # As another user, its group too and none of ours: with root's group still on,
        # a folder's group bits, not its others bits, decide whether the server may
        # pass through it.
        user = self.os_user
        return subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.folder,
                              user=user, group=user, extra_groups=None if user is None else [],
                              capture_output=True, text=True, timeout=self.timeout,
                              check=check)

    def sql(self, statements: str, database: str = "postgres") -> str:
        """Run SQL (several statements run as one transaction); return what psql printed."""
        return self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                         "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER,
                         "-d", database, "-c", statements).stdout

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:16]}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", check=False)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _unused_port() -> int:
    # Only a guess: the port is free now, not necessarily when the server binds it,
    # which is why start() tries again when the server reports the port taken.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(timeout: float, parent: Path | None = None) -> Cluster | None:
    """initdb and start a cluster in a new folder in `parent` (default: the system's
    temporary folder); None when PostgreSQL is not installed. When run as root, the
    `postgres` user must be able to pass through `parent`. The caller must stop()
    the cluster, which also removes its folder."""
    binaries = bin_dir()
    if binaries is None:
        return None
    os_user = SUPERUSER if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="dicomhub-pg-", dir=parent))
    if os_user is not None:
        shutil.chown(folder, os_user, os_user)
    cluster = Cluster(binaries, folder, 0, os_user, timeout)
    try:
        # --no-sync skips flushing initdb's own files: a throwaway cluster needs not
        # survive a power cut. The server itself runs with fsync on.
        cluster._run("initdb", "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust",
                     "--encoding=UTF8", f"--locale={_locale()}", "--no-sync")
        log = folder / "server.log"
        for _ in range(STARTS):
            cluster.port = _unused_port()
            options = (f"-c port={cluster.port} -c listen_addresses=127.0.0.1"
                       f" -c unix_socket_directories={folder} -c fsync=on"
                       " -c synchronous_commit=on")
            started = cluster._run("pg_ctl", "start", "-D", str(cluster.data), "-l", str(log),
                                   "-w", "-t", str(int(timeout)), "-o", options, check=False)
            if started.returncode == 0:
                return cluster
            if "already in use" not in log.read_text(errors="replace"):
                raise RuntimeError(f"PostgreSQL did not start:\n{started.stderr}\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
        raise RuntimeError(f"PostgreSQL found no free port in {STARTS} attempts")
    except BaseException:
        cluster.stop()
        raise
