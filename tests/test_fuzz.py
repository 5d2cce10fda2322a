"""Fuzzing the header reader: damaged files never crash, hang or balloon read_file.

Seeds are files built with tests/factory.py in several layouts and, when the sample
folder is there, the real samples under SEED_LIMIT bytes. Each example damages a
copy (bogus or undefined element lengths, truncation, flipped, overwritten, inserted
or deleted bytes) and reads it once. read_file must return a record or a rejection
the hub accepts, within TIME_LIMIT, and allocate at most the file's size plus SLACK:
a damaged length declaring 4 GB must not cost 4 GB. The tests after the properties
pin the damage the fuzzing found.
"""

from __future__ import annotations

import re
import signal
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

import factory
from conftest import manifest, samples_folder
from dicomhub.protocol import (
    REJECTION_REASONS,
    InstanceRecord,
    Rejection,
    parse_record,
    record_to_json,
)
from watcher.reader import MAX_INFLATED, read_file

TIME_LIMIT = 5.0  # seconds; the slowest of 30,000 random examples took 0.5 s
# Peak allocation allowed beyond the file's size. Measured over 30,000 random
# examples: at most 1.8 MB (pydicom's objects for the content tree of an SR sample,
# undamaged); before the fixes a bogus length cost the whole 4 GB.
SLACK = 4 << 20
SEED_LIMIT = 256 << 10
HUGE = 0xFFFFFFF0
# Zero pixels in a built seed: a sequence that runs on into them read one empty item
# per 8 bytes (~700 bytes each), so the allocation check notices at this size.
ZERO_PIXELS = 64 << 10
# In a rejection's detail these mean a bug, not damage (one was: pydicom adds the
# file object's name to a str, so a Path there turned every EOFError into a TypeError).
PROGRAMMING_ERRORS = re.compile(r"\b(TypeError|AttributeError|NameError|UnboundLocalError)\b")

_VRS = (b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM "
        b"UC UI UL UN UR US UT UV").split()
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_EXPLICIT_HEADER = re.compile(b"(?=[\\x00-\\xff]{4}(?:" + b"|".join(_VRS) + b"))")
# Tags whose 4-byte length follows them directly in implicit VR (and in items).
_KNOWN_TAGS = (0x00020000, 0x00020010, 0x00080005, 0x00080016, 0x00080018, 0x0020000D,
               0x0020000E, 0x00100010, 0x00280010, 0x7FE00010, 0xFFFEE000, 0xFFFEE00D,
               0xFFFEE0DD)

pytestmark = pytest.mark.fault  # malformed files at scale: a fault test too


# Seeds -----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Seed:
    name: str
    raw: bytes
    lengths: tuple[tuple[int, int], ...]  # (offset, width) of the length fields found

    def __repr__(self) -> str:
        return f"Seed({self.name!r}, {len(self.raw)} bytes)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis would print every field of a dataclass


def seed(name: str, raw: bytes) -> Seed:
    """A seed with the length fields of its element headers, found by their shape:
    explicit VR headers by their VR, implicit ones by the tags of known elements."""
    lengths = set()
    for match in _EXPLICIT_HEADER.finditer(raw):
        at = match.start()
        long = raw[at + 4:at + 6] in _LONG_VRS
        lengths.add((at + 8, 4) if long else (at + 6, 2))
    for tag in _KNOWN_TAGS:
        for match in re.finditer(re.escape(struct.pack("<HH", tag >> 16, tag & 0xFFFF)), raw):
            lengths.add((match.start() + 4, 4))
    return Seed(name, raw, tuple(sorted(at for at in lengths if at[0] + at[1] <= len(raw))))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# Fixed, so the built seeds (and so the examples) are the same on every run.
UIDS = {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.1", "StudyInstanceUID": "1.2.3.4",
        "SeriesInstanceUID": "1.2.3.4.5"}


def sequence() -> Sequence:
    item = Dataset()
    item.ReferencedSOPClassUID = factory.CT_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    return Sequence([item])


