"""The OpenAPI 3 description of the REST API, served at /api/openapi.json.

A test checks that it names exactly the routes the hub serves, and runs
schemathesis against it: every answer must match what is written here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dicomhub import __version__

from .auth import public

routes = web.RouteTableDef()

_TEXT = {"type": "string", "minLength": 1, "maxLength": 256}  # as hub/query.py checks
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                     "maximum": 1000}}
_CURSOR = {"name": "cursor", "in": "query", "schema": {"type": "string"}}
_ORDER = {"name": "order", "in": "query", "schema": {"type": "string",
                                                     "enum": ["asc", "desc"]}}


def _query(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema or _TEXT}


def _path(name: str) -> dict[str, Any]:
    # Percent-encoded, a long value of 4-byte characters would pass the 8 KB limit
    # on a request line; real UIDs and patient IDs are 64 characters at most.
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 256}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _page_of(item: str) -> dict[str, Any]:
    return {"type": "object", "required": ["items", "next_cursor"], "properties": {
        "items": {"type": "array", "items": _ref(item)},
        "next_cursor": {"type": ["string", "null"]}}}


_ERRORS = {str(code): _json(_ref("Error"), text) for code, text in (
    (400, "A parameter is invalid"), (401, "No key, or an unknown or revoked one"),
    (403, "The key's role does not reach this"), (429, "Too many failed attempts"))}
_NOT_FOUND = {"404": _json(_ref("Error"), "No such item")}


def _get(summary: str, ok: dict[str, Any], parameters: list[dict[str, Any]] | None = None,
         not_found: bool = False, secured: bool = True) -> dict[str, Any]:
    responses = {"200": ok, "304": {"description": "Not modified (If-None-Match)"}}
    if secured:
        responses.update(_ERRORS)
    else:
        responses["400"] = _ERRORS["400"]
    if not_found:
        responses.update(_NOT_FOUND)
    operation: dict[str, Any] = {"summary": summary, "parameters": parameters or [],
                                 "responses": responses}
    if not secured:
        operation["security"] = []
    return {"get": operation}


def _list(summary: str, item: str, filters: list[dict[str, Any]]) -> dict[str, Any]:
    return _get(summary, _json(_page_of(item)), [*filters, _LIMIT, _CURSOR, _ORDER])


_NULLABLE_INT = {"type": ["integer", "null"]}
_STR = {"type": "string"}
_TIME = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "message"],
              "properties": {"error": _STR, "message": _STR}},
    "Series": {"type": "object", "required": [
        "series_instance_uid", "study_instance_uid", "patient_id", "patient_name",
        "modality", "series_number", "series_description", "instance_count", "status",
        "first_seen", "last_seen"], "properties": {
        "series_instance_uid": _STR, "study_instance_uid": _STR, "study_date": _STR,
        "study_description": _STR, "accession_number": _STR, "patient_id": _STR,
        "patient_name": _STR, "modality": _STR, "series_number": _NULLABLE_INT,
        "series_description": _STR, "body_part_examined": _STR, "series_date": _STR,
        "series_time": _STR, "instance_count": {"type": "integer", "minimum": 0},
        "status": {"type": "string", "enum": ["receiving", "stable"]},
        "first_seen": _STR, "last_seen": _STR, "stable_since": _TIME}},
    "Instance": {"type": "object", "required": ["sop_instance_uid", "path"], "properties": {
        "sop_instance_uid": _STR, "sop_class_uid": _STR, "instance_number": _NULLABLE_INT,
        "number_of_frames": _NULLABLE_INT, "rows": _NULLABLE_INT, "columns": _NULLABLE_INT,
        "transfer_syntax_uid": _STR, "watcher_id": _STR, "path": _STR,
        "size": {"type": "integer"}, "received": _STR}},
    "Study": {"type": "object", "required": ["study_instance_uid", "patient_id",
                                             "series_count", "instance_count"], "properties": {
        "study_instance_uid": _STR, "patient_id": _STR, "patient_name": _STR,
        "study_date": _STR, "study_description": _STR, "accession_number": _STR,
        "series_count": {"type": "integer"}, "instance_count": {"type": "integer"},
        "modalities": {"type": "array", "items": _STR}}},
    "Patient": {"type": "object", "required": ["patient_id", "study_count"], "properties": {
        "patient_id": _STR, "patient_name": _STR, "patient_birth_date": _STR,
        "patient_sex": _STR, "study_count": {"type": "integer"}}},
    "Rejection": {"type": "object", "required": ["watcher_id", "path", "reason", "detail",
                                                 "time"], "properties": {
        "watcher_id": _STR, "path": _STR, "reason": _STR, "detail": _STR,
        "sop_instance_uid": _STR, "size": {"type": "integer"}, "time": _STR}},
    "Watcher": {"type": "object", "required": ["watcher_id", "connected", "backlog"],
                "properties": {"watcher_id": _STR, "connected": {"type": "boolean"},
                               "backlog": {"type": "integer"}, "last_seen": _STR}},
    "AuditEntry": {"type": "object", "required": ["time", "actor", "action", "target"],
                   "properties": {"time": _STR, "actor": _STR, "role": _STR, "action": _STR,
                                  "target": _STR, "address": _STR, "outcome": _STR}},
    "Change": {"type": "object", "required": ["seq", "time", "kind"], "properties": {
        "seq": {"type": "integer"}, "time": _STR, "kind": _STR}},
}

_STATUS = _query("status", {"type": "string", "enum": ["receiving", "stable"]})

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "dicomhub", "version": __version__,
             "description": "A watched folder of DICOM files as a live, queryable index."},
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/health": _get("Liveness; no key needed", _json({"type": "object"}),
                            secured=False),
        "/api/key": _get("The calling key's name and role (any role may ask)", _json({
            "type": "object", "required": ["name", "role"], "properties": {
                "name": _STR, "role": {"type": "string", "enum": ["ingest", "read",
                                                                  "admin"]}}})),
        "/api/series": _list("Series, with filters", "Series", [
            _query("patient_id"), _query("study_instance_uid"), _query("modality"), _STATUS]),
        "/api/series/{uid}": _get("One series with its instances", _json({
            "allOf": [_ref("Series"), {"type": "object", "properties": {
                "instances": {"type": "array", "items": _ref("Instance")}}}]}),
            [_path("uid")], not_found=True),
        "/api/studies": _list("Studies", "Study", [
            _query("patient_id"), _query("accession_number"), _query("study_date")]),
        "/api/studies/{uid}": _get("One study with its series", _json({
            "allOf": [_ref("Study"), {"type": "object", "properties": {
                "series": {"type": "array", "items": _ref("Series")}}}]}),
            [_path("uid")], not_found=True),
        "/api/patients": _list("Patients", "Patient", [_query("patient_id")]),
        "/api/patients/{patient_id}": _get("One patient with their studies", _json({
            "allOf": [_ref("Patient"), {"type": "object", "properties": {
                "studies": {"type": "array", "items": _ref("Study")}}}]}),
            [_path("patient_id")], not_found=True),
        "/api/rejections": _list("Rejected files", "Rejection", [
            _query("reason"), _query("watcher_id")]),
        "/api/changes": _get("The change log after a seq (long poll with wait)", _json({
            "type": "object", "required": ["changes", "last", "done"], "properties": {
                "changes": {"type": "array", "items": _ref("Change")},
                "last": {"type": "integer"}, "done": {"type": "boolean"}}}), [
            _query("since", {"type": "integer", "minimum": 0, "maximum": 2**62}),
            _LIMIT, _query("wait", {"type": "integer", "minimum": 0, "maximum": 300})]),
        "/api/watchers": _get("Watchers", _json({"type": "object", "properties": {
            "items": {"type": "array", "items": _ref("Watcher")}}})),
        "/api/stats": _get("Counts", _json({"type": "object", "additionalProperties": {
            "type": "integer"}})),
        "/api/audit": _list("The audit trail (admin)", "AuditEntry", [
            _query("actor"), _query("action")]),
    },
}


@routes.get("/api/openapi.json")
@public
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)
