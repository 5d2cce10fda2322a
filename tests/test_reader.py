"""Reading one file into a record or a rejection (watcher/reader.py read_file).

Files are built in tmp_path with tests/factory.py, then damaged on purpose; one set of
tests runs over the real sample folder described by its MANIFEST.tsv.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomhub.protocol import InstanceRecord, Rejection, parse_record, record_to_json
from conftest import REPO, TIMEOUT
from factory import CT_IMAGE_STORAGE, dataset, write
from procs import without_root_file_access
from watcher.reader import DICOMDIR_SOP_CLASS, read_file

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
ISO2022_ESCAPE = re.compile(r"\x1b[\x20-\x2f]*[\x30-\x7e]")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

LAYOUTS = [
    pytest.param(True, False, id="preamble-explicit"),
    pytest.param(True, True, id="preamble-implicit"),
    pytest.param(False, False, id="bare-explicit"),
    pytest.param(False, True, id="bare-implicit"),
]
UID_ATTRS = [("SOPInstanceUID", 0x00080018), ("StudyInstanceUID", 0x0020000D),
             ("SeriesInstanceUID", 0x0020000E)]


def instance(path: Path, root: Path, label: str = "") -> InstanceRecord:
    record = read_file(path, root, label)
    assert isinstance(record, InstanceRecord), record
    return record


def rejection(path: Path, root: Path, reason: str) -> Rejection:
    record = read_file(path, root)
    assert isinstance(record, Rejection), record
    assert record.reason == reason, record
    return record


def replace_explicit_element(raw: bytes, group: int, element: int, vr: str,
                             value: bytes) -> bytes:
    """Swap one short-VR element of an explicit VR little endian data set for a new value."""
    header = struct.pack("<HH", group, element) + vr.encode()
    start = raw.find(header, 132)
    assert start > 0 and raw.find(header, start + 1) == -1
    (length,) = struct.unpack("<H", raw[start + 6:start + 8])
    if len(value) % 2:
        value += b" "
    return raw[:start] + header + struct.pack("<H", len(value)) + value + \
        raw[start + 8 + length:]


def is_clean_text(text: str) -> bool:
    text.encode("utf-8")  # raises on lone surrogates
    return "\x1b" not in text and not CONTROL.search(text)


# Layouts and fields --------------------------------------------------------------


@pytest.mark.parametrize("preamble,implicit", LAYOUTS)
def test_reads_every_layout(tmp_path: Path, preamble: bool, implicit: bool) -> None:
    path = tmp_path / "study" / "one.dcm"
    ds = write(path, preamble=preamble, implicit=implicit)
    record = instance(path, tmp_path)
    assert record.sop_instance_uid == ds.SOPInstanceUID
    assert record.series_instance_uid == ds.SeriesInstanceUID
    assert record.study_instance_uid == ds.StudyInstanceUID
    assert record.patient_name == "Test^Patient"
    assert record.rows == 4 and record.columns == 4
    assert record.transfer_syntax_uid == (IMPLICIT_LE if implicit else EXPLICIT_LE)
    assert record.sop_class_uid == CT_IMAGE_STORAGE
    assert record.path == "study/one.dcm"


def test_every_extracted_field(tmp_path: Path) -> None:
    path = tmp_path / "full.dcm"
    write(path, pixels=16, IssuerOfPatientID="HOSP-A", ReferringPhysicianName="Ref^Doc",
          BodyPartExamined="CHEST", SeriesDate="20240103", SeriesTime="111500",
          NumberOfFrames=1, SpecificCharacterSet="ISO_IR 100", PatientName="Buc^Jérôme",
          StudyDescription="Thorax über alles")
    st = path.stat()
    record = instance(path, tmp_path)
    expected = {
        "path": "full.dcm", "size": st.st_size, "mtime": st.st_mtime,
        "sop_class_uid": CT_IMAGE_STORAGE, "patient_id": "TEST-0001",
        "issuer_of_patient_id": "HOSP-A", "patient_name": "Buc^Jérôme",
        "patient_birth_date": "19700101", "patient_sex": "O", "study_date": "20240102",
        "study_time": "101500", "study_description": "Thorax über alles",
        "accession_number": "ACC1", "study_id": "1", "referring_physician_name": "Ref^Doc",
        "modality": "CT", "series_number": 3, "series_description": "Axial",
        "body_part_examined": "CHEST", "series_date": "20240103", "series_time": "111500",
        "instance_number": 1, "number_of_frames": 1, "rows": 4, "columns": 4,
        "transfer_syntax_uid": EXPLICIT_LE, "specific_character_set": "ISO_IR 100",
    }
    for name, value in expected.items():
        assert getattr(record, name) == value, name


def test_absent_optional_attributes_are_empty(tmp_path: Path) -> None:
    path = tmp_path / "sparse.dcm"
    write(path, PatientName=None, Modality=None, SeriesNumber=None, Rows=None, StudyDate=None)
    record = instance(path, tmp_path)
    assert record.patient_name == "" and record.modality == "" and record.study_date == ""
    assert record.series_number is None and record.rows is None
    assert record.number_of_frames is None and record.issuer_of_patient_id == ""


def test_a_file_without_dcm_extension(tmp_path: Path) -> None:
    path = tmp_path / "IM000001"
    ds = write(path)
    assert instance(path, tmp_path).sop_instance_uid == ds.SOPInstanceUID
    bare = tmp_path / "I.1.2"
    ds = write(bare, preamble=False, implicit=True)
    assert instance(bare, tmp_path).sop_instance_uid == ds.SOPInstanceUID


def test_sop_class_falls_back_to_the_file_meta(tmp_path: Path) -> None:
    path = tmp_path / "noclass.dcm"
    write(path, SOPClassUID=None)  # factory puts CT Image Storage in the meta
    assert instance(path, tmp_path).sop_class_uid == CT_IMAGE_STORAGE


def test_whole_pixel_data_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "pix.dcm"
    write(path, pixels=1000)
    assert instance(path, tmp_path).rows == 4


def test_records_are_picklable_and_valid_protocol(tmp_path: Path) -> None:
    good, empty = tmp_path / "a.dcm", tmp_path / "b.dcm"
    write(good, SpecificCharacterSet="ISO_IR 100", PatientName="Äneas^Rüdiger")
    empty.touch()
    for record in (read_file(good, tmp_path), read_file(empty, tmp_path)):
        assert record is not None
        assert pickle.loads(pickle.dumps(record)) == record  # they cross process boundaries
        assert parse_record(record_to_json(record)) == record


# Character sets ------------------------------------------------------------------


@pytest.mark.parametrize("charset,name", [
    ("ISO_IR 100", "Buc^Jérôme"),
    ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
], ids=["latin1", "utf8", "jis-ir87", "jis-ir13-ir87", "korean-ir149"])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_patient_names_decode_to_clean_text(tmp_path: Path, charset: Any, name: str,
                                            implicit: bool) -> None:
    path = tmp_path / "name.dcm"
    write(path, implicit=implicit, SpecificCharacterSet=charset, PatientName=name)
    if isinstance(charset, list) and "ISO 2022 IR 87" in charset:
        assert b"\x1b$B" in path.read_bytes()  # really written with ISO 2022 escapes
    record = instance(path, tmp_path)
    assert record.patient_name == name
    assert is_clean_text(record.patient_name)
    expected_charset = charset if isinstance(charset, str) else "\\".join(charset)
    assert record.specific_character_set == expected_charset


def test_gb2312_escape_sequences_are_stripped(tmp_path: Path) -> None:
    # As real ISO 2022 IR 58 files store it (pydicom cannot write this form): each
    # Chinese component starts with the G1 designator ESC $ ) A, then GB2312 bytes.
    encoded = "Zhang^XiaoDong=".encode() + b"\x1b$)A" + "张".encode("gb2312") + b"^" + \
        b"\x1b$)A" + "小东".encode("gb2312")
    placeholder = "Zhang^XiaoDong=" + "Q" * (len(encoded) - 15)
    path = tmp_path / "gb.dcm"
    write(path, SpecificCharacterSet=["", "ISO 2022 IR 58"], PatientName=placeholder)
    raw = path.read_bytes()
    assert raw.count(placeholder.encode()) == 1
    path.write_bytes(raw.replace(placeholder.encode(), encoded))
    record = instance(path, tmp_path)
    assert record.patient_name == "Zhang^XiaoDong=张^小东"
    assert is_clean_text(record.patient_name)
    assert record.specific_character_set == "\\ISO 2022 IR 58"


# Integers ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    b"abc", b"12abc", b"99999999999999999999", b"--", b"",
    b"1.5",
])
def test_a_bad_integer_string_becomes_none(tmp_path: Path, value: bytes) -> None:
    path = tmp_path / "bad-is.dcm"
    write(path, NumberOfFrames=7)
    raw = path.read_bytes()
    raw = replace_explicit_element(raw, 0x0020, 0x0011, "IS", value)  # SeriesNumber
    raw = replace_explicit_element(raw, 0x0028, 0x0008, "IS", value)  # NumberOfFrames
    path.write_bytes(raw)
    record = instance(path, tmp_path)  # not a rejection
    assert record.series_number is None
    assert record.number_of_frames is None
    assert record.instance_number == 1 and record.rows == 4  # the others survive


def test_integer_strings_with_padding_and_several_values(tmp_path: Path) -> None:
    path = tmp_path / "is.dcm"
    write(path)
    raw = replace_explicit_element(path.read_bytes(), 0x0020, 0x0011, "IS", b" 12 ")
    raw = replace_explicit_element(raw, 0x0020, 0x0013, "IS", b"5\\6")
    path.write_bytes(raw)
    record = instance(path, tmp_path)
    assert record.series_number == 12
    assert record.instance_number == 5


# Rejections ----------------------------------------------------------------------


def test_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.dcm"
    path.touch()
    record = rejection(path, tmp_path, "empty")
    assert record.size == 0 and record.path == "zero.dcm"
    assert record.mtime == path.stat().st_mtime
    assert "empty" in record.detail


@pytest.mark.parametrize("content", [
    b"Hello, this is a text file and not an image.\n" * 20,
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"
    + bytes(range(256)) * 4 + b"\x00\x00\x00\x00IEND\xaeB`\x82",
    b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 10,
    b"PK\x03\x04" + bytes(200),
    b"{\"00100010\": {\"vr\": \"PN\"}}",
    random.Random(1234).randbytes(4096),
], ids=["text", "png", "pdf", "zip", "json", "noise"])
def test_garbage_named_dcm_is_not_dicom(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(content)
    record = rejection(path, tmp_path, "not_dicom")
    assert record.size == len(content)


def _dicomdir(path: Path, *, records: bool, meta: bool) -> None:
    ds = Dataset()
    ds.FileSetID = "TESTSET"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    if records:
        item = Dataset()
        item.DirectoryRecordType = "PATIENT"
        item.PatientID = "TEST-0001"
        ds.DirectoryRecordSequence = Sequence([item])
    if meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = DICOMDIR_SOP_CLASS
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True)


@pytest.mark.parametrize("records", [True, False], ids=["with-records", "without-records"])
def test_a_dicomdir_by_its_media_storage_class(tmp_path: Path, records: bool) -> None:
    path = tmp_path / "DICOMDIR"
    _dicomdir(path, records=records, meta=True)
    record = rejection(path, tmp_path, "dicomdir")
    assert "DICOMDIR" in record.detail


def test_a_dicomdir_by_its_directory_record_sequence(tmp_path: Path) -> None:
    # no file meta at all, but a DirectoryRecordSequence next to instance-like attributes
    ds = dataset()
    item = Dataset()
    item.DirectoryRecordType = "IMAGE"
    ds.DirectoryRecordSequence = Sequence([item])
    path = tmp_path / "index.dcm"
    write(path, ds, preamble=False)
    rejection(path, tmp_path, "dicomdir")
    # and with a meta that claims an ordinary class
    with_meta = tmp_path / "index2.dcm"
    write(with_meta, ds)
    rejection(with_meta, tmp_path, "dicomdir")


@pytest.mark.parametrize("missing,detail", [
    (["SOPInstanceUID"], "no SOP Instance UID"),
    (["SeriesInstanceUID"], "no Series Instance UID"),
    (["StudyInstanceUID"], "no Study Instance UID"),
    (["SeriesInstanceUID", "StudyInstanceUID"], "no Series Instance UID, Study Instance UID"),
    (["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"],
     "no SOP Instance UID, Series Instance UID, Study Instance UID"),
])
def test_missing_uids_are_named(tmp_path: Path, missing: list[str], detail: str) -> None:
    path = tmp_path / "m.dcm"
    ds = write(path, **{name: None for name in missing})
    record = rejection(path, tmp_path, "missing_uid")
    assert record.detail == detail
    expected_sop = "" if "SOPInstanceUID" in missing else ds.SOPInstanceUID
    assert record.sop_instance_uid == expected_sop


def test_an_empty_uid_counts_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "m.dcm"
    write(path, StudyInstanceUID="")
    assert rejection(path, tmp_path, "missing_uid").detail == "no Study Instance UID"


def test_no_meta_and_no_uids(tmp_path: Path) -> None:
    path = tmp_path / "acrnema"
    write(path, preamble=False, implicit=True, SOPInstanceUID=None, SeriesInstanceUID=None,
          StudyInstanceUID=None)
    record = rejection(path, tmp_path, "missing_uid")
    assert record.detail == "no DICOM file meta and no instance UIDs"


# Truncation ----------------------------------------------------------------------


@pytest.mark.parametrize("preamble,implicit", LAYOUTS)
@pytest.mark.parametrize("attr,tag", UID_ATTRS, ids=[a for a, _ in UID_ATTRS])
@pytest.mark.parametrize("where", ["first-byte", "middle", "last-byte"])
def test_a_file_cut_inside_a_uid_value_is_truncated(tmp_path: Path, preamble: bool,
                                                    implicit: bool, attr: str, tag: int,
                                                    where: str) -> None:
    path = tmp_path / "cut.dcm"
    ds = write(path, preamble=preamble, implicit=implicit, pixels=64)
    raw = path.read_bytes()
    uid = str(ds[attr].value).encode()
    start = raw.rfind(uid)  # the SOP UID is also in the file meta: take the data set's
    assert start > 0
    keep = {"first-byte": 1, "middle": len(uid) // 2, "last-byte": len(uid) - 1}[where]
    path.write_bytes(raw[:start + keep])
    record = rejection(path, tmp_path, "truncated")
    element = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    assert record.detail.startswith(f"file ends inside element {element}: ")
    if attr == "SOPInstanceUID":
        assert ds.SOPInstanceUID.startswith(record.sop_instance_uid)
    else:
        assert record.sop_instance_uid == ds.SOPInstanceUID
    assert record.size == start + keep


@pytest.mark.parametrize("preamble,implicit", LAYOUTS)
@pytest.mark.parametrize("missing", [1, 500, 999, 1000])
def test_a_file_with_short_pixel_data_is_truncated(tmp_path: Path, preamble: bool,
                                                   implicit: bool, missing: int) -> None:
    path = tmp_path / "short.dcm"
    ds = write(path, preamble=preamble, implicit=implicit, pixels=1000)
    raw = path.read_bytes()
    path.write_bytes(raw[:-missing])
    record = rejection(path, tmp_path, "truncated")
    assert record.detail == \
        f"file ends inside the pixel data: {1000 - missing} of 1000 bytes present"
    assert record.sop_instance_uid == ds.SOPInstanceUID


def _pixel_header_start(raw: bytes) -> int:
    start = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010), little endian
    assert start > 0
    return start


@pytest.mark.parametrize("kept", range(1, 12))
def test_a_file_cut_inside_the_pixel_data_header_is_truncated(tmp_path: Path,
                                                               kept: int) -> None:
    path = tmp_path / "hdr.dcm"
    write(path, pixels=1000)
    raw = path.read_bytes()
    path.write_bytes(raw[:_pixel_header_start(raw) + kept])
    rejection(path, tmp_path, "truncated")


def test_read_file_never_raises_on_any_truncation(tmp_path: Path) -> None:
    path = tmp_path / "cut.dcm"
    write(path, pixels=16)
    raw = path.read_bytes()
    failures = []
    for size in range(1, len(raw)):
        path.write_bytes(raw[:size])
        try:
            record = read_file(path, tmp_path)
        except Exception as exc:  # noqa: BLE001 - collected to report every offset
            failures.append((size, type(exc).__name__))
            continue
        assert isinstance(record, (InstanceRecord, Rejection))
    assert failures == []


def test_truncation_before_the_uids_is_never_indexed(tmp_path: Path) -> None:
    """Any cut before the end of the last UID leaves a rejection, never an instance."""
    path = tmp_path / "cut.dcm"
    ds = write(path, preamble=False)
    raw = path.read_bytes()
    end = raw.rfind(str(ds.SeriesInstanceUID).encode()) + len(str(ds.SeriesInstanceUID))
    for size in range(1, end):
        path.write_bytes(raw[:size])
        record = read_file(path, tmp_path)
        assert isinstance(record, Rejection), size
        assert record.reason in ("not_dicom", "truncated", "missing_uid"), (size, record)


def _nested_sequences(group: int, element: int, depth: int) -> bytes:
    """`depth` undefined-length sequences, each in an undefined-length item, never closed."""
    sequence = struct.pack("<HH", group, element) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    return (sequence + item) * depth


def test_damage_after_the_uids_still_indexes_the_header(tmp_path: Path) -> None:
    path = tmp_path / "deep.dcm"
    ds = write(path)
    # (0040,A730) comes after every UID and attribute the factory writes
    path.write_bytes(path.read_bytes() + _nested_sequences(0x0040, 0xA730, 5000))
    record = instance(path, tmp_path)
    assert (record.sop_instance_uid, record.series_instance_uid, record.study_instance_uid) \
        == (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID)
    assert record.patient_name == "Test^Patient" and record.rows == 4


def test_deep_nesting_before_the_uids_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "deep.dcm"
    write(path)
    raw = path.read_bytes()
    cut = raw.find(struct.pack("<HH", 0x0010, 0x0010) + b"PN")  # before Patient's Name
    path.write_bytes(raw[:cut] + _nested_sequences(0x0008, 0x1140, 5000))
    record = rejection(path, tmp_path, "corrupt")
    assert record.detail == "sequences nested too deeply to parse"


# Unreadable, vanished, paths -------------------------------------------------------


def test_a_symlink_loop_is_unreadable(tmp_path: Path) -> None:
    loop = tmp_path / "loop.dcm"
    os.symlink(loop, loop)
    record = read_file(loop, tmp_path)
    assert isinstance(record, Rejection)
    assert record.reason == "unreadable"
    assert record.detail.startswith("cannot read the file: ")
    assert record.path == "loop.dcm"
    assert record.size == 0 and record.mtime == os.lstat(loop).st_mtime  # the link's time


def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.dcm"
    write(path)
    path.chmod(0)
    # In a child without the capabilities that let root read any file.
    code = ("import json, sys; from pathlib import Path; from watcher.reader import read_file;"
            " from dicomhub.protocol import record_to_json;"
            " print(json.dumps(record_to_json(read_file(Path(sys.argv[1]), Path(sys.argv[2])))))")
    child = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path)],
                           capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT,
                           preexec_fn=without_root_file_access)
    assert child.returncode == 0, child.stderr
    record = parse_record(json.loads(child.stdout))
    assert isinstance(record, Rejection) and record.reason == "unreadable"
    assert record.detail == "cannot read the file: permission denied"
    assert record.size == path.stat().st_size


def test_a_vanished_file_gives_none(tmp_path: Path) -> None:
    assert read_file(tmp_path / "gone.dcm", tmp_path) is None


def test_a_dangling_symlink_is_unreadable_not_silent(tmp_path: Path) -> None:
    dangling = tmp_path / "dangling.dcm"
    os.symlink(tmp_path / "nowhere", dangling)
    record = read_file(dangling, tmp_path)
    assert isinstance(record, Rejection) and record.reason == "unreadable"
    assert "broken symbolic link" in record.detail


def test_a_folder_gives_none(tmp_path: Path) -> None:
    (tmp_path / "sub.dcm").mkdir()
    assert read_file(tmp_path / "sub.dcm", tmp_path) is None


def test_path_is_relative_with_slashes_and_labelled(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b c" / "IM 1.dcm"
    write(path)
    assert instance(path, tmp_path).path == "a/b c/IM 1.dcm"
    assert instance(path, tmp_path, "x").path == "x/a/b c/IM 1.dcm"
    assert instance(path, tmp_path / "a").path == "b c/IM 1.dcm"
    empty = tmp_path / "a" / "zero"
    empty.touch()
    assert rejection(empty, tmp_path, "empty").path == "a/zero"
    assert read_file(empty, tmp_path, "x").path == "x/a/zero"  # type: ignore[union-attr]


def test_a_non_utf8_file_name_becomes_valid_text(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.dcm")  # Latin-1 bytes on a UTF-8 system
    path = tmp_path / name
    try:
        write(path)
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    record = instance(path, tmp_path)
    assert record.path == "caf\\xe9.dcm"
    record.path.encode("utf-8")


def test_transfer_syntax_is_inferred_without_file_meta(tmp_path: Path) -> None:
    implicit, explicit = tmp_path / "i", tmp_path / "e"
    write(implicit, preamble=False, implicit=True)
    write(explicit, preamble=False, implicit=False)
    assert instance(implicit, tmp_path).transfer_syntax_uid == IMPLICIT_LE
    assert instance(explicit, tmp_path).transfer_syntax_uid == EXPLICIT_LE


# The real sample folder -----------------------------------------------------------


def samples_root() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "dicom-samples"
    return Path(os.environ.get("DICOMHUB_SAMPLES", default))


@dataclass(frozen=True)
class Sample:
    row: dict[str, str]
    result: InstanceRecord | Rejection | None | BaseException

    @property
    def uids(self) -> tuple[str, str, str]:
        return (self.row["sop_instance_uid"], self.row["series_instance_uid"],
                self.row["study_instance_uid"])

    @property
    def eligible(self) -> bool:
        """All three UIDs in the manifest and not a DICOMDIR: must be indexed (or truncated)."""
        return all(self.uids) and "DICOMDIR" not in self.row["notes"]


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    root = samples_root()
    manifest = root / "MANIFEST.tsv"
    if not manifest.is_file():
        pytest.skip(f"DICOM sample folder not found ({manifest} is missing); "
                    "set DICOMHUB_SAMPLES to a folder with MANIFEST.tsv")
    with manifest.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows, "MANIFEST.tsv has no rows"
    out = []
    for row in rows:
        try:
            result: Any = read_file(root / row["path"], root)
        except Exception as exc:  # noqa: BLE001 - reported by test_samples_never_raise
            result = exc
        out.append(Sample(row, result))
    return out


def _records(samples: list[Sample]) -> Iterator[tuple[Sample, InstanceRecord]]:
    for s in samples:
        if isinstance(s.result, InstanceRecord):
            yield s, s.result


def _reason(sample: Sample) -> str | None:
    return sample.result.reason if isinstance(sample.result, Rejection) else None


def test_samples_never_raise(samples: list[Sample]) -> None:
    raised = [(s.row["path"], repr(s.result)) for s in samples
              if isinstance(s.result, BaseException)]
    assert raised == []
    vanished = [s.row["path"] for s in samples if s.result is None]
    assert vanished == []  # every manifest file exists


def test_samples_paths_are_relative_to_the_root(samples: list[Sample]) -> None:
    for s in samples:
        if isinstance(s.result, (InstanceRecord, Rejection)):
            assert s.result.path == s.row["path"]
            assert s.result.size == int(s.row["size"])


def test_samples_not_dicom(samples: list[Sample]) -> None:
    rows = [s for s in samples if "not DICOM" in s.row["notes"]]
    assert rows, "the manifest lists no non-DICOM files"
    assert [(s.row["path"], _reason(s)) for s in rows if _reason(s) != "not_dicom"] == []


def test_samples_zero_length(samples: list[Sample]) -> None:
    rows = [s for s in samples if "zero-length" in s.row["notes"]]
    assert [(s.row["path"], _reason(s)) for s in rows if _reason(s) != "empty"] == []


def test_samples_dicomdir(samples: list[Sample]) -> None:
    rows = [s for s in samples if "DICOMDIR" in s.row["notes"]]
    assert [(s.row["path"], _reason(s)) for s in rows if _reason(s) != "dicomdir"] == []


def test_samples_indexed_uids_match_the_manifest(samples: list[Sample]) -> None:
    records = list(_records(samples))
    assert records, "nothing was indexed"
    wrong = [(s.row["path"], (r.sop_instance_uid, r.series_instance_uid, r.study_instance_uid),
              s.uids) for s, r in records
             if (r.sop_instance_uid, r.series_instance_uid, r.study_instance_uid) != s.uids]
    assert wrong == []


def test_samples_with_uids_are_indexed_or_truncated(samples: list[Sample]) -> None:
    """Every row with three UIDs (not a DICOMDIR) is indexed or rejected as truncated,
    and the distinct SOP Instance UIDs indexed are exactly those of such rows (a
    truncated copy is indexed through a whole file with the same UID)."""
    eligible = [s for s in samples if s.eligible]
    assert eligible
    lost = [(s.row["path"], _reason(s), getattr(s.result, "detail", "")) for s in eligible
            if not isinstance(s.result, InstanceRecord) and _reason(s) != "truncated"]
    assert lost == []
    indexed = {r.sop_instance_uid for _, r in _records(samples)}
    assert indexed == {s.row["sop_instance_uid"] for s in eligible}


def test_samples_without_all_uids_are_not_indexed(samples: list[Sample]) -> None:
    wrongly = [s.row["path"] for s, _ in _records(samples) if not s.eligible]
    assert wrongly == []


_DECODES_TO = re.compile(r"PatientName decodes to '(.*?)'(?=;|$)")
_REPR_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[\\'\"nrt])")
_SIMPLE = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def unescape_repr(text: str) -> str:
    """Undo Python repr() escapes (the manifest writes ESC as the four characters \\x1b).

    Done with a regex rather than codecs 'unicode_escape', which would mangle the
    non-ASCII characters around the escapes.
    """
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return _SIMPLE[code] if code in _SIMPLE else chr(int(code[1:], 16))
    return _REPR_ESCAPE.sub(one, text)


def test_unescape_repr() -> None:
    assert unescape_repr(r"Zhang=\x1b$)A张^\x1b$)A小东") == "Zhang=\x1b$)A张^\x1b$)A小东"
    assert unescape_repr(r"a\\x1b") == "a\\x1b"
    assert unescape_repr("Buc^Jérôme") == "Buc^Jérôme"


def test_samples_patient_names(samples: list[Sample]) -> None:
    checked = 0
    for s in samples:
        match = _DECODES_TO.search(s.row["notes"])
        if match is None:
            continue
        expected = ISO2022_ESCAPE.sub("", unescape_repr(match.group(1)))
        if not s.eligible:
            continue  # e.g. a worklist file without a Series UID: rejected, no name to check
        assert isinstance(s.result, InstanceRecord), (s.row["path"], s.result)
        assert s.result.patient_name == expected, s.row["path"]
        assert is_clean_text(s.result.patient_name), s.row["path"]
        checked += 1
    assert checked, "the manifest notes no decoded PatientName"


def test_samples_text_is_clean(samples: list[Sample]) -> None:
    for s, record in _records(samples):
        for name, value in record_to_json(record).items():
            if isinstance(value, str):
                assert is_clean_text(value), (s.row["path"], name)
        assert parse_record(record_to_json(record)) == record


# The fast path decodes raw bytes itself; pydicom's conversion is the reference.


def test_fast_path_matches_pydicom_on_every_sample(samples: list[Sample]) -> None:
    root = samples_root()
    differences = []
    for sample in samples:
        path = root / sample.row["path"]
        fast, slow = read_file(path, root), read_file(path, root, fast=False)
        if fast != slow:
            differences.append(sample.row["path"])
    assert differences == []


@pytest.mark.parametrize("charset, name", [
    (None, "Doe^John"), ("ISO_IR 100", "Buc^Jérôme"), ("ISO_IR 192", "王^小東"),
    ("ISO_IR 144", "Иванов^Иван"), ("ISO 2022 IR 100", "Äneas^Rüdiger"),
])
def test_fast_path_matches_pydicom_on_built_files(tmp_path: Path, charset: str | None,
                                                  name: str) -> None:
    path = tmp_path / "a.dcm"
    ds = dataset(PatientName=name, StudyDescription="Étude  ", SeriesNumber="12",
                 InstanceNumber="  7", Rows=512, Columns=256)
    if charset:
        ds.SpecificCharacterSet = charset
    write(path, ds)
    fast, slow = read_file(path, tmp_path), read_file(path, tmp_path, fast=False)
    assert fast == slow
    assert isinstance(fast, InstanceRecord) and fast.patient_name == name
    assert (fast.series_number, fast.instance_number, fast.rows, fast.columns) == (12, 7, 512, 256)


# The quick reader takes the common files; pydicom the rest -------------------------------


def quick(path: Path) -> InstanceRecord | None:
    from watcher.reader import _quick_record

    st = path.stat()
    with path.open("rb", buffering=0) as fh:
        return _quick_record(fh, st.st_size, {"path": path.name, "size": st.st_size,
                                              "mtime": st.st_mtime})


def _nested(depth: int, undefined: bool) -> Sequence:
    item = Dataset()
    item.CodeValue = "X"
    item.is_undefined_length_sequence_item = undefined
    if depth:
        item.ContentSequence = _nested(depth - 1, undefined)
        item["ContentSequence"].is_undefined_length = undefined
    return Sequence([item, item])


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined", [False, True])
def test_common_files_take_the_quick_path_and_agree_with_pydicom(
        tmp_path: Path, implicit: bool, undefined: bool) -> None:
    path = tmp_path / "a.dcm"
    ds = dataset(PatientName="Doe^John=", SeriesNumber="4", Rows=64,
                 PerformedProcedureStepStartDate="20240102")
    ds.ReferencedStudySequence = _nested(3, undefined)  # before the UIDs: skipped, not read
    ds["ReferencedStudySequence"].is_undefined_length = undefined
    write(path, ds, implicit=implicit, pixels=64)
    assert (path.read_bytes().count(b"\xfe\xff\xdd\xe0") == 15) == undefined  # nested 4 deep
    record = quick(path)
    assert record is not None
    assert record == read_file(path, tmp_path) == read_file(path, tmp_path, fast=False)
    assert (record.patient_name, record.series_number, record.rows, record.bits_allocated,
            record.performed_procedure_step_start_date) == ("Doe^John", 4, 64, 8, "20240102")


def test_odd_files_are_left_to_pydicom(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    write(path, preamble=False)
    assert quick(path) is None  # no file meta
    write(path, SpecificCharacterSet="ISO 2022 IR 87")
    assert quick(path) is None  # a character set with escapes
    write(path, SeriesInstanceUID=None)
    assert quick(path) is None  # a missing UID: pydicom's path names it
    write(path, pixels=100)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    assert quick(path) is None  # truncated pixel data
    path.write_bytes(raw[:raw.find(b"Test^Patient") + 3])
    assert quick(path) is None  # cut inside a value