@pytest.fixture(scope="module")
def built_seeds(scratch: Path) -> list[Seed]:
    path = scratch / "seed.dcm"
    seeds = []
    for preamble in (True, False):
        for implicit in (False, True):
            layout = (f"{'preamble' if preamble else 'bare'}-"
                      f"{'implicit' if implicit else 'explicit'}")
            factory.write(path, preamble=preamble, implicit=implicit, **UIDS)
            seeds.append(seed(layout, path.read_bytes()))
            # with a sequence, for item headers to damage
            factory.write(path, preamble=preamble, implicit=implicit, pixels=64,
                          ReferencedImageSequence=sequence(), **UIDS)
            seeds.append(seed(f"{layout}-sequence-64px", path.read_bytes()))
        # zeros after a sequence, for one that runs on past its end to read
        factory.write(path, preamble=preamble, pixels=ZERO_PIXELS,
                      IconImageSequence=sequence(), **UIDS)
        seeds.append(seed(f"{'preamble' if preamble else 'bare'}-icon-zeros", path.read_bytes()))
    return seeds


@pytest.fixture(scope="module")
def sample_seeds() -> list[Seed]:
    folder = samples_folder()
    if folder is None:
        pytest.skip("sample DICOM folder not found: set DICOMHUB_SAMPLES to a folder "
                    "holding MANIFEST.tsv and files/ (the built-file fuzz still runs)")
    rows = [row for row in manifest(folder) if 0 < int(row["size"]) < SEED_LIMIT]
    return [seed(row["path"], (folder / row["path"]).read_bytes()) for row in rows]


# Damage ----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Damaged:
    seed: Seed
    edits: tuple[str, ...]
    raw: bytes

    def __repr__(self) -> str:  # a failing example names its edits, not 256 KB of bytes
        return f"Damaged({self.seed!r}, {len(self.raw)} bytes: {'; '.join(self.edits)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


Draw = Callable[[st.SearchStrategy[Any]], Any]


def _position(draw: Draw, size: int) -> int:
    """Anywhere, but often in the first KB, where the header is."""
    return int(draw(st.one_of(st.integers(0, min(size, 1024)), st.integers(0, size))))


def _length_value(draw: Draw, width: int, room: int) -> int:
    """A bogus length: the edges of the field, a size just past the end of the file
    (`room` bytes follow the field), or anything."""
    top = (1 << 8 * width) - 1
    edges = [top, top - 1, top - 15, 1 << 8 * width - 1, (1 << 8 * width - 1) - 1]
    near_end = st.integers(max(room - 8, 0), room + 64).map(lambda n: min(n, top))
    return int(draw(st.one_of(st.sampled_from(edges), near_end, st.integers(0, top))))


def _truncate(draw: Draw, data: bytearray) -> str:
    at = _position(draw, len(data))
    del data[at:]
    return f"truncate at {at}"


def _flip(draw: Draw, data: bytearray) -> str:
    if not data:
        return "flip nothing"
    at = _position(draw, len(data) - 1)
    bit = draw(st.integers(0, 7))
    data[at] ^= 1 << bit
    return f"flip bit {bit} at {at}"


def _overwrite(draw: Draw, data: bytearray) -> str:
    at = _position(draw, len(data))
    blob = draw(st.binary(min_size=1, max_size=16))
    data[at:at + len(blob)] = blob
    return f"overwrite {blob.hex()} at {at}"


def _insert(draw: Draw, data: bytearray) -> str:
    at = _position(draw, len(data))
    blob = draw(st.binary(min_size=1, max_size=64))
    data[at:at] = blob
    return f"insert {blob.hex()} at {at}"


def _delete(draw: Draw, data: bytearray) -> str:
    at = _position(draw, len(data))
    count = draw(st.integers(1, 64))
    del data[at:at + count]
    return f"delete {count} at {at}"


