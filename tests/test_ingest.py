"""The ingest WebSocket, spoken to directly with the `websockets` client the watcher uses."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import TIMEOUT, Api, RunningHub, start_hub
from dicomhub.protocol import PROTOCOL_VERSION

pytestmark = pytest.mark.asyncio


def instance(n: int, series: str = "7.1", **extra: Any) -> dict[str, Any]:
    return {"kind": "instance", "path": f"a/{n}.dcm", "size": 10, "mtime": 1.5,
            "sop_instance_uid": f"{series}.{n}", "series_instance_uid": series,
            "study_instance_uid": "7", "patient_id": "P7", "modality": "CT", **extra}


@asynccontextmanager
async def session(hub: RunningHub, key: str, watcher_id: str = "wtest",
                  protocol: int = PROTOCOL_VERSION) -> AsyncIterator[ClientConnection]:
    async with connect(hub.ws_url, additional_headers={"Authorization": f"Bearer {key}"},
                       proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "watcher_id": watcher_id,
                                  "protocol": protocol}))
        yield ws


async def reply(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await ws.recv())


async def send_batch(ws: ClientConnection, batch_id: int, records: list[dict[str, Any]]) -> dict:
    await ws.send(json.dumps({"type": "batch", "batch_id": batch_id, "records": records}))
    return await reply(ws)


async def test_batch_is_acknowledged_after_storing(hub: RunningHub, api: Api) -> None:
    async with session(hub, await hub.key("ingest")) as ws:
        assert (await reply(ws))["type"] == "welcome"
        ack = await send_batch(ws, 5, [instance(1), instance(2)])
        assert ack == {"type": "ack", "batch_id": 5, "stored": 2, "duplicates": 0, "rejected": 0}
        # Acknowledged means committed: a reader sees it at once.
        series = await api.get("/api/series/7.1")
        assert series["instance_count"] == 2


async def test_same_instance_from_two_watchers_counts_once(hub: RunningHub, api: Api) -> None:
    async with session(hub, await hub.key("ingest"), "wa") as a, \
            session(hub, await hub.key("ingest"), "wb") as b:
        await reply(a), await reply(b)
        assert (await send_batch(a, 1, [instance(1), instance(2)]))["stored"] == 2
        again = await send_batch(b, 1, [instance(1), instance(2), instance(3)])
        assert (again["stored"], again["duplicates"]) == (1, 2)
        resend = await send_batch(a, 2, [instance(1)])
        assert (resend["stored"], resend["duplicates"]) == (0, 1)
    assert (await api.get("/api/series/7.1"))["instance_count"] == 3
    assert (await api.get("/api/stats"))["instances"] == 3
    assert (await api.get("/api/stats"))["files"] == 5  # every file known, once per watcher


async def test_same_sop_uid_in_another_series_is_a_visible_conflict(hub: RunningHub,
                                                                    api: Api) -> None:
    async with session(hub, await hub.key("ingest")) as ws:
        await reply(ws)
        await send_batch(ws, 1, [instance(1)])
        clash = instance(1, series="8.1")
        clash["sop_instance_uid"] = "7.1.1"
        clash["path"] = "other/1.dcm"
        ack = await send_batch(ws, 2, [clash])
        assert (ack["stored"], ack["rejected"]) == (0, 1)
    rejection = (await api.get("/api/rejections"))["items"][0]
    assert rejection["reason"] == "conflict" and rejection["path"] == "other/1.dcm"
    assert "7.1" in rejection["detail"]


@pytest.mark.parametrize("frame, field", [
    ("not json", "JSON"),
    ('{"type": "batch", "batch_id": 1, "records": []}', "records"),
    ('{"type": "batch", "batch_id": 1, "records": [{"kind": "instance", "path": "a",'
     ' "size": 1, "mtime": 1}]}', "records[0].sop_instance_uid"),
    ('{"type": "batch", "batch_id": -4, "records": [1]}', "batch_id"),
    ('{"type": "launch"}', "type"),
    ('[1, 2]', "message"),
])
async def test_malformed_frames_get_an_error_and_change_nothing(
        hub: RunningHub, api: Api, frame: str, field: str) -> None:
    async with session(hub, await hub.key("ingest")) as ws:
        await reply(ws)
        await ws.send(frame)
        error = await reply(ws)
        assert error["type"] == "error" and field in error["message"]
        assert error["fatal"] is False
        # The connection is still good for real work.
        assert (await send_batch(ws, 9, [instance(1)]))["type"] == "ack"
    assert (await api.get("/api/stats"))["instances"] == 1


async def test_one_bad_connection_does_not_disturb_another(hub: RunningHub, api: Api) -> None:
    async with session(hub, await hub.key("ingest"), "good") as good:
        await reply(good)
        async with connect(hub.ws_url, proxy=None, additional_headers={
                "Authorization": f"Bearer {await hub.key('ingest')}"}) as bad:
            await bad.send(b"\x00\x01binary")
            error = await reply(bad)
            assert error["fatal"] is True  # no hello: the bad one is closed
            with pytest.raises(ConnectionClosed):
                await bad.recv()
        assert (await send_batch(good, 1, [instance(1)]))["stored"] == 1


async def test_wrong_protocol_version_is_refused_with_a_reason(hub: RunningHub) -> None:
    async with session(hub, await hub.key("ingest"), protocol=PROTOCOL_VERSION + 1) as ws:
        error = await reply(ws)
        assert error["fatal"] and f"version {PROTOCOL_VERSION + 1}" in error["message"]
        with pytest.raises(ConnectionClosed):
            await ws.recv()


async def test_handshake_needs_an_ingest_key(hub: RunningHub) -> None:
    for key, status in ((None, 401), ("dhk_" + "a" * 43, 401),
                        (await hub.key("read"), 403)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with pytest.raises(InvalidStatus) as info:
            async with connect(hub.ws_url, additional_headers=headers, proxy=None):
                pass
        assert info.value.response.status_code == status


async def test_watcher_appears_connected_then_disconnected(hub: RunningHub, api: Api) -> None:
    async with session(hub, await hub.key("ingest", name="site-a"), "scanner-1") as ws:
        await reply(ws)
        await ws.send(json.dumps({"type": "batch", "batch_id": 1, "backlog": 42,
                                  "records": [instance(1)]}))
        await reply(ws)
        watcher = (await api.get("/api/watchers"))["items"][0]
        assert watcher["connected"] and watcher["key_name"] == "site-a"
        assert watcher["backlog"] == 42 and watcher["instances"] == 1
        await ws.send(json.dumps({"type": "status", "backlog": 7}))  # no reply expected

        async def updated() -> bool:
            return bool((await api.get("/api/watchers"))["items"][0]["backlog"] == 7)

        from conftest import wait_for
        await wait_for(updated, "the status to update the backlog")

    async def disconnected() -> bool:
        return not (await api.get("/api/watchers"))["items"][0]["connected"]

    await wait_for(disconnected, "the hub to notice the watcher left")
    kinds = [c["kind"] for c in (await api.get("/api/changes"))["changes"]]
    assert kinds[0] == "watcher.connected" and kinds[-1] == "watcher.disconnected"


async def test_a_client_that_keeps_sending_garbage_is_closed(hub: RunningHub, api: Api) -> None:
    from hub.ingest import MAX_VIOLATIONS

    async with session(hub, await hub.key("ingest")) as ws:
        await reply(ws)
        for _ in range(MAX_VIOLATIONS):
            await ws.send("garbage")
            assert (await reply(ws))["fatal"] is False
        await ws.send("garbage")
        last = await reply(ws)
        assert last["fatal"] is True and "malformed" in last["message"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    async with session(hub, await hub.key("ingest"), "other") as ws:  # others unaffected
        await reply(ws)
        assert (await send_batch(ws, 1, [instance(1)]))["stored"] == 1


async def test_a_flooding_client_is_closed(hub: RunningHub,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from hub import ingest as ingest_module

    # The real limit (100 a second) is far above what a test can send reliably
    # faster than the hub stores batches; a low one shows the mechanism.
    monkeypatch.setattr(ingest_module, "MAX_FRAMES_PER_SECOND", 1)
    monkeypatch.setattr(ingest_module, "FRAME_BURST", 5)
    async with session(hub, await hub.key("ingest")) as ws:
        await reply(ws)
        frames = []
        with pytest.raises(ConnectionClosed):
            for n in range(50):
                await ws.send(json.dumps({"type": "batch", "batch_id": n,
                                          "records": [instance(1)]}))
            while True:
                frames.append(json.loads(await ws.recv()))
        assert frames[-1]["fatal"] is True and "a second" in frames[-1]["message"]
        assert len([f for f in frames if f["type"] == "ack"]) <= 6


async def test_revoking_an_ingest_key_closes_its_connection(hub: RunningHub) -> None:
    async with session(hub, await hub.key("ingest", name="scanner-7")) as ws:
        await reply(ws)
        assert await hub.store.revoke_key("scanner-7", time.time())
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_batch_stored_for_a_watcher_that_vanished_still_counts(
        tmp_path: Path, api: Api) -> None:
    """The watcher dies between its batch and the ack (a kill, a network cut): the
    batch is committed all the same, so its series must still be announced live
    and become stable, even though the ack can no longer be sent."""
    hub = await start_hub(tmp_path / "quick", stable_after=0.2)
    try:
        async with aiohttp.ClientSession() as http:
            live = await http.ws_connect(f"{hub.url}/ws/live",
                                         headers={"Authorization":
                                                  f"Bearer {await hub.key('read')}"})
            assert json.loads((await live.receive()).data)["kind"] == "live"
            async with session(hub, await hub.key("ingest")) as ws:
                assert (await reply(ws))["type"] == "welcome"
                await ws.send(json.dumps({"type": "batch", "batch_id": 1,
                                          "records": [instance(1, series="7.9")]}))
                ws.transport.abort()  # gone before the hub can answer
            kinds: list[str] = []
            async with asyncio.timeout(TIMEOUT):
                while "series.stable" not in kinds:
                    data = json.loads((await live.receive()).data)
                    if data.get("series_instance_uid") == "7.9":
                        kinds.append(data["kind"])
            assert kinds == ["series.created", "series.stable"]
            await live.close()
    finally:
        await hub.stop()
