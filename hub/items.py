"""Database rows as the JSON items the API answers with, for every store engine.

One definition of each item's shape, so that SQLite and PostgreSQL answer alike:
the row's columns, minus internal keys, with times as ISO 8601 UTC strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .store import iso

if TYPE_CHECKING:  # sqlite3.Row and asyncpg's Record both: keys() and [key]
    from _typeshed import SupportsKeysAndGetItem

    Row = SupportsKeysAndGetItem[str, Any]


def series_item(row: Row) -> dict[str, Any]:
    item = dict(row)
    del item["id"]
    for key in ("first_seen", "last_seen", "stable_since"):
        item[key] = iso(item[key])
    return item


def study_item(row: Row) -> dict[str, Any]:
    item = dict(row)
    del item["id"]
    item["modalities"] = sorted(filter(None, (item["modalities"] or "").split(",")))
    item["first_seen"], item["last_seen"] = iso(item["first_seen"]), iso(item["last_seen"])
    return item


def patient_item(row: Row) -> dict[str, Any]:
    item = dict(row)
    del item["id"]
    item["first_seen"], item["last_seen"] = iso(item["first_seen"]), iso(item["last_seen"])
    return item


def instance_items(rows: Iterable[Row]) -> list[dict[str, Any]]:
    items = []
    for row in rows:
        item = dict(row)
        item["received"] = iso(item["received"])
        items.append(item)
    return items


def rejection_item(row: Row) -> dict[str, Any]:
    item = dict(row)
    del item["id"]
    item["time"] = iso(item["time"])
    return item


def audit_item(row: Row) -> dict[str, Any]:
    item = dict(row)
    item["time"] = iso(item["time"])
    return item


def watcher_item(row: Row) -> dict[str, Any]:
    item = dict(row)
    item.pop("hub", None)  # PostgreSQL: the session name of the hub serving it (internal)
    item["connected"] = bool(item["connected"])
    item["first_seen"], item["last_seen"] = iso(item["first_seen"]), iso(item["last_seen"])
    return item
