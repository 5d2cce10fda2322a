"""The DICOM upper layer and DIMSE messages an SCP for storage needs, without I/O.

Association negotiation (which presentation contexts, roles and transfer syntaxes
to accept) follows pynetdicom's acceptor, through its PDU classes and
`negotiate_as_acceptor`: that is where the standard's rules are subtle. The data
path (P-DATA-TF, DIMSE command sets, responses, the file meta header) is coded
here, because it is simple and runs for every instance: pynetdicom's threaded
reactors poll with sleeps and cap a single association at ~640 C-STOREs/s on this
machine even when the handler does nothing, against 4,000/s for dcmtk's storescp.

References: PS3.8 section 9 (PDUs), PS3.7 chapter 9 and annex E (DIMSE command
sets), PS3.10 section 7.1 (file meta information).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from dicomhub import __version__

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_HEADER = struct.Struct(">BxI")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
# A UUID-derived UID (PS3.5 B.2): no registered root needed.
IMPLEMENTATION_UID = "2.25.252097542935442104618209102233367367411"
IMPLEMENTATION_VERSION = f"DICOMHUB_{__version__}"[:16]
MAX_PDU = 1 << 20  # what we accept per PDU: few PDUs per instance, bounded memory

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (1, 1, 3)  # permanent, service user, calling AE title not recognised
REJECT_CONTEXT_NAME = (1, 1, 2)  # permanent, service user, application context name
REJECT_VERSION = (1, 2, 2)  # permanent, service provider (ACSE), protocol version
REJECT_BUSY = (2, 3, 2)  # transient, service provider (presentation), local limit exceeded

# A-ABORT reasons when we are the provider (source 2), PS3.8 9.3.8
ABORT_UNRECOGNISED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 1, 2, 6

# DIMSE command fields and statuses (PS3.7 9.3, annex C)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNISED_OPERATION = 0x0211
CANNOT_UNDERSTAND = 0xC000

# Command set tags, group 0000
COMMAND_GROUP_LENGTH = 0x00000000
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
RESPONDED_ID = 0x00000120
DATA_SET_TYPE = 0x00000800
STATUS = 0x00000900
AFFECTED_SOP_INSTANCE = 0x00001000
_TEXT_TAGS = {AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE, 0x00001030}  # 1030: move originator AE
_US_TAGS = {COMMAND_FIELD, MESSAGE_ID, RESPONDED_ID, DATA_SET_TYPE, STATUS, 0x00000700,
            0x00001031}


class ProtocolError(Exception):
    """The peer broke the protocol: the association is aborted with `reason`."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def supported_contexts() -> list[PresentationContext]:
    """Every storage SOP class and Verification, each with every transfer syntax
    pynetdicom knows: instances are stored as sent, never transcoded."""
    contexts = [build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
                for cx in AllStoragePresentationContexts if cx.abstract_syntax]
    contexts.append(build_context(VERIFICATION, ALL_TRANSFER_SYNTAXES))
    return contexts


@dataclass
class Association:
    """What an accepted association settled: the contexts by id, and how big the
    PDUs we send may be."""

    calling_ae: str
    called_ae: str
    contexts: dict[int, tuple[str, str]]  # id: (abstract syntax, transfer syntax)
    peer_max_pdu: int  # 0: no limit
    implementation_uid: str = ""
    implementation_version: str = ""
    rejected: list[int] = field(default_factory=list)


def pdu(kind: int, body: bytes | memoryview) -> bytes:
    return PDU_HEADER.pack(kind, len(body)) + bytes(body)


def reject(reason: tuple[int, int, int]) -> bytes:
    return pdu(ASSOCIATE_RJ, bytes([0, *reason]))


def abort(reason: int = 0, source: int = 2) -> bytes:
    return pdu(ABORT, bytes([0, 0, source, reason]))


RELEASE_RP_PDU = pdu(RELEASE_RP, bytes(4))


def negotiate(body: bytes | memoryview, supported: list[PresentationContext],
              allowed_calling: Iterable[str], busy: bool) -> tuple[bytes, Association | None]:
    """Answer an A-ASSOCIATE-RQ body: (the A-ASSOCIATE-AC or -RJ PDU to send, and
    the association when accepted). Raises ProtocolError for a PDU that cannot be
    decoded."""
    request = A_ASSOCIATE_RQ()
    try:
        request.decode(pdu(ASSOCIATE_RQ, body))
        primitive = request.to_primitive()
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises a variety on bad bytes
        raise ProtocolError(f"undecodable A-ASSOCIATE-RQ ({exc})") from None
    calling = (primitive.calling_ae_title or "").strip()
    allowed = [a.strip() for a in allowed_calling]
    if not request.protocol_version & 1:
        return reject(REJECT_VERSION), None
    if str(primitive.application_context_name) != APPLICATION_CONTEXT:
        return reject(REJECT_CONTEXT_NAME), None
    if allowed and calling not in allowed:
        return reject(REJECT_CALLING_AE), None
    if busy:
        return reject(REJECT_BUSY), None

    peer_max, roles, impl_uid, impl_version = 0, {}, "", ""
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            impl_version = str(item.implementation_version_name or "")
    proposed = primitive.presentation_context_definition_list
    results, reply_roles = negotiate_as_acceptor(
        proposed, _in_proposed_order(proposed, supported), roles or None)

    accept = A_ASSOCIATE()
    accept.application_context_name = UID(APPLICATION_CONTEXT)
    accept.calling_ae_title = primitive.calling_ae_title
    accept.called_ae_title = primitive.called_ae_title
    accept.result, accept.result_source = 0x00, 0x01
    accept.presentation_context_definition_results_list = results
    info: list[Any] = [MaximumLengthNotification(), ImplementationClassUIDNotification(),
                  ImplementationVersionNameNotification()]
    info[0].maximum_length_received = MAX_PDU
    info[1].implementation_class_uid = UID(IMPLEMENTATION_UID)
    info[2].implementation_version_name = IMPLEMENTATION_VERSION
    accept.user_information = info + list(reply_roles)
    answer = A_ASSOCIATE_AC()
    answer.from_primitive(accept)
    association = Association(
        calling_ae=calling, called_ae=(primitive.called_ae_title or "").strip(),
        contexts={int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                  for cx in results if cx.result == 0 and cx.context_id is not None},
        peer_max_pdu=peer_max, implementation_uid=impl_uid,
        implementation_version=impl_version,
        rejected=[int(cx.context_id) for cx in results
                  if cx.result != 0 and cx.context_id is not None])
    return answer.encode(), association


