"""The watcher's DICOM listener: C-ECHO, and C-STORE into a watched folder.

Scanners and archives that cannot write to a share send over the DICOM network
protocol. What they send keeps the folder's promise: each instance is written
under a temporary name outside the watched tree, synced, renamed into
``store_into/<Study UID>/<Series UID>/<SOP Instance UID>.dcm``, and its record
handed to the outbox, all before the C-STORE response says success. A peer
that hears success can forget the instance; until then, nothing is promised
and a resend is harmless (same name, same record, and the hub is idempotent).

pynetdicom runs each association on its own thread; the outbox lives on the
watcher's event loop, so handlers hand their record over to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomhub.config import DicomConfig
from dicomhub.errors import DicomhubError
from dicomhub.protocol import InstanceRecord, record_text

from . import reader
from .state import Outcome

log = logging.getLogger("dicomhub.watcher")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # PS3.4 C.4.2.1.4: refused, out of resources
CANNOT_UNDERSTAND = 0xC000  # error, cannot understand
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
INCOMING = ".incoming"  # hidden: the watcher ignores it
POLL_DELAY = 0.0002


class Listener:
    def __init__(self, config: DicomConfig, folder: Path, root: Path, label: str,
                 loop: asyncio.AbstractEventLoop, accept: Callable[[Outcome], None],
                 scratch: Path | None = None) -> None:
        self.config, self.folder, self.root, self.label = config, folder, root, label
        self.scratch = scratch  # a folder for temporary files, outside the watched tree
        self.incoming = folder / INCOMING
        self.loop, self.accept = loop, accept
        self.received = 0
        self.in_flight: set[str] = set()  # paths being written: not for the watcher's parsers
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> None:
        ae = AE(ae_title=self.config.ae_title)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = self.config.max_associations
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.maximum_pdu_size = 0  # no limit: large PDUs cost fewer round trips
        self.incoming = _incoming(self.folder, self.scratch)
        try:
            self._server = ae.start_server(
                (self.config.host, self.config.port), block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                              (evt.EVT_CONN_OPEN, no_delay)])
        except OSError as exc:
            raise DicomhubError(
                f"cannot listen for DICOM on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc}; choose another [watcher.dicom] port or stop "
                "what uses it") from None
        log.info("DICOM listener %s on %s:%d, storing into %s", self.config.ae_title,
                 self.config.host, self.port, self.folder)

    @property
    def port(self) -> int:
        """The port listened on (config may say 0: any free one)."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def busy(self, path: str) -> bool:
        with self._lock:
            return path in self.in_flight

    def _on_store(self, event: Any) -> int:
        """On the association's thread: write, sync, rename, commit, then answer."""
        try:
            data: bytes = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a peer's bad data must not end the thread
            log.warning("C-STORE from %s: cannot encode what was sent: %s",
                        _peer(event), exc)
            return CANNOT_UNDERSTAND
        sop = str(event.request.AffectedSOPInstanceUID or "")
        # One parse, of the bytes in memory: the record, and the UIDs for the name.
        record = reader.read_bytes(data, self.folder / "x.dcm", self.root, self.label)
        if not isinstance(record, InstanceRecord) or record.sop_instance_uid != sop \
                or not all(_UID.fullmatch(u) and len(u) <= 64 for u in (
                    record.study_instance_uid, record.series_instance_uid, sop)):
            log.warning("C-STORE from %s refused: not an instance with valid UIDs (%s)",
                        _peer(event), getattr(record, "detail", "UIDs"))
            return CANNOT_UNDERSTAND
        final = self.folder / record.study_instance_uid / record.series_instance_uid \
            / f"{sop}.dcm"
        with self._lock:
            self.in_flight.add(str(final))
        try:
            try:
                st = _write_atomically(final, self.incoming, data)
            except OSError as exc:
                log.error("C-STORE from %s refused: cannot write %s: %s", _peer(event),
                          final, exc.strerror or exc)
                return OUT_OF_RESOURCES
            rel = reader.display_path(final, self.root, self.label)
            text = record_text(_with_file(record, rel, st.st_size, st.st_mtime))
            # The file is durable now, so success can be answered: the record joins the
            # outbox with the next commit, and if the watcher dies first, its start-up
            # walk finds the file (not in its memory of delivered files) and reads it.
            self.loop.call_soon_threadsafe(
                self.accept, Outcome(os.fsencode(final), st.st_size, st.st_mtime_ns, text))
        finally:
            with self._lock:
                self.in_flight.discard(str(final))
        with self._lock:
            self.received += 1
        return SUCCESS


def _incoming(folder: Path, scratch: Path | None) -> Path:
    """Where instances are written before the rename: `scratch` (the watcher's state
    folder) when it is on the same file system, so that the rename stays atomic and
    the writes raise no file events in the watched tree; else a hidden folder there."""
    folder.mkdir(parents=True, exist_ok=True)
    if scratch is not None:
        candidate = scratch / "incoming"
        candidate.mkdir(parents=True, exist_ok=True)
        if os.stat(candidate).st_dev == os.stat(folder).st_dev:
            return candidate
    hidden = folder / INCOMING
    hidden.mkdir(exist_ok=True)
    return hidden


def _with_file(record: InstanceRecord, path: str, size: int, mtime: float) -> InstanceRecord:
    from dataclasses import replace

    return replace(record, path=path, size=size, mtime=mtime)


def _write_atomically(final: Path, incoming: Path, data: bytes) -> os.stat_result:
    """Write under a temporary name, sync, rename into place, sync the folder: after a
    crash the final name holds the whole file or nothing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = incoming / f"{final.stem}.{secrets.token_hex(4)}.part"
    try:
        with temporary.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        st = os.stat(temporary)
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return st


def no_delay(event: Any) -> None:
    """Nagle's algorithm holds back the small response PDUs: with it on, a C-STORE of
    a 130 KB file takes ~57 ms instead of ~3 ms on loopback. pynetdicom's protocol
    thread also polls, sleeping 1 ms whenever a turn found nothing to do; a
    shorter nap roughly halves the time per C-STORE for a little CPU while the
    association is open."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        event.assoc.dul._run_loop_delay = POLL_DELAY
    except (AttributeError, OSError):
        pass


def _peer(event: Any) -> str:
    try:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title} ({requestor.address})"
    except AttributeError:
        return "a peer"
