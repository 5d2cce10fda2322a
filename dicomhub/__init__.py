"""dicomhub: a watched folder of DICOM files as a live, queryable index."""

__version__ = "0.1.0"
