"""A QIDO-RS query as one PostgreSQL statement (pure: text and parameters only).

The same matching as qido_sqlite.py, row for row. DICOM's wildcards map onto
LIKE (`*` to `%`, `?` to `_`; the text columns are COLLATE "C", so LIKE is
case-sensitive, as PS3.4 asks); everything else in a value is escaped with a
backslash so that it matches literally. Person names match whole or by any of
their component groups (alphabetic, ideographic, phonetic). Fuzzy matching
lowers the stored name with lower(), which under "C" folds ASCII only, and the
pattern with Python's str.lower(): exactly what the SQLite store does.

Two values PostgreSQL cannot even compare are answered as "no match" rather
than an error: text holding NUL (no stored text can hold it) and an integer
outside bigint (no stored integer can be it).
"""

from __future__ import annotations

from typing import Any

from .qido import FROM, KEY, SCOPE, Match, Query

_COMPUTED = {
    "ModalitiesInStudy": "(SELECT string_agg(DISTINCT m.modality, ',') FROM series m"
                         " WHERE m.study_pk = st.id)",
    "NumberOfStudyRelatedSeries": "(SELECT count(*) FROM series m WHERE m.study_pk = st.id)",
    "NumberOfStudyRelatedInstances": "(SELECT coalesce(sum(m.instance_count), 0)::bigint"
                                     " FROM series m WHERE m.study_pk = st.id)",
    "NumberOfSeriesRelatedInstances": "se.instance_count",
}
_BIGINT = range(-2**63, 2**63)


def escape_like(text: str) -> str:
    """`text` as a LIKE pattern (backslash escapes) that matches only itself."""
    return "".join(f"\\{c}" if c in "\\%_" else c for c in text)


def dicom_like(pattern: str) -> str:
    """A DICOM wildcard pattern as LIKE: * and ? become % and _, the rest is literal."""
    return "".join("%" if c == "*" else "_" if c == "?" else escape_like(c) for c in pattern)


class _Params:
    """Numbers parameters $1, $2, … in the order the SQL text uses them."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def build(query: Query) -> tuple[str, list[Any]]:
    """SELECT the query's fields (named by keyword) for one page plus one row, so the
    caller can tell whether more follow."""
    # Quoted: PostgreSQL would fold an unquoted alias to lower case.
    columns = [f'{_COMPUTED.get(a.keyword, a.column)} AS "{a.keyword}"' for a in query.fields]
    where: list[str] = []
    params = _Params()
    for keyword, uid in query.scope.items():
        where.append(f"{SCOPE[keyword]} = {params.add(uid)}" if "\x00" not in uid
                     else "FALSE")
    for match in query.matches:
        where.append(_condition(match, query.fuzzy, params))
    sql = f"SELECT {', '.join(columns)} FROM {FROM[query.level]}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += (f" ORDER BY {KEY[query.level]}"
            f" LIMIT {params.add(query.limit + 1)} OFFSET {params.add(query.offset)}")
    return sql, params.values


def _condition(match: Match, fuzzy: bool, params: _Params) -> str:
    if any("\x00" in value for value in match.values):
        return "FALSE"
    attr = match.attribute
    if attr.keyword == "ModalitiesInStudy":
        inner = _compare("m.modality", match, False, params)
        return f"EXISTS (SELECT 1 FROM series m WHERE m.study_pk = st.id AND {inner})"
    return _compare(attr.column, match, fuzzy, params)


def _compare(column: str, match: Match, fuzzy: bool, params: _Params) -> str:
    kind, values, vr = match.kind, match.values, match.attribute.vr
    if kind == "range":
        low, high = values
        parts = [f"{column} != ''"]
        if low:
            parts.append(f"{column} >= {params.add(low)}")
        if high:
            parts.append(f"{column} <= {params.add(high)}")
        return "(" + " AND ".join(parts) + ")"
    if kind == "list":
        return f"{column} IN ({', '.join(params.add(v) for v in values)})"
    if vr in ("IS", "US"):
        number = int(values[0])
        return f"{column} = {params.add(number)}" if number in _BIGINT else "FALSE"
    if vr == "PN":
        # Delimit the groups with '=' so one pattern tests the whole name and each group.
        pattern = dicom_like(values[0]) if kind == "wildcard" else escape_like(values[0])
        if fuzzy:  # case-insensitive, and the value may be the start of a name
            return f"lower('=' || {column} || '=') LIKE {params.add(f'%={pattern.lower()}%')}"
        return f"('=' || {column} || '=') LIKE {params.add(f'%={pattern}=%')}"
    if kind == "wildcard":
        return f"{column} LIKE {params.add(dicom_like(values[0]))}"
    return f"{column} = {params.add(values[0])}"
