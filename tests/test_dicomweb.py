"""QIDO-RS through a real third-party client (dicomweb-client) against a running hub.

Files are built here with pydicom for exact cases, and the public samples are
checked against what pydicom itself reads from them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from pydicom.filereader import read_partial
import pytest
from dicomweb_client.api import DICOMwebClient
from requests.exceptions import HTTPError

import factory
from conftest import REPO, TIMEOUT, Api, RunningHub, manifest, start_hub, wait_for
from hub import schema

pytestmark = pytest.mark.asyncio

STUDY = "0020000D"
SERIES = "0020000E"
SOP = "00080018"


def client(hub: RunningHub, key: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{hub.url}/dicomweb", headers={"Authorization": f"Bearer {key}"})


async def call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """dicomweb-client is synchronous; the hub runs on this test's event loop."""
    return await asyncio.to_thread(fn, **kwargs)


def value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value", [])
    return values[0] if len(values) == 1 else values or None


def by(items: list[dict[str, Any]], tag: str = STUDY) -> list[dict[str, Any]]:
    """Results in the order of one attribute (the hub answers in the order it indexed,
    which parallel parsing does not fix)."""
    return sorted(items, key=lambda item: value(item, tag))


def uids(items: list[dict[str, Any]], tag: str = STUDY) -> list[str]:
    return [value(item, tag) for item in items]


async def settle_all(api: Api, count: int) -> None:
    async def done() -> bool:
        stats = await api.get("/api/stats")
        return stats["files"] + stats["rejections"] >= count

    await wait_for(done, f"{count} files to be indexed or rejected")


# A corpus built for the exact cases ---------------------------------------------------

YAMADA = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def build_corpus(folder: Path) -> dict[str, dict[str, Any]]:
    """Three patients, three studies, four series; returns the studies by name."""
    studies = {
        "S1": dict(StudyInstanceUID="1.2.826.0.1.3680043.8.1055.1.1", PatientID="PA",
                   PatientName=YAMADA, PatientBirthDate="19700101", PatientSex="M",
                   StudyDate="20200105", StudyTime="101530", AccessionNumber="ACC-1",
                   StudyDescription="Chest", ReferringPhysicianName="Who^Doctor",
                   SpecificCharacterSet="ISO_IR 192"),
        "S2": dict(StudyInstanceUID="1.2.826.0.1.3680043.8.1055.1.2", PatientID="PB",
                   PatientName="Doe^John", PatientBirthDate="19800202", PatientSex="M",
                   StudyDate="20211231", StudyTime="235900", AccessionNumber="ACC-2",
                   StudyDescription="Head", ReferringPhysicianName=""),
        "S3": dict(StudyInstanceUID="1.2.826.0.1.3680043.8.1055.1.3", PatientID="PC",
                   PatientName="Smith^Anna", PatientBirthDate="19900303", PatientSex="F",
                   StudyDate="20230615", StudyTime="080000", AccessionNumber="ACC-3",
                   StudyDescription="Knee", ReferringPhysicianName=""),
    }
    series = [("S1", "1", "CT", 3), ("S1", "2", "MR", 2), ("S2", "1", "MR", 4),
              ("S3", "1", "US", 1)]
    for study, number, modality, count in series:
        attrs = studies[study]
        for n in range(count):
            factory.write(folder / study / number / f"{n}.dcm", pixels=16, **attrs,
                          SeriesInstanceUID=f"{attrs['StudyInstanceUID']}.{number}",
                          SeriesNumber=int(number), Modality=modality, InstanceNumber=n + 1,
                          SeriesDescription=f"{modality} series",
                          PerformedProcedureStepStartDate=attrs["StudyDate"],
                          PerformedProcedureStepStartTime="0900")
    return studies


@pytest.fixture
async def corpus(hub: RunningHub, api: Api, run_watcher,
                 tmp_path: Path) -> dict[str, dict[str, Any]]:
    studies = build_corpus(tmp_path / "inbox-w1")
    await run_watcher(hub)
    await settle_all(api, 10)
    return studies


@pytest.fixture
async def web(hub: RunningHub) -> DICOMwebClient:
    return client(hub, await hub.key("read"))


