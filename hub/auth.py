"""Who is calling, and may they? Bearer keys checked against hashed keys in the store.

Handlers declare the role they need with `@requires("read")`, or `@public`.
A route with neither is refused to everyone but admins, so forgetting the
decorator fails closed. Missing or unknown key: 401; known key, wrong role: 403.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from dicomhub import keys

from .audit import AUDITOR_KEY, PHI_ROUTES
from .ratelimit import FailureLimiter
from .store import KeyInfo, Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Callable[..., Any])

KEY_INFO = web.RequestKey("key_info", KeyInfo)  # the caller, once authenticated
STORE_KEY = web.AppKey("store", Store)


def requires(role: str) -> Callable[[H], H]:
    keys.check_role(role)

    def mark(handler: H) -> H:
        handler.required_role = role  # type: ignore[attr-defined]
        return handler

    return mark


def public(handler: H) -> H:
    handler.required_role = None  # type: ignore[attr-defined]
    return handler


def json_error(cls: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    body = {"error": cls.__name__.removeprefix("HTTP").lower(), "message": message}
    return cls(text=json.dumps(body), content_type="application/json", headers=headers)


def unauthorized(message: str) -> web.HTTPException:
    return json_error(web.HTTPUnauthorized, message,
                  **{"WWW-Authenticate": 'Bearer realm="dicomhub"'})


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


COOKIE = "dicomhub_session"


ALLOWED_ORIGINS_KEY: web.AppKey[tuple[str, ...]] = web.AppKey("allowed_origins")


def same_origin(request: web.Request) -> bool:
    """Did the browser send this from the hub's own page (or an allowed origin)?"""
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return origin == f"{request.scheme}://{request.host}" \
        or origin in request.app.get(ALLOWED_ORIGINS_KEY, ())


async def from_cookie(request: web.Request) -> KeyInfo | None:
    """The key behind the request's dashboard session cookie, or None."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    return await request.app[STORE_KEY].find_session(keys.digest(token), time.time())


async def authenticate(request: web.Request) -> KeyInfo:
    """A bearer key, or else a dashboard session cookie. A cookie rides along on
    any request the browser makes, so with it a WebSocket handshake or an unsafe
    method must come from our own origin."""
    if bearer_token(request) is not None:
        return await authenticate_bearer(request)
    info = await from_cookie(request)
    if info is None:
        raise unauthorized("this endpoint needs 'Authorization: Bearer <key>' "
                           "or a dashboard session")
    is_websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    if (is_websocket or request.method not in ("GET", "HEAD")) and not same_origin(request):
        raise json_error(web.HTTPForbidden, "cross-origin request refused")
    return info


LIMITER_KEY = web.AppKey("auth_failures", FailureLimiter)


def check_not_blocked(request: web.Request) -> None:
    """Refuse an address that failed too often lately, before looking at its key."""
    wait = request.app[LIMITER_KEY].retry_after(request.remote or "", time.monotonic())
    if wait > 0:
        raise json_error(web.HTTPTooManyRequests,
                         "too many failed authentication attempts from this address; "
                         f"try again in {wait:.0f} s", **{"Retry-After": str(int(wait) + 1)})


def note_failure(request: web.Request) -> None:
    request.app[LIMITER_KEY].failure(request.remote or "", time.monotonic())
    request.app[AUDITOR_KEY].record(request, "", "", "auth.failed", _route(request),
                                    outcome="refused")


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


async def authenticate_bearer(request: web.Request) -> KeyInfo:
    token = bearer_token(request)
    if token is None:
        raise unauthorized("this endpoint needs 'Authorization: Bearer <key>'")
    check_not_blocked(request)
    try:
        return await _check_bearer(request, token)
    except web.HTTPUnauthorized:
        note_failure(request)
        raise


async def _check_bearer(request: web.Request, token: str) -> KeyInfo:
    if not keys.is_well_formed(token):
        raise unauthorized("the key is not a dicomhub key")
    digest = keys.digest(token)
    info = await request.app[STORE_KEY].find_key(digest)
    # The lookup is by hash, so timing reveals nothing about the key; compare anyway
    # so that an engine's string comparison never decides.
    if info is None or not hmac.compare_digest(digest, keys.digest(token)):
        raise unauthorized("unknown or revoked key")
    return info


RECHECK_INTERVAL = 2.0  # seconds between checks that a socket's key or session holds


async def still_allowed(request: web.Request) -> bool:
    """Is the key (or session) that opened this request still valid?"""
    token = bearer_token(request)
    if token is None:
        return await from_cookie(request) is not None
    if not keys.is_well_formed(token):
        return False
    return await request.app[STORE_KEY].find_key(keys.digest(token)) is not None


async def guard_socket(request: web.Request, ws: web.WebSocketResponse, code: int) -> None:
    """Run beside a long-lived WebSocket: revoking its key (or ending its session)
    closes it within RECHECK_INTERVAL."""
    while not ws.closed:
        await asyncio.sleep(RECHECK_INTERVAL)
        if not await still_allowed(request):
            await ws.close(code=code, message=b"key revoked or session ended")
            return


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route_handler = getattr(request.match_info, "handler", None)
    role = getattr(route_handler, "required_role", "admin")
    if role is None or request.match_info.http_exception is not None:
        return await handler(request)  # public, or a 404/405 with nothing to protect
    # Watchers authenticate with their key only; cookies are for the dashboard.
    info = await (authenticate_bearer(request) if role == "ingest" else authenticate(request))
    if not keys.allows(info.role, role):
        raise json_error(web.HTTPForbidden,
                     f"key {info.name!r} has role {info.role!r}; this needs {role!r}")
    request[KEY_INFO] = info
    if _route(request) in PHI_ROUTES:
        request.app[AUDITOR_KEY].record(request, info.name, info.role, "read")
    return await handler(request)
