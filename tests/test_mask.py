"""Masked patient display: the pure masking, then a hub configured for it."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest

from conftest import Api, start_hub
from dicomhub.protocol import InstanceRecord
from hub.mask import initials, mask, masked_id

SECRET = b"k" * 32


def test_initials_read_the_alphabetic_group() -> None:
    assert initials("Doe^John^^Dr") == "J.D."
    assert initials("Yamada^Tarou=山田^太郎=やまだ^たろう") == "T.Y."
    assert initials("doe") == "D."
    assert initials("") == "" and initials("^^") == ""


def test_masked_ids_are_stable_keyed_and_distinct() -> None:
    assert masked_id("P1", SECRET) == masked_id("P1", SECRET)
    assert masked_id("P1", SECRET) != masked_id("P2", SECRET)
    assert masked_id("P1", SECRET) != masked_id("P1", b"other secret")
    assert masked_id("P1", SECRET).startswith("anon-") and "P1" not in masked_id("P1", SECRET)
    assert masked_id("", SECRET) == ""


def test_mask_reaches_every_depth() -> None:
    value = {"patient_id": "P1", "patient_name": "Doe^Jane", "patient_birth_date": "19700101",
             "studies": [{"patient_id": "P1", "patient_name": "Doe^Jane", "x": 1}]}
    masked = mask(value, SECRET)
    text = json.dumps(masked)
    assert "Doe" not in text and "P1" not in text and "1970" not in text
    assert masked["studies"][0]["x"] == 1 and masked["patient_name"] == "J.D."


@pytest.mark.asyncio
async def test_read_role_sees_masked_patients_and_admin_sees_all(tmp_path) -> None:
    hub = await start_hub(tmp_path, phi_display="masked")
    try:
        record = InstanceRecord(path="a", size=1, mtime=1.0, sop_instance_uid="5.1.1",
                                series_instance_uid="5.1", study_instance_uid="5",
                                patient_id="MRN-778899", patient_name="Doe^Jane",
                                patient_birth_date="19700101")
        async with aiohttp.ClientSession() as http:
            reader = Api(http, hub.url, await hub.key("read"))
            admin = Api(http, hub.url, await hub.key("admin"))
            ws = await http.ws_connect(hub.url + "/ws/live?since=0",
                                       headers={"Authorization": f"Bearer {reader.key}"})
            from hub.ingest import PUBLISH
            result = await hub.store.ingest("w", [record], time.time())
            hub.runner.app[PUBLISH](result.changes)

            seen = []
            for path in ("/api/series", "/api/studies", "/api/patients", "/api/changes",
                         "/api/series/5.1", "/api/studies/5"):
                seen.append(json.dumps(await reader.get(path), ensure_ascii=False))
            while True:
                message = json.loads((await ws.receive()).data)
                if message.get("kind") == "series.created":
                    seen.append(json.dumps(message, ensure_ascii=False))
                    break
            await ws.close()
            everything = "\n".join(seen)
            assert "MRN-778899" not in everything and "Doe" not in everything
            assert "19700101" not in everything
            assert "J.D." in everything and "anon-" in everything

            series = (await admin.get("/api/series"))["items"][0]
            assert (series["patient_id"], series["patient_name"]) == ("MRN-778899", "Doe^Jane")
            for url in ("/api/series?patient_id=MRN-778899", "/api/patients/MRN-778899"):
                async with http.get(hub.url + url,
                                    headers={"Authorization": f"Bearer {reader.key}"}) as r:
                    assert r.status == 403  # no probing for real IDs behind the mask
            assert (await admin.get("/api/patients/MRN-778899"))["patient_name"] == "Doe^Jane"
    finally:
        await hub.stop()
