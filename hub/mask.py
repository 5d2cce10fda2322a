"""Masked patient display (`[hub] phi_display = "masked"`), pure.

For the read role, patients appear as initials and a keyed hash of their ID:
enough to tell patients apart and follow one through the index, not enough to
identify them. The hash is an HMAC with a secret kept in the database, so
it cannot be reversed by hashing every plausible ID. Admins see everything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

MASKED_FIELDS = ("patient_name", "patient_id", "patient_birth_date")


def initials(person_name: str) -> str:
    """'Doe^John^^Dr=…' -> 'J.D.'; empty when there is no name."""
    alphabetic = person_name.split("=", 1)[0]
    parts = [p.strip() for p in alphabetic.split("^")]
    family, given = (parts + ["", ""])[:2]
    letters = [name[0].upper() for name in (given, family) if name]
    return "".join(f"{letter}." for letter in letters)


def masked_id(patient_id: str, secret: bytes) -> str:
    if not patient_id:
        return ""
    digest = hmac.new(secret, patient_id.encode(), hashlib.sha256).hexdigest()
    return f"anon-{digest[:12]}"


def mask(value: Any, secret: bytes) -> Any:
    """A copy of a JSON value with every patient field masked, at any depth."""
    if isinstance(value, list):
        return [mask(item, secret) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: mask(item, secret) for key, item in value.items()}
    if isinstance(out.get("patient_name"), str):
        out["patient_name"] = initials(out["patient_name"])
    if isinstance(out.get("patient_id"), str):
        out["patient_id"] = masked_id(out["patient_id"], secret)
    if "patient_birth_date" in out:
        out["patient_birth_date"] = ""
    return out


def mask_text(text: str | bytes, secret: bytes) -> str:
    return json.dumps(mask(json.loads(text), secret), ensure_ascii=False,
                      separators=(",", ":"))
