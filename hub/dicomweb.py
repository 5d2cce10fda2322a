"""DICOMweb QIDO-RS search under /dicomweb (read role), in the DICOM JSON model.

The hub indexes headers; it does not hold the files, so it answers searches
(QIDO-RS) but not retrievals: RetrieveURL is left out of every answer rather
than pointing at something that would fail.
"""

from __future__ import annotations

import json
import re

from aiohttp import web

from . import qido
from .auth import KEY_INFO, STORE_KEY, json_error, requires
from .live import FEED_KEY
from .mask import initials, masked_id

routes = web.RouteTableDef()

MEDIA_TYPE = "application/dicom+json"
_ACCEPTED = {"application/dicom+json", "application/json", "application/*", "*/*"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MORE_WARNING = '299 dicomhub "There are additional results that can be requested"'


async def _search(request: web.Request, level: str) -> web.Response:
    _check_accept(request)
    scope = {}
    for name, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
        uid = request.match_info.get(name)
        if uid is not None:
            if not _UID.fullmatch(uid) or len(uid) > 64:
                raise json_error(web.HTTPBadRequest, f"{keyword} in the path is not a UID")
            scope[keyword] = uid
    try:
        query = qido.parse(level, list(request.query.items()), scope)
    except qido.BadQuery as exc:
        raise json_error(web.HTTPBadRequest, str(exc)) from None
    feed = request.app[FEED_KEY]
    masked = feed.masks(request[KEY_INFO].role)
    if masked and any(m.attribute.keyword in qido.PHI_KEYWORDS for m in query.matches):
        raise json_error(web.HTTPForbidden, "patients are masked for this key (phi_display "
                         "= masked): matching on PatientName, PatientID or PatientBirthDate "
                         "needs an admin key")
    rows, more = await request.app[STORE_KEY].qido(query)
    if not rows:
        return web.Response(status=204)
    if masked:
        assert feed.mask_secret is not None
        rows = [dict(row, PatientName=initials(row.get("PatientName") or ""),
                     PatientID=masked_id(row.get("PatientID") or "", feed.mask_secret),
                     PatientBirthDate="") for row in rows]
    body = [qido.to_dicom_json(row, query.fields) for row in rows]
    headers = {"Warning": MORE_WARNING} if more else {}
    return web.Response(text=json.dumps(body, ensure_ascii=False, separators=(",", ":")),
                        content_type=MEDIA_TYPE, headers=headers)


def _check_accept(request: web.Request) -> None:
    accept = request.headers.get("Accept", "")
    if not accept:
        return
    offered = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not offered & _ACCEPTED:
        raise json_error(web.HTTPNotAcceptable, "this hub answers searches as "
                         "application/dicom+json only")


@routes.get("/dicomweb/studies")
@requires("read")
async def studies(request: web.Request) -> web.Response:
    return await _search(request, "study")


@routes.get("/dicomweb/series")
@requires("read")
async def series(request: web.Request) -> web.Response:
    return await _search(request, "series")


@routes.get("/dicomweb/instances")
@requires("read")
async def instances(request: web.Request) -> web.Response:
    return await _search(request, "instance")


@routes.get("/dicomweb/studies/{study}/series")
@requires("read")
async def study_series(request: web.Request) -> web.Response:
    return await _search(request, "series")


@routes.get("/dicomweb/studies/{study}/instances")
@requires("read")
async def study_instances(request: web.Request) -> web.Response:
    return await _search(request, "instance")


@routes.get("/dicomweb/studies/{study}/series/{series}/instances")
@requires("read")
async def series_instances(request: web.Request) -> web.Response:
    return await _search(request, "instance")
