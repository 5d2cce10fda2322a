"""Read one file's DICOM header into a record, or say why it is not an instance.

`read_file` never raises for anything a file can contain: every outcome is an
:class:`InstanceRecord` or a :class:`Rejection` with a reason. It returns None
only when the file vanished before it could be opened (nothing to report).
It runs in worker processes, so it takes plain paths and returns picklable
frozen records; values are copied out of pydicom's lazy data set here, inside
one try, so no conversion error surfaces later. Damage must not make pydicom read
past the file's size or run on for minutes either: see _BoundedReader,
_read_sequence_item and _Stop.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import io
import logging
import os
import re
import signal
import struct
import sys
import time
import warnings
import zlib
from collections.abc import MutableSequence
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import filereader
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from dicomhub.protocol import InstanceRecord, Rejection, checked, record_text

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DEFLATED = "1.2.840.10008.1.2.1.99"
UNDEFINED_LENGTH = 0xFFFFFFFF
# Reads up to this size pass straight through; larger ones are clamped to the bytes
# left in the file (see _BoundedReader). Nearly every read is a header or a short value.
_SMALL_READ = 1 << 16
# A deflated data set that inflates past this is rejected: pydicom inflates it whole,
# in one call, and deflate can grow 1000-fold (a 1 MB file would take 1 GB).
MAX_INFLATED = 256 << 20
_INFLATE_CHUNK = 1 << 18
_ZERO_RUN = 1024  # (0000,0000) elements read before a data set counts as run on
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC",
                              "UN", "UR", "UT", "UV"})
# Tags common to nearly every real DICOM header: a file parsed with force=True
# that has none of them is junk that happened to decode into "elements".
_TELLTALE_TAGS = (0x00080016, 0x00080018, 0x00080020, 0x00080060, 0x00100010,
                  0x00100020, 0x0020000D, 0x0020000E, 0x00280010)
# ISO 2022 escape sequences (ESC, intermediates 0x20-0x2F, final 0x30-0x7E):
# pydicom leaves some in decoded names (seen with ISO 2022 IR 58).
_ESCAPES = re.compile(r"\x1b[\x20-\x2f]*[\x30-\x7e]?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_TEXT_TAGS = {
    "patient_id": 0x00100020,
    "issuer_of_patient_id": 0x00100021,
    "patient_name": 0x00100010,
    "patient_birth_date": 0x00100030,
    "patient_sex": 0x00100040,
    "study_date": 0x00080020,
    "study_time": 0x00080030,
    "study_description": 0x00081030,
    "accession_number": 0x00080050,
    "study_id": 0x00200010,
    "referring_physician_name": 0x00080090,
    "modality": 0x00080060,
    "series_description": 0x0008103E,
    "body_part_examined": 0x00180015,
    "series_date": 0x00080021,
    "series_time": 0x00080031,
    "sop_class_uid": 0x00080016,
    "specific_character_set": 0x00080005,
    "performed_procedure_step_start_date": 0x00400244,
    "performed_procedure_step_start_time": 0x00400245,
}
_INT_TAGS = {
    "series_number": 0x00200011,
    "instance_number": 0x00200013,
    "number_of_frames": 0x00280008,
    "rows": 0x00280010,
    "columns": 0x00280011,
    "bits_allocated": 0x00280100,
}
_UID_TAGS = {
    "sop_instance_uid": (0x00080018, "SOP Instance UID"),
    "series_instance_uid": (0x0020000E, "Series Instance UID"),
    "study_instance_uid": (0x0020000D, "Study Instance UID"),
}

logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def init_worker() -> None:
    """In a parsing process: leave Ctrl-C to the watcher, which shuts the pool down
    itself; die with the parent if it is killed outright (no orphans holding files
    or the terminal); keep pydicom's warnings about odd files quiet."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    warnings.simplefilter("ignore")


