"""Parse and check REST query parameters (pure). Errors say which parameter and why."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from .store import ListQuery

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_VALUE = 256  # DICOM values filtered on are 64 characters at most
STATUSES = ("receiving", "stable")
MAX_ROW_ID = 2**63 - 1  # SQLite's largest integer


class BadQuery(ValueError):
    """A query parameter the API cannot accept; the message is shown to the client."""


def encode_cursor(after: int | None) -> str | None:
    if after is None:
        return None
    return base64.urlsafe_b64encode(f"v1:{after}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        version, _, number = raw.partition(":")
        after = int(number)
        if version != "v1" or not 0 <= after <= MAX_ROW_ID:
            raise ValueError
        return after
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery(f"parameter 'cursor' has value {text[:40]!r}: not a cursor "
                       "returned by this API (use next_cursor as given)") from None


def integer(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadQuery(f"parameter {name!r} has value {text[:40]!r}: not an integer") from None
    if not lo <= value <= hi:
        raise BadQuery(f"parameter {name!r} has value {value}: must be between {lo} and {hi}")
    return value


def check_known(params: Mapping[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BadQuery(f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
                       f"this endpoint takes {', '.join(sorted(allowed))}")
    for name in params:
        if len(params.getall(name) if hasattr(params, "getall") else [params[name]]) > 1:
            raise BadQuery(f"parameter {name!r} is given more than once")


def list_query(params: Mapping[str, str], filters: tuple[str, ...]) -> ListQuery:
    """Filters, `limit` (1-1000, default 100) and `cursor` for a list endpoint."""
    check_known(params, {*filters, "limit", "cursor", "order"})
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise BadQuery(f"parameter 'order' has value {order[:40]!r}: must be asc (oldest "
                       "first, the default) or desc (newest first)")
    chosen: dict[str, str] = {}
    for name in filters:
        value = params.get(name)
        if value is None:
            continue
        if not value or len(value) > MAX_VALUE:
            raise BadQuery(f"parameter {name!r} must be 1 to {MAX_VALUE} characters")
        if name == "status" and value not in STATUSES:
            raise BadQuery(f"parameter 'status' has value {value[:40]!r}: must be one of "
                           f"{', '.join(STATUSES)}")
        chosen[name] = value
    cursor = params.get("cursor")
    return ListQuery(
        filters=chosen,
        limit=integer(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        after=decode_cursor(cursor) if cursor else 0,
        newest_first=order == "desc",
    )
