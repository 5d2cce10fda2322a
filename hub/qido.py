"""QIDO-RS (DICOMweb search, PS3.18 §10.6) queries and answers, pure.

A request becomes a :class:`Query`: what level is searched, which attributes
are matched and how (PS3.4 C.2.2.2: universal, single value, list of UIDs,
wildcard, range), which are returned, and the page. Anything the hub cannot
honour is a :class:`BadQuery` naming the parameter, never a silent omission.
Rows found by the store become the DICOM JSON model (PS3.18 F.2) here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

LEVELS = ("study", "series", "instance")
MAX_LIMIT = 1000
MAX_VALUE = 256
MAX_UIDS = 500  # in one UID list

# VRs whose values may hold the * and ? wildcards (PS3.4 C.2.2.2.4).
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "TM"})
_INTEGER_VRS = frozenset({"IS", "US"})
# VRs whose values may not hold a comma, so a comma separates several values.
_LIST_VRS = frozenset({"UI", "CS"})
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")


class BadQuery(ValueError):
    """A query the hub cannot answer as asked; the message is shown to the client."""


# The tables each level searches, under the aliases Attribute.column uses (the
# same for every store engine), the key that orders its rows, and the columns
# that a study or series scope (/studies/{uid}/series) fixes.
FROM = {
    "study": "studies st JOIN patients p ON p.id = st.patient_pk",
    "series": "series se JOIN studies st ON st.id = se.study_pk"
              " JOIN patients p ON p.id = st.patient_pk",
    "instance": "instances i JOIN series se ON se.id = i.series_pk"
                " JOIN studies st ON st.id = se.study_pk"
                " JOIN patients p ON p.id = st.patient_pk",
}
KEY = {"study": "st.id", "series": "se.id", "instance": "i.id"}
SCOPE = {"StudyInstanceUID": "st.study_instance_uid",
         "SeriesInstanceUID": "se.series_instance_uid"}


@dataclass(frozen=True)
class Attribute:
    keyword: str
    vr: str
    level: str  # the lowest level that has it: study (patient attributes too), series, instance
    column: str  # the SQL expression the store selects and matches it by
    computed: bool = False  # counted or gathered, not a stored column

    @property
    def tag(self) -> str:
        return f"{tag_for_keyword(self.keyword):08X}"


def _attributes() -> dict[str, Attribute]:
    rows = [
        # Patient attributes are answered at study level and below.
        ("PatientName", "study", "p.patient_name"),
        ("PatientID", "study", "p.patient_id"),
        ("IssuerOfPatientID", "study", "p.issuer_of_patient_id"),
        ("PatientBirthDate", "study", "p.patient_birth_date"),
        ("PatientSex", "study", "p.patient_sex"),
        ("StudyInstanceUID", "study", "st.study_instance_uid"),
        ("StudyDate", "study", "st.study_date"),
        ("StudyTime", "study", "st.study_time"),
        ("AccessionNumber", "study", "st.accession_number"),
        ("StudyID", "study", "st.study_id"),
        ("StudyDescription", "study", "st.study_description"),
        ("ReferringPhysicianName", "study", "st.referring_physician_name"),
        ("SeriesInstanceUID", "series", "se.series_instance_uid"),
        ("Modality", "series", "se.modality"),
        ("SeriesNumber", "series", "se.series_number"),
        ("SeriesDescription", "series", "se.series_description"),
        ("BodyPartExamined", "series", "se.body_part_examined"),
        ("SeriesDate", "series", "se.series_date"),
        ("SeriesTime", "series", "se.series_time"),
        ("PerformedProcedureStepStartDate", "series", "se.pps_start_date"),
        ("PerformedProcedureStepStartTime", "series", "se.pps_start_time"),
        ("SOPInstanceUID", "instance", "i.sop_instance_uid"),
        ("SOPClassUID", "instance", "i.sop_class_uid"),
        ("InstanceNumber", "instance", "i.instance_number"),
        ("Rows", "instance", "i.rows"),
        ("Columns", "instance", "i.columns"),
        ("BitsAllocated", "instance", "i.bits_allocated"),
        ("NumberOfFrames", "instance", "i.number_of_frames"),
    ]
    found = {k: Attribute(k, dictionary_VR(k), level, column) for k, level, column in rows}
    for keyword, level in (("ModalitiesInStudy", "study"),
                           ("NumberOfStudyRelatedSeries", "study"),
                           ("NumberOfStudyRelatedInstances", "study"),
                           ("NumberOfSeriesRelatedInstances", "series")):
        found[keyword] = Attribute(keyword, dictionary_VR(keyword), level, keyword,
                                   computed=True)
    return found


ATTRIBUTES = _attributes()
_BY_TAG = {a.tag: a for a in ATTRIBUTES.values()}

# What each level returns without being asked (PS3.18 Tables 10.6.3-3, -4, -5),
# of what the hub holds. Searching across studies (or series) adds the levels above.
DEFAULT_FIELDS = {
    "study": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyID", "StudyInstanceUID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "series": ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
               "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
               "PerformedProcedureStepStartTime"),
    "instance": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                 "BitsAllocated", "NumberOfFrames"),
}
PHI_KEYWORDS = frozenset({"PatientName", "PatientID", "PatientBirthDate"})
_CONTROL_PARAMS = frozenset({"limit", "offset", "fuzzymatching", "includefield"})


@dataclass(frozen=True)
class Match:
    attribute: Attribute
    kind: str  # "single", "list", "wildcard", "range"
    values: tuple[str, ...]  # range: (low, high), "" for an open end


@dataclass(frozen=True)
class Query:
    level: str
    matches: tuple[Match, ...]
    fields: tuple[Attribute, ...]
    limit: int
    offset: int
    fuzzy: bool = False
    scope: Mapping[str, str] = field(default_factory=dict)  # UIDs fixed by the path

    def matched(self, keyword: str) -> bool:
        return any(m.attribute.keyword == keyword for m in self.matches)


def _level_index(level: str) -> int:
    return LEVELS.index(level)


def attribute(name: str, param: str) -> Attribute | None:
    """The attribute a parameter names by keyword or by tag; None if the hub does not
    hold it; BadQuery if it is not a DICOM attribute at all."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        tag = name.upper()
        if tag in _BY_TAG:
            return _BY_TAG[tag]
        if not keyword_for_tag(int(tag, 16)):
            raise BadQuery(f"{param} {name!r}: not a DICOM attribute tag this hub knows")
        return None
    if name in ATTRIBUTES:
        return ATTRIBUTES[name]
    if "." in name:
        raise BadQuery(f"{param} {name!r}: matching inside sequences is not supported")
    if tag_for_keyword(name) is None:
        raise BadQuery(f"{param} {name!r}: not a DICOM attribute keyword or tag")
    return None


