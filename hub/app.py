"""The hub's aiohttp application: `create_app(config)` for `dicomhub hub` and tests alike."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from dicomhub.config import HubConfig
from dicomhub.errors import DicomhubError
from dicomhub.logs import keep_phi_out

from . import api, dicomweb, ingest, live, metrics, openapi, session
from .audit import AUDITOR_KEY, Auditor
from .auth import ALLOWED_ORIGINS_KEY, LIMITER_KEY, STORE_KEY, auth_middleware, public
from .ratelimit import FailureLimiter
from .feed import Feed
from .monitor import SeriesMonitor
from .store import Store
from .stores import create_store

log = logging.getLogger("dicomhub.hub")

CONFIG_KEY = web.AppKey("config", HubConfig)
MONITOR_KEY = web.AppKey("monitor", SeriesMonitor)

WEB_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # No inline script or style: whatever a DICOM file smuggles in stays text.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
}


def _web_dir() -> Path:
    return Path(str(resources.files("web")))


class RouteAccessLogger(AbstractAccessLogger):
    """Access log with the route pattern instead of the path and no query string:
    both can carry a Patient ID, which must never reach a log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        match_info = getattr(request, "match_info", None)
        resource = match_info.route.resource if match_info is not None else None
        route = resource.canonical if resource is not None else "(unmatched)"
        self.logger.info("%s %s %s %d %.1fms", request.remote, request.method, route,
                         response.status, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


@public
async def _web_file(request: web.Request) -> web.StreamResponse:
    """The dashboard's static files: flat names in web/, by a fixed list of types."""
    name = request.match_info.get("name", "index.html")
    path = _web_dir() / name
    content_type = WEB_TYPES.get(path.suffix)
    if content_type is None or "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": content_type, **PAGE_HEADERS})


def create_app(config: HubConfig, store: Store | None = None) -> web.Application:
    keep_phi_out()
    app = web.Application(middlewares=[api.error_middleware, api.etag_middleware,
                                       api.mask_middleware, auth_middleware],
                          client_max_size=1024 * 1024)
    app[CONFIG_KEY] = config
    app[STORE_KEY] = store or create_store(config)
    app[LIMITER_KEY] = FailureLimiter()
    app[ALLOWED_ORIGINS_KEY] = config.allowed_origins
    app[AUDITOR_KEY] = Auditor(app[STORE_KEY])
    feed = Feed(app[STORE_KEY], masked=config.phi_display == "masked")
    app[live.FEED_KEY] = feed
    app[ingest.PUBLISH] = feed.publish
    app[ingest.INGEST_SOCKETS] = dict[str, web.WebSocketResponse]()
    app[live.LIVE_SOCKETS] = set[web.WebSocketResponse]()
    app[metrics.METRICS_KEY] = metrics.HubMetrics(feed, app[ingest.INGEST_SOCKETS],
                                                  app[live.LIVE_SOCKETS])
    app[metrics.METRICS_KEY].instrument(app[STORE_KEY])
    app.add_routes(api.routes)
    app.add_routes(ingest.routes)
    app.add_routes(live.routes)
    app.add_routes(session.routes)
    app.add_routes(openapi.routes)
    app.add_routes(dicomweb.routes)
    app.add_routes(metrics.routes)
    app.router.add_get("/", _web_file)
    app.router.add_get(r"/{name:[A-Za-z0-9_-][A-Za-z0-9_.-]*}", _web_file)
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_close_sockets)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE_KEY]
    await store.open()
    await store.reset_watchers()
    monitor = SeriesMonitor(store, app[CONFIG_KEY].stable_after, app[ingest.PUBLISH])
    app[MONITOR_KEY] = monitor
    app[ingest.TOUCH] = monitor.touch
    await monitor.start()
    app[live.FEED_KEY].on_changes = monitor.refresh  # other hubs' series, on a shared store
    await app[live.FEED_KEY].start()
    await app[AUDITOR_KEY].start()
    yield
    await app[AUDITOR_KEY].stop()
    await app[live.FEED_KEY].stop()
    await monitor.stop()
    await store.close()


async def _close_sockets(app: web.Application) -> None:
    sockets = [*app[ingest.INGEST_SOCKETS].values(), *app[live.LIVE_SOCKETS]]
    await asyncio.gather(*(ws.close(code=1001, message=b"hub shutting down")
                           for ws in sockets), return_exceptions=True)


def _listen_hint(exc: OSError) -> str:
    """How to fix what kept the hub from listening, by what the system said."""
    if isinstance(exc, socket.gaierror):
        return "no such host name here: check [hub] host"
    return {
        errno.EADDRINUSE: "is another hub running? change [hub] port",
        errno.EADDRNOTAVAIL: "this machine has no such address: check [hub] host",
        errno.EACCES: "ports below 1024 need privileges: choose [hub] port 1024 or above",
    }.get(exc.errno or 0, "check [hub] host and port")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_ssl(config: HubConfig) -> ssl.SSLContext | None:
    """The TLS context for HTTPS/WSS, or None for plain HTTP (allowed on loopback,
    elsewhere only with allow_insecure)."""
    if not config.tls:
        if not is_loopback(config.host):
            if not config.allow_insecure:
                raise DicomhubError(
                    f"refusing plain HTTP on {config.host}: patient data would cross the "
                    "network unencrypted. Set [hub] tls_cert and tls_key, or "
                    "allow_insecure = true if something else encrypts the traffic")
            log.warning("serving plain HTTP on %s (allow_insecure = true): keys and "
                        "patient data cross the network unencrypted", config.host)
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
            context.load_verify_locations(cafile=config.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise DicomhubError(f"cannot load the hub's TLS files: {exc}") from None
    return context


async def start(config: HubConfig, store: Store | None = None) -> tuple[web.AppRunner, str]:
    """Start serving; return the runner (for cleanup) and the base URL actually bound."""
    context = server_ssl(config)
    app = create_app(config, store)
    runner = web.AppRunner(app, access_log_class=RouteAccessLogger,
                           access_log=logging.getLogger("dicomhub.access"),
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise DicomhubError(f"cannot listen on {config.host}:{config.port}: "
                            f"{exc.strerror or exc} ({_listen_hint(exc)})") from None
    port = runner.addresses[0][1]  # the port actually bound (config may say 0)
    host = config.host if ":" not in config.host else f"[{config.host}]"
    return runner, f"{'https' if context else 'http'}://{host}:{port}"