_EDITS = (_truncate, _flip, _overwrite, _insert, _delete)


@st.composite
def damaged(draw: Draw, seed: Seed) -> Damaged:
    """The seed with bogus lengths in some element headers, then a few other edits
    (lengths first: they are found in the undamaged layout)."""
    data = bytearray(seed.raw)
    edits = []
    for _ in range(draw(st.integers(0, 3)) if seed.lengths else 0):
        at, width = draw(st.sampled_from(seed.lengths))
        value = _length_value(draw, width, len(data) - at - width)
        data[at:at + width] = value.to_bytes(width, "little")
        edits.append(f"length {value:#x} at {at}")
    # undefined length where a defined one was (pydicom writes defined lengths): a
    # sequence or value with no end, read on until something stops it
    wide = [at for at, width in seed.lengths if width == 4]
    for _ in range(draw(st.integers(0, 1)) if wide else 0):
        at = draw(st.sampled_from(wide))
        data[at:at + 4] = b"\xff\xff\xff\xff"
        edits.append(f"undefined length at {at}")
    for _ in range(draw(st.integers(0 if edits else 1, 3))):
        edits.append(draw(st.sampled_from(_EDITS))(draw, data))
    return Damaged(seed, tuple(edits), bytes(data))


# Checks ----------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm. A BaseException, so read_file cannot turn it into a
    rejection, and hypothesis stops at once instead of shrinking TIME_LIMIT at a time."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds`; put back any outer alarm (pytest-timeout's)."""
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            left = max(outer - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, interval)


@dataclass
class Reading:
    result: InstanceRecord | Rejection | None
    peak: int  # bytes allocated at most during the call, beyond what was before
    seconds: float


def measured_read(path: Path) -> Reading:
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        started = time.monotonic()
        with deadline(TIME_LIMIT):
            result = read_file(path, path.parent)
        seconds = time.monotonic() - started
        return Reading(result, tracemalloc.get_traced_memory()[1] - before, seconds)
    finally:
        if not tracing:
            tracemalloc.stop()


def check_damaged(folder: Path, damage: Damaged) -> None:
    try:
        check(folder, damage.raw)
    except Hang as exc:
        raise Hang(f"{exc}: {damage!r}") from None  # say which example hung


def check(folder: Path, raw: bytes) -> Reading:
    """Read `raw` as a file and check every property; return the reading."""
    path = folder / "damaged.dcm"
    path.write_bytes(raw)
    reading = measured_read(path)
    result = reading.result
    assert isinstance(result, (InstanceRecord, Rejection)), result
    assert result.size == len(raw), result
    if isinstance(result, Rejection):
        assert result.reason in REJECTION_REASONS and result.detail.strip(), result
        assert not PROGRAMMING_ERRORS.search(result.detail), result
    assert parse_record(record_to_json(result)) == result  # the hub takes it as it is
    for value in record_to_json(result).values():
        if isinstance(value, str):
            value.encode("utf-8")  # no lone surrogates on the wire
    # A signal can land in pydicom's `except BaseException` and come out as an
    # OSError (an "unreadable" rejection), so check the time as well.
    assert reading.seconds < TIME_LIMIT, f"took {reading.seconds:.1f} s"
    assert reading.peak < len(raw) + SLACK, \
        f"allocated {reading.peak} bytes reading a {len(raw)}-byte file"
    return reading


# Properties ------------------------------------------------------------------------


@settings(max_examples=800, derandomize=True, deadline=None)
@given(data=st.data())
def test_damaged_built_files(data: st.DataObject, built_seeds: list[Seed],
                             scratch: Path) -> None:
    damage = data.draw(st.sampled_from(built_seeds).flatmap(damaged), label="damage")
    check_damaged(scratch, damage)


@settings(max_examples=800, derandomize=True, deadline=None)
@given(data=st.data())
def test_damaged_sample_files(data: st.DataObject, sample_seeds: list[Seed],
                              scratch: Path) -> None:
    damage = data.draw(st.sampled_from(sample_seeds).flatmap(damaged), label="damage")
    check_damaged(scratch, damage)


