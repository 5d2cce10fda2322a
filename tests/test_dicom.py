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
from procs import Service, fill, hub_with_keys, mounted_tmpfs, restart_hub
from watcher.spool import Spool

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


async def spool_settled(listener: Any) -> None:
    """Wait until the spool holds nothing but the empty files it makes ahead: every
    instance has its final name, synced, and nothing half-written is left."""
    def sizes() -> list[int]:
        out = []
        for path in listener.incoming.iterdir():
            try:
                out.append(path.stat().st_size)
            except FileNotFoundError:
                out.append(-1)  # removed while listed: look again
        return out

    async def settled() -> bool:
        return not any(sizes())

    await wait_for(settled, "the spool to settle")


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
    await spool_settled(listening.watcher.listener)
    assert listening.inbox not in listening.watcher.listener.incoming.parents  # outside the tree
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
    acknowledged = await successes(sender, 100)
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
    await spool_settled(listening.watcher.listener)


async def successes(sender: asyncio.subprocess.Process, wanted: int) -> int:
    """Read a `storescu -v` until it has heard `wanted` success responses."""
    assert sender.stdout is not None
    heard = 0
    while heard < wanted:
        line = await asyncio.wait_for(sender.stdout.readline(), TIMEOUT)
        assert line, "storescu ended early"
        heard += b"Received Store Response (Success)" in line
    return heard


