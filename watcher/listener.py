"""The watcher's DICOM listener: C-ECHO, and C-STORE into a watched folder.

Scanners and archives that cannot write to a share send over the DICOM network
protocol. What they send keeps the folder's promise: each instance is written
into the spool outside the watched tree, synced, and given its final name
``store_into/<Study UID>/<Series UID>/<SOP Instance UID>.dcm`` (see `spool`)
before the C-STORE response says success. A peer that hears success can forget
the instance; until then, nothing is promised and a resend is harmless (same
name, same record, and the hub is idempotent). The record, already parsed from
memory, goes to the outbox after the response.

Each association runs on a thread of its own with blocking I/O; `dicomnet` holds
the protocol without I/O. Records are handed to the watcher's event loop, which
owns the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from dicomhub.config import DicomConfig
from dicomhub.errors import DicomhubError
from dicomhub.protocol import InstanceRecord, Rejection, record_text

from . import dicomnet as net
from . import reader
from .spool import Entry, Spool
from .state import Outcome

log = logging.getLogger("dicomhub.watcher")

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
INCOMING = ".incoming"  # hidden: the watcher ignores it
ASSOCIATE_TIMEOUT = 30.0  # for the A-ASSOCIATE-RQ after connecting (the ARTIM timer)
IDLE_TIMEOUT = 120.0  # an association silent this long is aborted
SPILL_BYTES = 32 << 20  # larger data sets go to their spool file as they arrive
RECENT = 10_000  # instances whose own file event is still expected
HANDOVER = 0.005  # seconds a stored instance's record may wait to join others


class Listener:
    def __init__(self, config: DicomConfig, folder: Path, root: Path, label: str,
                 loop: asyncio.AbstractEventLoop, accept: Callable[[Outcome], None],
                 scratch: Path | None = None) -> None:
        self.config, self.folder, self.root, self.label = config, folder, root, label
        self.scratch = scratch  # a folder for temporary files, outside the watched tree
        self.incoming = folder / INCOMING
        self.spool = Spool(self.incoming, folder)
        self.loop, self.accept = loop, accept
        self.received = 0
        self.in_flight: set[str] = set()  # paths being written: not for the watcher's parsers
        self._recent: OrderedDict[str, int] = OrderedDict()  # path: size, until its event
        self._arrived: list[Outcome] = []  # stored, not yet handed to the event loop
        self._draining = False  # a drain is scheduled
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._open: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        self._contexts = net.supported_contexts()

    def start(self) -> None:
        """Put back what a crash left in the spool, then listen. Raises DicomhubError."""
        try:
            self.incoming = _incoming(self.folder, self.scratch)
            self.spool = Spool(self.incoming, self.folder)
            recovered = self.spool.recover(self._final_of)
            self.spool.start()
        except OSError as exc:
            raise DicomhubError(f"cannot write DICOM instances into {self.folder}: "
                                f"{exc.strerror or exc}") from None
        if recovered:
            log.warning("DICOM listener: %d instances received before a crash were put "
                        "in place", recovered)
        try:
            self._server = socket.create_server((self.config.host, self.config.port),
                                                backlog=64)
        except OSError as exc:
            raise DicomhubError(
                f"cannot listen for DICOM on {self.config.host}:{self.config.port}: "
                f"{exc.strerror or exc}; choose another [watcher.dicom] port or stop "
                "what uses it") from None
        self._accepting = threading.Thread(target=self._accept_loop, args=(self._server,),
                                           name="dicom-listener", daemon=True)
        self._accepting.start()
        log.info("DICOM listener %s on %s:%d, storing into %s", self.config.ae_title,
                 self.config.host, self.port, self.folder)

    @property
    def port(self) -> int:
        """The port listened on (config may say 0: any free one)."""
        return int(self._server.getsockname()[1]) if self._server is not None else 0

    def stop(self) -> None:
        """Stop listening and abort open associations: what they had not heard
        success for, their peers send again."""
        with self._lock:
            self._closing = True
            server, self._server = self._server, None
            open_ = list(self._open.items())
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes accept()
            server.close()
        if self._accepting is not None:
            self._accepting.join(5)
        for conn, _ in open_:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes recv(); the thread sends no more
        for _, thread in open_:
            thread.join(10)
        self.spool.stop()

    def busy(self, path: str) -> bool:
        """On the event loop: whether a file event for `path` is this listener's own
        doing (the file is being written, or was written and its record handed over)."""
        with self._lock:
            if path in self.in_flight:
                return True
        size = self._recent.pop(path, None)
        if size is None:
            return False
        try:
            return os.stat(path).st_size == size
        except OSError:
            return False

    def drain(self) -> None:
        """On the event loop: hand what arrived to the outbox (its next commit)."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
            self._draining = False
        for outcome in arrived:
            path = os.fsdecode(outcome.path)
            self.accept(outcome)
            self._recent[path] = outcome.size
            if len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        with self._lock:
            for outcome in arrived:
                self.in_flight.discard(os.fsdecode(outcome.path))
            self.received += len(arrived)

    def _hand_over(self, final: Path, record: InstanceRecord, st: os.stat_result) -> None:
        """After the response: the record, to the event loop with others that arrive
        within HANDOVER (one wake-up of the loop for them all)."""
        rel = reader.display_path(final, self.root, self.label)
        text = record_text(replace(record, path=rel, size=st.st_size, mtime=st.st_mtime))
        outcome = Outcome(os.fsencode(final), st.st_size, st.st_mtime_ns, text, refound=True)
        with self._lock:
            self._arrived.append(outcome)
            wake, self._draining = not self._draining, True
        if wake:
            self.loop.call_soon_threadsafe(self.loop.call_later, HANDOVER, self.drain)

    # associations: one thread each, blocking I/O -------------------------------------
    # Each association is a strict request-response sequence, so a thread per
    # association reading its socket directly costs nothing in parallelism and keeps
    # the event loop, busy with the outbox, out of every instance's path.

    def _accept_loop(self, server: socket.socket) -> None:
        while True:
            try:
                conn, address = server.accept()
            except OSError:
                return  # closed by stop()
            thread = threading.Thread(target=self._association, args=(conn, address),
                                      name="dicom-association", daemon=True)
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                self._open[conn] = thread
            thread.start()

    def _association(self, conn: socket.socket, address: tuple[str, int]) -> None:
        peer = f"{address[0]}:{address[1]}"
        try:
            with contextlib.suppress(OSError):
                # Nagle's algorithm holds back our small responses: with it on, a
                # C-STORE of a 130 KB file takes ~57 ms instead of ~3 ms on loopback.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._associate(conn, peer)
        except net.ProtocolError as exc:
            log.warning("DICOM association from %s aborted: %s", peer, exc)
            _send_quietly(conn, net.abort(exc.reason))
        except TimeoutError:
            log.warning("DICOM association from %s aborted: no PDU for too long", peer)
            _send_quietly(conn, net.abort())
        except (ConnectionError, EOFError, OSError) as exc:
            if not self._closing:
                log.warning("DICOM association from %s: the connection was lost (%s)",
                            peer, getattr(exc, "strerror", None) or exc)
        except Exception:  # noqa: BLE001 - one peer's association must not end the listener
            log.exception("DICOM association from %s failed", peer)
            _send_quietly(conn, net.abort())
        finally:
            with self._lock:
                self._open.pop(conn, None)
            conn.close()

    def _associate(self, conn: socket.socket, peer: str) -> None:
        conn.settimeout(ASSOCIATE_TIMEOUT)
        kind, body = _recv_pdu(conn)
        if kind != net.ASSOCIATE_RQ:
            raise net.ProtocolError(f"PDU type {kind} before A-ASSOCIATE-RQ",
                                    net.ABORT_UNEXPECTED_PDU)
        with self._lock:
            busy = len(self._open) > self.config.max_associations
        answer, association = net.negotiate(body, self._contexts,
                                            self.config.allowed_calling_aets, busy)
        conn.sendall(answer)
        if association is None:
            log.warning("DICOM association from %s refused (%s)", peer,
                        "too many open" if busy else "calling AE title not allowed, or "
                        "not a request we can accept")
            return
        label = f"{association.calling_ae} ({peer})"
        log.info("DICOM association from %s accepted: %d of %d contexts", label,
                 len(association.contexts),
                 len(association.contexts) + len(association.rejected))
        conn.settimeout(IDLE_TIMEOUT)
        stored = self._serve(conn, association, label)
        log.info("DICOM association from %s released: %d instances stored", label, stored)

    def _serve(self, conn: socket.socket, association: net.Association, label: str) -> int:
        """Read P-DATA until the peer releases; answer each message. Returns how many
        instances were stored."""
        stored = 0
        command_parts: list[bytes] = []
        message: _Message | None = None
        try:
            while True:
                kind, body = _recv_pdu(conn)
                if kind == net.RELEASE_RQ:
                    conn.sendall(net.RELEASE_RP_PDU)
                    return stored
                if kind == net.ABORT:
                    log.warning("DICOM association from %s aborted by the peer", label)
                    return stored
                if kind != net.P_DATA_TF:
                    raise net.ProtocolError(f"unexpected PDU type {kind}",
                                            net.ABORT_UNEXPECTED_PDU)
                for context_id, control, fragment in net.pdvs(body):
                    if context_id not in association.contexts:
                        raise net.ProtocolError(f"presentation context {context_id} "
                                                "was not accepted")
                    if control & 1:  # a command fragment
                        if message is not None:
                            raise net.ProtocolError("a command while a data set was due")
                        command_parts.append(bytes(fragment))
                        if not control & 2:
                            continue
                        message = _Message(context_id, net.decode_command(
                            b"".join(command_parts)), association, self.spool)
                        command_parts = []
                        if not message.has_data_set:
                            self._answer(conn, association, message)
                            message = None
                    else:
                        if message is None or context_id != message.context_id:
                            raise net.ProtocolError("a data set without its command")
                        message.add(fragment)
                        if control & 2:
                            stored += self._answer(conn, association, message)
                            message = None
        finally:
            if message is not None:
                message.discard()

    def _answer(self, conn: socket.socket, association: net.Association,
                message: _Message) -> int:
        """Act on a complete message and send its response; 1 if an instance was
        stored."""
        command = message.command
        field = int(command.get(net.COMMAND_FIELD, -1))
        message_id = int(command.get(net.MESSAGE_ID, 0))
        sop_class = str(command.get(net.AFFECTED_SOP_CLASS, ""))
        sop = str(command.get(net.AFFECTED_SOP_INSTANCE, ""))
        abstract = association.contexts[message.context_id][0]
        status, stored = net.SUCCESS, None
        if field == net.C_CANCEL_RQ:
            return 0  # nothing to cancel: each operation is answered before the next
        if field == net.C_ECHO_RQ:
            response = net.encode_response(net.C_ECHO_RSP, message_id, net.SUCCESS,
                                           sop_class or net.VERIFICATION)
        elif field == net.C_STORE_RQ and message.has_data_set:
            if sop_class != abstract or abstract == net.VERIFICATION:
                status = net.SOP_CLASS_NOT_SUPPORTED
                message.discard()
            else:
                status, stored = self._store(message, sop, association.calling_ae)
            response = net.encode_response(net.C_STORE_RSP, message_id, status,
                                           sop_class, sop)
        else:
            message.discard()
            status = net.UNRECOGNISED_OPERATION
            response = net.encode_response((field & 0x7FFF) | 0x8000, message_id, status,
                                           sop_class)
        conn.sendall(b"".join(net.p_data(message.context_id, True, response,
                                         association.peer_max_pdu)))
        if stored is not None:
            # While the peer gets its next instance ready.
            self._hand_over(*stored)
        return int(field == net.C_STORE_RQ and status == net.SUCCESS)

    def _store(self, message: _Message, sop: str, calling: str
               ) -> tuple[int, tuple[Path, InstanceRecord, os.stat_result] | None]:
        """Parse what arrived and write it atomically: the status, and on success
        what the record needs."""
        try:
            record = message.record(self.folder / "x.dcm", self.root, self.label)
        except OSError as exc:
            message.discard()
            log.error("C-STORE from %s refused: cannot write to the spool: %s",
                      calling, exc.strerror or exc)
            return net.OUT_OF_RESOURCES, None
        final = self._final(record, sop)
        if final is None:
            message.discard()
            detail = record.detail if isinstance(record, Rejection) else "its UIDs"
            log.warning("C-STORE from %s refused: not an instance with valid UIDs (%s)",
                        calling, detail)
            return net.CANNOT_UNDERSTAND, None
        assert isinstance(record, InstanceRecord)
        with self._lock:
            self.in_flight.add(str(final))
        try:
            st = message.write(final)
        except OSError as exc:
            with self._lock:
                self.in_flight.discard(str(final))
            log.error("C-STORE from %s refused: cannot write %s: %s", calling, final,
                      exc.strerror or exc)
            return net.OUT_OF_RESOURCES, None
        # The file is durable now (or whole in the spool, which puts it in place at the
        # next start), so success can be answered. Its record is handed over after
        # the response; if the watcher dies first, its start-up walk finds the file
        # (not in its memory of delivered files) and reads it.
        return net.SUCCESS, (final, record, st)

    def _final(self, record: InstanceRecord | Rejection | None, sop: str) -> Path | None:
        """Where an instance is stored, or None when its UIDs cannot name a file."""
        if not isinstance(record, InstanceRecord) or record.sop_instance_uid != sop \
                or not all(_UID.fullmatch(u) and len(u) <= 64 for u in (
                    record.study_instance_uid, record.series_instance_uid, sop)):
            return None
        return self.folder / record.study_instance_uid / record.series_instance_uid \
            / f"{sop}.dcm"

    def _final_of(self, spooled: Path) -> Path | None:
        record = reader.read_file(spooled, spooled.parent, self.label)
        sop = record.sop_instance_uid if isinstance(record, InstanceRecord) else ""
        return self._final(record, sop)


