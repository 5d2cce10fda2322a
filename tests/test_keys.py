"""API key format, generation and hashing (dicomhub/keys.py)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from dicomhub import keys
from dicomhub.keys import KeyFormatError


def test_generated_keys_are_well_formed() -> None:
    for _ in range(50):
        key = keys.generate()
        assert key.startswith("dhk_")
        assert len(key) == 4 + 43
        assert re.fullmatch(r"dhk_[A-Za-z0-9_-]{43}", key)
        assert keys.is_well_formed(key)
        assert keys.check(key, "test") == key


def test_generated_keys_carry_at_least_256_random_bits() -> None:
    body = keys.generate()[len(keys.PREFIX):]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert len(raw) * 8 >= 256


def test_generated_keys_are_distinct() -> None:
    generated = {keys.generate() for _ in range(500)}
    assert len(generated) == 500


def test_digest_is_sha256_hex_of_the_key() -> None:
    key = keys.generate()
    digest = keys.digest(key)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hashlib.sha256(key.encode("utf-8")).hexdigest()
    assert keys.digest(key) == digest  # deterministic
    assert keys.digest(keys.generate()) != digest


def test_digest_known_value() -> None:
    assert keys.digest("abc") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("padding", [" ", "\n", "\t", "\r\n", "  \n"])
def test_check_strips_whitespace(padding: str) -> None:
    key = keys.generate()
    assert keys.check(padding + key + padding, "$DICOMHUB_KEY") == key


@pytest.mark.parametrize("bad", [
    "",
    "dhk_",
    "dhk_" + "a" * 42,  # one short
    "dhk_" + "a" * 44,  # one long
    "dhk_" + "a" * 42 + "!",  # a character outside the URL-safe alphabet
    "DHK_" + "a" * 43,
    "key_" + "a" * 43,
    "dhk_" + "a" * 21 + " " + "a" * 21,  # inner whitespace is not stripped
    "dhk_" + "a" * 43 + "\x00",
])
def test_check_refuses_malformed_keys(bad: str) -> None:
    assert not keys.is_well_formed(bad.strip())
    with pytest.raises(KeyFormatError):
        keys.check(bad, "the key file /etc/dicomhub/ingest.key")


def test_check_error_names_the_source_and_does_not_echo_a_long_key() -> None:
    secret_part = "Qx7Zp2Lm9Rt4Vw8Ys1Bn6Kj3Hg5Fd0Ca_-eU"
    bad = "dhk_" + secret_part + "!!!!!!!"  # 47 characters, like a key with one typo
    with pytest.raises(KeyFormatError) as info:
        keys.check(bad, "the key file /srv/ingest.key")
    message = str(info.value)
    assert "the key file /srv/ingest.key" in message
    assert f"({len(bad)} characters)" in message
    assert secret_part not in message
    assert bad[8:16] not in message  # at most the first 8 characters are shown
    assert "dhk_Qx7Z" in message
    assert "dicomhub keys create" in message


def test_check_error_counts_characters_after_stripping() -> None:
    with pytest.raises(KeyFormatError, match=r"\(3 characters\)"):
        keys.check("  abc\n", "--key")


def test_key_format_error_is_a_value_error() -> None:
    assert issubclass(KeyFormatError, ValueError)


@pytest.mark.parametrize("name", ["a", "ward-7", "alice@example.org", "pacs_01.ingest",
                                  "A" * 64, "0start"])
def test_check_name_accepts(name: str) -> None:
    assert keys.check_name(name) == name


@pytest.mark.parametrize("name", ["", "A" * 65, "-lead", ".lead", "_lead", "@lead",
                                  "has space", "tab\tname", "slash/name", "név",
                                  "trailing\n"])
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(KeyFormatError, match="key name .* is not valid"):
        keys.check_name(name)


@pytest.mark.parametrize("role", ["ingest", "read", "admin"])
def test_check_role_accepts_the_three_roles(role: str) -> None:
    assert keys.check_role(role) == role
    assert role in keys.ROLES


@pytest.mark.parametrize("role", ["", "Admin", "write", "root", " read"])
def test_check_role_refuses_anything_else(role: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        keys.check_role(role)
    assert "ingest, read, admin" in str(info.value)


@pytest.mark.parametrize("role,needed,allowed", [
    ("admin", "admin", True),
    ("admin", "read", True),
    ("admin", "ingest", True),
    ("read", "read", True),
    ("read", "ingest", False),
    ("read", "admin", False),
    ("ingest", "ingest", True),
    ("ingest", "read", False),
    ("ingest", "admin", False),
])
def test_allows(role: str, needed: str, allowed: bool) -> None:
    assert keys.allows(role, needed) is allowed