async def test_studies_carry_the_required_attributes(corpus: dict[str, Any],
                                                     web: DICOMwebClient) -> None:
    found = by(await call(web.search_for_studies))
    assert uids(found) == [corpus[s]["StudyInstanceUID"] for s in ("S1", "S2", "S3")]
    s1 = found[0]
    assert s1["00100010"] == {"vr": "PN", "Value": [{
        "Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]}
    assert value(s1, "00100020") == "PA" and value(s1, "00100030") == "19700101"
    assert value(s1, "00100040") == "M" and value(s1, "00080050") == "ACC-1"
    assert value(s1, "00080020") == "20200105" and value(s1, "00080030") == "101530"
    assert s1["00080090"] == {"vr": "PN", "Value": [{"Alphabetic": "Who^Doctor"}]}
    assert s1["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert value(s1, "00201206") == 2 and value(s1, "00201208") == 5
    assert value(s1, "00081030") == "Chest"
    assert found[1]["00080090"] == {"vr": "PN"}  # empty: present, without a Value
    assert "00081190" not in s1  # no RetrieveURL: the hub serves no instances


@pytest.mark.parametrize(("filters", "expected"), [
    ({"PatientID": "PB"}, ["S2"]),
    ({"00100020": "PC"}, ["S3"]),
    ({"PatientName": "Yam*"}, ["S1"]),
    ({"PatientName": "山田^太郎"}, ["S1"]),
    ({"PatientName": "?mith*"}, ["S3"]),
    ({"StudyDate": "20200101-20211231"}, ["S1", "S2"]),
    ({"StudyDate": "-20201231"}, ["S1"]),
    ({"StudyDate": "20211231-"}, ["S2", "S3"]),
    ({"StudyTime": "0800-1200"}, ["S1", "S3"]),
    ({"ModalitiesInStudy": "MR"}, ["S1", "S2"]),
    ({"ModalitiesInStudy": "US,CT"}, ["S1", "S3"]),
    ({"AccessionNumber": "ACC-*"}, ["S1", "S2", "S3"]),
    ({"StudyDescription": "K*"}, ["S3"]),
    ({"PatientSex": "F"}, ["S3"]),
    ({"PatientName": "NOBODY*"}, []),
])
async def test_study_filters(corpus: dict[str, Any], web: DICOMwebClient,
                             filters: dict[str, str], expected: list[str]) -> None:
    found = by(await call(web.search_for_studies, search_filters=filters))
    assert uids(found) == [corpus[s]["StudyInstanceUID"] for s in expected]


async def test_uid_lists_and_fuzzy_names(corpus: dict[str, Any], web: DICOMwebClient) -> None:
    wanted = [corpus["S3"]["StudyInstanceUID"], corpus["S1"]["StudyInstanceUID"]]
    found = await call(web.search_for_studies, search_filters={"StudyInstanceUID": wanted})
    assert sorted(uids(found)) == sorted(wanted)
    found = await call(web.search_for_studies, fuzzymatching=True,
                       search_filters={"PatientName": "doe"})
    assert uids(found) == [corpus["S2"]["StudyInstanceUID"]]


async def test_series_within_a_study_and_across_studies(corpus: dict[str, Any],
                                                        web: DICOMwebClient) -> None:
    s1 = corpus["S1"]["StudyInstanceUID"]
    found = by(await call(web.search_for_series, study_instance_uid=s1), SERIES)
    assert uids(found, SERIES) == [f"{s1}.1", f"{s1}.2"]
    assert [value(s, "00080060") for s in found] == ["CT", "MR"]
    assert [value(s, "00201209") for s in found] == [3, 2]
    assert [value(s, "00200011") for s in found] == [1, 2]
    assert value(found[0], "0008103E") == "CT series"
    assert value(found[0], "00400244") == "20200105" and value(found[0], "00400245") == "0900"
    assert "00100010" not in found[0]  # within one study: no study attributes
    across = by(await call(web.search_for_series, search_filters={"Modality": "MR"}), SERIES)
    assert uids(across, SERIES) == [f"{s1}.2", f"{corpus['S2']['StudyInstanceUID']}.1"]
    assert value(across[1], "00100020") == "PB"  # across studies: study attributes too
    relational = await call(web.search_for_series, search_filters={"PatientID": "PA"})
    assert len(relational) == 2


async def test_instances_at_every_scope(corpus: dict[str, Any], web: DICOMwebClient) -> None:
    s1 = corpus["S1"]["StudyInstanceUID"]
    found = by(await call(web.search_for_instances, study_instance_uid=s1,
                          series_instance_uid=f"{s1}.1"), "00200013")
    assert [value(i, "00200013") for i in found] == [1, 2, 3]
    first = found[0]
    assert value(first, "00080016") == factory.CT_IMAGE_STORAGE
    assert (value(first, "00280010"), value(first, "00280011"), value(first, "00280100")) \
        == (4, 4, 8)
    assert value(first, SERIES) == f"{s1}.1"
    in_study = await call(web.search_for_instances, study_instance_uid=s1)
    assert sorted(value(i, "00080060") for i in in_study) == ["CT"] * 3 + ["MR"] * 2
    everywhere = await call(web.search_for_instances, search_filters={"InstanceNumber": "4"})
    assert uids(everywhere, SERIES) == [f"{corpus['S2']['StudyInstanceUID']}.1"]
    assert value(everywhere[0], "00100020") == "PB"


async def test_paging_and_includefield(corpus: dict[str, Any], web: DICOMwebClient) -> None:
    every = uids(await call(web.search_for_instances))
    assert len(every) == 10
    pages = []
    for offset in range(0, 10, 3):
        pages += uids(await call(web.search_for_instances, limit=3, offset=offset))
    assert pages == every
    assert uids(await call(web.search_for_instances, limit=3, get_remaining=True)) == every
    assert await call(web.search_for_studies, offset=3) == []
    found = await call(web.search_for_studies, fields=["IssuerOfPatientID", "00180015"])
    assert found[0]["00100021"] == {"vr": "LO"} and "00180015" not in found[0]
    found = await call(web.search_for_series, fields=["all"],
                       study_instance_uid=corpus["S3"]["StudyInstanceUID"])
    assert value(found[0], "00180015") is None and "00180015" in found[0]


async def test_answers_in_http_terms(corpus: dict[str, Any], hub: RunningHub,
                                     http: aiohttp.ClientSession) -> None:
    key = await hub.key("read")
    auth = {"Authorization": f"Bearer {key}"}

    async def get(path: str, headers: dict[str, str] | None = None,
                  **params: str) -> aiohttp.ClientResponse:
        async with http.get(hub.url + path, params=params, headers={**auth, **(headers or {})}) \
                as resp:
            await resp.read()
            return resp

    resp = await get("/dicomweb/studies", limit="1")
    assert resp.status == 200 and resp.content_type == "application/dicom+json"
    assert "additional results" in resp.headers["Warning"]
    assert "Warning" not in (await get("/dicomweb/studies")).headers
    assert (await get("/dicomweb/studies", PatientID="nobody")).status == 204
    xml = await get("/dicomweb/studies",
                    {"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert xml.status == 406
    tag = (await get("/dicomweb/studies")).headers["ETag"]
    assert (await get("/dicomweb/studies", {"If-None-Match": tag})).status == 304
    async with http.get(hub.url + "/dicomweb/studies") as resp:
        assert resp.status == 401
    async with http.get(hub.url + "/dicomweb/studies",
                        headers={"Authorization": f"Bearer {await hub.key('ingest')}"}) as resp:
        assert resp.status == 403


@pytest.mark.parametrize(("path", "params", "message"), [
    ("/dicomweb/studies", {"PatientNme": "x"}, "not a DICOM attribute"),
    ("/dicomweb/studies", {"StationName": "x"}, "not an attribute this hub indexes"),
    ("/dicomweb/studies", {"StudyDate": "2020"}, "expected a date YYYYMMDD"),
    ("/dicomweb/studies", {"SOPInstanceUID": "1.2"}, "cannot be matched in a study search"),
    ("/dicomweb/studies", {"limit": "-1"}, "must be between 1"),
    ("/dicomweb/series", {"StudyInstanceUID": "1.*"}, "not a UID"),
    ("/dicomweb/studies/abc/series", {}, "not a UID"),
    ("/dicomweb/studies/1.2/series", {"StudyInstanceUID": "1.2"}, "fixed by the path"),
])
async def test_bad_queries_are_400_with_a_message(hub: RunningHub, http: aiohttp.ClientSession,
                                                  path: str, params: dict[str, str],
                                                  message: str) -> None:
    key = await hub.key("read")
    async with http.get(hub.url + path, params=params,
                        headers={"Authorization": f"Bearer {key}"}) as resp:
        body = await resp.json()
        assert resp.status == 400 and message in body["message"], body


async def test_the_client_sees_a_bad_query_as_an_error(hub: RunningHub,
                                                       web: DICOMwebClient) -> None:
    with pytest.raises(HTTPError, match="400"):
        await call(web.search_for_studies, search_filters={"StudyDate": "yesterday"})


async def test_masked_display_masks_searches_too(tmp_path: Path, run_watcher) -> None:
    hub = await start_hub(tmp_path, phi_display="masked")
    try:
        build_corpus(tmp_path / "inbox-w1")
        await run_watcher(hub)
        async with aiohttp.ClientSession() as http:
            await settle_all(Api(http, hub.url, await hub.key("read")), 10)
        reader = client(hub, await hub.key("read"))
        found = by(await call(reader.search_for_studies))
        assert found[0]["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "T.Y."}]}
        assert value(found[0], "00100020").startswith("anon-")
        assert found[0]["00100030"] == {"vr": "DA"}
        with pytest.raises(HTTPError, match="403"):
            await call(reader.search_for_studies, search_filters={"PatientID": "PA"})
        admin = client(hub, await hub.key("admin"))
        found = await call(admin.search_for_studies, search_filters={"PatientID": "PA"})
        assert value(found[0], "00100020") == "PA"
    finally:
        await hub.stop()


async def test_a_database_from_before_dicomweb_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    con = sqlite3.connect(path)
    for migration in schema.MIGRATIONS[:4]:
        for statement in migration:
            con.execute(statement)
    con.execute("PRAGMA user_version = 4")
    con.execute("INSERT INTO patients (id, patient_id, first_seen, last_seen)"
                " VALUES (1, 'P1', 0, 0)")
    con.execute("INSERT INTO studies (id, study_instance_uid, patient_pk, first_seen, last_seen)"
                " VALUES (1, '1.2', 1, 0, 0)")
    con.commit()
    con.close()
    hub = await start_hub(tmp_path)
    try:
        found = await call(client(hub, await hub.key("read")).search_for_studies)
        assert uids(found) == ["1.2"] and value(found[0], "00201206") == 0
    finally:
        await hub.stop()


# The public samples --------------------------------------------------------------------

_ESCAPES = re.compile(r"\x1b[\x20-\x2f]*[\x30-\x7e]?")


async def test_samples_match_what_pydicom_reads(hub: RunningHub, api: Api, run_watcher,
                                                samples: Path, web: DICOMwebClient) -> None:
    running = await run_watcher(hub, workers=2)
    shutil.copytree(samples / "files", running.inbox / "samples")
    rows = manifest(samples)
    await settle_all(api, len(rows))
    # Ground truth: every file pydicom reads with all three UIDs, not a DICOMDIR.
    sops: dict[str, set[str]] = collections.defaultdict(set)
    series_of: dict[str, set[str]] = collections.defaultdict(set)
    names: dict[str, set[str]] = collections.defaultdict(set)
    for row in rows:
        if not all(row[k] for k in ("sop_instance_uid", "series_instance_uid",
                                    "study_instance_uid")) or "DICOMDIR" in row["notes"]:
            continue
        with (samples / row["path"]).open("rb") as fh:  # the header, up to the UIDs
            ds = read_partial(fh, stop_when=lambda tag, vr, length: 0x0020000E < tag < 0xFFFE0000,
                              force=True)
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        sops[study].add(str(ds.SOPInstanceUID))
        series_of[study].add(series)
        if ds.get("PatientName"):  # patients are shared by ID across studies
            names[str(ds.get("PatientID", ""))].add(_ESCAPES.sub("", str(ds.PatientName)))
    found = await call(web.search_for_studies, get_remaining=True, limit=50)
    assert sorted(uids(found)) == sorted(sops)
    for study in found:
        uid = value(study, STUDY)
        assert value(study, "00201206") == len(series_of[uid]), uid
        assert value(study, "00201208") == len(sops[uid]), uid
        name = study["00100010"].get("Value", [{}])[0]
        patient = value(study, "00100020") or ""
        if names[patient]:  # intact, in every component group, whatever the character set
            assert "=".join(name.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")
                            ).rstrip("=") in {n.rstrip("=") for n in names[patient]}, uid
    instances = await call(web.search_for_instances, get_remaining=True)
    assert sorted(uids(instances, SOP)) == sorted(s for v in sops.values() for s in v)
    non_latin = [s for s in found if set("".join(
        n.get("Ideographic", "") + n.get("Alphabetic", "")
        for n in s.get("00100010", {}).get("Value", []))) - set(map(chr, range(128)))]
    assert len(non_latin) >= 3  # the samples hold Japanese, Greek, Cyrillic, … names


async def test_the_readme_example_works_against_dicomhub_up(tmp_path: Path,
                                                             services: list[Any]) -> None:
    from procs import KEY_RE, Service, write_config

    text = (REPO / "README.md").read_text()
    [example] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S)
                 if "DICOMwebClient" in block]
    write_config(tmp_path)
    up = await Service.start("up", cwd=tmp_path, name="up")
    services.append(up)
    url = (await up.read_until(r"REST API\s+(http://\S+)/api/series")).group(1)
    key = (await up.read_until(KEY_RE.pattern)).group(0)
    build_corpus(tmp_path / "inbox")
    async with aiohttp.ClientSession() as http:
        await settle_all(Api(http, url, key), 10)
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://127.0.0.1:8080", url))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), env={**os.environ, "DICOMHUB_READ_KEY": key},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    s1 = "1.2.826.0.1.3680043.8.1055.1.1"
    assert sorted(lines[:3]) == [f"{s1} 5 instances",
                                 "1.2.826.0.1.3680043.8.1055.1.2 4 instances",
                                 "1.2.826.0.1.3680043.8.1055.1.3 1 instances"]
    assert lines[3:] == [f"{s1}.1 3 instances"]
    assert await up.stop() == 0
