"""The watcher <-> hub wire protocol: round trips and validation (dicomhub/protocol.py)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies
from dicomhub.protocol import (
    MAX_BATCH_RECORDS,
    MAX_PATH,
    MAX_TEXT,
    MAX_UID,
    PROTOCOL_VERSION,
    REJECTION_REASONS,
    WATCHER_ID_LIMIT,
    Ack,
    Batch,
    Error,
    Hello,
    InstanceRecord,
    ProtocolError,
    Rejection,
    Status,
    Welcome,
    encode_message,
    parse_message,
    parse_record,
    record_to_json,
)
from strategies import valid_instance_json, valid_rejection_json

PHI = "Doe^John"


def batch_text(records: list[Any], **fields: Any) -> str:
    return json.dumps({"type": "batch", "batch_id": 7, "records": records, **fields})


def parse_error(text: str | bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    return str(info.value)


def record_error(value: Any, where: str = "record.") -> str:
    with pytest.raises(ProtocolError) as info:
        parse_record(value, where)
    return str(info.value)


# Round trips ---------------------------------------------------------------------


@settings(max_examples=200, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(strategies.messages)
def test_every_message_survives_encode_then_parse(message: Any) -> None:
    text = encode_message(message)
    assert isinstance(text, str)
    assert parse_message(text) == message
    assert parse_message(text.encode("utf-8")) == message  # frames may arrive as bytes


@settings(max_examples=200, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(strategies.records)
def test_every_record_survives_json_round_trip(record: Any) -> None:
    as_json = record_to_json(record)
    # through real JSON text, as on the wire
    decoded = json.loads(json.dumps(as_json, ensure_ascii=False))
    parsed = parse_record(decoded)
    assert parsed == record
    assert type(parsed) is type(record)


def test_record_to_json_names_the_kind_and_every_field() -> None:
    record = InstanceRecord(path="a/b.dcm", size=3, mtime=1.5, sop_instance_uid="1.2.3",
                            series_instance_uid="1.2", study_instance_uid="1",
                            patient_name="Buc^Jérôme", rows=4)
    out = record_to_json(record)
    assert out["kind"] == "instance"
    assert out["patient_name"] == "Buc^Jérôme"
    assert out["rows"] == 4 and out["columns"] is None
    assert set(out) == {"kind"} | {f for f in InstanceRecord.__dataclass_fields__}

    rejection = Rejection(path="x", size=0, mtime=0.0, reason="empty")
    assert record_to_json(rejection) == {"kind": "rejection", "path": "x", "size": 0,
                                         "mtime": 0.0, "reason": "empty", "detail": "",
                                         "sop_instance_uid": ""}


def test_encode_message_is_compact_utf8_json_with_a_type() -> None:
    text = encode_message(Hello(watcher_id="ward-7 ü", software="dicomhub 0.1", backlog=3))
    assert " " not in text.replace("ward-7 ü", "").replace("dicomhub 0.1", "")
    assert "ü" in text  # not \u00fc: UTF-8 on the wire
    assert json.loads(text) == {"type": "hello", "watcher_id": "ward-7 ü",
                                "protocol": PROTOCOL_VERSION, "software": "dicomhub 0.1",
                                "backlog": 3}


def test_batch_encodes_records_as_json_objects() -> None:
    rec = Rejection(path="a.dcm", size=0, mtime=2.0, reason="empty")
    decoded = json.loads(encode_message(Batch(batch_id=1, records=(rec,))))
    assert decoded["records"] == [record_to_json(rec)]
    assert decoded["type"] == "batch" and decoded["batch_id"] == 1


def test_optional_fields_take_their_defaults() -> None:
    assert parse_message('{"type":"hello","watcher_id":"w","protocol":1}') == \
        Hello(watcher_id="w", protocol=1, software="", backlog=0)
    assert parse_message('{"type":"ack","batch_id":4}') == Ack(batch_id=4)
    assert parse_message('{"type":"error","message":"boom"}') == \
        Error(message="boom", batch_id=None, fatal=False)
    assert parse_message('{"type":"welcome","protocol":1}') == Welcome(protocol=1, hub="")


def test_status_carries_only_a_backlog() -> None:
    assert parse_message('{"type":"status","backlog":7}') == Status(backlog=7)
    assert parse_message(encode_message(Status(backlog=0))) == Status(backlog=0)
    for bad in ('{"type":"status"}', '{"type":"status","backlog":-1}',
                '{"type":"status","backlog":"7"}'):
        with pytest.raises(ProtocolError, match="backlog"):
            parse_message(bad)


def test_null_text_fields_read_as_empty_and_int_mtime_as_float() -> None:
    rec = parse_record(valid_instance_json(patient_name=None, modality=None, mtime=5))
    assert isinstance(rec, InstanceRecord)
    assert rec.patient_name == "" and rec.modality == ""
    assert rec.mtime == 5.0 and isinstance(rec.mtime, float)


def test_limits_are_inclusive() -> None:
    rec = parse_record(valid_instance_json(patient_name="x" * MAX_TEXT,
                                           sop_instance_uid="1" * MAX_UID,
                                           path="p" * MAX_PATH))
    assert isinstance(rec, InstanceRecord)
    records = [valid_rejection_json(path=f"f{i}") for i in range(MAX_BATCH_RECORDS)]
    batch = parse_message(batch_text(records))
    assert isinstance(batch, Batch) and len(batch.records) == MAX_BATCH_RECORDS


# Validation: every failure is a ProtocolError naming the field ---------------------


def test_not_json() -> None:
    assert parse_error("{not json").startswith("not valid JSON")
    assert parse_error(b"\xff\xfe{}").startswith("not valid JSON")
    assert parse_error("").startswith("not valid JSON")


@pytest.mark.parametrize("text", ['[]', '"hello"', '42', 'null', 'true'])
def test_message_must_be_an_object(text: str) -> None:
    assert parse_error(text).startswith("message: expected a JSON object")


@pytest.mark.parametrize("kind", ['"goodbye"', '""', "null", "1", '["hello"]'])
def test_unknown_or_missing_type(kind: str) -> None:
    message = parse_error('{"type": %s, "watcher_id": "w", "protocol": 1}' % kind)
    assert message.startswith("type: expected one of hello, batch, status, welcome, ack, error")
    assert parse_error('{"watcher_id": "w"}').startswith("type: ")


def test_empty_batch() -> None:
    assert parse_error(batch_text([])) == \
        f"records: expected a list of 1 to {MAX_BATCH_RECORDS} records, got a list of 0 items"


def test_too_many_records() -> None:
    records = [valid_rejection_json() for _ in range(MAX_BATCH_RECORDS + 1)]
    assert parse_error(batch_text(records)) == (
        f"records: expected a list of 1 to {MAX_BATCH_RECORDS} records, "
        f"got a list of {MAX_BATCH_RECORDS + 1} items")


@pytest.mark.parametrize("records", [None, {"0": {}}, "records"])
def test_records_must_be_a_list(records: Any) -> None:
    assert parse_error(batch_text(records)).startswith("records: expected a list")


def test_error_names_the_index_of_the_bad_record() -> None:
    records = [valid_instance_json() for _ in range(5)]
    records[3]["sop_instance_uid"] = ""
    assert parse_error(batch_text(records)) == \
        "records[3].sop_instance_uid: expected a non-empty string, got a string of 0 characters"


def test_a_record_that_is_not_an_object() -> None:
    assert parse_error(batch_text([valid_instance_json(), ["x"]])) == \
        "records[1]: expected a JSON object, got a list of 1 items"


@pytest.mark.parametrize("uid", strategies.UID_FIELDS)
def test_each_instance_uid_is_required(uid: str) -> None:
    value = valid_instance_json()
    del value[uid]
    assert record_error(value).startswith(f"record.{uid}: expected a non-empty string")


@pytest.mark.parametrize("uid", strategies.UID_FIELDS)
def test_uids_are_bounded(uid: str) -> None:
    message = parse_error(batch_text([valid_instance_json(**{uid: "1" * (MAX_UID + 1)})]))
    assert message.startswith(f"records[0].{uid}: expected a string of at most {MAX_UID}")


@pytest.mark.parametrize("kind", [None, "image", 1, ""])
def test_bad_kind(kind: Any) -> None:
    assert record_error(valid_instance_json(kind=kind)).startswith(
        "record.kind: expected 'instance' or 'rejection'")


@pytest.mark.parametrize("reason", ["bogus", "", None, 3, "EMPTY"])
def test_bad_rejection_reason(reason: Any) -> None:
    message = parse_error(batch_text([valid_rejection_json(reason=reason)]))
    assert message.startswith(f"records[0].reason: expected one of {', '.join(REJECTION_REASONS)}")


@pytest.mark.parametrize("reason", REJECTION_REASONS)
def test_every_documented_reason_is_accepted(reason: str) -> None:
    rec = parse_record(valid_rejection_json(reason=reason))
    assert isinstance(rec, Rejection) and rec.reason == reason


@pytest.mark.parametrize("path", ["/etc/passwd", "/", "a\x00b"])
def test_path_must_be_relative_without_nul(path: str) -> None:
    assert parse_error(batch_text([valid_instance_json(path=path)])).startswith(
        "records[0].path: expected a path relative to the watch root, got a string of ")


@pytest.mark.parametrize("path", ["", None])
def test_path_is_required(path: Any) -> None:
    assert record_error(valid_rejection_json(path=path)).startswith(
        "record.path: expected a non-empty string")


def test_path_is_bounded() -> None:
    assert record_error(valid_instance_json(path="p" * (MAX_PATH + 1))).startswith(
        f"record.path: expected a string of at most {MAX_PATH} characters")


@pytest.mark.parametrize("field", ["size", "rows", "series_number"])
def test_bool_is_not_an_integer(field: str) -> None:
    assert record_error(valid_instance_json(**{field: True})) == \
        f"record.{field}: expected an integer{' >= 0' if field == 'size' else ''}, got true"


def test_bool_is_not_a_batch_id_or_count() -> None:
    assert parse_error('{"type":"ack","batch_id":false}') == \
        "batch_id: expected an integer >= 0, got false"
    assert parse_error('{"type":"ack","batch_id":1,"stored":true}') == \
        "stored: expected an integer >= 0, got true"


@pytest.mark.parametrize("value,shown", [(1.5, "1.5"), ("12", "a string of 2 characters"),
                                          (-1, "-1"), (None, "null")])
def test_size_must_be_a_non_negative_integer(value: Any, shown: str) -> None:
    assert record_error(valid_rejection_json(size=value)) == \
        f"record.size: expected an integer >= 0, got {shown}"


@pytest.mark.parametrize("field", strategies.INT_FIELDS)
def test_int_fields_reject_floats_and_strings(field: str) -> None:
    assert record_error(valid_instance_json(**{field: 2.0})) == \
        f"record.{field}: expected an integer, got 2.0"
    assert record_error(valid_instance_json(**{field: "2"})).startswith(
        f"record.{field}: expected an integer")


@pytest.mark.parametrize("value", [True, "1.5", None, [1]])
def test_mtime_must_be_a_number(value: Any) -> None:
    assert record_error(valid_instance_json(mtime=value)).startswith(
        "record.mtime: expected a finite number")


def test_nan_mtime_is_refused() -> None:
    assert record_error(valid_instance_json(mtime=math.nan)) == \
        "record.mtime: expected a finite number, got NaN"
    # NaN also arrives as a JSON (extension) literal
    assert parse_error(batch_text([valid_instance_json(mtime=math.nan)])).startswith(
        "records[0].mtime: expected a finite number")


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_mtime_is_refused(value: float) -> None:
    with pytest.raises(ProtocolError, match=r"^records\[0\]\.mtime: "):
        parse_message(batch_text([valid_instance_json(mtime=value)]))


@pytest.mark.parametrize("field", ["patient_name", "study_description", "modality",
                                   "sop_class_uid", "transfer_syntax_uid"])
def test_text_fields_must_be_strings(field: str) -> None:
    assert record_error(valid_instance_json(**{field: 12})).startswith(
        f"record.{field}: expected a string of at most ")


def test_other_uid_fields_are_bounded_by_max_uid() -> None:
    assert record_error(valid_instance_json(sop_class_uid="1" * (MAX_UID + 1))).startswith(
        f"record.sop_class_uid: expected a string of at most {MAX_UID} characters")
    assert isinstance(parse_record(valid_instance_json(study_description="d" * MAX_TEXT)),
                      InstanceRecord)


def test_rejection_fields_are_checked() -> None:
    assert record_error(valid_rejection_json(detail=["x"])).startswith("record.detail: ")
    assert record_error(valid_rejection_json(sop_instance_uid="1" * (MAX_UID + 1))).startswith(
        "record.sop_instance_uid: ")


@pytest.mark.parametrize("text,field", [
    ('{"type":"hello","protocol":1}', "watcher_id"),
    ('{"type":"hello","watcher_id":"","protocol":1}', "watcher_id"),
    ('{"type":"hello","watcher_id":"w"}', "protocol"),
    ('{"type":"hello","watcher_id":"w","protocol":0}', "protocol"),
    ('{"type":"hello","watcher_id":"w","protocol":"1"}', "protocol"),
    ('{"type":"hello","watcher_id":"w","protocol":1,"backlog":-1}', "backlog"),
    ('{"type":"hello","watcher_id":"w","protocol":1,"software":5}', "software"),
    ('{"type":"batch","records":[{}]}', "batch_id"),
    ('{"type":"batch","batch_id":-3,"records":[{}]}', "batch_id"),
    ('{"type":"welcome"}', "protocol"),
    ('{"type":"welcome","protocol":1,"hub":[]}', "hub"),
    ('{"type":"ack"}', "batch_id"),
    ('{"type":"ack","batch_id":1,"duplicates":-1}', "duplicates"),
    ('{"type":"ack","batch_id":1,"rejected":0.5}', "rejected"),
    ('{"type":"error","message":"m","fatal":"yes"}', "fatal"),
    ('{"type":"error","message":"m","fatal":1}', "fatal"),
    ('{"type":"error","message":"m","batch_id":-1}', "batch_id"),
    ('{"type":"error","message":7}', "message"),
])
def test_message_field_errors_name_the_field(text: str, field: str) -> None:
    assert parse_error(text).startswith(f"{field}: expected ")


def test_watcher_id_must_be_printable_and_bounded() -> None:
    hello = {"type": "hello", "protocol": 1}
    for bad in ("ward\n7", "a\x00b", "tab\there", "\u200b"):
        assert parse_error(json.dumps({**hello, "watcher_id": bad})).startswith(
            "watcher_id: expected printable text")
    assert parse_error(json.dumps({**hello, "watcher_id": "w" * (WATCHER_ID_LIMIT + 1)})) \
        .startswith(f"watcher_id: expected a string of at most {WATCHER_ID_LIMIT}")
    ok = parse_message(json.dumps({**hello, "watcher_id": "w" * WATCHER_ID_LIMIT}))
    assert isinstance(ok, Hello)


def test_text_limits_of_messages() -> None:
    assert parse_error(json.dumps({"type": "error", "message": "m" * 2001})).startswith(
        "message: expected a string of at most 2000 characters")
    assert parse_error(json.dumps({"type": "welcome", "protocol": 1, "hub": "h" * 201})) \
        .startswith("hub: expected a string of at most 200 characters")


# No PHI in error messages --------------------------------------------------------

LONG_PHI = PHI + "x" * 2000


@pytest.mark.parametrize("field", strategies.TEXT_FIELDS)
def test_too_long_text_is_described_not_echoed(field: str) -> None:
    message = parse_error(batch_text([valid_instance_json(), valid_instance_json(),
                                      valid_instance_json(**{field: LONG_PHI})]))
    assert message.startswith(f"records[2].{field}: expected a string of at most ")
    assert message.endswith(f"got a string of {len(LONG_PHI)} characters")
    assert PHI not in message and "xxxxxxxx" not in message


@pytest.mark.parametrize("bad", [
    [PHI], {"family": PHI}, {PHI: 1}, [[PHI, PHI]],
])
def test_wrong_typed_values_are_described_not_echoed(bad: Any) -> None:
    message = record_error(valid_instance_json(patient_name=bad))
    assert message.startswith("record.patient_name: expected a string")
    assert PHI not in message and "family" not in message


@pytest.mark.parametrize("overrides", [
    {"path": "/home/" + PHI + "/ct.dcm"},
    {"path": PHI + "\x00.dcm"},
    {"sop_instance_uid": PHI * 40},
    {"kind": PHI},
])
def test_record_errors_never_contain_the_value(overrides: dict[str, Any]) -> None:
    message = parse_error(batch_text([valid_instance_json(**overrides)]))
    assert PHI not in message


def test_rejection_errors_never_contain_the_value() -> None:
    for overrides in ({"reason": PHI}, {"detail": LONG_PHI}):
        message = parse_error(batch_text([valid_rejection_json(**overrides)]))
        assert PHI not in message


def test_message_level_errors_never_contain_the_value() -> None:
    texts = [
        json.dumps({"type": PHI}),
        json.dumps({"type": "hello", "protocol": 1, "watcher_id": PHI + "\n"}),
        json.dumps({"type": "hello", "protocol": 1, "watcher_id": LONG_PHI}),
        json.dumps({"type": "error", "message": LONG_PHI}),
        json.dumps({"type": "error", "message": "m", "fatal": PHI}),
        '{"type": "batch", "records": [{"patient_name": "' + PHI,  # truncated JSON
        '{"patient_name": "' + PHI + '" "x": 1}',
    ]
    for text in texts:
        assert PHI not in parse_error(text), text


@given(secret=st.text(st.characters(codec="utf-8"), min_size=MAX_TEXT + 1, max_size=MAX_TEXT + 40),
       field=st.sampled_from(strategies.TEXT_FIELDS))
@settings(max_examples=50, derandomize=True)
def test_property_no_field_content_in_errors(secret: str, field: str) -> None:
    marker = "\u2603PHI\u2603"
    value = marker + secret
    with pytest.raises(ProtocolError) as info:
        parse_message(batch_text([valid_instance_json(**{field: value})]))
    assert marker not in str(info.value)
    assert str(info.value).startswith(f"records[0].{field}: ")