def display_path(path: Path | str, root: Path | str, label: str = "") -> str:
    """The path relative to its watch root, always valid UTF-8, with '/' separators.

    A watcher with several roots passes each root's folder name as `label`, so
    equal relative paths under different roots stay apart.
    """
    text, top = os.fspath(path), os.fspath(root).rstrip(os.sep) + os.sep
    if text.startswith(top):  # the common case, without pathlib's cost per file
        rel = text[len(top):].replace(os.sep, "/")
    else:
        rel = Path(text).relative_to(root).as_posix()
    if label:
        rel = f"{label}/{rel}"
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


class _Stop:
    """Base of the stop_when callbacks, which see every top-level element: a run of
    (0000,0000) elements ends the data set. Damage that carries it on into zero-filled
    pixels reads one per 8 bytes, 2 µs each: minutes for a large file, for nothing."""

    zeros = 0

    def _zero_run(self) -> bool:
        self.zeros += 1
        return self.zeros > _ZERO_RUN


class _StopAtPixels(_Stop):
    """stop_when callback for read_partial that remembers the pixel element's length."""

    def __init__(self) -> None:
        self.length: int | None = None
        self.vr: str | None = None

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            self.length, self.vr = length, vr
            return True
        return not tag and self._zero_run()


def warm_up() -> None:
    """A task for a new parsing process: it exists and has imported what it needs.
    It lingers a moment so that each of the pool's processes gets one."""
    time.sleep(0.05)


def read_files(items: list[tuple[str, str, str]]) -> list[InstanceRecord | Rejection | None]:
    """read_file for many (path, root, label) at once: one round trip to a worker."""
    return [read_file(path, root, label) for path, root, label in items]


def encode_files(items: list[tuple[str, str, str]]) -> list[tuple[str, bool] | None]:
    """read_files, each record checked against the protocol and encoded as the
    outbox's JSON text here in the worker, so the watcher's one event loop only
    stores text. With each: whether the file is worth reading again later (it
    could not be opened)."""
    out: list[tuple[str, bool] | None] = []
    for record in read_files(items):
        if record is None:
            out.append(None)
            continue
        record = checked(record)
        retry = isinstance(record, Rejection) and record.reason == "unreadable"
        out.append((record_text(record), retry))
    return out


def read_file(path: Path | str, root: Path | str, label: str = "", *,
              fast: bool = True) -> InstanceRecord | Rejection | None:
    """`fast=False` converts every value with pydicom: the reference the fast path
    (raw bytes decoded here, for the common character sets) is tested against."""
    rel = display_path(path, root, label)
    try:
        # unbuffered, to wrap; opened by str, as pydicom adds fp.name to strings
        with open(os.fspath(path), "rb", buffering=0) as raw:
            st = os.fstat(raw.fileno())
            base: dict[str, Any] = {"path": rel, "size": st.st_size, "mtime": st.st_mtime}
            if st.st_size == 0:
                return Rejection(reason="empty", detail="the file is empty (0 bytes)", **base)
            return _read_stream(raw, st.st_size, base, fast)
    except FileNotFoundError:
        if not os.path.islink(path):
            return None  # vanished before we could read it: nothing to report
        size, mtime = _stat_or_zero(Path(path))
        return Rejection(path=rel, size=size, mtime=mtime, reason="unreadable",
                         detail="broken symbolic link: its target does not exist")
    except IsADirectoryError:
        return None
    except OSError as exc:
        size, mtime = _stat_or_zero(Path(path))
        why = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else (
            exc.strerror or type(exc).__name__)
        return Rejection(path=rel, size=size, mtime=mtime, reason="unreadable",
                         detail=f"cannot read the file: {why}")


class DamagedStructureError(Exception):
    """Damage found before pydicom reads on through it (for minutes, into gigabytes)."""


class InflateLimitError(DamagedStructureError):
    """A deflated data set inflates to more than MAX_INFLATED bytes."""


_buffered_read = io.BufferedReader.read


class _BoundedReader(io.BufferedReader):
    """The open file as pydicom reads it: no read goes past the size it had when opened.

    pydicom reads each value with read(declared length), and BufferedReader.read(n)
    allocates n bytes before it finds the file shorter: a damaged length of 4 GB
    would cost 4 GB. read() of the whole rest, which pydicom does only to inflate a
    deflated data set, first checks what that would inflate to.
    """

    def __init__(self, raw: io.FileIO, size: int) -> None:
        super().__init__(raw)
        self.size = size

    def read(self, size: int | None = -1, /) -> bytes:
        if size is not None and 0 <= size <= _SMALL_READ:
            return _buffered_read(self, size)  # the hot path: no tell(), no min()
        left = max(self.size - self.tell(), 0)
        if size is not None and size >= 0:
            return _buffered_read(self, min(size, left))
        rest = _buffered_read(self, left)
        _check_inflated_size(rest)
        return rest


