"""QIDO-RS queries parsed, turned into SQL and answered (pure parts, plus real SQLite
and a real PostgreSQL, which must find the same rows)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from hub import pg_schema, qido, qido_pg, qido_sqlite, schema
from dicomhub.bench.pgcluster import Cluster
from hub.qido import BadQuery, Match, parse, person_name, to_dicom_json


def keywords(query: qido.Query) -> list[str]:
    return [a.keyword for a in query.fields]


def match(query: qido.Query, keyword: str) -> Match:
    [found] = [m for m in query.matches if m.attribute.keyword == keyword]
    return found


# What each level returns ------------------------------------------------------------


def test_study_search_returns_the_required_study_attributes_in_tag_order() -> None:
    query = parse("study", [])
    assert keywords(query) == [
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
        "ReferringPhysicianName", "StudyDescription", "PatientName", "PatientID",
        "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
    tags = [a.tag for a in query.fields]
    assert tags == sorted(tags) and "00081190" not in tags  # no RetrieveURL
    assert (query.limit, query.offset, query.fuzzy) == (qido.MAX_LIMIT, 0, False)


def test_searching_all_series_adds_the_study_attributes() -> None:
    across = keywords(parse("series", []))
    within = keywords(parse("series", [], {"StudyInstanceUID": "1.2"}))
    assert "PatientName" in across and "NumberOfSeriesRelatedInstances" in across
    assert "PatientName" not in within and "StudyInstanceUID" in within
    assert set(qido.DEFAULT_FIELDS["series"]) <= set(within)


def test_instance_searches_add_the_levels_the_path_leaves_open() -> None:
    everything = keywords(parse("instance", []))
    in_study = keywords(parse("instance", [], {"StudyInstanceUID": "1.2"}))
    in_series = keywords(parse("instance", [], {"StudyInstanceUID": "1.2",
                                                "SeriesInstanceUID": "1.2.3"}))
    assert {"PatientID", "Modality", "SOPInstanceUID", "BitsAllocated"} <= set(everything)
    assert "Modality" in in_study and "PatientID" not in in_study
    assert "Modality" not in in_series and "SeriesInstanceUID" in in_series


def test_includefield_adds_attributes_and_all_adds_every_one() -> None:
    query = parse("study", [("includefield", "IssuerOfPatientID,00100021")])
    assert keywords(query).count("IssuerOfPatientID") == 1
    every = keywords(parse("series", [("includefield", "all")], {"StudyInstanceUID": "1"}))
    assert {"BodyPartExamined", "SeriesDate", "IssuerOfPatientID"} <= set(every)
    assert "SOPInstanceUID" not in every  # below the series level


def test_includefield_of_an_attribute_the_hub_lacks_is_absent_not_an_error() -> None:
    query = parse("study", [("includefield", "StationName"), ("includefield", "Modality")])
    assert "StationName" not in keywords(query) and "Modality" not in keywords(query)


def test_a_matching_key_is_returned_even_when_not_a_default() -> None:
    assert "IssuerOfPatientID" in keywords(parse("study", [("IssuerOfPatientID", "X")]))
    assert "BodyPartExamined" in keywords(parse("series", [("BodyPartExamined", "")]))


# Matching ---------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "kind", "values"), [
    ("PatientID", "P1", "single", ("P1",)),
    ("00100020", "P1", "single", ("P1",)),
    ("PatientName", "Doe*", "wildcard", ("Doe*",)),
    ("PatientName", "D?e^John", "wildcard", ("D?e^John",)),
    ("StudyInstanceUID", "1.2.3,1.2.4", "list", ("1.2.3", "1.2.4")),
    ("StudyInstanceUID", "1.2.3\\1.2.4", "list", ("1.2.3", "1.2.4")),
    ("ModalitiesInStudy", "CT,MR", "list", ("CT", "MR")),
    ("ModalitiesInStudy", "C*", "wildcard", ("C*",)),
    ("StudyDate", "20200101", "single", ("20200101",)),
    ("StudyDate", "20200101-20201231", "range", ("20200101", "20201231")),
    ("StudyDate", "-20201231", "range", ("", "20201231")),
    ("StudyDate", "20200101-", "range", ("20200101", "")),
    ("StudyTime", "10", "range", ("10", "109999.999999")),
    ("StudyTime", "1015-113000.5", "range", ("1015", "113000.599999")),
    ("StudyTime", "-0930", "range", ("", "093099.999999")),
])
def test_matching_kinds(key: str, value: str, kind: str, values: tuple[str, ...]) -> None:
    query = parse("study", [(key, value)])
    [found] = query.matches
    assert (found.kind, found.values) == (kind, values)


@pytest.mark.parametrize("value", ["", "*"])
def test_an_empty_value_or_a_lone_star_matches_everything(value: str) -> None:
    query = parse("study", [("PatientName", value)])
    assert query.matches == () and "PatientName" in keywords(query)


def test_repeated_uid_keys_form_a_list() -> None:
    query = parse("series", [("SeriesInstanceUID", "1.2"), ("SeriesInstanceUID", "1.3")])
    assert match(query, "SeriesInstanceUID").values == ("1.2", "1.3")


def test_integers_match_exactly_and_relational_keys_are_allowed() -> None:
    query = parse("instance", [("InstanceNumber", "7"), ("PatientID", "P1"),
                               ("Modality", "CT")])
    assert match(query, "InstanceNumber").values == ("7",)
    assert {m.attribute.keyword for m in query.matches} == {"InstanceNumber", "PatientID",
                                                            "Modality"}


def test_paging_and_fuzzy_matching() -> None:
    query = parse("study", [("limit", "10"), ("offset", "20"), ("fuzzymatching", "true")])
    assert (query.limit, query.offset, query.fuzzy) == (10, 20, True)
    assert parse("study", [("limit", "100000")]).limit == qido.MAX_LIMIT  # capped


@pytest.mark.parametrize(("params", "message"), [
    ([("PatientNme", "x")], "not a DICOM attribute keyword or tag"),
    ([("StationName", "x")], "not an attribute this hub indexes"),
    ([("FFFF0000", "x")], "not a DICOM attribute tag"),
    ([("ReferencedSeriesSequence.SeriesInstanceUID", "1")], "inside sequences"),
    ([("SOPInstanceUID", "1.2")], "instance-level attribute: it cannot be matched in a study"),
    ([("StudyInstanceUID", "1.2.*")], "not a UID"),
    ([("StudyInstanceUID", "abc")], "not a UID"),
    ([("StudyDate", "2020-01-01")], "expected a date YYYYMMDD"),
    ([("StudyDate", "20201231-20200101")], "ends before it starts"),
    ([("StudyDate", "-")], "at least one end"),
    ([("StudyDate", "2020*")], "expected a date"),
    ([("StudyTime", "25:00")], "expected a time"),
    ([("NumberOfStudyRelatedSeries", "3")], "counted by the hub"),
    ([("PatientID", "a"), ("PatientID", "b")], "given more than once"),
    ([("limit", "0")], "must be between 1"),
    ([("limit", "ten")], "not an integer"),
    ([("offset", "-1")], "must be between 0"),
    ([("limit", "1"), ("limit", "2")], "given more than once"),
    ([("fuzzymatching", "yes")], "must be true or false"),
    ([("PatientID", "x" * 300)], "at most 256 characters"),
    ([("StudyInstanceUID", "1.2,,1.3")], "a list needs"),
    ([("includefield", "Bogus")], "not a DICOM attribute keyword"),
])
def test_bad_queries_say_what_is_wrong(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(BadQuery, match=message.replace("*", r"\*")):
        parse("study", params)


def test_series_number_needs_an_integer_and_uids_in_the_path_cannot_repeat() -> None:
    with pytest.raises(BadQuery, match="not an integer"):
        parse("series", [("SeriesNumber", "three")])
    with pytest.raises(BadQuery, match="already fixed by the path"):
        parse("series", [("StudyInstanceUID", "1.2")], {"StudyInstanceUID": "1.2"})


# Answers ----------------------------------------------------------------------------


def test_person_names_split_into_component_groups() -> None:
    assert person_name("Yamada^Tarou=山田^太郎=やまだ^たろう") == {
        "Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    assert person_name("=山田^太郎") == {"Ideographic": "山田^太郎"}
    assert person_name("Doe^John") == {"Alphabetic": "Doe^John"}


def test_dicom_json_model() -> None:
    query = parse("study", [])
    row = {"PatientName": "Doe^John", "PatientID": "P1", "StudyDate": "",
           "NumberOfStudyRelatedSeries": 2, "NumberOfStudyRelatedInstances": 7,
           "ModalitiesInStudy": "MR,CT,MR", "StudyInstanceUID": "1.2"}
    body = to_dicom_json(row, query.fields)
    assert body["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert body["00100020"] == {"vr": "LO", "Value": ["P1"]}
    assert body["00080020"] == {"vr": "DA"}  # empty: no Value
    assert body["00201206"] == {"vr": "IS", "Value": [2]}
    assert body["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert body["0020000D"] == {"vr": "UI", "Value": ["1.2"]}
    assert list(body) == sorted(body)


# SQL on a real database ---------------------------------------------------------------


# The same rows in either engine's schema.
ROWS = (
    "INSERT INTO patients (id, patient_id, patient_name, first_seen, last_seen)"
    " VALUES (1, 'P1', 'Yamada^Tarou=山田^太郎=やまだ^たろう', 0, 0),"
    " (2, 'P2', 'Doe^John', 0, 0), (3, 'P[3]', 'O''Brien*^Ann?', 0, 0)",
    "INSERT INTO studies (id, study_instance_uid, patient_pk, study_date,"
    " study_time, first_seen, last_seen) VALUES (1, '1.1', 1, '20200105', '101530',"
    " 0, 0), (2, '1.2', 2, '20211231', '2359', 0, 0), (3, '1.3', 3, '', '', 0, 0)",
    "INSERT INTO series (id, series_instance_uid, study_pk, modality, series_number,"
    " instance_count, first_seen, last_seen) VALUES (1, '1.1.1', 1, 'CT', 1, 3,"
    " 0, 0), (2, '1.1.2', 1, 'MR', 2, 2, 0, 0), (3, '1.2.1', 2, 'MR', 1, 1, 0, 0)",
)


@pytest.fixture
def db() -> sqlite3.Connection:
    con = sqlite3.connect(":memory:")
    con.row_factory = sqlite3.Row
    for migration in schema.MIGRATIONS:
        for statement in migration:
            con.execute(statement)
    for statement in ROWS:
        con.execute(statement)
    return con


@pytest.fixture(scope="module")
def pg_rows(postgres: Cluster) -> Iterator[str]:
    """One database with the rows for the whole module: its tests only read."""
    name = postgres.create_database()
    postgres.sql(";\n".join([*(s for m in pg_schema.MIGRATIONS for s in m), *ROWS]), name)
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture
async def pg(pg_rows: str) -> AsyncIterator[Any]:
    con = await asyncpg.connect(pg_rows)
    yield con
    await con.close()


def uids(db: sqlite3.Connection, level: str, params: list[tuple[str, str]]) -> list[str]:
    query = parse(level, params)
    sql, values = qido_sqlite.build(query)
    key = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}[level]
    return [row[key] for row in db.execute(sql, values)]


async def pg_uids(con: Any, level: str, params: list[tuple[str, str]]) -> list[str]:
    sql, values = qido_pg.build(parse(level, params))
    key = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}[level]
    return [row[key] for row in await con.fetch(sql, *values)]


STUDY_CASES = [
    ([], ["1.1", "1.2", "1.3"]),
    ([("PatientName", "Doe^John")], ["1.2"]),
    ([("PatientName", "doe^john")], []),  # case-sensitive unless fuzzy
    ([("PatientName", "doe"), ("fuzzymatching", "true")], ["1.2"]),
    ([("PatientName", "Yam*")], ["1.1"]),
    ([("PatientName", "山田*")], ["1.1"]),  # the ideographic group
    ([("PatientName", "やまだ^たろう")], ["1.1"]),  # the phonetic group, exactly
    ([("PatientName", "O'Brien*^Ann?")], ["1.3"]),  # * and ? in a value: wildcards
    ([("PatientID", "P[3]")], ["1.3"]),  # GLOB's [ is escaped
    ([("PatientID", "P?")], ["1.1", "1.2"]),
    ([("StudyDate", "20200101-20201231")], ["1.1"]),
    ([("StudyDate", "20210101-")], ["1.2"]),
    ([("StudyDate", "-20211231")], ["1.1", "1.2"]),  # an empty date never matches a range
    ([("StudyTime", "10")], ["1.1"]),
    ([("StudyTime", "2300-")], ["1.2"]),
    ([("ModalitiesInStudy", "MR")], ["1.1", "1.2"]),
    ([("ModalitiesInStudy", "CT,PT")], ["1.1"]),
    ([("StudyInstanceUID", "1.2,1.3")], ["1.2", "1.3"]),
    ([("limit", "1"), ("offset", "1")], ["1.2", "1.3"]),  # one page plus one row
]


@pytest.mark.parametrize(("params", "expected"), STUDY_CASES)
def test_study_matching_in_sqlite(db: sqlite3.Connection, params: list[tuple[str, str]],
                                  expected: list[str]) -> None:
    assert uids(db, "study", params) == expected


def test_counts_and_modalities(db: sqlite3.Connection) -> None:
    sql, values = qido_sqlite.build(parse("study", [("StudyInstanceUID", "1.1")]))
    [row] = db.execute(sql, values).fetchall()
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 5)
    assert sorted(row["ModalitiesInStudy"].split(",")) == ["CT", "MR"]


def test_series_matching_in_sqlite(db: sqlite3.Connection) -> None:
    assert uids(db, "series", [("Modality", "MR")]) == ["1.1.2", "1.2.1"]
    assert uids(db, "series", [("SeriesNumber", "1"), ("PatientID", "P1")]) == ["1.1.1"]


@pytest.mark.parametrize(("params", "expected"), STUDY_CASES)
async def test_study_matching_in_postgresql(pg: Any, params: list[tuple[str, str]],
                                            expected: list[str]) -> None:
    assert await pg_uids(pg, "study", params) == expected


async def test_counts_and_modalities_in_postgresql(pg: Any) -> None:
    sql, values = qido_pg.build(parse("study", [("StudyInstanceUID", "1.1")]))
    [row] = await pg.fetch(sql, *values)
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 5)
    assert sorted(row["ModalitiesInStudy"].split(",")) == ["CT", "MR"]


async def test_series_matching_in_postgresql(pg: Any) -> None:
    assert await pg_uids(pg, "series", [("Modality", "MR")]) == ["1.1.2", "1.2.1"]
    assert await pg_uids(pg, "series", [("SeriesNumber", "1"), ("PatientID", "P1")]) == [
        "1.1.1"]
    # Values PostgreSQL cannot compare match nothing instead of failing the query.
    assert await pg_uids(pg, "series", [("SeriesNumber", str(2**70))]) == []
    assert await pg_uids(pg, "series", [("PatientID", "P\x001")]) == []


def test_like_patterns_escape_everything_but_the_dicom_wildcards() -> None:
    assert qido_pg.escape_like("a%b_c\\d") == "a\\%b\\_c\\\\d"
    assert qido_pg.dicom_like("J*n?_%") == "J%n_\\_\\%"