class _Message:
    """One DIMSE message being received: its command, and its data set in memory,
    or, past SPILL_BYTES, in its spool file as it arrives (an instance may be
    gigabytes)."""

    def __init__(self, context_id: int, command: dict[int, str | int],
                 association: net.Association, spool: Spool) -> None:
        self.context_id, self.command = context_id, command
        self.has_data_set = command.get(net.DATA_SET_TYPE, net.NO_DATA_SET) != net.NO_DATA_SET
        self.spool = spool
        # Everything the file meta needs is in the command and the context.
        self.meta = net.file_meta(
            str(command.get(net.AFFECTED_SOP_CLASS, "")),
            str(command.get(net.AFFECTED_SOP_INSTANCE, "")),
            association.contexts[context_id][1], association.calling_ae)
        self.parts: list[bytes | memoryview] = [self.meta]
        self.size = 0
        self.entry: Entry | None = None  # once spilled, or once complete
        self.error: OSError | None = None  # the spool refused it: answered as such

    def add(self, fragment: memoryview) -> None:
        if self.error is not None:
            return  # the rest of a message that fails anyway
        self.size += len(fragment)
        if self.entry is None:
            self.parts.append(fragment)
            if self.size <= SPILL_BYTES:
                return
        self._spool(fragment if self.entry is not None else None)

    def record(self, path: Path, root: Path,
               label: str) -> InstanceRecord | Rejection | None:
        """Start the write, then parse: the record, from the bytes in memory (or the
        header of the spool file). Raises OSError when the spool refuses the data."""
        if self.error is not None:
            raise self.error
        if self.entry is not None:
            self.entry.write_back()
            # (its path is replaced with the final one once written)
            return reader.read_file(Path(self.entry.path), self.spool.folder, label)
        data = b"".join(self.parts)
        self.parts = []
        self._spool(data)
        if self.error is not None:
            raise self.error
        assert self.entry is not None
        # The disk starts on it while it is parsed; `write` waits for the rest.
        self.entry.write_back()
        return reader.read_bytes(data, path, root, label)

    def write(self, final: Path) -> os.stat_result:
        """Synced and placed under `final`: after a crash, the final name holds the
        whole file or nothing, or the spool holds it whole for the next start."""
        entry, self.entry = self.entry, None
        assert entry is not None, "record() spools the data set first"
        return entry.commit(final)

    def discard(self) -> None:
        if self.entry is not None:
            self.entry.discard()
            self.entry = None
        self.parts = []

    def _spool(self, data: bytes | memoryview | None) -> None:
        """Write `data`, or what is held in memory, to the spool file."""
        try:
            if self.entry is None:
                self.entry = self.spool.take()
                for part in self.parts if data is None else [data]:
                    self.entry.write(part)
                self.parts = []
            elif data is not None:
                self.entry.write(data)
        except OSError as exc:
            self.error = exc
            self.discard()