# Item, Item Delimitation and Sequence Delimitation tags, little and big endian.
_ITEM_TAGS = frozenset({b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0",
                        b"\xff\xfe\xe0\x00", b"\xff\xfe\xe0\x0d", b"\xff\xfe\xe0\xdd"})
_strict_items: contextvars.ContextVar[bool] = contextvars.ContextVar("strict_items",
                                                                     default=False)
_pydicom_read_sequence_item = filereader.read_sequence_item


def _read_sequence_item(fp: BinaryIO, is_implicit_VR: bool, is_little_endian: bool,
                        encoding: str | MutableSequence[str], offset: int = 0,
                        ) -> Dataset | None:
    """pydicom's read_sequence_item, which while read_file runs insists on an item tag.

    pydicom takes any 8 bytes where an item should start for an item header, so a
    sequence whose end is damaged runs on into the pixel data: from zeros it reads
    an empty item every 8 bytes (80 times the file's size in memory, seconds per MB),
    from other data elements by the million.
    """
    if _strict_items.get():
        tag = fp.read(4)
        fp.seek(-len(tag), os.SEEK_CUR)
        if len(tag) == 4 and tag not in _ITEM_TAGS:
            raise DamagedStructureError(
                f"a sequence runs on past its end: no item at offset {fp.tell() + offset}")
    return _pydicom_read_sequence_item(fp, is_implicit_VR, is_little_endian, encoding,
                                       offset)


filereader.read_sequence_item = _read_sequence_item  # read_sequence looks it up by name


