"""The live feed, long polls, ETags and dashboard sessions, on a real hub."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from conftest import TIMEOUT, Api, RunningHub, wait_for
from dicomhub.protocol import InstanceRecord

pytestmark = pytest.mark.asyncio


def record(n: int, series: str = "6.1") -> InstanceRecord:
    return InstanceRecord(path=f"{series}/{n}.dcm", size=1, mtime=1.0,
                          sop_instance_uid=f"{series}.{n}", series_instance_uid=series,
                          study_instance_uid="6", patient_id="P6", modality="MR")


async def ingest(hub: RunningHub, *records: InstanceRecord) -> None:
    """Store through the real store and publish, as the ingest endpoint does."""
    from hub.ingest import PUBLISH

    result = await hub.store.ingest("w", list(records), time.time())
    hub.runner.app[PUBLISH](result.changes)


async def changes_until(ws: aiohttp.ClientWebSocketResponse, seq: int) -> list[dict[str, Any]]:
    """Collect change messages (skipping stats) until one with `seq` arrives."""
    got: list[dict[str, Any]] = []
    while not got or got[-1].get("seq", 0) < seq:
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["kind"] not in ("stats", "live"):
            got.append(data)
    return got


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_replay_then_live_without_gap_or_duplicate_across_a_reconnect(
        hub: RunningHub, api: Api, http: aiohttp.ClientSession) -> None:
    for n in range(1, 6):
        await ingest(hub, record(n))
    ws = await http.ws_connect(hub.url + "/ws/live?since=0", headers=bearer(api.key))
    first = await changes_until(ws, 5)
    assert [c["seq"] for c in first] == [1, 2, 3, 4, 5]
    assert first[0]["kind"] == "series.created" and first[-1]["instance_count"] == 5
    await ingest(hub, record(6))
    live = await changes_until(ws, 6)
    assert [c["seq"] for c in live] == [6]
    await ws.close()
    # Changes keep coming while the client is away; it resumes from its last seq.
    for n in range(7, 10):
        await ingest(hub, record(n))
    ws = await http.ws_connect(hub.url + "/ws/live?since=6", headers=bearer(api.key))

    async def more() -> None:  # and some arrive during the replay itself
        for n in range(10, 30):
            await ingest(hub, record(n))

    writer = asyncio.create_task(more())
    resumed = await changes_until(ws, 29)
    await writer
    assert [c["seq"] for c in resumed] == list(range(7, 30))
    assert resumed[-1]["instance_count"] == 29
    await ws.close()


async def test_no_since_means_live_only(hub: RunningHub, api: Api,
                                        http: aiohttp.ClientSession) -> None:
    await ingest(hub, record(1))
    ws = await http.ws_connect(hub.url + "/ws/live", headers=bearer(api.key))
    hello = json.loads((await ws.receive()).data)
    assert hello == {"kind": "live", "last_seq": 1}
    await ingest(hub, record(2))
    assert [c["seq"] for c in await changes_until(ws, 2)] == [2]
    await ws.close()


async def test_stats_arrive_about_once_a_second(hub: RunningHub, api: Api,
                                                http: aiohttp.ClientSession) -> None:
    await hub.store.watcher_connected("w", "k", "", "", 7, time.time())
    ws = await http.ws_connect(hub.url + "/ws/live", headers=bearer(api.key))
    await ingest(hub, record(1), record(2))
    await hub.store.watcher_backlog("w", 7, time.time())
    while True:
        data = json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
        if data["kind"] == "stats":
            break
    assert data["instances"] == 2 and data["files_per_second"] >= 0
    assert data["watchers"][0]["watcher_id"] == "w" and data["watchers"][0]["backlog"] == 7
    await ws.close()


async def test_a_slow_client_is_cut_off_and_the_others_get_everything(
        hub: RunningHub, api: Api, http: aiohttp.ClientSession) -> None:
    from hub import feed as feed_module
    from hub.live import FEED_KEY
    from hub.store import Change

    # A slow reader: a raw socket with a tiny receive buffer that completes the
    # handshake and then never reads.
    host, port = hub.url.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((host, int(port)))
    slow.sendall((f"GET /ws/live HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {api.key}\r\n\r\n"
                  ).encode())
    normal = await http.ws_connect(hub.url + "/ws/live", headers=bearer(api.key))
    feed = hub.runner.app[FEED_KEY]
    await wait_for(lambda: _async(len(feed.clients) == 2), "both clients to subscribe")
    # Far more than the queue bound plus what the kernel buffers can hold.
    total, padding = feed_module.QUEUE_LIMIT + 5000, "x" * 4_000
    seen: list[int] = []

    async def read_all() -> None:
        while not seen or seen[-1] < total:
            data = json.loads((await asyncio.wait_for(normal.receive(), TIMEOUT)).data)
            if "seq" in data:
                seen.append(data["seq"])

    reader = asyncio.create_task(read_all())
    for seq in range(1, total + 1):
        feed.publish([Change(seq, time.time(), "series.updated", {"padding": padding})])
        while seq - len(seen) > 200:  # a normal client keeps up; the slow one never reads
            await asyncio.sleep(0.001)
    await reader
    assert seen == list(range(1, total + 1))  # the normal client lost nothing
    await wait_for(lambda: _async(len(feed.clients) == 1), "the slow client to be cut off")
    slow.close()
    await normal.close()


async def _async(value: bool) -> bool:
    return value


async def test_long_poll_returns_as_soon_as_a_change_exists(
        hub: RunningHub, api: Api, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    empty = await api.get("/api/changes", since=0, wait=1)
    assert empty["changes"] == [] and time.monotonic() - started >= 0.9
    poll = asyncio.create_task(api.get("/api/changes", since=0, wait=60))
    await asyncio.sleep(0)  # let the poll reach the hub before the change
    await ingest(hub, record(1))
    answer = await asyncio.wait_for(poll, 30)
    assert [c["seq"] for c in answer["changes"]] == [1]
    # A change that already exists answers at once.
    started = time.monotonic()
    assert (await api.get("/api/changes", since=0, wait=60))["last"] == 1
    assert time.monotonic() - started < 30


async def test_lists_send_etags_and_answer_304(hub: RunningHub, api: Api,
                                               http: aiohttp.ClientSession) -> None:
    await ingest(hub, record(1))
    async with http.get(hub.url + "/api/series", headers=bearer(api.key)) as resp:
        tag = resp.headers["ETag"]
    headers = {**bearer(api.key), "If-None-Match": tag}
    async with http.get(hub.url + "/api/series", headers=headers) as resp:
        assert resp.status == 304 and resp.headers["ETag"] == tag
    await ingest(hub, record(2))
    async with http.get(hub.url + "/api/series", headers=headers) as resp:
        assert resp.status == 200 and resp.headers["ETag"] != tag


async def test_dashboard_session_cookie(hub: RunningHub, api: Api) -> None:
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for an IP-address host
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.post(hub.url + "/api/session", json={"key": "dhk_" + "x" * 43}) as r:
            assert r.status == 401
        async with browser.post(hub.url + "/api/session",
                                json={"key": await hub.key("ingest")}) as r:
            assert r.status == 403
        async with browser.post(hub.url + "/api/session", json={"key": api.key}) as r:
            assert r.status == 200
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        async with browser.get(hub.url + "/api/series") as r:
            assert r.status == 200
        origin = {"Origin": hub.url}
        ws = await browser.ws_connect(hub.url + "/ws/live", headers=origin)
        assert json.loads((await ws.receive()).data)["kind"] == "live"
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await browser.ws_connect(hub.url + "/ws/live",
                                     headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403
        async with browser.delete(hub.url + "/api/session", headers=origin) as r:
            assert r.status == 204
        async with browser.get(hub.url + "/api/series") as r:
            assert r.status == 401
        ws = await browser.ws_connect(hub.url + "/ws/live", headers=origin)
        closed = await ws.receive()
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4401


async def test_one_time_login_link_and_revocation(hub: RunningHub) -> None:
    from hub.session import new_login_link

    await hub.key("read", name="desk")
    token = await new_login_link(hub.store, "desk")
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.get(f"{hub.url}/login?token={token}", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
        async with browser.get(hub.url + "/api/session") as r:
            assert r.status == 200 and (await r.json())["name"] == "desk"
        assert await hub.store.revoke_key("desk", time.time())
        async with browser.get(hub.url + "/api/session") as r:
            assert r.status == 401  # revoking the key ends its sessions
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        async with other.get(f"{hub.url}/login?token={token}", allow_redirects=False) as r:
            assert r.headers["Location"] == "/#link-expired"  # used once already
        async with other.get(hub.url + "/api/session") as r:
            assert r.status == 401


async def test_ingest_never_accepts_a_session_cookie(hub: RunningHub) -> None:
    admin = await hub.key("admin")
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.post(hub.url + "/api/session", json={"key": admin}) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await browser.ws_connect(hub.ws_url, headers={"Origin": hub.url})
        assert refused.value.status == 401


async def test_revoking_a_key_closes_its_open_live_connections(
        hub: RunningHub, http: aiohttp.ClientSession) -> None:
    key = await hub.key("read", name="temporary")
    ws = await http.ws_connect(hub.url + "/ws/live", headers=bearer(key))
    assert json.loads((await ws.receive()).data)["kind"] == "live"
    assert await hub.store.revoke_key("temporary", time.time())
    while True:
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401


async def test_a_listed_origin_may_use_a_session(tmp_path) -> None:
    from conftest import start_hub

    hub = await start_hub(tmp_path, allowed_origins=("https://dicomhub.example",))
    try:
        key = await hub.key("read")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.post(hub.url + "/api/session", json={"key": key}) as r:
                assert r.status == 200
            ws = await browser.ws_connect(hub.url + "/ws/live",
                                          headers={"Origin": "https://dicomhub.example"})
            assert json.loads((await ws.receive()).data)["kind"] == "live"
            await ws.close()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await browser.ws_connect(hub.url + "/ws/live",
                                         headers={"Origin": "https://other.example"})
            assert refused.value.status == 403
    finally:
        await hub.stop()