# Damage the fuzzing found ----------------------------------------------------------
# Before the fixes each of these but the pixel data case (read_partial stops before
# its value) allocated gigabytes (a declared 4 GB: tracemalloc peak 4.29e9 bytes),
# many times the file's size, or read on for seconds per MB.


def explicit_element(tag: int, vr: str, length: int, value: bytes = b"") -> bytes:
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length) + value


def insert_before(raw: bytes, tag: int, data: bytes) -> bytes:
    """`data` inserted before the element `tag` of an explicit VR LE data set."""
    at = raw.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 132)
    assert at > 0
    return raw[:at] + data + raw[at:]


@pytest.mark.parametrize("vr", ["OB", "UN", "UT"])
def test_huge_length_before_the_uids(tmp_path: Path, vr: str) -> None:
    path = tmp_path / "huge.dcm"
    factory.write(path, pixels=64)
    # (0008,0010) comes before SOP Class and SOP Instance UID
    path.write_bytes(insert_before(path.read_bytes(), 0x00080016,
                                   explicit_element(0x00080010, vr, HUGE, b"abcd")))
    reading = check(tmp_path, path.read_bytes())
    assert isinstance(reading.result, Rejection)
    assert reading.result.reason == "truncated", reading.result
    assert "(0008,0010)" in reading.result.detail
    assert reading.peak < SLACK


def test_huge_length_in_the_file_meta(tmp_path: Path) -> None:
    path = tmp_path / "huge.dcm"
    factory.write(path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x02\x00\x01\x00OB")  # File Meta Information Version
    raw[at + 8:at + 12] = struct.pack("<I", HUGE)
    reading = check(tmp_path, bytes(raw))
    assert isinstance(reading.result, Rejection)
    assert reading.result.reason == "truncated", reading.result
    assert reading.peak < SLACK


def test_file_meta_length_damaged(tmp_path: Path) -> None:
    # Damage turns the VR of (0002,0000) into no VR, so pydicom reads it as implicit
    # VR, with a length of the whole file, and converts it to ints to check the
    # encoding: 13 times the file's size before the fix.
    path = tmp_path / "meta.dcm"
    factory.write(path, pixels=1 << 20)
    raw = bytearray(path.read_bytes())
    raw[-(1 << 20):] = bytes(range(1, 256)) * 4112 + bytes(16)  # no small, cached ints
    assert raw[132:138] == b"\x02\x00\x00\x00UL"
    raw[136:140] = struct.pack("<I", (len(raw) - 140) & ~3)
    reading = check(tmp_path, bytes(raw))
    assert isinstance(reading.result, Rejection)
    assert reading.result.reason == "corrupt", reading.result
    assert "file meta" in reading.result.detail
    assert reading.peak < SLACK


@pytest.mark.parametrize("vr", ["OB", "UN", "UT"])
def test_huge_length_after_the_uids(tmp_path: Path, vr: str) -> None:
    path = tmp_path / "huge.dcm"
    ds = factory.write(path, pixels=64)
    # a private element just before the pixels
    path.write_bytes(insert_before(path.read_bytes(), 0x7FE00010,
                                   explicit_element(0x00291010, vr, HUGE, b"abcd")))
    reading = check(tmp_path, path.read_bytes())
    assert isinstance(reading.result, Rejection)
    assert reading.result.reason == "truncated", reading.result
    assert "(0029,1010)" in reading.result.detail
    assert reading.result.sop_instance_uid == ds.SOPInstanceUID
    assert reading.peak < SLACK


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_huge_pixel_data_length(tmp_path: Path, implicit: bool) -> None:
    path = tmp_path / "huge.dcm"
    factory.write(path, pixels=64, implicit=implicit)
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b"\xe0\x7f\x10\x00")
    length_at = at + 4 if implicit else at + 8
    raw[length_at:length_at + 4] = struct.pack("<I", HUGE)
    reading = check(tmp_path, bytes(raw))
    assert isinstance(reading.result, Rejection)
    assert reading.result.reason == "truncated", reading.result
    assert "pixel data" in reading.result.detail
    assert reading.peak < SLACK