def _check_inflated_size(deflated: bytes) -> None:
    """Raise InflateLimitError if `deflated` inflates past MAX_INFLATED bytes.

    Inflates in chunks, from slices of the input, and keeps none of the output:
    it holds no more than a chunk or two. Data zlib rejects passes: pydicom's own
    inflation meets the same error and reports it.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with memoryview(deflated) as view:
        try:
            for start in range(0, len(view), _INFLATE_CHUNK):
                data: bytes | memoryview = view[start:start + _INFLATE_CHUNK]
                while data and not inflater.eof:
                    inflated = len(inflater.decompress(data, _INFLATE_CHUNK))
                    total += inflated
                    if total > MAX_INFLATED:
                        raise InflateLimitError(
                            f"deflated data set inflates to more than {MAX_INFLATED >> 20}"
                            f" MiB (from {len(deflated)} bytes)")
                    if not inflated and len(inflater.unconsumed_tail) == len(data):
                        break  # no progress (zlib would say why)
                    data = inflater.unconsumed_tail
                if inflater.eof:
                    return
        except zlib.error:
            return


def read_bytes(data: bytes, path: Path | str, root: Path | str, label: str = "",
               mtime: float = 0.0) -> InstanceRecord | Rejection:
    """read_file for a file's content already in memory (one a DICOM peer sent),
    to be stored at `path`: the same outcome, without reading it back."""
    base: dict[str, Any] = {"path": display_path(path, root, label), "size": len(data),
                            "mtime": mtime}
    if not data:
        return Rejection(reason="empty", detail="the file is empty (0 bytes)", **base)
    stream = io.BytesIO(data)
    stream.name = os.fspath(path)  # pydicom names the file in some messages
    return _read_stream(stream, len(data), base, True)


def _read_stream(raw: Any, size: int, base: dict[str, Any],
                 fast: bool) -> InstanceRecord | Rejection:
    if fast:
        quick = _quick_record(raw, size, base)
        if quick is not None:
            return quick
        raw.seek(0)
    strict = _strict_items.set(True)
    try:
        with _BoundedReader(raw, size) as fp:
            return _read_open(fp, base, fast)
    finally:
        _strict_items.reset(strict)


def _stat_or_zero(path: Path) -> tuple[int, float]:
    """Size and mtime for a rejection; a link that leads nowhere has size 0."""
    try:
        st = path.stat()
        return st.st_size, st.st_mtime
    except OSError:
        pass
    try:
        return 0, path.lstat().st_mtime
    except OSError:
        return 0, 0.0


def _read_open(fp: BinaryIO, base: dict[str, Any], fast: bool) -> InstanceRecord | Rejection:
    head = fp.read(144)
    has_dicm = head[128:132] == b"DICM"
    fp.seek(0)
    meta_length = _first_meta_length(head, has_dicm)
    if meta_length > _SMALL_READ:
        # pydicom converts the first file meta element to check how the meta is
        # encoded; a damaged one read as UL becomes 13 times its length in ints.
        return _failure(DamagedStructureError(
            f"the file meta is damaged: its first element declares {meta_length} bytes"),
            has_dicm, base)
    stop = _StopAtPixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(fp, stop_when=stop, force=True)
            return _to_record(ds, has_dicm, stop, fp.tell(), base, fast)
    except InflateLimitError as exc:
        return Rejection(reason="corrupt", detail=str(exc), **base)  # no second try
    except Exception as exc:  # noqa: BLE001 - no file may crash the watcher
        failure = _failure(exc, has_dicm, base)
    if failure.reason == "corrupt":
        # The full parse failed somewhere; the UIDs usually come before the damage.
        recovered = _read_tolerant(fp, has_dicm, base, fast)
        if isinstance(recovered, InstanceRecord):
            return recovered
    return failure


def _first_meta_length(head: bytes, has_dicm: bool) -> int:
    """The length the first file meta element declares, as pydicom will read it;
    0 when there is no file meta or the length takes 2 bytes (at most 64 KiB)."""
    header = head[132:144] if has_dicm else head[:12]
    if len(header) < 12 or header[:2] != b"\x02\x00":
        return 0
    vr = header[4:6]
    if not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):  # pydicom's test for implicit VR
        return int.from_bytes(header[4:8], "little")
    if vr.decode() in _LONG_LENGTH_VRS:
        return int.from_bytes(header[8:12], "little")
    return 0


def _failure(exc: BaseException, has_dicm: bool, base: dict[str, Any]) -> Rejection:
    if isinstance(exc, struct.error) or type(exc).__name__ == "BytesLengthException":
        # pydicom unpacks a tag, VR or length the file is too short to hold.
        return Rejection(reason="truncated" if has_dicm else "not_dicom",
                         detail="file ends inside an element header" if has_dicm
                         else "no DICOM structure found", **base)
    if isinstance(exc, zlib.error):
        return Rejection(reason="truncated" if "incomplete" in str(exc) else "corrupt",
                         detail=f"deflated data set cannot be inflated: {exc}", **base)
    if not has_dicm and not isinstance(exc, (RecursionError, MemoryError)):
        return Rejection(reason="not_dicom", detail="no DICOM structure found", **base)
    if isinstance(exc, RecursionError):
        detail = "sequences nested too deeply to parse"
    elif isinstance(exc, MemoryError):
        detail = "a declared length is impossibly large"
    elif isinstance(exc, DamagedStructureError):
        detail = str(exc)
    else:
        detail = f"cannot parse the header: {type(exc).__name__}: {_clean(str(exc))[:200]}"
    return Rejection(reason="corrupt", detail=detail, **base)


class _StopAtSequenceAfterUids(_Stop):
    """stop_when for a second, tolerant read: once past the instance UIDs (top-level
    tags ascend), stop before the first undefined-length value, where parsers most
    often lose their way (deep nesting, missing delimiters)."""

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if not tag:
            return self._zero_run()
        return tag > 0x0020000E and length == UNDEFINED_LENGTH


def _read_tolerant(fp: BinaryIO, has_dicm: bool, base: dict[str, Any],
                   fast: bool) -> InstanceRecord | Rejection | None:
    try:
        fp.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(fp, stop_when=_StopAtSequenceAfterUids(), force=True)
            return _to_record(ds, has_dicm, _StopAtPixels(), 0, base, fast)
    except Exception:  # noqa: BLE001
        return None


def _to_record(ds: Dataset, has_dicm: bool, stop: _StopAtPixels, pixel_start: int,
               base: dict[str, Any], fast: bool) -> InstanceRecord | Rejection:
    meta = getattr(ds, "file_meta", None) or Dataset()
    media_class = (_fast_uid(meta, 0x00020002) if fast else None)
    media_class = _uid(meta, 0x00020002) if media_class is None else media_class
    transfer_syntax = (_fast_uid(meta, 0x00020010) if fast else None)
    transfer_syntax = _uid(meta, 0x00020010) if transfer_syntax is None else transfer_syntax
    elements = ds._dict  # raw elements, not yet converted: cheap to inspect
    if not has_dicm and not any(t in elements for t in _TELLTALE_TAGS) and not len(meta):
        return Rejection(reason="not_dicom", detail="no DICOM structure found", **base)
    if media_class == DICOMDIR_SOP_CLASS or 0x00041220 in elements:
        return Rejection(reason="dicomdir",
                         detail="a DICOMDIR (file-set index), not an image instance", **base)
    truncated = (_truncation(meta._dict, stop, -1, 0, "")
                 or _truncation(elements, stop, pixel_start, base["size"], transfer_syntax))
    uids: dict[str, str] = {}
    for field, (tag, _) in _UID_TAGS.items():
        fast_uid = _fast_uid(ds, tag) if fast else None
        uids[field] = _uid(ds, tag) if fast_uid is None else fast_uid
    if truncated:
        return Rejection(reason="truncated", detail=truncated,
                         sop_instance_uid=uids["sop_instance_uid"], **base)
    missing = [label for field, (_, label) in _UID_TAGS.items() if not uids[field]]
    if missing:
        if not has_dicm and len(missing) == 3 and not len(meta):
            detail = "no DICOM file meta and no instance UIDs"
        else:
            detail = "no " + ", ".join(missing)
        return Rejection(reason="missing_uid", detail=detail,
                         sop_instance_uid=uids["sop_instance_uid"], **base)
    codec = _simple_codec(ds) if fast else None
    values: dict[str, Any] = {}
    for name, tag in _TEXT_TAGS.items():
        text = _fast_text(ds, tag, codec) if codec else None
        values[name] = _text(ds, tag) if text is None else text
    for name, tag in _INT_TAGS.items():
        number = _fast_integer(ds, tag) if fast else _SLOW
        values[name] = _integer(ds, tag) if number is _SLOW else number
    if not values["sop_class_uid"]:
        values["sop_class_uid"] = media_class
    values["transfer_syntax_uid"] = transfer_syntax or _inferred_syntax(ds)
    values.update(uids)
    return InstanceRecord(**base, **values)


# The fast path: most values are plain bytes in a known encoding, and decoding
# them here costs a fraction of pydicom's general conversion. Anything unusual
# (other character sets, values pydicom already converted) takes pydicom's way.
_SIMPLE_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO 2022 IR 6": "latin-1",
                  "ISO_IR 100": "latin-1", "ISO 2022 IR 100": "latin-1",
                  "ISO_IR 192": "utf-8"}
_US_TAGS = frozenset({0x00280010, 0x00280011, 0x00280100})
_SLOW = object()  # "decide with pydicom"


def _raw(ds: Dataset, tag: int) -> bytes | None:
    """The undecoded value of a top-level element; b"" when absent; None when the
    element is not plain raw bytes (so pydicom must decide)."""
    elem = ds._dict.get(BaseTag(tag))
    if elem is None:
        return b""
    value = getattr(elem, "value", None)
    return value if isinstance(elem, RawDataElement) and isinstance(value, bytes) else None


def _simple_codec(ds: Dataset) -> str | None:
    raw = _raw(ds, 0x00080005)
    if raw is None:
        return None
    return _SIMPLE_CODECS.get(raw.decode("latin-1").strip(" \x00"))


def _fast_text(ds: Dataset, tag: int, codec: str) -> str | None:
    raw = _raw(ds, tag)
    if raw is None:
        return None
    text = raw.decode(codec, "replace")
    return _clean("\\".join(v.strip(" \x00") for v in text.split("\\")))[:1024]


def _fast_uid(ds: Dataset, tag: int) -> str | None:
    raw = _raw(ds, tag)
    if raw is None:
        return None
    return _uid_text(raw)


def _fast_integer(ds: Dataset, tag: int) -> int | None | object:
    raw = _raw(ds, tag)
    if raw is None:
        return _SLOW
    if not raw:
        return None
    elem = ds._dict[BaseTag(tag)]
    if tag in _US_TAGS:
        # pydicom would convert every 2 bytes of a multi-valued US to an int (20 times
        # the size) for us to keep the first
        if len(raw) < 2 or len(raw) % 2 or not isinstance(elem, RawDataElement):
            return _SLOW
        return int.from_bytes(raw[:2], "little" if elem.is_little_endian else "big")
    return _integer_string(raw)


def _integer_string(raw: bytes) -> int | None:
    """The first value of a raw IS element; None when empty or not a whole number."""
    try:
        return _whole_number(raw.split(b"\\", 1)[0].decode("latin-1").strip(" \x00"))
    except ValueError:
        return None


def _whole_number(text: str) -> int | None:
    """An IS value as an integer; None when empty, fractional or out of range."""
    if not text:
        return None
    try:
        number = int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            return None
        number = int(value)
    return number if -(2**63) <= number < 2**63 else None


def _truncation(elements: Any, stop: _StopAtPixels, pixel_start: int, size: int,
                transfer_syntax: str) -> str:
    """Say where the file ends too early, or return '' when it is whole.

    pydicom returns a short value, with no error, for an element cut off by the
    end of the file: compare each value with its declared length.
    """
    end = 0  # where the last element of known length ends
    for tag, elem in elements.items():
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if isinstance(value, bytes) and length not in (None, UNDEFINED_LENGTH) \
                and len(value) < length:
            return (f"file ends inside element {_tag(tag)}: {len(value)} of {length} "
                    "bytes present")
        value_tell = getattr(elem, "value_tell", None)
        if value_tell is not None and length is not None:
            end = max(end, value_tell + (0 if length == UNDEFINED_LENGTH else length))
    # pydicom stops quietly when fewer than 8 bytes remain for the next element header.
    leftover = size - end
    if stop.length is None and pixel_start >= 0 and transfer_syntax != DEFLATED \
            and end and 0 < leftover < 8 and _last_is_defined(elements):
        return f"file ends inside an element header ({leftover} bytes of it present)"
    if stop.length is not None and stop.length != UNDEFINED_LENGTH and pixel_start >= 0 \
            and transfer_syntax != DEFLATED:
        header = 12 if stop.vr in _LONG_LENGTH_VRS else 8
        remaining = size - (pixel_start + header)
        if remaining < stop.length:
            return (f"file ends inside the pixel data: {max(remaining, 0)} of "
                    f"{stop.length} bytes present")
    return ""


def _last_is_defined(elements: Any) -> bool:
    """True when the data set's last element has a defined length, so its end is known."""
    if not elements:
        return False
    last = elements[max(elements)]
    return getattr(last, "length", UNDEFINED_LENGTH) != UNDEFINED_LENGTH


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _clean(text: str) -> str:
    return _CONTROLS.sub("", _ESCAPES.sub("", text)).strip()


