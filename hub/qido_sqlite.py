"""A QIDO-RS query as one SQLite statement (pure: text and parameters only).

DICOM's wildcards map onto SQLite's GLOB (`*` any run, `?` one character,
case-sensitive, as PS3.4 asks); everything else in a value is escaped so that
it matches literally. Person names match whole or by any of their component
groups (alphabetic, ideographic, phonetic).
"""

from __future__ import annotations

from typing import Any

from .qido import FROM, KEY, SCOPE, Match, Query

_COMPUTED = {
    "ModalitiesInStudy": "(SELECT group_concat(DISTINCT m.modality) FROM series m"
                         " WHERE m.study_pk = st.id)",
    "NumberOfStudyRelatedSeries": "(SELECT count(*) FROM series m WHERE m.study_pk = st.id)",
    "NumberOfStudyRelatedInstances": "(SELECT coalesce(sum(m.instance_count), 0)"
                                     " FROM series m WHERE m.study_pk = st.id)",
    "NumberOfSeriesRelatedInstances": "se.instance_count",
}


def escape_glob(text: str) -> str:
    """`text` as a GLOB pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def dicom_glob(pattern: str) -> str:
    """A DICOM wildcard pattern as GLOB: keep * and ?, escape the rest."""
    return "".join(c if c in "*?" else escape_glob(c) for c in pattern)


def build(query: Query) -> tuple[str, list[Any]]:
    """SELECT the query's fields (named by keyword) for one page plus one row, so the
    caller can tell whether more follow."""
    columns = [f"{_COMPUTED.get(a.keyword, a.column)} AS {a.keyword}" for a in query.fields]
    where: list[str] = []
    params: list[Any] = []
    for keyword, uid in query.scope.items():
        where.append(f"{SCOPE[keyword]} = ?")
        params.append(uid)
    for match in query.matches:
        sql, values = _condition(match, query.fuzzy)
        where.append(sql)
        params += values
    sql = f"SELECT {', '.join(columns)} FROM {FROM[query.level]}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {KEY[query.level]} LIMIT ? OFFSET ?"
    params += [query.limit + 1, query.offset]
    return sql, params


def _condition(match: Match, fuzzy: bool) -> tuple[str, list[Any]]:
    attr = match.attribute
    if attr.keyword == "ModalitiesInStudy":
        inner, values = _compare("m.modality", match, fuzzy=False)
        return (f"EXISTS (SELECT 1 FROM series m WHERE m.study_pk = st.id AND {inner})",
                values)
    return _compare(attr.column, match, fuzzy)


def _compare(column: str, match: Match, fuzzy: bool) -> tuple[str, list[Any]]:
    kind, values, vr = match.kind, match.values, match.attribute.vr
    if kind == "range":
        low, high = values
        parts, params = [f"{column} != ''"], []
        if low:
            parts.append(f"{column} >= ?")
            params.append(low)
        if high:
            parts.append(f"{column} <= ?")
            params.append(high)
        return "(" + " AND ".join(parts) + ")", params
    if kind == "list":
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)
    if vr in ("IS", "US"):
        return f"{column} = ?", [int(values[0])]
    if vr == "PN":
        # Delimit the groups with '=' so one pattern tests the whole name and each group.
        pattern = values[0] if kind == "wildcard" else escape_glob(values[0])
        if kind == "wildcard":
            pattern = dicom_glob(pattern)
        if fuzzy:  # case-insensitive, and the value may be the start of a name
            return ("lower('=' || " + column + " || '=') GLOB ?",
                    [f"*={pattern.lower()}*"])
        return f"('=' || {column} || '=') GLOB ?", [f"*={pattern}=*"]
    if kind == "wildcard":
        return f"{column} GLOB ?", [dicom_glob(values[0])]
    return f"{column} = ?", [values[0]]
