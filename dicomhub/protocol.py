"""The watcher ↔ hub wire protocol, defined once and used by both sides.

No I/O lives here: messages are parsed from decoded JSON values and
serialised back to them, so both ends (and the tests) share one definition.

Every message is a JSON object with a ``type``:

watcher → hub
    ``hello``   {protocol, watcher_id, software, backlog}
    ``batch``   {batch_id, records: [InstanceRecord | Rejection], backlog}
    ``status``  {backlog}  (the backlog changed with no batch to carry it)
hub → watcher
    ``welcome`` {protocol, hub}
    ``ack``     {batch_id, stored, duplicates, rejected}
    ``error``   {message, batch_id?, fatal}

A batch is acknowledged only after the hub has committed it; the watcher keeps
every record in its outbox until then. Parse errors raise
:class:`ProtocolError` naming the offending field, e.g.
``records[3].sop_instance_uid: expected a non-empty string``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar, Union

PROTOCOL_VERSION = 1

MAX_BATCH_RECORDS = 1000
# Messages a watcher may send a second, on average and at once: the hub closes the
# connection of one sending faster (a broken or hostile client), so the watcher
# paces itself below both.
MAX_FRAMES_PER_SECOND = 100
FRAME_BURST = 200
MAX_TEXT = 1024  # longest free-text attribute we accept (DICOM LO/PN are far shorter)
MAX_UID = 128  # DICOM says 64; real files exceed it, so accept but bound it
MAX_PATH = 4096

REJECTION_REASONS = (
    "empty",  # zero-length file
    "not_dicom",  # no DICOM structure or no DICOM attributes at all
    "truncated",  # the file ends inside a value or inside the pixel data
    "missing_uid",  # no SOP, Series or Study Instance UID
    "dicomdir",  # a DICOMDIR file-set index, not an instance
    "unreadable",  # permission denied, I/O error
    "corrupt",  # DICOM, but its structure cannot be parsed
    "conflict",  # SOP Instance UID already indexed under another series (hub-side)
)


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text names the field."""


def _fail(field: str, expected: str, value: Any) -> ProtocolError:
    # Describe strings and containers without their content: a field may hold PHI,
    # and these messages reach logs on both sides.
    if isinstance(value, str):
        shown = f"a string of {len(value)} characters"
    elif isinstance(value, (list, dict)):
        shown = f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)} items"
    elif value is None or isinstance(value, (bool, int, float)):
        shown = json.dumps(value)
    else:
        shown = type(value).__name__
    return ProtocolError(f"{field}: expected {expected}, got {shown}")


def _str(obj: dict[str, Any], key: str, where: str, *, limit: int = MAX_TEXT,
         required: bool = False) -> str:
    value = obj.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str) or len(value) > limit:
        raise _fail(f"{where}{key}", f"a string of at most {limit} characters", value)
    if required and not value:
        raise _fail(f"{where}{key}", "a non-empty string", value)
    return value


def _int(obj: dict[str, Any], key: str, where: str, *, optional: bool = True,
         minimum: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or (
        minimum is not None and value < minimum
    ):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise _fail(f"{where}{key}", f"an integer{bound}", value)
    return value


def _num(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value):
        raise _fail(f"{where}{key}", "a finite number", value)
    return float(value)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where or "message", "a JSON object", value)
    return value


@dataclass(frozen=True, slots=True)
class FileInfo:
    """Where a record came from: a path relative to its watch root."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """The header of one DICOM instance, as text and integers (UTF-8 on the wire)."""

    kind: ClassVar[str] = "instance"
    path: str
    size: int
    mtime: float
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    accession_number: str = ""
    study_id: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    series_date: str = ""
    series_time: str = ""
    instance_number: int | None = None
    number_of_frames: int | None = None
    rows: int | None = None
    columns: int | None = None
    transfer_syntax_uid: str = ""
    specific_character_set: str = ""
    # Added after the first release: watchers that do not send them leave them empty.
    performed_procedure_step_start_date: str = ""
    performed_procedure_step_start_time: str = ""
    bits_allocated: int | None = None


_UID_FIELDS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid")
_INT_FIELDS = ("series_number", "instance_number", "number_of_frames", "rows", "columns",
               "bits_allocated")
_TEXT_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(InstanceRecord)
    if f.name not in _UID_FIELDS + _INT_FIELDS + ("path", "size", "mtime")
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A file the watcher met that is not an indexable instance, and why."""

    kind: ClassVar[str] = "rejection"
    path: str
    size: int
    mtime: float
    reason: str
    detail: str = ""
    sop_instance_uid: str = ""


Record = Union[InstanceRecord, Rejection]


def _parse_file_fields(obj: dict[str, Any], where: str) -> dict[str, Any]:
    path = _str(obj, "path", where, limit=MAX_PATH, required=True)
    if path.startswith("/") or "\x00" in path:
        raise _fail(f"{where}path", "a path relative to the watch root", path)
    size = _int(obj, "size", where, optional=False, minimum=0)
    return {"path": path, "size": size, "mtime": _num(obj, "mtime", where)}