def _text(ds: Dataset, tag: int) -> str:
    try:
        elem = ds.get(tag)
        if elem is None or elem.value is None:
            return ""
        value = elem.value
        if isinstance(value, bytes):
            return ""  # undecodable (VR UN/OB where text was expected): nothing trustworthy
        if not isinstance(value, str) and hasattr(value, "__iter__") \
                and not hasattr(value, "family_name"):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        return _clean(text)[:1024]
    except Exception:  # noqa: BLE001 - one bad optional attribute must not reject the file
        return ""


def _integer(ds: Dataset, tag: int) -> int | None:
    try:
        elem = ds.get(tag)
        if elem is None or elem.value in (None, ""):
            return None
        value = elem.value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        if value is None:
            return None
        if isinstance(value, float) and not value.is_integer():
            return None  # "1.5" is no valid IS; rounding would invent a number
        number = int(value)
        return number if -(2**63) <= number < 2**63 else None
    except Exception:  # noqa: BLE001 - malformed IS/US values are dropped, not fatal
        return None


def _uid(ds: Dataset, tag: int) -> str:
    try:
        elem = ds.get(tag)
        if elem is None or elem.value is None:
            return ""
        value = elem.value
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str):
            value = str(value[0]) if len(value) else ""
        return _clean(value.strip("\x00 "))[:128]
    except Exception:  # noqa: BLE001
        return ""