def _in_proposed_order(proposed: list[PresentationContext],
                       supported: list[PresentationContext]) -> list[PresentationContext]:
    """Our contexts, each with its transfer syntaxes in the order the peer proposed
    them: pynetdicom picks the first of *ours* that was proposed, so without this a
    peer offering JPEG, then explicit VR, would have to decompress for us. Stored
    as sent means in the syntax the sender prefers."""
    wanted: dict[str, list[str]] = {}
    for cx in proposed:
        wanted.setdefault(str(cx.abstract_syntax), []).extend(map(str, cx.transfer_syntax))
    out = []
    for cx in supported:
        ours = [str(ts) for ts in cx.transfer_syntax]
        first = [ts for ts in dict.fromkeys(wanted.get(str(cx.abstract_syntax), []))
                 if ts in ours]
        if first:
            cx = build_context(str(cx.abstract_syntax),
                               first + [t for t in ours if t not in first])
        out.append(cx)
    return out


def pdvs(body: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation data values of a P-DATA-TF body: (context id, control
    header, fragment). Control bit 0: command (else data set); bit 1: last."""
    view = memoryview(body)
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise ProtocolError("a truncated PDV item")
        (length,) = struct.unpack_from(">I", view, offset)
        if length < 2 or offset + 4 + length > end:
            raise ProtocolError(f"a PDV item of length {length} in a PDU of {end}")
        yield view[offset + 4], view[offset + 5], view[offset + 6: offset + 4 + length]
        offset += 4 + length


def p_data(context_id: int, command: bool, payload: bytes, max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying one command set or data set, fragmented to fit the
    peer's maximum PDU length (0: no limit)."""
    room = len(payload) if max_pdu == 0 else max(1, max_pdu - 6)
    out = []
    offset = 0
    while True:
        fragment = payload[offset: offset + room]
        offset += len(fragment)
        last = offset >= len(payload)
        control = (1 if command else 0) | (2 if last else 0)
        out.append(pdu(P_DATA_TF, struct.pack(">IBB", len(fragment) + 2, context_id, control)
                       + fragment))
        if last:
            return out


# DIMSE command sets: implicit VR little endian, group 0000 only ---------------------------

def decode_command(data: bytes) -> dict[int, str | int]:
    """The elements a storage SCP reads from a command set. Unknown tags are
    skipped; a malformed set raises ProtocolError."""
    out: dict[int, str | int] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("a truncated command set")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if offset + length > end:
            raise ProtocolError("a command element longer than its command set")
        tag = group << 16 | element
        value = data[offset: offset + length]
        offset += length
        if tag in _US_TAGS and length == 2:
            out[tag] = struct.unpack("<H", value)[0]
        elif tag in _TEXT_TAGS:
            out[tag] = value.decode("ascii", "replace").rstrip("\0 ").strip()
    return out


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _us(tag: int, value: int) -> bytes:
    return _element(tag, struct.pack("<H", value))


def encode_response(command_field: int, message_id: int, status: int,
                    sop_class: str = "", sop_instance: str = "") -> bytes:
    """A response command set with no data set (C-STORE-RSP, C-ECHO-RSP, or the
    response to an operation we do not perform)."""
    body = b"".join([
        _element(AFFECTED_SOP_CLASS, sop_class.encode()) if sop_class else b"",
        _us(COMMAND_FIELD, command_field),
        _us(RESPONDED_ID, message_id),
        _us(DATA_SET_TYPE, NO_DATA_SET),
        _us(STATUS, status),
        _element(AFFECTED_SOP_INSTANCE, sop_instance.encode()) if sop_instance else b"",
    ])
    return _element(COMMAND_GROUP_LENGTH, struct.pack("<I", len(body))) + body


# the file -----------------------------------------------------------------------------

def _explicit(group_element: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", group_element >> 16, group_element & 0xFFFF)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, prefix and file meta information for an instance received as sent
    (PS3.10 7.1), in explicit VR little endian as the standard requires."""
    elements = b"".join([
        _explicit(0x00020001, b"OB", b"\x00\x01"),
        _explicit(0x00020002, b"UI", _padded(sop_class, b"\0")),
        _explicit(0x00020003, b"UI", _padded(sop_instance, b"\0")),
        _explicit(0x00020010, b"UI", _padded(transfer_syntax, b"\0")),
        _explicit(0x00020012, b"UI", _padded(IMPLEMENTATION_UID, b"\0")),
        _explicit(0x00020013, b"SH", _padded(IMPLEMENTATION_VERSION, b" ")),
        _explicit(0x00020016, b"AE", _padded(source_ae, b" ")) if source_ae else b"",
    ])
    length = _explicit(0x00020000, b"UL", struct.pack("<I", len(elements)))
    return bytes(128) + b"DICM" + length + elements