def parse(level: str, params: Sequence[tuple[str, str]], scope: Mapping[str, str] | None = None,
          *, max_limit: int = MAX_LIMIT) -> Query:
    """A query for `level` ("study", "series", "instance") from the request's parameters
    (in order, repeated ones kept); `scope` holds the UIDs fixed by the path."""
    scope = dict(scope or {})
    target = _level_index(level)
    limit, offset, fuzzy = max_limit, 0, False
    includes: list[str] = []
    matches: dict[str, Match] = {}
    returned: dict[str, Attribute] = {}
    keys: dict[str, tuple[Attribute, str]] = {}
    seen: set[str] = set()
    for name, value in params:
        if name in _CONTROL_PARAMS:
            if name == "includefield":
                includes += [v.strip() for v in value.split(",") if v.strip()]
                continue
            if name in seen:
                raise BadQuery(f"parameter {name!r} is given more than once")
            seen.add(name)
            if name == "limit":
                # Above the hub's page size is not an error: the answer is capped and
                # says, in a Warning header, that more can be requested.
                limit = min(_integer(name, value, 1, 2**31 - 1), max_limit)
            elif name == "offset":
                offset = _integer(name, value, 0, 2**31 - 1)
            else:
                if value not in ("true", "false"):
                    raise BadQuery(f"parameter 'fuzzymatching' has value {value[:40]!r}: "
                                   "must be true or false")
                fuzzy = value == "true"
            continue
        attr = attribute(name, "query key")
        if attr is None:
            raise BadQuery(f"query key {name!r}: not an attribute this hub indexes; it can "
                           f"match on {', '.join(sorted(ATTRIBUTES))}")
        if attr.keyword in keys:
            if attr.vr not in _LIST_VRS:
                raise BadQuery(f"query key {attr.keyword!r} is given more than once")
            keys[attr.keyword] = (attr, keys[attr.keyword][1] + "," + value)  # a list
        else:
            keys[attr.keyword] = (attr, value)
    for attr, value in keys.values():
        if _level_index(attr.level) > target:
            raise BadQuery(f"query key {attr.keyword!r} is a {attr.level}-level attribute: "
                           f"it cannot be matched in a {level} search")
        if attr.keyword in scope:
            raise BadQuery(f"query key {attr.keyword!r} is already fixed by the path")
        if len(value) > (MAX_VALUE if attr.vr != "UI" else MAX_UIDS * 65):
            raise BadQuery(f"query key {attr.keyword!r}: values are at most {MAX_VALUE} "
                           "characters")
        match = _match(attr, value)
        returned[attr.keyword] = attr  # a matching key is always returned (PS3.4 C.2.2.1)
        if match is not None:
            matches[attr.keyword] = match
    fields = _fields(level, scope, includes, returned)
    return Query(level, tuple(matches.values()), fields, limit, offset, fuzzy, scope)


