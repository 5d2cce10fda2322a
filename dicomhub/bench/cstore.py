"""Step 8: instances sent over DICOM (C-STORE) to the watcher's listener, over one
association, by dcmtk's storescu when installed (else by pynetdicom): files/s
from the first byte sent until the sender has heard every response. When Orthanc
is installed, the same files go to it too, the same way, in the same run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from . import corpus
from .context import Context, StepOutput, wait_instances, write_corpus
from .procs import Api, BenchError, start_hub, start_watcher

SEND_TIMEOUT = 600.0


async def cstore(ctx: Context) -> StepOutput:
    count = ctx.options.cstore_files
    folder = ctx.work / "cstore"
    spec = corpus.Spec(corpus.new_root(), count, 10, ctx.options.image_size)
    written = write_corpus(folder / "outgoing", spec)
    port = _free_port()
    hub = await start_hub(ctx.services, folder)
    watcher = await start_watcher(ctx.services, hub, extra=(
        f"[watcher.dicom]\nenabled = true\nport = {port}\n"))
    # The corpus just written is still being flushed; our listener syncs every file,
    # so without this the first seconds would measure that writeback.
    await asyncio.to_thread(os.sync)
    storescu = dcmtk_storescu()
    sender = "storescu" if storescu else "pynetdicom"
    ctx.say(f"sending {count} files over one association with {sender}")
    started = time.perf_counter()
    if storescu:
        await _storescu(storescu, written.folder, port)
    else:
        await asyncio.to_thread(_pynetdicom, written.paths, port)
    seconds = time.perf_counter() - started
    async with ctx.session() as http:
        await wait_instances(Api(http, hub.url, hub.read_key), count,
                             [hub.service, watcher], 0.05)
    figures: dict[str, Any] = {"files": count, "files_per_second": round(count / seconds)}
    details: dict[str, Any] = {
        "sender": sender, "seconds": round(seconds, 3), "mean_file_kib": round(
            sum(p.stat().st_size for p in written.paths) / count / 1024, 1)}
    orthanc = shutil.which("Orthanc")
    if storescu and orthanc:
        ctx.say(f"sending the same {count} files to Orthanc")
        orthanc_seconds, version = await _orthanc(orthanc, storescu, folder, written.folder)
        figures["orthanc_files_per_second"] = round(count / orthanc_seconds)
        figures["ratio_to_orthanc"] = round(orthanc_seconds / seconds, 2)
        details["orthanc"] = version
    else:
        details["orthanc"] = "not measured: Orthanc (and dcmtk's storescu) not installed"
    return figures, details


async def _orthanc(program: str, storescu: str, folder: Path,
                   outgoing: Path) -> tuple[float, str]:
    """Orthanc as Debian installs it, on a fresh storage folder and index, with
    TCP_NODELAY=1 for its dcmtk; seconds to store the folder, and its version."""
    home = folder / "orthanc"
    home.mkdir()
    dicom_port, http_port = _free_port(), _free_port()
    (home / "orthanc.json").write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"), "DicomAet": "ORTHANC",
        "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": []}))
    version = subprocess.run([program, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[0:1]
    process = await asyncio.create_subprocess_exec(
        program, str(home / "orthanc.json"), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, cwd=home, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        deadline = time.monotonic() + 60
        while not _accepts(dicom_port):
            if process.returncode is not None or time.monotonic() > deadline:
                raise BenchError("Orthanc did not start listening for DICOM")
            await asyncio.sleep(0.1)
        await asyncio.to_thread(os.sync)
        started = time.perf_counter()
        await _storescu(storescu, outgoing, dicom_port, called="ORTHANC")
        # The first line reads "<program path> <version>".
        return time.perf_counter() - started, "Orthanc " + (version or [" ?"])[0].split()[-1]
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def dcmtk_storescu() -> str | None:
    """dcmtk's storescu on PATH, passing over pynetdicom's program of the same name
    (a virtualenv's bin folder holds one)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("storescu", path=folder)
        if candidate is None:
            continue
        try:
            version = subprocess.run([candidate, "--version"], capture_output=True,
                                     text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in version:
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _storescu(program: str, folder: Path, port: int, called: str = "DICOMHUB") -> None:
    # dcmtk leaves Nagle's algorithm on unless told otherwise (see the README).
    process = await asyncio.create_subprocess_exec(
        program, "-aet", "BENCH", "-aec", called, "+sd", "+r", "127.0.0.1",
        str(port), str(folder), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "TCP_NODELAY": "1"})
    _, err = await asyncio.wait_for(process.communicate(), SEND_TIMEOUT)
    if process.returncode != 0:
        raise BenchError(f"storescu failed: {err.decode(errors='replace')[-500:]}")


def no_delay(event: Any) -> None:
    """For pynetdicom as a sender: Nagle's algorithm off, and a shorter nap in its
    polling reactor (1 ms by default, sleeping whenever a turn found nothing to do)."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        event.assoc.dul._run_loop_delay = 0.0002
    except (AttributeError, OSError):
        pass


def _pynetdicom(paths: list[Path], port: int) -> None:
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts, evt

    ae = AE(ae_title="BENCH")
    ae.requested_contexts = StoragePresentationContexts[:120]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMHUB",
                         evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
    if not assoc.is_established:
        raise BenchError("the listener refused the association")
    try:
        for path in paths:
            status = assoc.send_c_store(dcmread(path))
            if int(getattr(status, "Status", -1)) != 0:
                raise BenchError(f"C-STORE of {path.name} failed: {status}")
    finally:
        assoc.release()
