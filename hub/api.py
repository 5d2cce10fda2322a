"""REST reads: JSON, snake_case, times in ISO 8601 UTC, keyset paging.

Handlers parse, call the store, respond. Every list answers
``{"items": [...], "next_cursor": str | null}``; pass `cursor` back to continue.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from aiohttp import web

from dicomhub import __version__

from . import query
from .auth import KEY_INFO, STORE_KEY, Handler, authenticate, json_error, public, requires
from .live import FEED_KEY
from .mask import mask_text
from .store import ListQuery, Page

log = logging.getLogger("dicomhub.hub")
routes = web.RouteTableDef()

MAX_CHANGES = 1000
MAX_WAIT = 300  # seconds a long poll may be held


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                        status=status, content_type="application/json")


def _page(page: Page) -> web.Response:
    return _json({"items": page.items, "next_cursor": query.encode_cursor(page.next_after)})


def _list_query(request: web.Request, filters: tuple[str, ...]) -> ListQuery:
    try:
        q = query.list_query(request.query, filters)
    except query.BadQuery as exc:
        raise json_error(web.HTTPBadRequest, str(exc)) from None
    if "patient_id" in q.filters:
        _patient_lookup_allowed(request)
    return q


def _patient_lookup_allowed(request: web.Request) -> None:
    """With masked display, finding patients by their real ID would undo the mask."""
    if request.app[FEED_KEY].masks(request[KEY_INFO].role):
        raise json_error(web.HTTPForbidden, "patients are masked for this key "
                         "(phi_display = masked): looking them up by ID needs an admin key")


def _no_params(request: web.Request) -> None:
    if request.query:
        raise json_error(web.HTTPBadRequest, f"unknown parameter(s) "
                         f"{', '.join(map(repr, sorted(request.query)))}; this endpoint takes none")


def _not_found(what: str) -> web.HTTPException:
    return json_error(web.HTTPNotFound, f"no {what} with that identifier")


@routes.get("/api/health")
@public
async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "version": __version__})


# Any valid key may ask, whatever its role (`requires` names one role, admin aside):
# public to the middleware, the handler authenticates the caller itself.
@routes.get("/api/key")
@public
async def key_info(request: web.Request) -> web.Response:
    """The calling key's name and role: `dicomhub doctor` checks a watcher's key
    with it before the watcher uses it. 401 for a missing, unknown or revoked key."""
    info = await authenticate(request)
    _no_params(request)
    return _json({"name": info.name, "role": info.role})


@routes.get("/api/series")
@requires("read")
async def list_series(request: web.Request) -> web.Response:
    q = _list_query(request, ("patient_id", "study_instance_uid", "modality", "status"))
    return _page(await request.app[STORE_KEY].list_series(q))


@routes.get("/api/series/{uid}")
@requires("read")
async def get_series(request: web.Request) -> web.Response:
    _no_params(request)
    item = await request.app[STORE_KEY].get_series(request.match_info["uid"])
    if item is None:
        raise _not_found("series")
    return _json(item)


@routes.get("/api/studies")
@requires("read")
async def list_studies(request: web.Request) -> web.Response:
    q = _list_query(request, ("patient_id", "accession_number", "study_date"))
    return _page(await request.app[STORE_KEY].list_studies(q))


@routes.get("/api/studies/{uid}")
@requires("read")
async def get_study(request: web.Request) -> web.Response:
    _no_params(request)
    item = await request.app[STORE_KEY].get_study(request.match_info["uid"])
    if item is None:
        raise _not_found("study")
    return _json(item)


@routes.get("/api/patients")
@requires("read")
async def list_patients(request: web.Request) -> web.Response:
    q = _list_query(request, ("patient_id",))
    return _page(await request.app[STORE_KEY].list_patients(q))


# A Patient ID may hold '/', so the route takes the rest of the path (percent-encoded).
@routes.get("/api/patients/{patient_id:.+}")
@requires("read")
async def get_patient(request: web.Request) -> web.Response:
    _no_params(request)
    _patient_lookup_allowed(request)
    item = await request.app[STORE_KEY].get_patient(request.match_info["patient_id"])
    if item is None:
        raise _not_found("patient")
    return _json(item)


@routes.get("/api/rejections")
@requires("read")
async def list_rejections(request: web.Request) -> web.Response:
    q = _list_query(request, ("reason", "watcher_id"))
    return _page(await request.app[STORE_KEY].list_rejections(q))


@routes.get("/api/changes")
@requires("read")
async def list_changes(request: web.Request) -> web.Response:
    try:
        query.check_known(request.query, {"since", "limit", "wait"})
        since = query.integer(request.query, "since", 0, 0, 2**62)
        limit = query.integer(request.query, "limit", 100, 1, MAX_CHANGES)
        wait = query.integer(request.query, "wait", 0, 0, MAX_WAIT)
    except query.BadQuery as exc:
        raise json_error(web.HTTPBadRequest, str(exc)) from None
    store = request.app[STORE_KEY]
    changes = await store.changes(since, limit)
    if not changes and wait and await request.app[FEED_KEY].wait_after(since, wait):
        changes = await store.changes(since, limit)  # long poll: answer once one exists
    # As Orthanc's /changes: poll again with since=last; done says nothing more is waiting.
    return _json({"changes": [c.to_json() for c in changes],
                  "last": changes[-1].seq if changes else since,
                  "done": len(changes) < limit})


@routes.get("/api/watchers")
@requires("read")
async def list_watchers(request: web.Request) -> web.Response:
    _no_params(request)
    return _json({"items": await request.app[STORE_KEY].list_watchers()})


@routes.get("/api/audit")
@requires("admin")
async def list_audit(request: web.Request) -> web.Response:
    q = _list_query(request, ("actor", "action"))
    return _page(await request.app[STORE_KEY].list_audit(q))


@routes.get("/api/stats")
@requires("read")
async def stats(request: web.Request) -> web.Response:
    _no_params(request)
    return _json(await request.app[STORE_KEY].stats())


@web.middleware
async def etag_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pollers re-asking for an unchanged list get 304 Not Modified and no body.

    The tag is a digest of the body itself, so it changes exactly when the answer
    does, whatever the store looks like underneath."""
    response = await handler(request)
    if request.method != "GET" or response.status != 200 \
            or not isinstance(response, web.Response) or response.body is None \
            or response.content_type not in ("application/json", "application/dicom+json"):
        return response
    body = response.body
    assert isinstance(body, bytes)
    tag = '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'
    response.headers["ETag"] = tag
    response.headers.setdefault("Cache-Control", "no-cache")
    wanted = request.headers.get("If-None-Match", "")
    if tag in (t.strip().removeprefix("W/") for t in wanted.split(",")) or wanted == "*":
        return web.Response(status=304, headers={"ETag": tag, "Cache-Control": "no-cache"})
    return response


