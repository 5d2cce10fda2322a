"""REST reads against a real hub on an ephemeral port, data stored through the real store."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from conftest import Api, RunningHub
from dicomhub.protocol import InstanceRecord, Rejection

pytestmark = pytest.mark.asyncio


def record(n: int, series: str = "1.2.3.1", study: str = "1.2.3", **extra: Any) -> InstanceRecord:
    values: dict[str, Any] = dict(
        path=f"s/{series}/{n}.dcm", size=100 + n, mtime=1700000000.0,
        sop_instance_uid=f"{series}.{n}", series_instance_uid=series, study_instance_uid=study,
        patient_id="P1", patient_name="Doe^Jane", modality="CT", series_number=1,
        instance_number=n)
    values.update(extra)
    return InstanceRecord(**values)


async def _ingest(hub: RunningHub, records: list[Any], watcher: str = "w1") -> None:
    await hub.store.watcher_connected(watcher, "k", "test", "127.0.0.1", 0, time.time())
    await hub.store.ingest(watcher, records, time.time())


async def status_of(http: aiohttp.ClientSession, url: str, key: str | None = None,
                    **headers: str) -> tuple[int, dict[str, Any]]:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_health_is_open(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    status, body = await status_of(http, hub.url + "/api/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("path", ["/api/series", "/api/series/1.2", "/api/studies",
                                  "/api/studies/1.2", "/api/patients", "/api/patients/P1",
                                  "/api/changes", "/api/rejections", "/api/watchers",
                                  "/api/stats"])
async def test_reads_need_a_read_key(hub: RunningHub, http: aiohttp.ClientSession,
                                     path: str) -> None:
    status, body = await status_of(http, hub.url + path)
    assert status == 401 and "Bearer" in body["message"]
    status, body = await status_of(http, hub.url + path, "dhk_" + "x" * 43)
    assert status == 401 and body["message"] == "unknown or revoked key"
    status, _ = await status_of(http, hub.url + path, "not-even-a-key")
    assert status == 401
    status, body = await status_of(http, hub.url + path, await hub.key("ingest"))
    assert status == 403 and "'read'" in body["message"]
    for role in ("read", "admin"):
        status, _ = await status_of(http, hub.url + path, await hub.key(role))
        assert status in (200, 404)


async def test_401_says_how_to_authenticate(hub: RunningHub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.url + "/api/series") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.content_type == "application/json"


async def test_revoked_key_is_refused_at_once(hub: RunningHub,
                                              http: aiohttp.ClientSession) -> None:
    key = await hub.key("read", name="temp")
    assert (await status_of(http, hub.url + "/api/series", key))[0] == 200
    assert await hub.store.revoke_key("temp", time.time())
    assert (await status_of(http, hub.url + "/api/series", key))[0] == 401


async def test_ingest_websocket_refuses_read_key(hub: RunningHub,
                                                 http: aiohttp.ClientSession) -> None:
    key = await hub.key("read")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(hub.ws_url, headers={"Authorization": f"Bearer {key}"})
    assert info.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(hub.ws_url)
    assert info.value.status == 401


async def test_series_list_detail_and_counts(hub: RunningHub, api: Api) -> None:
    await _ingest(hub, [record(n) for n in range(1, 4)]
                  + [record(1, series="1.2.3.2", modality="MR")])
    page = await api.get("/api/series")
    assert page["next_cursor"] is None
    by_uid = {s["series_instance_uid"]: s for s in page["items"]}
    assert by_uid["1.2.3.1"]["instance_count"] == 3
    assert by_uid["1.2.3.2"]["instance_count"] == 1
    item = by_uid["1.2.3.1"]
    for key in ("series_instance_uid", "study_instance_uid", "patient_id", "patient_name",
                "modality", "series_number", "series_description", "instance_count",
                "status", "first_seen", "last_seen"):
        assert key in item
    assert item["status"] == "receiving" and item["patient_name"] == "Doe^Jane"
    assert item["first_seen"].endswith("Z") and "T" in item["first_seen"]
    detail = await api.get("/api/series/1.2.3.1")
    assert [i["sop_instance_uid"] for i in detail["instances"]] == [
        "1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"]
    assert detail["instances"][0]["path"] == "s/1.2.3.1/1.dcm"


async def test_series_filters(hub: RunningHub, api: Api) -> None:
    await _ingest(hub, [record(1), record(1, series="2.1", study="2", patient_id="P2",
                                           modality="MR")])
    assert [s["series_instance_uid"] for s in
            (await api.get("/api/series", modality="MR"))["items"]] == ["2.1"]
    assert [s["series_instance_uid"] for s in
            (await api.get("/api/series", patient_id="P1"))["items"]] == ["1.2.3.1"]
    assert [s["series_instance_uid"] for s in
            (await api.get("/api/series", study_instance_uid="2"))["items"]] == ["2.1"]
    assert len((await api.get("/api/series", status="receiving"))["items"]) == 2
    assert (await api.get("/api/series", status="stable"))["items"] == []


async def test_paging_visits_every_series_once(hub: RunningHub, api: Api) -> None:
    await _ingest(hub, [record(1, series=f"9.{n}") for n in range(25)])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = await api.get("/api/series", **params)
        seen += [s["series_instance_uid"] for s in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 4 and sorted(seen) == sorted(f"9.{n}" for n in range(25))
    assert len(set(seen)) == 25


@pytest.mark.parametrize("query, word", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=abc", "limit"),
    ("cursor=garbage!", "cursor"), ("status=done", "status"), ("colour=red", "colour"),
    ("modality=CT&modality=MR", "modality"), ("patient_id=", "patient_id"),
])
async def test_bad_parameters_are_400_with_a_message(hub: RunningHub, api: Api,
                                                     http: aiohttp.ClientSession,
                                                     query: str, word: str) -> None:
    status, body = await status_of(http, f"{hub.url}/api/series?{query}", api.key)
    assert status == 400 and word in body["message"]


@pytest.mark.parametrize("url", ["/api/changes?since=-1", "/api/changes?since=x",
                                 "/api/changes?limit=0", "/api/rejections?limit=x",
                                 "/api/studies?bogus=1", "/api/watchers?x=1",
                                 "/api/series/1.2?x=1"])
async def test_other_bad_parameters(hub: RunningHub, api: Api, http: aiohttp.ClientSession,
                                    url: str) -> None:
    status, body = await status_of(http, hub.url + url, api.key)
    assert status == 400 and body["message"]


async def test_unknown_things_are_404_json(hub: RunningHub, api: Api,
                                           http: aiohttp.ClientSession) -> None:
    for path in ("/api/series/9.9", "/api/studies/9.9", "/api/patients/nobody"):
        status, body = await status_of(http, hub.url + path, api.key)
        assert status == 404 and body["error"] == "notfound"
    status, body = await status_of(http, hub.url + "/api/nothing-here", api.key)
    assert status == 404 and body["message"]


async def test_studies_and_patients(hub: RunningHub, api: Api) -> None:
    await _ingest(hub, [record(1), record(2), record(1, series="1.2.3.9", modality="MR"),
                        record(1, series="5.1", study="5", patient_id="A/B^C", modality="US")])
    study = await api.get("/api/studies/1.2.3")
    assert study["series_count"] == 2 and study["instance_count"] == 3
    assert study["modalities"] == ["CT", "MR"]
    assert {s["series_instance_uid"] for s in study["series"]} == {"1.2.3.1", "1.2.3.9"}
    patients = await api.all("/api/patients")
    assert {p["patient_id"] for p in patients} == {"P1", "A/B^C"}
    # A Patient ID with '/' in it is reachable, percent-encoded.
    patient = await api.get("/api/patients/A%2FB%5EC")
    assert patient["patient_id"] == "A/B^C" and [s["study_instance_uid"]
                                                  for s in patient["studies"]] == ["5"]
    assert [s["study_instance_uid"] for s in
            (await api.get("/api/studies", patient_id="P1"))["items"]] == ["1.2.3"]


async def test_rejections_changes_watchers_stats(hub: RunningHub, api: Api) -> None:
    await _ingest(hub, [record(1), Rejection(path="junk.dcm", size=3, mtime=1.0,
                                             reason="not_dicom", detail="no DICOM")])
    rejections = await api.get("/api/rejections")
    assert [(r["path"], r["reason"], r["watcher_id"]) for r in rejections["items"]] == [
        ("junk.dcm", "not_dicom", "w1")]
    assert rejections["items"][0]["time"].endswith("Z")
    changes = await api.get("/api/changes", since=0)
    kinds = [c["kind"] for c in changes["changes"]]
    assert kinds == ["watcher.connected", "instance.rejected", "series.created"]
    assert [c["seq"] for c in changes["changes"]] == sorted(c["seq"] for c in changes["changes"])
    assert changes["last"] == changes["changes"][-1]["seq"] and changes["done"]
    later = await api.get("/api/changes", since=changes["last"])
    assert later == {"changes": [], "last": changes["last"], "done": True}
    first = await api.get("/api/changes", since=0, limit=1)
    assert len(first["changes"]) == 1 and not first["done"]
    watchers = (await api.get("/api/watchers"))["items"]
    assert watchers[0]["watcher_id"] == "w1" and watchers[0]["instances"] == 1
    stats = await api.get("/api/stats")
    assert stats["instances"] == 1 and stats["rejections"] == 1 and stats["series"] == 1


async def test_dashboard_page_is_served_with_security_headers(
        hub: RunningHub, http: aiohttp.ClientSession) -> None:
    async with http.get(hub.url + "/") as resp:
        assert resp.status == 200 and "dicomhub" in await resp.text()
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with http.get(hub.url + "/app.js") as resp:
        assert resp.status == 200 and resp.content_type == "text/javascript"


async def test_lists_page_newest_first_on_request(hub: RunningHub, api: Api,
                                                  http: aiohttp.ClientSession) -> None:
    await _ingest(hub, [Rejection(path=f"junk{n}.dcm", size=1, mtime=1.0, reason="not_dicom")
                        for n in range(5)])
    first = await api.get("/api/rejections", order="desc", limit=2)
    assert [r["path"] for r in first["items"]] == ["junk4.dcm", "junk3.dcm"]
    rest = await api.get("/api/rejections", order="desc", limit=10, cursor=first["next_cursor"])
    assert [r["path"] for r in rest["items"]] == ["junk2.dcm", "junk1.dcm", "junk0.dcm"]
    status, body = await status_of(http, f"{hub.url}/api/rejections?order=up", api.key)
    assert status == 400 and "order" in body["message"]


async def test_wrong_method_is_a_json_405_with_allow(hub: RunningHub, api: Api,
                                                     http: aiohttp.ClientSession) -> None:
    async with http.post(hub.url + "/api/series",
                         headers={"Authorization": f"Bearer {api.key}"}) as resp:
        assert resp.status == 405 and "GET" in resp.headers["Allow"]
        assert (await resp.json())["error"] == "methodnotallowed"
