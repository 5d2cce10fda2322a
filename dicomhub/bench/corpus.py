"""Synthetic CT corpora, written fast: one file built with pydicom, then copies
with their UIDs and patient ID patched in the bytes.

Every patched value has the length of the template's (UIDs end in a number of
fixed width without leading zeros), so element lengths, the padding pydicom
chose for the template (a NUL after an odd-length UID) and every offset stay
valid, and each copy is as conformant as the template.
"""

from __future__ import annotations

import io
import math
import os
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
PYDICOM_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's own root for generated UIDs
NUMBER_BASE = 10_000_000  # n + base has 8 digits for n < 90,000,000: fixed length
SERIES_PER_STUDY = 2
STUDY, SERIES, INSTANCE = 1, 2, 3


def new_root() -> str:
    """A UID root of its own for one corpus (a random 12-digit arc under pydicom's)."""
    return f"{PYDICOM_ROOT}{secrets.randbelow(9 * 10**11) + 10**11}"


def uid(root: str, level: int, n: int) -> str:
    """The n-th UID of a level (study, series, instance) under `root`, all of one length."""
    return f"{root}.{level}.{NUMBER_BASE + n}"


def patient_id(study: int) -> str:
    return f"BENCH{NUMBER_BASE + study}"


@dataclass(frozen=True)
class Spec:
    """A corpus: `count` instances in `series` series (SERIES_PER_STUDY per study, one
    patient per study); each series in a folder of its own of at most `per_folder`
    files."""

    root: str
    count: int
    series: int
    image_size: int
    pixels: bool = True
    per_folder: int = 1000

    @property
    def series_count(self) -> int:
        # More series than asked when needed to keep every folder under `per_folder`.
        return max(1, min(self.count, max(self.series, math.ceil(self.count / self.per_folder))))

    def series_of(self, n: int) -> int:
        return n * self.series_count // self.count

    def series_uid(self, s: int) -> str:
        return uid(self.root, SERIES, s)

    def path(self, n: int) -> Path:
        return Path(f"series{self.series_of(n):05d}") / f"{n:08d}.dcm"


@dataclass(frozen=True)
class Template:
    """The bytes of file 0 up to its pixel data, where each patched value sits, and
    the pixel data element shared by every copy."""

    header: bytes
    offsets: dict[str, tuple[int, ...]]
    lengths: dict[str, int]
    pixels: bytes


def _dataset(first: dict[str, str], image_size: int) -> Dataset:
    """File 0: a CT header with the usual attributes (about 1 KiB), `first` its values."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = first["instance"]
    ds.StudyDate, ds.StudyTime = "20240102", "101500"
    ds.SeriesDate, ds.SeriesTime = "20240102", "101700"
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "dicomhub bench"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = "Referrer^Synthetic"
    ds.StudyDescription = "Synthetic benchmark study"
    ds.SeriesDescription = "Axial 1.0 mm"
    ds.PatientName = "Bench^Synthetic"
    ds.PatientID = first["patient"]
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = first["study"]
    ds.SeriesInstanceUID = first["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ["-125.0", "-125.0", "0.0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = image_size
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _pixel_element(image_size: int) -> bytes:
    """(7FE0,0010) OW in explicit VR little endian: a 16-bit ramp, rows x columns."""
    count = image_size * image_size
    ramp = struct.pack(f"<{min(count, 4096)}H", *(i % 4096 for i in range(min(count, 4096))))
    data = (ramp * (count // 4096 + 1))[: count * 2]
    return b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", len(data)) + data


def _offsets(header: bytes, value: str, expected: int) -> tuple[int, ...]:
    found, start = [], 0
    needle = value.encode("ascii")
    while (at := header.find(needle, start)) >= 0:
        found.append(at)
        start = at + 1
    if len(found) != expected:  # the layout assumption broke: refuse rather than corrupt
        raise RuntimeError(f"template holds {value!r} {len(found)} times, not {expected}")
    return tuple(found)


def build(spec: Spec) -> Template:
    """The template file for `spec` (file 0) and where its UIDs and patient ID sit."""
    first = values(spec, 0)
    buffer = io.BytesIO()
    _dataset(first, spec.image_size).save_as(buffer, enforce_file_format=True)
    header = buffer.getvalue()
    # The SOP Instance UID is in the file meta and in the data set.
    offsets = {name: _offsets(header, value, 2 if name == "instance" else 1)
               for name, value in first.items()}
    lengths = {name: len(value) for name, value in first.items()}
    return Template(header, offsets, lengths,
                    _pixel_element(spec.image_size) if spec.pixels else b"")


def patch(template: Template, replacements: dict[str, str]) -> bytes:
    """The template's header with each named value replaced in place. Raises
    ValueError for a value whose length differs from the template's."""
    out = bytearray(template.header)
    for name, value in replacements.items():
        raw = value.encode("ascii")
        if len(raw) != template.lengths[name]:
            raise ValueError(f"{name} value {value!r} is not {template.lengths[name]} "
                             "characters long like the template's")
        for at in template.offsets[name]:
            out[at:at + len(raw)] = raw
    return bytes(out)


def values(spec: Spec, n: int) -> dict[str, str]:
    """What file n holds in place of file 0's instance, series and study UIDs and
    patient ID."""
    s = spec.series_of(n)
    study = s // SERIES_PER_STUDY
    return {"instance": uid(spec.root, INSTANCE, n), "series": uid(spec.root, SERIES, s),
            "study": uid(spec.root, STUDY, study), "patient": patient_id(study)}


def write(folder: Path, spec: Spec) -> list[Path]:
    """Write the corpus under `folder` and return the paths, in order."""
    template = build(spec)
    paths: list[Path] = []
    made: set[Path] = set()
    for n in range(spec.count):
        path = folder / spec.path(n)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.writev(fd, [patch(template, values(spec, n)), template.pixels])
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def size_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)
