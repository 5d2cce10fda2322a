"""REST query parameters (hub/query.py): cursors, limits, filters, unknown parameters."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from hub import query
from hub.query import BadQuery, decode_cursor, encode_cursor, list_query
from hub.store import ListQuery

SERIES_FILTERS = ("patient_id", "study_instance_uid", "modality", "status")


def params(*pairs: tuple[str, str], **kwargs: str) -> MultiDict[str]:
    return MultiDict([*pairs, *kwargs.items()])


def bad(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# Cursors -------------------------------------------------------------------------


def test_encode_none_is_none() -> None:
    assert encode_cursor(None) is None


@pytest.mark.parametrize("after", [0, 1, 99, 2**31, 2**62, 2**63 - 1])
def test_cursor_round_trip(after: int) -> None:
    cursor = encode_cursor(after)
    assert cursor is not None
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor  # URL-safe
    assert decode_cursor(cursor) == after


@settings(derandomize=True)
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_cursor_round_trip_property(after: int) -> None:
    cursor = encode_cursor(after)
    assert cursor is not None and cursor.isascii()
    assert decode_cursor(cursor) == after


def test_cursors_are_opaque_but_versioned() -> None:
    assert base64.urlsafe_b64decode(encode_cursor(42) + "==") == b"v1:42"  # type: ignore[operator]


@pytest.mark.parametrize("cursor", [
    "!!!!",
    "x",
    bad("v2:5"),
    bad("v1:"),
    bad("v1:-1"),
    bad("v1:abc"),
    bad("42"),
    bad(":42"),
    base64.urlsafe_b64encode(b"\xff\xfe:1").decode(),
    "%%%",
])
def test_bad_cursors_name_the_cursor_parameter(cursor: str) -> None:
    with pytest.raises(BadQuery) as info:
        decode_cursor(cursor)
    message = str(info.value)
    assert message.startswith("parameter 'cursor' has value ")
    assert "not a cursor returned by this API" in message


def test_a_bad_cursor_is_shown_shortened() -> None:
    cursor = "A" * 5000 + "!"
    with pytest.raises(BadQuery) as info:
        decode_cursor(cursor)
    assert "A" * 41 not in str(info.value)


@pytest.mark.parametrize("after", [2**63, 10**30])
def test_a_cursor_beyond_any_row_id_is_refused(after: int) -> None:
    with pytest.raises(BadQuery, match="'cursor'"):
        decode_cursor(bad(f"v1:{after}"))


def test_list_query_decodes_the_cursor() -> None:
    q = list_query(params(cursor=encode_cursor(77) or ""), SERIES_FILTERS)
    assert q.after == 77
    assert list_query(params(cursor=""), SERIES_FILTERS).after == 0


def test_list_query_reports_a_bad_cursor() -> None:
    with pytest.raises(BadQuery, match="parameter 'cursor'"):
        list_query(params(cursor="nonsense!"), SERIES_FILTERS)


# limit ---------------------------------------------------------------------------


def test_default_query() -> None:
    assert list_query(params(), SERIES_FILTERS) == ListQuery(filters={}, limit=100, after=0)


@pytest.mark.parametrize("text,value", [("1", 1), ("100", 100), ("1000", 1000), ("0042", 42)])
def test_limit_within_bounds(text: str, value: int) -> None:
    assert list_query(params(limit=text), SERIES_FILTERS).limit == value


@pytest.mark.parametrize("text", ["0", "-1", "1001", "99999999999999999999"])
def test_limit_out_of_bounds(text: str) -> None:
    with pytest.raises(BadQuery) as info:
        list_query(params(limit=text), SERIES_FILTERS)
    assert str(info.value).startswith("parameter 'limit' has value ")
    assert "must be between 1 and 1000" in str(info.value)


@pytest.mark.parametrize("text", ["", "ten", "1.5", "1e3", "0x10", "10 items"])
def test_limit_must_be_an_integer(text: str) -> None:
    with pytest.raises(BadQuery) as info:
        list_query(params(limit=text), SERIES_FILTERS)
    assert str(info.value) == f"parameter 'limit' has value {text!r}: not an integer"


def test_integer_helper() -> None:
    assert query.integer(params(), "since", 5, 0, 10) == 5
    assert query.integer(params(since="7"), "since", 5, 0, 10) == 7
    with pytest.raises(BadQuery, match="parameter 'since' has value 11: must be between 0 and 10"):
        query.integer(params(since="11"), "since", 5, 0, 10)
    with pytest.raises(BadQuery) as info:
        query.integer(params(since="x" * 100), "since", 5, 0, 10)
    assert "x" * 41 not in str(info.value)  # long values are cut


# Unknown and repeated parameters -------------------------------------------------


def test_unknown_parameters_are_refused() -> None:
    with pytest.raises(BadQuery) as info:
        list_query(params(modality="CT", colour="red", aaa="1"), SERIES_FILTERS)
    message = str(info.value)
    assert message.startswith("unknown parameter(s) 'aaa', 'colour'; this endpoint takes ")
    for name in (*SERIES_FILTERS, "limit", "cursor"):
        assert name in message


def test_a_filter_of_another_endpoint_is_unknown() -> None:
    with pytest.raises(BadQuery, match="unknown parameter"):
        list_query(params(accession_number="A1"), ("patient_id",))


@pytest.mark.parametrize("name,value", [("modality", "CT"), ("limit", "5"), ("cursor", "x")])
def test_a_repeated_parameter_is_refused(name: str, value: str) -> None:
    with pytest.raises(BadQuery) as info:
        list_query(params((name, value), (name, value)), SERIES_FILTERS)
    assert str(info.value) == f"parameter {name!r} is given more than once"


def test_check_known_accepts_plain_mappings() -> None:
    query.check_known({"since": "1"}, {"since", "limit"})
    with pytest.raises(BadQuery, match="unknown parameter"):
        query.check_known({"until": "1"}, {"since", "limit"})


# Filters -------------------------------------------------------------------------


def test_filters_are_kept() -> None:
    q = list_query(params(patient_id="P1", modality="MR", limit="10"), SERIES_FILTERS)
    assert q == ListQuery(filters={"patient_id": "P1", "modality": "MR"}, limit=10, after=0)


@pytest.mark.parametrize("status", ["receiving", "stable"])
def test_status_values(status: str) -> None:
    assert list_query(params(status=status), SERIES_FILTERS).filters == {"status": status}


@pytest.mark.parametrize("status", ["done", "Stable", "", "receiving,stable", "s" * 2000])
def test_status_must_be_receiving_or_stable(status: str) -> None:
    with pytest.raises(BadQuery) as info:
        list_query(params(status=status), SERIES_FILTERS)
    message = str(info.value)
    assert message.startswith("parameter 'status' ")
    assert "s" * 41 not in message


def test_status_message_lists_the_choices() -> None:
    with pytest.raises(BadQuery) as info:
        list_query(params(status="done"), SERIES_FILTERS)
    assert str(info.value) == \
        "parameter 'status' has value 'done': must be one of receiving, stable"


@pytest.mark.parametrize("value", ["", "x" * (query.MAX_VALUE + 1)])
def test_filter_values_are_bounded(value: str) -> None:
    with pytest.raises(BadQuery) as info:
        list_query(params(patient_id=value), SERIES_FILTERS)
    assert str(info.value) == \
        f"parameter 'patient_id' must be 1 to {query.MAX_VALUE} characters"


def test_a_filter_at_the_length_limit_passes() -> None:
    value = "x" * query.MAX_VALUE
    assert list_query(params(patient_id=value), SERIES_FILTERS).filters == {"patient_id": value}


def test_a_status_filter_is_only_checked_where_it_exists() -> None:
    # on an endpoint without status, 'status' is simply unknown
    with pytest.raises(BadQuery, match="unknown parameter"):
        list_query(params(status="stable"), ("reason", "watcher_id"))
    # and 'reason' is free text
    assert list_query(params(reason="anything"), ("reason",)).filters == {"reason": "anything"}