def _integer(name: str, text: str, lo: int, hi: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadQuery(f"parameter {name!r} has value {text[:40]!r}: not an integer") from None
    if not lo <= value <= hi:
        raise BadQuery(f"parameter {name!r} has value {value}: must be between {lo} and {hi}")
    return value


def _match(attr: Attribute, value: str) -> Match | None:
    """How `value` matches `attr`; None for universal matching (return it, match all)."""
    key = attr.keyword
    if value == "" or (value == "*" and attr.vr in _WILDCARD_VRS):
        return None
    if attr.computed and attr.keyword != "ModalitiesInStudy":
        raise BadQuery(f"query key {key!r} is counted by the hub: it can be returned "
                       "(includefield), not matched")
    if attr.vr in _RANGE_VRS:
        return _range(attr, value)
    if attr.vr in _INTEGER_VRS:
        try:
            number = int(value)
        except ValueError:
            raise BadQuery(f"query key {key!r} has value {value[:40]!r}: not an integer") \
                from None
        return Match(attr, "single", (str(number),))
    values = [value]
    if attr.vr in _LIST_VRS:
        values = [v.strip() for v in re.split(r"[,\\]", value)]
        if any(not v for v in values) or len(values) > MAX_UIDS:
            raise BadQuery(f"query key {key!r} has value {value[:40]!r}: a list needs 1 to "
                           f"{MAX_UIDS} non-empty values separated by commas")
    if attr.vr == "UI":
        bad = [v for v in values if not _UID.fullmatch(v) or len(v) > 64]
        if bad:
            raise BadQuery(f"query key {key!r} has value {bad[0][:70]!r}: not a UID (digits "
                           "and dots; wildcards do not apply to UIDs)")
    if any(c in v for v in values for c in "*?"):
        if attr.vr not in _WILDCARD_VRS:
            raise BadQuery(f"query key {key!r}: wildcards do not apply to {attr.vr} values")
        if len(values) > 1:
            raise BadQuery(f"query key {key!r}: a list of values cannot hold wildcards")
        return Match(attr, "wildcard", (values[0],))
    return Match(attr, "list" if len(values) > 1 else "single", tuple(values))


def _range(attr: Attribute, value: str) -> Match:
    key, pattern = attr.keyword, _DATE if attr.vr == "DA" else _TIME
    low, dash, high = value.partition("-")
    what = "a date YYYYMMDD" if attr.vr == "DA" else "a time HHMMSS[.ffffff]"
    for part in (low, high):
        if part and not pattern.fullmatch(part):
            raise BadQuery(f"query key {key!r} has value {value[:40]!r}: expected {what}, or "
                           f"a range of them (A-B, A-, -B)")
    if not dash:
        if attr.vr == "DA":
            return Match(attr, "single", (low,))
        # A partial time names a span: 10 is 10:00:00 to 10:59:59.999999.
        return Match(attr, "range", (low, _pad(low)))
    if not low and not high:
        raise BadQuery(f"query key {key!r} has value '-': a range needs at least one end")
    if attr.vr == "TM" and high:
        high = _pad(high)
    if low and high and low > high:
        raise BadQuery(f"query key {key!r} has value {value[:40]!r}: the range ends before "
                       "it starts")
    return Match(attr, "range", (low, high))


def _pad(time: str) -> str:
    """The end of the span a partial time names, at full precision. (The start needs
    no padding: stored times compare as text, and "1015" sorts before "101500".)"""
    whole, _, fraction = time.partition(".")
    return f"{whole.ljust(6, '9')}.{fraction.ljust(6, '9')}"


def _fields(level: str, scope: Mapping[str, str], includes: Iterable[str],
            returned: Mapping[str, Attribute]) -> tuple[Attribute, ...]:
    """The attributes each answer holds, in a stable order: the defaults of the
    level and of the levels above that the path leaves open, the matching keys,
    and what `includefield` asks for."""
    target = _level_index(level)
    levels = [level]
    if level in ("series", "instance") and "StudyInstanceUID" not in scope:
        levels.insert(0, "study")
    if level == "instance" and "SeriesInstanceUID" not in scope:
        levels.insert(-1, "series")
    wanted = [k for lv in levels for k in DEFAULT_FIELDS[lv]]
    wanted += [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if k in scope
               and _level_index(ATTRIBUTES[k].level) <= target]
    wanted += list(returned)
    for name in includes:
        if name == "all":
            wanted += [k for k, a in ATTRIBUTES.items() if _level_index(a.level) <= target]
            continue
        attr = attribute(name, "includefield")
        # A real attribute the hub does not hold, or one below the searched level,
        # is simply absent from the answer, as for any attribute a file lacks.
        if attr is not None and _level_index(attr.level) <= target:
            wanted.append(attr.keyword)
    order = list(dict.fromkeys(wanted))
    return tuple(ATTRIBUTES[k] for k in sorted(order, key=lambda k: ATTRIBUTES[k].tag))


# Answers ---------------------------------------------------------------------------


def person_name(value: str) -> dict[str, str]:
    """'Yamada^Tarou=山田^太郎=やまだ^たろう' -> the three component groups (F.2.2)."""
    groups = value.split("=")[:3]
    return {name: text for name, text in zip(("Alphabetic", "Ideographic", "Phonetic"),
                                               groups, strict=False) if text}


def to_dicom_json(row: Mapping[str, Any], fields: Sequence[Attribute]) -> dict[str, Any]:
    """One result in the DICOM JSON model: a tag, its VR, and Value only when it has one."""
    out: dict[str, Any] = {}
    for attr in fields:
        value = row.get(attr.keyword)
        entry: dict[str, Any] = {"vr": attr.vr}
        values = _values(attr, value)
        if values:
            entry["Value"] = values
        out[attr.tag] = entry
    return out


def _values(attr: Attribute, value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if attr.keyword == "ModalitiesInStudy":
        return sorted(set(str(value).split(",")) - {""})
    if attr.vr == "PN":
        name = person_name(str(value))
        return [name] if name else []
    if attr.vr in _INTEGER_VRS:
        return [int(value)]
    return [value]
