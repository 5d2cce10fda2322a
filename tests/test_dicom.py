"""The watcher's DICOM listener, with real peers: pynetdicom and dcmtk's storescu."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import factory
from conftest import TIMEOUT, Api, RunningHub, wait_for
from dicomhub.config import DicomConfig
from dicomhub.bench.cstore import no_delay
from procs import Service, hub_with_keys, restart_hub

pytestmark = pytest.mark.asyncio

CALLED = "DICOMHUB"
SCANNER = "SCANNER1"


def instance(series: int, number: int, study: str = "1.2.826.0.1.3680043.8.1055.9") -> Dataset:
    ds = factory.dataset(StudyInstanceUID=study, SeriesInstanceUID=f"{study}.{series}",
                         InstanceNumber=number, Modality="CT")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 2 * 16  # 4 x 4 x ... enough to be real bytes
    ds.Rows, ds.Columns = 32, 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def send(port: int, datasets: list[Dataset], calling: str = SCANNER) -> list[int]:
    """C-STORE over one association; the status of each, or [] if it was refused."""
    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts[:120]
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED,
                         evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def echo(port: int) -> int | None:
    ae = AE(ae_title=SCANNER)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def data_set_bytes(path: Path) -> bytes:
    """A DICOM file's data set: what follows the preamble and the file meta."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_length = struct.unpack_from("<I", raw, 132 + 8)[0]  # (0002,0000) UL
    return raw[132 + 12 + group_length:]


@pytest.fixture
async def listening(hub: RunningHub, run_watcher, tmp_path: Path) -> Any:
    running = await run_watcher(hub, dicom=DicomConfig(
        enabled=True, port=0, allowed_calling_aets=(SCANNER, "STORESCU")))
    return running


async def test_five_hundred_instances_arrive_whole_and_are_indexed_once(
        listening: Any, api: Api) -> None:
    port = listening.watcher.listener.port
    datasets = [instance(n % 5, n) for n in range(500)]
    statuses = await asyncio.to_thread(send, port, datasets)
    assert statuses == [0] * 500

    async def indexed() -> bool:
        return (await api.get("/api/stats"))["instances"] == 500

    await wait_for(indexed, "500 instances indexed")
    counts = sorted(s["instance_count"] for s in await api.all("/api/series"))
    assert counts == [100] * 5
    assert listening.watcher.parsed == 0  # taken from memory, never read back
    folder = listening.inbox / "dicom"
    for ds in datasets[::50]:
        path = folder / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        implicit = pydicom.dcmread(path).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert data_set_bytes(path) == encode(ds, implicit, True)  # as sent, byte for byte
    incoming = listening.watcher.listener.incoming
    assert not list(incoming.iterdir())  # no temporary file left
    assert listening.inbox not in incoming.parents  # written outside the watched tree
    # Sending again is harmless: same files, same records, counted once.
    assert await asyncio.to_thread(send, port, datasets[:20]) == [0] * 20
    stats = await api.get("/api/stats")
    assert (stats["instances"], stats["files"]) == (500, 500)


async def test_echo_and_unknown_calling_ae_titles(listening: Any) -> None:
    port = listening.watcher.listener.port
    assert await asyncio.to_thread(echo, port) == 0
    assert await asyncio.to_thread(send, port, [instance(0, 1)], "INTRUDER") == []


def storescu() -> str:
    from dicomhub.bench.cstore import dcmtk_storescu

    path = dcmtk_storescu()
    if path is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk; CI does)")
    return path


async def test_dcmtk_storescu_sends_a_folder(listening: Any, api: Api, tmp_path: Path) -> None:
    command = storescu()
    port = listening.watcher.listener.port
    outgoing = tmp_path / "outgoing"
    for n in range(60):
        ds = instance(n % 3, n, study="1.2.826.0.1.3680043.8.1055.10")
        factory.write(outgoing / f"{n}.dcm", ds)
    result = await asyncio.to_thread(
        subprocess.run, [command, "-aet", "STORESCU", "-aec", CALLED, "+sd", "+r",
                         "127.0.0.1", str(port), str(outgoing)],
        capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stderr

    async def indexed() -> bool:
        return (await api.get("/api/stats"))["instances"] == 60

    await wait_for(indexed, "60 instances from storescu")
    assert listening.watcher.parsed == 0


async def test_a_sender_killed_mid_association_loses_only_what_was_not_acknowledged(
        listening: Any, api: Api, tmp_path: Path) -> None:
    command = storescu()
    port = listening.watcher.listener.port
    outgoing = tmp_path / "outgoing"
    for n in range(400):
        factory.write(outgoing / f"{n:04d}.dcm",
                      instance(n % 4, n, "1.2.826.0.1.3680043.8.1055.11"))
    sender = await asyncio.create_subprocess_exec(
        command, "-v", "-aet", "STORESCU", "-aec", CALLED, "+sd", "127.0.0.1", str(port),
        str(outgoing), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert sender.stdout is not None
    acknowledged = 0
    while acknowledged < 100:
        line = await asyncio.wait_for(sender.stdout.readline(), TIMEOUT)
        assert line, "storescu ended early"
        acknowledged += b"Received Store Response (Success)" in line
    sender.kill()
    await sender.wait()
    # Whatever the peer heard as success is indexed; at most the one in flight is too.

    async def delivered() -> bool:
        stats = await api.get("/api/stats")
        return stats["instances"] >= acknowledged and not listening.watcher.listener.in_flight \
            and listening.watcher.state.backlog == 0

    await wait_for(delivered, "every acknowledged instance to be indexed")
    stored = (await api.get("/api/stats"))["instances"]
    assert acknowledged <= stored <= acknowledged + 1
    assert not list(listening.watcher.listener.incoming.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_watcher_killed_right_after_success_still_indexes_the_instance(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, key, read_key = await hub_with_keys(tmp_path, services, "hub1")
    port = free_port()
    (tmp_path / "watcher.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = "{url.replace('http', 'ws', 1)}/ws/ingest"
        workers = 1
        [watcher.dicom]
        enabled = true
        port = {port}
        """))

    async def start(name: str) -> Service:
        watcher = await Service.start("watch", "--config", "watcher.toml", cwd=tmp_path,
                                      env={"DICOMHUB_KEY": key}, name=name)
        services.append(watcher)
        await watcher.logged(r"DICOM listener")
        return watcher

    first = await start("watcher1")
    assert await hub.stop() == 0  # so the record can only be in the watcher's outbox
    ds = instance(0, 1, "1.2.826.0.1.3680043.8.1055.12")
    assert await asyncio.to_thread(send, port, [ds]) == [0]
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    hub = await restart_hub(tmp_path, services, url, "hub2")
    second = await start("watcher2")
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)

        async def indexed() -> bool:
            return (await api.get("/api/stats"))["instances"] == 1

        await wait_for(indexed, "the acknowledged instance to be indexed")
    assert await second.stop() == 0
    log = (tmp_path / "watcher2.log").read_text()
    # Its record reached the outbox before the kill (nothing to read back), or the
    # start-up walk found the file, durable before success was answered, and read it.
    assert re.search(r"parsed [01] files this run", log)


async def test_a_busy_dicom_port_is_one_clear_line(tmp_path: Path) -> None:
    from procs import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "watcher.toml").write_text(
            f'[watcher]\nkey_file = ""\n[watcher.dicom]\nenabled = true\nport = {port}\n')
        result = run_cli("watch", "--config", "watcher.toml", cwd=tmp_path,
                         env={"DICOMHUB_KEY": "dhk_" + "a" * 43})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert f"cannot listen for DICOM on 127.0.0.1:{port}" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
