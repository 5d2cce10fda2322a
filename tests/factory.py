"""Build DICOM files for the exact cases a test checks (pydicom, no pixels unless asked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def dataset(**attrs: Any) -> Dataset:
    """A minimal CT instance; keyword arguments set or (with None) remove attributes."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-0001"
    ds.PatientName = "Test^Patient"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyDescription = "Test study"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.SeriesNumber = 3
    ds.SeriesDescription = "Axial"
    ds.InstanceNumber = 1
    ds.Rows = 4
    ds.Columns = 4
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def write(path: Path, ds: Dataset | None = None, *, preamble: bool = True,
          implicit: bool = False, pixels: int = 0, **attrs: Any) -> Dataset:
    """Write `ds` (or a new dataset with `attrs`) to `path` and return it.

    preamble=False writes a bare data set with no 128-byte preamble and no file
    meta, as old modalities do. `pixels` adds that many bytes of native pixel data.
    """
    ds = ds if ds is not None else dataset(**attrs)
    if pixels:
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
        meta.TransferSyntaxUID = syntax
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=implicit, little_endian=True)
    return ds