def parse_record(value: Any, where: str = "record.") -> Record:
    obj = _object(value, where.rstrip("."))
    kind = obj.get("kind")
    fields = _parse_file_fields(obj, where)
    if kind == "rejection":
        reason = obj.get("reason")
        if reason not in REJECTION_REASONS:
            raise _fail(f"{where}reason", f"one of {', '.join(REJECTION_REASONS)}", reason)
        return Rejection(
            reason=reason,
            detail=_str(obj, "detail", where),
            sop_instance_uid=_str(obj, "sop_instance_uid", where, limit=MAX_UID),
            **fields,
        )
    if kind != "instance":
        raise _fail(f"{where}kind", "'instance' or 'rejection'", kind)
    for name in _UID_FIELDS:
        fields[name] = _str(obj, name, where, limit=MAX_UID, required=True)
    for name in _INT_FIELDS:
        fields[name] = _int(obj, name, where)
    for name in _TEXT_FIELDS:
        fields[name] = _str(obj, name, where, limit=MAX_UID if name.endswith("_uid") else MAX_TEXT)
    return InstanceRecord(**fields)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:  # dataclasses.fields() is too slow to call per record
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def record_to_json(record: Record) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": record.kind}
    for name in _field_names(type(record)):
        out[name] = getattr(record, name)
    return out


def record_text(record: Record) -> str:
    """The record as the JSON text the outbox keeps and batches carry."""
    return json.dumps(record_to_json(record), ensure_ascii=False, separators=(",", ":"))


def checked(record: Record) -> Record:
    """The record, or a `corrupt` rejection if the hub would refuse it: a record the
    hub cannot accept must become a visible rejection at the watcher, not block
    its outbox."""
    try:
        parse_record(record_to_json(record))
    except ProtocolError as exc:
        return Rejection(path=record.path, size=record.size, mtime=record.mtime,
                         reason="corrupt", detail=f"values the hub cannot accept: {exc}")
    return record


# Messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    type: ClassVar[str] = "hello"
    watcher_id: str
    protocol: int = PROTOCOL_VERSION
    software: str = ""
    backlog: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    type: ClassVar[str] = "batch"
    batch_id: int
    records: tuple[Record, ...]
    backlog: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    type: ClassVar[str] = "status"
    backlog: int = 0


@dataclass(frozen=True, slots=True)
class Welcome:
    type: ClassVar[str] = "welcome"
    protocol: int = PROTOCOL_VERSION
    hub: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    type: ClassVar[str] = "ack"
    batch_id: int
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class Error:
    type: ClassVar[str] = "error"
    message: str
    batch_id: int | None = None
    fatal: bool = False


Message = Union[Hello, Batch, Status, Welcome, Ack, Error]

WATCHER_ID_LIMIT = 128


def _parse_hello(obj: dict[str, Any]) -> Hello:
    watcher_id = _str(obj, "watcher_id", "", limit=WATCHER_ID_LIMIT, required=True)
    if not watcher_id.isprintable():
        raise _fail("watcher_id", "printable text", watcher_id)
    return Hello(
        watcher_id=watcher_id,
        protocol=_int(obj, "protocol", "", optional=False, minimum=1) or 0,
        software=_str(obj, "software", "", limit=200),
        backlog=_int(obj, "backlog", "", minimum=0) or 0,
    )


def _parse_batch(obj: dict[str, Any]) -> Batch:
    batch_id = _int(obj, "batch_id", "", optional=False, minimum=0)
    records = obj.get("records")
    if not isinstance(records, list) or not records or len(records) > MAX_BATCH_RECORDS:
        raise _fail("records", f"a list of 1 to {MAX_BATCH_RECORDS} records", records)
    parsed = tuple(parse_record(r, f"records[{i}].") for i, r in enumerate(records))
    return Batch(batch_id=batch_id or 0, records=parsed,
                 backlog=_int(obj, "backlog", "", minimum=0) or 0)


def _parse_status(obj: dict[str, Any]) -> Status:
    return Status(backlog=_int(obj, "backlog", "", optional=False, minimum=0) or 0)


def _parse_welcome(obj: dict[str, Any]) -> Welcome:
    return Welcome(protocol=_int(obj, "protocol", "", optional=False, minimum=1) or 0,
                   hub=_str(obj, "hub", "", limit=200))


def _parse_ack(obj: dict[str, Any]) -> Ack:
    return Ack(
        batch_id=_int(obj, "batch_id", "", optional=False, minimum=0) or 0,
        stored=_int(obj, "stored", "", minimum=0) or 0,
        duplicates=_int(obj, "duplicates", "", minimum=0) or 0,
        rejected=_int(obj, "rejected", "", minimum=0) or 0,
    )


def _parse_error(obj: dict[str, Any]) -> Error:
    fatal = obj.get("fatal", False)
    if not isinstance(fatal, bool):
        raise _fail("fatal", "true or false", fatal)
    return Error(message=_str(obj, "message", "", limit=2000),
                 batch_id=_int(obj, "batch_id", "", minimum=0), fatal=fatal)


_PARSERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "hello": _parse_hello,
    "batch": _parse_batch,
    "status": _parse_status,
    "welcome": _parse_welcome,
    "ack": _parse_ack,
    "error": _parse_error,
}


def parse_message(text: str | bytes) -> Message:
    """Decode one frame into a message; raise ProtocolError naming the problem."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not valid JSON: {exc}") from None
    obj = _object(value, "message")
    kind = obj.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise _fail("type", f"one of {', '.join(_PARSERS)}", kind)
    message: Message = parser(obj)
    return message


def encode_message(message: Message) -> str:
    out: dict[str, Any] = {"type": message.type}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name == "records":
            value = [record_to_json(r) for r in value]
        out[f.name] = value
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))