def listener_config(folder: Path, url: str) -> int:
    """watcher.toml in `folder`: a watcher of the hub at `url` with its listener on
    a free port, which it returns."""
    port = free_port()
    (folder / "watcher.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = "{url.replace('http', 'ws', 1)}/ws/ingest"
        workers = 1
        [watcher.dicom]
        enabled = true
        port = {port}
        """))
    return port


async def start_listening(folder: Path, services: list[Service], key: str,
                          name: str) -> Service:
    """A watcher process on `folder`'s watcher.toml, once its listener is up."""
    watcher = await Service.start("watch", "--config", "watcher.toml", cwd=folder,
                                  env={"DICOMHUB_KEY": key}, name=name)
    services.append(watcher)
    await watcher.logged(r"DICOM listener")
    return watcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_watcher_killed_right_after_success_still_indexes_the_instance(
        tmp_path: Path, services: list[Service]) -> None:
    hub, url, key, read_key = await hub_with_keys(tmp_path, services, "hub1")
    port = listener_config(tmp_path, url)

    first = await start_listening(tmp_path, services, key, "watcher1")
    assert await hub.stop() == 0  # so the record can only be in the watcher's outbox
    ds = instance(0, 1, "1.2.826.0.1.3680043.8.1055.12")
    assert await asyncio.to_thread(send, port, [ds]) == [0]
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    hub = await restart_hub(tmp_path, services, url, "hub2")
    second = await start_listening(tmp_path, services, key, "watcher2")
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


async def test_a_full_disk_is_answered_out_of_resources_and_leaves_nothing(
        hub: RunningHub, run_watcher: Any, api: Api, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "disk", "16m") as disk:
        running = await run_watcher(hub, watch=(disk,), dicom=DicomConfig(
            enabled=True, port=0, allowed_calling_aets=(SCANNER,)))
        listener = running.watcher.listener
        # The state folder is on another file system: the spool sits beside the store.
        assert disk in listener.incoming.parents
        (disk / ".ballast").mkdir()  # hidden: the watcher leaves it alone
        ballast = fill(disk / ".ballast")
        first, second = instance(0, 1), instance(0, 2)
        assert await asyncio.to_thread(send, listener.port, [first]) == [0xA700]
        assert not list((disk / "dicom").rglob("*.dcm"))
        await spool_settled(listener)  # nothing half-written in the spool either
        ballast.unlink()
        ballast.with_name("crumbs").unlink(missing_ok=True)
        assert await asyncio.to_thread(send, listener.port, [first, second]) == [0, 0]

        async def indexed() -> bool:
            return (await api.get("/api/stats"))["instances"] == 2

        await wait_for(indexed, "both instances once the disk has room")
        await running.stop()


async def test_an_instance_a_crash_left_in_the_spool_is_placed_and_indexed_at_start(
        hub: RunningHub, run_watcher: Any, api: Api, tmp_path: Path) -> None:
    ds = instance(0, 1, "1.2.826.0.1.3680043.8.1055.16")
    source = tmp_path / "source.dcm"
    ds.save_as(source, enforce_file_format=True)
    store = tmp_path / "inbox-w1" / "dicom"
    final = store / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    # What a power failure can leave: the instance synced in the spool (success was
    # answered), its link to the final name lost.
    crashed = Spool(tmp_path / "state-w1" / "incoming", store)
    crashed.open()
    entry = crashed.take()
    entry.write(source.read_bytes())
    entry.commit(final)
    final.unlink()
    running = await run_watcher(hub, dicom=DicomConfig(enabled=True, port=0))

    async def indexed() -> bool:
        return (await api.get("/api/stats"))["instances"] == 1

    await wait_for(indexed, "the instance put back from the spool")
    assert final.read_bytes() == source.read_bytes()
    await spool_settled(running.watcher.listener)


async def test_files_others_put_in_the_listeners_folder_are_found_by_the_rescan(
        hub: RunningHub, run_watcher: Any, api: Api) -> None:
    running = await run_watcher(hub, rescan_interval=0.5, dicom=DicomConfig(
        enabled=True, port=0, allowed_calling_aets=(SCANNER,)))
    assert await asyncio.to_thread(send, running.watcher.listener.port,
                                   [instance(0, 1)]) == [0]
    # No file events come from the listener's folder: what it stores it hands over.
    factory.write(running.inbox / "dicom" / "by-hand" / "other.dcm")

    async def indexed() -> bool:
        return (await api.get("/api/stats"))["instances"] == 2

    await wait_for(indexed, "the stored instance and the one put there by hand")
    assert running.watcher.rescans >= 1


async def test_instances_streaming_in_are_paced_below_the_hubs_message_limit(
        hub: RunningHub, run_watcher: Any, api: Api, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from hub import ingest
    from watcher import link

    # The real limits (100 a second, 200 at once) scaled down, so that a test can
    # send faster than them: each instance arrives alone, and unpaced, the watcher
    # would send a batch every few milliseconds.
    monkeypatch.setattr(ingest, "MAX_FRAMES_PER_SECOND", 20)
    monkeypatch.setattr(ingest, "FRAME_BURST", 10)
    monkeypatch.setattr(link, "PACE", 16.0)
    monkeypatch.setattr(link, "PACE_BURST", 5)
    running = await run_watcher(hub, dicom=DicomConfig(
        enabled=True, port=0, allowed_calling_aets=(SCANNER,)))
    datasets = [instance(n % 3, n) for n in range(150)]
    assert await asyncio.to_thread(send, running.watcher.listener.port, datasets) == [0] * 150

    async def indexed() -> bool:
        return (await api.get("/api/stats"))["instances"] == 150

    await wait_for(indexed, "150 instances")
    assert "more than" not in caplog.text  # the hub never closed the connection
    assert running.watcher.link.connected.is_set()


async def test_a_watcher_killed_mid_study_keeps_every_acknowledged_instance_whole(
        tmp_path: Path, services: list[Service]) -> None:
    command = storescu()
    hub, url, key, read_key = await hub_with_keys(tmp_path, services, "hub1")
    port = listener_config(tmp_path, url)
    sent = {}
    for n in range(300):
        ds = instance(n % 3, n, "1.2.826.0.1.3680043.8.1055.17")
        sent[ds.SOPInstanceUID] = ds
        factory.write(tmp_path / "outgoing" / f"{n:04d}.dcm", ds)

    first = await start_listening(tmp_path, services, key, "watcher1")
    sender = await asyncio.create_subprocess_exec(
        command, "-v", "-aet", "STORESCU", "-aec", CALLED, "+sd", "127.0.0.1", str(port),
        str(tmp_path / "outgoing"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
    acknowledged = await successes(sender, 100)
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-study
    await asyncio.wait_for(sender.communicate(), TIMEOUT)
    second = await start_listening(tmp_path, services, key, "watcher2")
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)

        async def indexed() -> bool:
            return (await api.get("/api/stats"))["instances"] >= acknowledged

        await wait_for(indexed, "every acknowledged instance to be indexed")
    store = tmp_path / "inbox" / "dicom"
    stored = sorted(store.rglob("*.dcm"))
    # What was acknowledged, and at most the one in flight, each whole: every
    # element as sent, pixels included (a half-written file would not be).
    assert acknowledged <= len(stored) <= acknowledged + 1
    for path in stored:
        assert pydicom.dcmread(path) == sent[path.stem]
    assert await second.stop() == 0


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


# what real peers send: every transfer syntax, large instances, many associations ---------


async def test_every_transfer_syntax_in_the_samples_arrives_as_sent(
        hub: RunningHub, run_watcher: Any, api: Api, samples: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import manifest
    from pynetdicom import _config
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import uid_to_service_class  # type: ignore[attr-defined]
    from pynetdicom.service_class import StorageServiceClass

    folder = samples
    chosen: dict[str, tuple[Path, str]] = {}  # transfer syntax: (file, SOP class)
    for row in manifest(folder):
        ts = row["transfer_syntax"]
        uids = (row["sop_instance_uid"], row["series_instance_uid"], row["study_instance_uid"])
        if row["parse_ok"] != "yes" or not ts or ts in chosen or not all(uids):
            continue  # (an instance without its UIDs is refused: test_what_the_listener...)
        path = folder / row["path"]
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        if uid_to_service_class(sop_class) is StorageServiceClass:
            chosen[ts] = (path, sop_class)
    assert len(chosen) >= 10, sorted(chosen)
    listening = await run_watcher(hub, dicom=DicomConfig(enabled=True, port=0))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes

    def send_files() -> list[int]:
        ae = AE(ae_title=SCANNER)
        ae.requested_contexts = [build_context(c, [ts]) for ts, (_, c) in chosen.items()]
        assoc = ae.associate("127.0.0.1", listening.watcher.listener.port, ae_title=CALLED)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(path).Status) for path, _ in chosen.values()]
        finally:
            assoc.release()

    assert await asyncio.to_thread(send_files) == [0] * len(chosen)

    async def indexed() -> bool:
        return (await api.get("/api/stats"))["instances"] == len(chosen)

    await wait_for(indexed, "one instance per transfer syntax")
    assert (await api.get("/api/stats"))["rejections"] == 0
    stored = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID: p
              for p in (listening.inbox / "dicom").rglob("*.dcm")}
    assert set(stored) == set(chosen)
    for ts, (path, _) in chosen.items():
        assert data_set_bytes(stored[ts]) == _data_set_of_file(path), ts


def _data_set_of_file(path: Path) -> bytes:
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


async def test_a_large_instance_goes_to_disk_as_it_arrives(
        listening: Any, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    import watcher.listener

    monkeypatch.setattr(watcher.listener, "SPILL_BYTES", 256 * 1024)
    ds = instance(0, 1, "1.2.826.0.1.3680043.8.1055.13")
    ds.Rows, ds.Columns = 1024, 1024
    ds.PixelData = os.urandom(1024 * 1024 * 2)
    small = instance(0, 2, "1.2.826.0.1.3680043.8.1055.13")

    def send_small_pdus() -> list[int]:
        ae = AE(ae_title=SCANNER)
        ae.maximum_pdu_size = 100  # our responses must be fragmented to fit
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listening.watcher.listener.port, ae_title=CALLED)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(d).Status) for d in (ds, small)]
        finally:
            assoc.release()

    assert await asyncio.to_thread(send_small_pdus) == [0, 0]

    async def indexed() -> bool:
        return (await api.get("/api/stats"))["instances"] == 2

    await wait_for(indexed, "the large and the small instance")
    path = listening.inbox / "dicom" / ds.StudyInstanceUID / ds.SeriesInstanceUID \
        / f"{ds.SOPInstanceUID}.dcm"
    assert data_set_bytes(path) == encode(ds, False, True)
    await spool_settled(listening.watcher.listener)


