"""API keys: format, generation and hashing (no I/O).

A key is ``dhk_`` followed by 43 URL-safe characters (256 random bits). Only
its SHA-256 is stored: with that much entropy a slow password hash buys
nothing, and a fast one lets every request be checked with one index lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets

ROLES = ("ingest", "read", "admin")
PREFIX = "dhk_"
_KEY_RE = re.compile(r"dhk_[A-Za-z0-9_-]{43}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class KeyFormatError(ValueError):
    """A string that cannot be a dicomhub key."""


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def is_well_formed(key: str) -> bool:
    return _KEY_RE.fullmatch(key) is not None


def check(key: str, source: str) -> str:
    """Return the key stripped of whitespace, or raise naming where it came from.

    The value is echoed only in a shortened form: a malformed key may still be
    most of a real one.
    """
    key = key.strip()
    if not is_well_formed(key):
        shown = key if len(key) <= 8 else key[:8] + "…"
        raise KeyFormatError(
            f"{source} has value {shown!r} ({len(key)} characters): not a dicomhub key "
            f"(expected '{PREFIX}' followed by 43 characters, as printed by "
            "'dicomhub keys create')"
        )
    return key


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    if _NAME_RE.fullmatch(name) is None:
        raise KeyFormatError(
            f"key name {name!r} is not valid: use 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise KeyFormatError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def allows(role: str, needed: str) -> bool:
    """Admin reaches everything; ingest and read reach only their own routes."""
    return role == needed or role == "admin"