def run_on(path: Path, attribute: str, tag: int, implicit: bool) -> bytes:
    """A file whose sequence `attribute` lost its end: its defined length made
    undefined, with no delimiter, so reading runs on through the zero pixels after."""
    factory.write(path, implicit=implicit, pixels=1 << 20, **{attribute: sequence()})
    raw = bytearray(path.read_bytes())
    at = raw.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 132)
    length_at = at + 4 if implicit else at + 8
    raw[length_at:length_at + 4] = b"\xff\xff\xff\xff"
    return bytes(raw)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_sequence_running_on_after_the_uids(tmp_path: Path, implicit: bool) -> None:
    # Before the fix: explicit VR took 80 MB (an empty item per 8 zero bytes),
    # implicit VR ran for seconds per MB (an element per 8 bytes).
    raw = run_on(tmp_path / "icon.dcm", "IconImageSequence", 0x00880200, implicit)
    reading = check(tmp_path, raw)
    assert isinstance(reading.result, InstanceRecord), reading.result  # read up to it
    assert reading.seconds < 1.0


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_sequence_running_on_before_the_uids(tmp_path: Path, implicit: bool) -> None:
    raw = run_on(tmp_path / "refs.dcm", "ReferencedImageSequence", 0x00081140, implicit)
    reading = check(tmp_path, raw)
    assert isinstance(reading.result, Rejection)
    assert reading.result.reason == "corrupt", reading.result
    assert reading.seconds < 1.0


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_data_set_running_on_into_zeros(tmp_path: Path, implicit: bool) -> None:
    # The element before the pixels claims their header too, so reading goes on in
    # the zeros: an element (0000,0000) per 8 bytes, seconds per MB before the fix.
    path = tmp_path / "zeros.dcm"
    factory.write(path, implicit=implicit, pixels=1 << 20)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x28\x00\x03\x01", 132)  # (0028,0103), just before the pixels
    if implicit:
        raw[at + 4:at + 8] = struct.pack("<I", 2 + 8)
    else:
        raw[at + 6:at + 8] = struct.pack("<H", 2 + 12)
    reading = check(tmp_path, bytes(raw))
    assert isinstance(reading.result, InstanceRecord), reading.result  # read up to it
    assert reading.seconds < 1.0


def deflated_bomb(path: Path, pixel_mib: int) -> None:
    """A deflated file whose data set inflates to a header and `pixel_mib` MiB of
    zero pixels, from a file of about 1 KB per MiB."""
    ds = factory.dataset()
    factory.write(path, ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    (meta_length,) = struct.unpack("<I", raw[140:144])
    meta_end = 144 + meta_length
    header = zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)
    pixels = pixel_mib << 20
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(header + explicit_element(0x7FE00010, "OB", pixels)) \
        + deflater.flush(zlib.Z_FULL_FLUSH)
    # After a full flush each MiB of zeros deflates to the same bytes: compress one.
    block = deflater.compress(bytes(1 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH)
    path.write_bytes(raw[:meta_end] + start + block * pixel_mib + deflater.flush())


def test_deflate_bomb_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bomb.dcm"
    deflated_bomb(path, (MAX_INFLATED >> 20) + 1)
    reading = check(tmp_path, path.read_bytes())
    assert isinstance(reading.result, Rejection)
    assert reading.result.reason == "corrupt", reading.result
    assert "inflates to more than" in reading.result.detail
    assert reading.peak < path.stat().st_size + SLACK


def test_deflated_file_under_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "deflated.dcm"
    deflated_bomb(path, 8)
    result = read_file(path, tmp_path)
    assert isinstance(result, InstanceRecord), result
    assert result.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