def _inferred_syntax(ds: Dataset) -> str:
    """Files without file meta carry no transfer syntax: report how they decoded."""
    implicit = getattr(ds, "is_implicit_VR", None)
    little = getattr(ds, "is_little_endian", None)
    if implicit is None or little is None:
        return ""
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"


# The quick reader ----------------------------------------------------------------------
#
# Nearly every file is a complete instance with a file meta, in little-endian explicit
# or implicit VR. For those, walking the element headers over the raw bytes costs a
# sixth of pydicom's generic parse (profiled: 26 µs against 164 µs a header). Anything
# unusual (no file meta, big endian, deflate, a character set outside the simple ones,
# missing UIDs, damage of any kind) is declined and goes to pydicom's path above, so
# every rejection and every odd file keeps exactly the outcome it had.

_QUICK_FIRST_READ = 16384
_QUICK_MAX_HEADER = 1 << 20  # a header longer than this goes to pydicom
_QUICK_DEPTH = 16
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VR_BYTES = frozenset(vr.encode() for vr in _LONG_LENGTH_VRS)
_WANTED_TAGS = frozenset({*_TEXT_TAGS.values(), *_INT_TAGS.values(),
                          *(tag for tag, _ in _UID_TAGS.values())})
_PN_TAGS = frozenset({0x00100010, 0x00080090})
_unpack_tag = struct.Struct("<HH").unpack_from
_unpack_u16 = struct.Struct("<H").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from