async def test_associations_beyond_the_limit_are_refused_until_one_ends(
        hub: RunningHub, run_watcher: Any) -> None:
    listening = await run_watcher(hub, dicom=DicomConfig(enabled=True, port=0,
                                                         max_associations=1))
    port = listening.watcher.listener.port

    def second_while_first_open() -> tuple[bool, bool, bool]:
        ae = AE(ae_title=SCANNER)
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", port, ae_title=CALLED)
        second = ae.associate("127.0.0.1", port, ae_title=CALLED)
        refused = second.is_rejected
        first.release()
        return first.is_established or first.is_released, refused, True

    opened, refused, _ = await asyncio.to_thread(second_while_first_open)
    assert opened and refused
    # The first association's thread ends after its release; then there is room again.

    async def echoes() -> bool:
        return await asyncio.to_thread(echo, port) == 0

    await wait_for(echoes, "an association to be accepted again")


class RawPeer:
    """A requestor speaking PDUs by hand, for what well-behaved libraries never send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

    def associate(self, *abstract_syntaxes: str) -> bytes:
        from pynetdicom.pdu import A_ASSOCIATE_RQ
        from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
        from pynetdicom.presentation import build_context

        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title, primitive.called_ae_title = SCANNER, CALLED
        contexts = [build_context(a, [ExplicitVRLittleEndian]) for a in abstract_syntaxes]
        for n, context in enumerate(contexts):
            context.context_id = 2 * n + 1
        primitive.presentation_context_definition_list = contexts
        length = MaximumLengthNotification()
        length.maximum_length_received = 16384
        primitive.user_information = [length]
        request = A_ASSOCIATE_RQ()
        request.from_primitive(primitive)
        self.sock.sendall(request.encode())
        return self.receive()

    def receive(self) -> bytes:
        """One PDU; b"" when the listener has closed the connection."""
        header = self._exactly(6)
        if not header:
            return b""
        return header + self._exactly(struct.unpack(">I", header[2:])[0])

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return b""
            data += chunk
        return data

    def message(self, command: Dataset, data_set: bytes | None, context_id: int = 1) -> bytes:
        """Send a DIMSE message; return the command set of the response."""
        from watcher import dicomnet

        for pdu in dicomnet.p_data(context_id, True, encode(command, True, True), 16384):
            self.sock.sendall(pdu)
        if data_set is not None:
            for pdu in dicomnet.p_data(context_id, False, data_set, 16384):
                self.sock.sendall(pdu)
        answer = self.receive()
        assert answer[0] == 0x04, answer[:16]
        return answer[12:]  # P-DATA header 6, PDV length 4, context id, control

    def close(self) -> None:
        self.sock.close()


def command(field: int, sop_class: str, sop: str = "", has_data_set: bool = True) -> Dataset:
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = field
    ds.MessageID = 7
    ds.CommandDataSetType = 0x0001 if has_data_set else 0x0101
    if sop:
        ds.AffectedSOPInstanceUID = sop
    return ds


async def test_what_the_listener_cannot_do_gets_a_status_and_stores_nothing(
        listening: Any, api: Api) -> None:
    from pynetdicom.dsutils import decode

    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    good = instance(0, 1, "1.2.826.0.1.3680043.8.1055.14")

    def session() -> list[tuple[int, int]]:
        peer = RawPeer(listening.watcher.listener.port)
        try:
            accepted = peer.associate(ct)
            assert accepted[0] == 0x02, accepted[:10]
            answers = [
                # A C-FIND on a storage context: not an operation of ours.
                peer.message(command(0x0020, ct), encode(Dataset(), False, True)),
                # An MR instance on the CT context.
                peer.message(command(0x0001, mr, "1.2.3.4"), encode(good, False, True)),
                # Bytes that are no data set.
                peer.message(command(0x0001, ct, "1.2.3.5"), b"\xff" * 64),
                # A data set whose SOP Instance UID is not the command's.
                peer.message(command(0x0001, ct, "1.2.3.6"), encode(good, False, True)),
            ]
            out = []
            for raw in answers:
                response = decode(__import__("io").BytesIO(raw), True, True)
                out.append((int(response.CommandField), int(response.Status)))
            peer.sock.sendall(bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
            assert peer.receive()[:1] == b"\x06"
            return out
        finally:
            peer.close()

    assert await asyncio.to_thread(session) == [
        (0x8020, 0x0211), (0x8001, 0x0122), (0x8001, 0xC000), (0x8001, 0xC000)]
    assert await asyncio.to_thread(echo, listening.watcher.listener.port) == 0
    assert (await api.get("/api/stats"))["instances"] == 0
    assert not list((listening.inbox / "dicom").rglob("*.dcm"))


@pytest.mark.parametrize("opening", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not DICOM at all
    bytes([4, 0, 0, 0, 0, 8, 0, 0, 0, 4, 1, 3, 0, 0]),  # P-DATA before any association
    bytes([1, 0, 0x7F, 0xFF, 0xFF, 0xFF]),  # a 2 GB A-ASSOCIATE-RQ
    bytes([1, 0, 0, 0, 0, 10]) + b"\xff" * 10,  # an A-ASSOCIATE-RQ that does not decode
])
async def test_a_peer_breaking_the_protocol_is_aborted_and_others_go_on(
        listening: Any, opening: bytes) -> None:
    def exchange() -> bytes:
        peer = RawPeer(listening.watcher.listener.port)
        try:
            peer.sock.sendall(opening)
            return peer.receive()
        finally:
            peer.close()

    answer = await asyncio.to_thread(exchange)
    assert answer[:1] == b"\x07" and len(answer) == 10, answer  # A-ABORT
    assert answer[8] == 2  # from the service provider
    assert await asyncio.to_thread(echo, listening.watcher.listener.port) == 0


async def test_a_silent_peer_is_aborted(listening: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import watcher.listener

    monkeypatch.setattr(watcher.listener, "ASSOCIATE_TIMEOUT", 0.2)
    monkeypatch.setattr(watcher.listener, "IDLE_TIMEOUT", 0.2)

    def silent(associate: bool) -> bytes:
        peer = RawPeer(listening.watcher.listener.port)
        try:
            if associate:
                assert peer.associate("1.2.840.10008.1.1")[:1] == b"\x02"
            return peer.receive()  # blocks until the listener gives up on us
        finally:
            peer.close()

    for associate in (False, True):
        answer = await asyncio.to_thread(silent, associate)
        assert answer[:1] == b"\x07", answer
