"""Dashboard sessions: a browser cannot put a bearer key on a WebSocket, so it
logs in once with a read key (or a one-time link) and gets a session cookie.

The cookie is HttpOnly and SameSite=Strict (Secure under TLS); only a hash of
its token is stored, bound to the key that opened it, so revoking the key ends
the session. Cookie-authenticated WebSocket handshakes and unsafe methods must
come from the hub's own origin (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from dicomhub import keys

from .auth import (
    COOKIE,
    STORE_KEY,
    authenticate_bearer,
    bearer_token,
    check_not_blocked,
    from_cookie,
    json_error,
    note_failure,
    public,
)
from .store import KeyInfo, Store

SESSION_TTL = 12 * 3600.0
LOGIN_TTL = 12 * 3600.0

routes = web.RouteTableDef()


async def identify(request: web.Request) -> KeyInfo | None:
    """Bearer key if one is sent (raising 401 when it is bad), else the session cookie."""
    if bearer_token(request) is not None:
        return await authenticate_bearer(request)
    return await from_cookie(request)


async def new_login_link(store: Store, key_name: str) -> str | None:
    """A one-time login token for the dashboard (printed by `dicomhub up`)."""
    token = secrets.token_urlsafe(32)
    now = time.time()
    if not await store.create_session(keys.digest(token), key_name, "login", now,
                                      now + LOGIN_TTL):
        return None
    return token


async def _open_session(request: web.Request, key_name: str,
                        response: web.StreamResponse) -> None:
    token = secrets.token_urlsafe(32)
    now = time.time()
    if not await request.app[STORE_KEY].create_session(keys.digest(token), key_name,
                                                       "session", now, now + SESSION_TTL):
        raise json_error(web.HTTPUnauthorized, "the key was revoked")
    response.set_cookie(COOKIE, token, max_age=int(SESSION_TTL), httponly=True,
                        samesite="Strict", secure=request.secure, path="/")


@routes.post("/api/session")
@public
async def login(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        key = body["key"] if isinstance(body, dict) else None
    except (ValueError, KeyError):
        key = None
    if not isinstance(key, str):
        raise json_error(web.HTTPBadRequest, 'send JSON {"key": "dhk_..."}')
    check_not_blocked(request)
    key = key.strip()
    info = await request.app[STORE_KEY].find_key(keys.digest(key)) \
        if keys.is_well_formed(key) else None
    if info is None:
        note_failure(request)
        raise json_error(web.HTTPUnauthorized, "unknown or revoked key")
    if not keys.allows(info.role, "read"):
        raise json_error(web.HTTPForbidden, f"key {info.name!r} has role {info.role!r}; "
                         "the dashboard needs a read key")
    response = web.json_response({"name": info.name, "role": info.role})
    await _open_session(request, info.name, response)
    return response


@routes.get("/api/session")
@public
async def whoami(request: web.Request) -> web.Response:
    info = await identify(request)
    if info is None:
        raise json_error(web.HTTPUnauthorized, "not logged in")
    return web.json_response({"name": info.name, "role": info.role})


@routes.delete("/api/session")
@public
async def logout(request: web.Request) -> web.Response:
    token = request.cookies.get(COOKIE)
    if token:
        await request.app[STORE_KEY].delete_session(keys.digest(token))
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/")
    return response


@routes.get("/login")
@public
async def login_link(request: web.Request) -> web.StreamResponse:
    """Redeem a one-time link: open a session and go to the dashboard."""
    token = request.query.get("token", "")
    key_name = None
    if 0 < len(token) <= 200:
        key_name = await request.app[STORE_KEY].redeem_login(keys.digest(token), time.time())
    if key_name is None:
        raise web.HTTPSeeOther("/#link-expired")
    response = web.HTTPSeeOther("/")
    await _open_session(request, key_name, response)
    raise response