class _Decline(Exception):
    """The quick reader leaves this file to pydicom."""


class _NeedMore(Exception):
    """The header goes on past the bytes read so far."""


def _quick_record(raw: BinaryIO, size: int, base: dict[str, Any]) -> InstanceRecord | None:
    """The record of a common, complete file, or None to let pydicom read it."""
    if size < 144:
        return None
    data = raw.read(min(size, _QUICK_FIRST_READ))
    while True:
        try:
            return _quick_parse(data, size, base)
        except _NeedMore:
            limit = min(size, _QUICK_MAX_HEADER)
            if len(data) >= limit:
                return None
            data += raw.read(limit - len(data))
        except Exception:  # noqa: BLE001 - _Decline, or a surprise: pydicom decides
            return None


def _header(data: bytes, pos: int, size: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value start) of the element at `pos`."""
    if pos + 8 > len(data):
        raise _NeedMore if len(data) < size else _Decline
    group, element = _unpack_tag(data, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        return tag, b"", _unpack_u32(data, pos + 4)[0], pos + 8
    vr = data[pos + 4:pos + 6]
    if not (0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A):
        raise _Decline  # not explicit VR after all: pydicom guesses
    if vr in _LONG_VR_BYTES:
        if pos + 12 > len(data):
            raise _NeedMore if len(data) < size else _Decline
        return tag, vr, _unpack_u32(data, pos + 8)[0], pos + 12
    return tag, vr, _unpack_u16(data, pos + 6)[0], pos + 8


def _value_end(data: bytes, start: int, length: int, size: int) -> int:
    end = start + length
    if end > size:
        raise _Decline  # truncated: pydicom's path says where
    if end > len(data):
        raise _NeedMore
    return end


def _skip_items(data: bytes, pos: int, size: int, implicit: bool, depth: int) -> int:
    """Skip a sequence of undefined length; return where it ends."""
    if depth > _QUICK_DEPTH:
        raise _Decline
    while True:
        tag, _, length, start = _header(data, pos, size, True)
        if tag == _SEQUENCE_END:
            return start
        if tag != _ITEM:
            raise _Decline
        if length != UNDEFINED_LENGTH:
            pos = _value_end(data, start, length, size)
            continue
        pos = start
        while True:  # an item of undefined length: its elements, up to its delimiter
            tag, vr, length, start = _header(data, pos, size, implicit)
            if tag == _ITEM_END:
                pos = start
                break
            if length == UNDEFINED_LENGTH:
                if not implicit and vr != b"SQ":
                    raise _Decline
                pos = _skip_items(data, start, size, implicit, depth + 1)
            else:
                pos = _value_end(data, start, length, size)


def _quick_parse(data: bytes, size: int, base: dict[str, Any]) -> InstanceRecord:
    if data[128:132] != b"DICM":
        raise _Decline
    pos, meta = 132, {}
    while True:
        if pos + 8 > len(data):
            raise _NeedMore if len(data) < size else _Decline
        if data[pos:pos + 2] != b"\x02\x00":
            break
        tag, _, length, start = _header(data, pos, size, False)
        if length == UNDEFINED_LENGTH:
            raise _Decline
        pos = _value_end(data, start, length, size)
        meta[tag] = data[start:pos]
    syntax = _uid_text(meta.get(0x00020010, b""))
    media_class = _uid_text(meta.get(0x00020002, b""))
    if not syntax or syntax == _EXPLICIT_BE or syntax.startswith(DEFLATED) \
            or media_class == DICOMDIR_SOP_CLASS:
        raise _Decline
    implicit = syntax == _IMPLICIT_LE
    values: dict[int, bytes] = {}
    last = -1
    while pos != size:
        if pos + 8 > size:
            raise _Decline  # ends inside an element header
        tag, vr, length, start = _header(data, pos, size, implicit)
        if tag <= last or tag == 0x00041220:
            raise _Decline  # out of order, or a DICOMDIR
        last = tag
        if tag in _PIXEL_TAGS:
            if length != UNDEFINED_LENGTH and start + length > size:
                raise _Decline  # ends inside the pixel data
            break
        if length == UNDEFINED_LENGTH:
            if not implicit and vr != b"SQ":
                raise _Decline
            pos = _skip_items(data, start, size, implicit, 0)
            continue
        pos = _value_end(data, start, length, size)
        if tag in _WANTED_TAGS:
            values[tag] = data[start:pos]
    return _quick_values(values, media_class, syntax, base)


def _uid_text(raw: bytes) -> str:
    # split bytes, once: a damaged length can make a "UID" of megabytes
    return _clean(raw.split(b"\\", 1)[0].decode("latin-1").strip("\x00 "))[:128]


def _quick_values(values: dict[int, bytes], media_class: str, syntax: str,
                  base: dict[str, Any]) -> InstanceRecord:
    uids: dict[str, Any] = {field: _uid_text(values.get(tag, b""))
                            for field, (tag, _) in _UID_TAGS.items()}
    codec = _SIMPLE_CODECS.get(values.get(0x00080005, b"").decode("latin-1").strip(" \x00"))
    if not all(uids.values()) or codec is None:
        raise _Decline
    fields: dict[str, Any] = {}
    for name, tag in _TEXT_TAGS.items():
        raw = values.get(tag)
        if not raw:
            fields[name] = ""
            continue
        parts = [v.strip(" \x00") for v in raw.decode(codec, "replace").split("\\")]
        if tag in _PN_TAGS:  # as pydicom's PersonName: no trailing empty groups
            parts = [v.rstrip("=") for v in parts]
        fields[name] = _clean("\\".join(parts))[:1024]
    for name, tag in _INT_TAGS.items():
        raw = values.get(tag)
        if not raw:
            fields[name] = None
        elif tag in _US_TAGS:
            if len(raw) % 2:
                raise _Decline
            fields[name] = int.from_bytes(raw[:2], "little")
        else:
            fields[name] = _integer_string(raw)
    if not fields["sop_class_uid"]:
        fields["sop_class_uid"] = media_class
    fields["transfer_syntax_uid"] = syntax
    return InstanceRecord(**base, **fields, **uids)
