"""Hypothesis strategies for the watcher <-> hub protocol (records and messages).

Every value drawn here is valid: ``parse_message(encode_message(m)) == m`` must hold
for all of them. Text avoids lone surrogates, which cannot travel as UTF-8.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st

from dicomhub import protocol
from dicomhub.protocol import (
    MAX_PATH,
    MAX_TEXT,
    MAX_UID,
    REJECTION_REASONS,
    WATCHER_ID_LIMIT,
    Ack,
    Batch,
    Error,
    Hello,
    InstanceRecord,
    Rejection,
    Welcome,
)

# Any character that survives UTF-8 (so: no lone surrogates).
_chars = st.characters(codec="utf-8")


def text(max_size: int = 64, *, min_size: int = 0) -> st.SearchStrategy[str]:
    """Unicode text within a protocol length limit (kept short so examples stay fast)."""
    return st.text(_chars, min_size=min_size, max_size=max_size)


def bounded_text(limit: int, *, min_size: int = 0) -> st.SearchStrategy[str]:
    """Mostly short text, sometimes exactly at `limit` characters (the edge that must pass)."""
    return st.one_of(
        text(min(limit, 64), min_size=min_size),
        st.builds(lambda c: c * limit, _chars),
    )


uids = st.one_of(
    # realistic: dotted digits
    st.lists(st.integers(min_value=0, max_value=10**12), min_size=2, max_size=8)
    .map(lambda parts: ".".join(map(str, parts))),
    # the protocol accepts any non-empty string up to MAX_UID characters
    bounded_text(MAX_UID, min_size=1),
)

optional_uids = st.one_of(st.just(""), uids)

_segment = st.text(
    st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=20
)

# Relative paths: never a leading '/', never NUL, at most MAX_PATH characters.
paths = st.lists(_segment, min_size=1, max_size=6).map("/".join).filter(
    lambda p: len(p) <= MAX_PATH
)

sizes = st.integers(min_value=0, max_value=2**53)
mtimes = st.floats(allow_nan=False, allow_infinity=False)
optional_ints = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
counts = st.integers(min_value=0, max_value=2**31)

_UID_FIELDS = {"sop_instance_uid", "series_instance_uid", "study_instance_uid"}
_INT_FIELDS = {"series_number", "instance_number", "number_of_frames", "rows", "columns",
               "bits_allocated"}
_FILE_FIELDS = {"path", "size", "mtime"}

# The free-text fields of an InstanceRecord, and the other *_uid ones (bounded by MAX_UID).
TEXT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(InstanceRecord)
    if f.name not in _UID_FIELDS | _INT_FIELDS | _FILE_FIELDS
)
INT_FIELDS: tuple[str, ...] = tuple(sorted(_INT_FIELDS))
UID_FIELDS: tuple[str, ...] = ("sop_instance_uid", "series_instance_uid", "study_instance_uid")


def _text_field(name: str) -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), bounded_text(MAX_UID if name.endswith("_uid") else MAX_TEXT))


instance_records: st.SearchStrategy[InstanceRecord] = st.builds(
    InstanceRecord,
    path=paths,
    size=sizes,
    mtime=mtimes,
    sop_instance_uid=uids,
    series_instance_uid=uids,
    study_instance_uid=uids,
    **{name: optional_ints for name in INT_FIELDS},
    **{name: _text_field(name) for name in TEXT_FIELDS},
)

rejections: st.SearchStrategy[Rejection] = st.builds(
    Rejection,
    path=paths,
    size=sizes,
    mtime=mtimes,
    reason=st.sampled_from(REJECTION_REASONS),
    detail=st.one_of(st.just(""), bounded_text(MAX_TEXT)),
    sop_instance_uid=optional_uids,
)

records: st.SearchStrategy[protocol.Record] = st.one_of(instance_records, rejections)

watcher_ids = st.text(
    st.one_of(st.characters(codec="utf-8", exclude_categories=("C", "Z")), st.just(" ")),
    min_size=1,
    max_size=WATCHER_ID_LIMIT,
).filter(lambda s: s.isprintable() and len(s) <= WATCHER_ID_LIMIT)

protocol_versions = st.integers(min_value=1, max_value=2**31)

hellos = st.builds(Hello, watcher_id=watcher_ids, protocol=protocol_versions,
                   software=text(200), backlog=counts)
batches = st.builds(Batch, batch_id=counts,
                    records=st.lists(records, min_size=1, max_size=5).map(tuple),
                    backlog=counts)
welcomes = st.builds(Welcome, protocol=protocol_versions, hub=text(200))
acks = st.builds(Ack, batch_id=counts, stored=counts, duplicates=counts, rejected=counts)
errors = st.builds(Error, message=st.one_of(text(100), bounded_text(2000)),
                   batch_id=st.one_of(st.none(), counts), fatal=st.booleans())

messages: st.SearchStrategy[protocol.Message] = st.one_of(
    hellos, batches, welcomes, acks, errors
)


def valid_instance_json(**overrides: Any) -> dict[str, Any]:
    """A plain, valid instance record as decoded JSON, with some fields replaced."""
    out: dict[str, Any] = {
        "kind": "instance",
        "path": "study/series/1.dcm",
        "size": 1234,
        "mtime": 1700000000.5,
        "sop_instance_uid": "1.2.3.4.5",
        "series_instance_uid": "1.2.3.4",
        "study_instance_uid": "1.2.3",
        "patient_name": "Test^Patient",
        "rows": 512,
    }
    out.update(overrides)
    return out


def valid_rejection_json(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "rejection",
        "path": "junk/readme.txt",
        "size": 10,
        "mtime": 1700000000.0,
        "reason": "not_dicom",
        "detail": "no DICOM structure found",
    }
    out.update(overrides)
    return out