@web.middleware
async def mask_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With phi_display = "masked", the read role gets patients as initials and
    hashed IDs in every JSON answer; admins see them whole."""
    response = await handler(request)
    feed = request.app[FEED_KEY]
    info = request.get(KEY_INFO)
    if info is None or not feed.masks(info.role) or not isinstance(response, web.Response) \
            or response.content_type != "application/json" or response.body is None:
        return response
    assert feed.mask_secret is not None and isinstance(response.body, bytes)
    response.text = mask_text(response.body, feed.mask_secret)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON with a message; unexpected ones never leak details."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        # aiohttp's own 404/405 and friends: the same JSON shape as ours. (Not by
        # re-raising: their constructors differ, e.g. 405 needs the allowed methods.)
        keep = {k: v for k, v in exc.headers.items()
                if k.lower() in ("allow", "retry-after", "www-authenticate")}
        body = {"error": type(exc).__name__.removeprefix("HTTP").lower(),
                "message": exc.reason}
        return web.json_response(body, status=exc.status, headers=keep)
    except Exception:
        # The route pattern, never the path: paths can carry a Patient ID.
        log.exception("internal error handling %s %s", request.method, _route_name(request))
        raise json_error(web.HTTPInternalServerError,
                         "internal error; see the hub's log") from None


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(unmatched)"