def _recv_pdu(conn: socket.socket) -> tuple[int, memoryview]:
    header = _recv_exactly(conn, 6)
    kind, length = net.PDU_HEADER.unpack(header)
    if kind not in (net.ASSOCIATE_RQ, net.P_DATA_TF, net.RELEASE_RQ, net.RELEASE_RP,
                    net.ABORT, net.ASSOCIATE_AC, net.ASSOCIATE_RJ):
        raise net.ProtocolError(f"unknown PDU type {kind}", net.ABORT_UNRECOGNISED_PDU)
    if length > net.MAX_PDU + 6:
        raise net.ProtocolError(f"a PDU of {length} bytes, above the {net.MAX_PDU} agreed")
    return kind, _recv_exactly(conn, length)


def _recv_exactly(conn: socket.socket, size: int) -> memoryview:
    buffer = memoryview(bytearray(size))
    got = 0
    while got < size:
        n = conn.recv_into(buffer[got:])
        if n == 0:
            raise EOFError("the peer closed the connection")
        got += n
    return buffer


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(2.0)
        conn.sendall(data)


def _incoming(folder: Path, scratch: Path | None) -> Path:
    """The spool folder: in `scratch` (the watcher's state folder) when it is on the
    same file system, so that links and renames into place work and the writes
    raise no file events in the watched tree; else a hidden folder there."""
    folder.mkdir(parents=True, exist_ok=True)
    if scratch is not None:
        candidate = scratch / "incoming"
        candidate.mkdir(parents=True, exist_ok=True)
        if os.stat(candidate).st_dev == os.stat(folder).st_dev:
            return candidate
    hidden = folder / INCOMING
    hidden.mkdir(exist_ok=True)
    return hidden
