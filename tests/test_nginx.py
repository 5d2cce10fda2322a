"""Two hubs behind nginx, a real WebSocket-capable load balancer, as the README
shows it: watchers and dashboards know one address; when the hub behind their
connection dies, nginx gives the next connection to the other."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from conftest import TIMEOUT, Api, wait_for
from procs import (
    LiveClient,
    Service,
    all_changes,
    config_with_keys,
    drop,
    start_hub,
    start_watcher,
)

pytestmark = pytest.mark.asyncio


def nginx_config(prefix: Path, port: int, upstreams: list[str]) -> Path:
    """The README's configuration, with this test's ports and a private prefix."""
    servers = "\n".join(f"        server {u.removeprefix('http://')} max_fails=1 "
                        "fail_timeout=5s;" for u in upstreams)
    path = prefix / "nginx.conf"
    path.write_text(textwrap.dedent("""\
        daemon off;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        events {{ worker_connections 256; }}
        http {{
            access_log off;
            client_body_temp_path {prefix}/body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            map $http_upgrade $connection_upgrade {{
                default upgrade;
                ''      close;
            }}
            upstream dicomhub {{
        {servers}
            }}
            server {{
                listen 127.0.0.1:{port};
                location / {{
                    proxy_pass http://dicomhub;
                    proxy_http_version 1.1;
                    proxy_set_header Upgrade $http_upgrade;
                    proxy_set_header Connection $connection_upgrade;
                    proxy_set_header Host $host;
                    proxy_read_timeout 1h;
                    proxy_next_upstream error timeout http_502;
                }}
            }}
        }}
        """).format(prefix=prefix, port=port, servers=servers))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def nginx_program() -> AsyncIterator[str]:
    program = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if program is None:
        pytest.skip("nginx is not installed (apt-get install nginx; CI does)")
    yield program


async def test_watchers_and_dashboards_behind_nginx_survive_a_hub(
        tmp_path: Path, services: list[Service], pg_database: str, nginx_program: str) -> None:
    ingest_key, read_key = config_with_keys(tmp_path, f'database = "{pg_database}"')
    hubs = [await start_hub(tmp_path, services, name) for name in ("hubA", "hubB")]
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    config = nginx_config(prefix, port, [url for _, url in hubs])
    balancer = await asyncio.create_subprocess_exec(
        nginx_program, "-p", str(prefix), "-c", str(config), stderr=asyncio.subprocess.PIPE)
    try:
        front = f"http://127.0.0.1:{port}"

        async def listening() -> bool:
            assert balancer.returncode is None, await balancer.stderr.read()  # type: ignore
            try:
                async with aiohttp.ClientSession() as http, \
                        http.get(front + "/api/health") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(listening, "nginx to proxy to the hubs")
        inbox = await start_watcher(tmp_path, services, "w1", [front], ingest_key)
        async with aiohttp.ClientSession() as http:
            client = LiveClient(http, read_key)
            client.follow(front)
            api = Api(http, front, read_key)
            drop(inbox, "a", "1.2.826.0.1.3680043.8.1055.60", 0, 100)

            async def stored(count: int) -> bool:
                return (await api.get("/api/stats"))["instances"] >= count

            await wait_for(lambda: stored(100), "the first series through nginx")
            # Kill the hub holding the watcher's connection (its log says which).
            victim = next(hub for hub, _ in hubs if "connected from" in hub.log.read_text())
            assert await victim.stop(signal.SIGKILL) == -signal.SIGKILL
            drop(inbox, "b", "1.2.826.0.1.3680043.8.1055.60", 1, 100)
            await wait_for(lambda: stored(200), "the second series, through the survivor")
            if client.task is not None and client.task.done():
                client.follow(front)  # its hub was the one killed: resume, as the page does
            log = await all_changes(api)
            seqs = [c["seq"] for c in log]

            async def caught_up() -> bool:
                if client.task is not None and client.task.done():
                    client.follow(front)
                return bool(client.seqs) and client.seqs[-1] >= seqs[-1]

            await wait_for(caught_up, "the live client to reach the end of the log")
            assert client.seqs[:len(seqs)] == seqs  # every change once, in order
            stats = await api.get("/api/stats")
            assert (stats["instances"], stats["files"]) == (200, 200)
    finally:
        if balancer.returncode is None:
            balancer.terminate()
            await asyncio.wait_for(balancer.wait(), TIMEOUT)
