"""`/ws/ingest`: one persistent WebSocket per watcher.

The watcher says hello, then sends batches; each batch is stored in one
transaction and acknowledged only after the commit. A malformed frame gets an
error frame naming the problem and touches nothing else; a store failure
closes the socket (the watcher keeps the batch and retries after reconnecting).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from aiohttp import WSMsgType, web

from dicomhub import __version__
from dicomhub.bucket import TokenBucket
from dicomhub.protocol import (
    FRAME_BURST,
    MAX_FRAMES_PER_SECOND,
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Error,
    Hello,
    Message,
    ProtocolError,
    Status,
    Welcome,
    encode_message,
    parse_message,
)

from .auth import KEY_INFO, STORE_KEY, guard_socket, requires
from .metrics import METRICS_KEY
from .store import Change, KeyInfo

log = logging.getLogger("dicomhub.hub")

HELLO_TIMEOUT = 30.0
MAX_VIOLATIONS = 20  # malformed messages answered before the connection is closed
MAX_FRAME = 16 * 1024 * 1024  # a full batch of records with long paths fits easily
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_REPLACED = 4000
CLOSE_REVOKED = 4401

Publish = Callable[[Sequence[Change]], None]
Touch = Callable[[Mapping[str, float]], None]

INGEST_SOCKETS: web.AppKey[dict[str, web.WebSocketResponse]] = web.AppKey("ingest_sockets")
PUBLISH: web.AppKey[Publish] = web.AppKey("publish")  # hands changes to the live feed
TOUCH: web.AppKey[Touch] = web.AppKey("touch")  # tells the stability timers


async def _send(ws: web.WebSocketResponse, message: Message) -> None:
    await ws.send_str(encode_message(message))


async def _hello(ws: web.WebSocketResponse) -> Hello | None:
    try:
        msg = await ws.receive(timeout=HELLO_TIMEOUT)
    except asyncio.TimeoutError:
        await _fatal(ws, "no hello within 30 s")
        return None
    if msg.type != WSMsgType.TEXT:
        if msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            await _fatal(ws, "the first frame must be a text hello")
        return None
    try:
        hello = parse_message(msg.data)
    except ProtocolError as exc:
        await _fatal(ws, f"bad hello: {exc}")
        return None
    if not isinstance(hello, Hello):
        await _fatal(ws, f"expected a hello first, got {hello.type!r}")
        return None
    if hello.protocol != PROTOCOL_VERSION:
        await _fatal(ws, f"protocol version {hello.protocol} is not supported; "
                         f"this hub speaks version {PROTOCOL_VERSION}")
        return None
    return hello


async def _fatal(ws: web.WebSocketResponse, message: str, code: int = CLOSE_POLICY) -> None:
    if not ws.closed:
        await _send(ws, Error(message=message, fatal=True))
        await ws.close(code=code, message=message[:120].encode())


routes = web.RouteTableDef()


@routes.get("/ws/ingest")
@requires("ingest")
async def ingest(request: web.Request) -> web.StreamResponse:
    key: KeyInfo = request[KEY_INFO]
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_FRAME)
    await ws.prepare(request)
    hello = await _hello(ws)
    if hello is None:
        return ws
    app = request.app
    store, sockets = app[STORE_KEY], app[INGEST_SOCKETS]
    watcher_id = hello.watcher_id
    previous = sockets.get(watcher_id)
    if previous is not None:
        # The same watcher again: its old connection is half-dead (a restart, a
        # network change). The newest one wins.
        log.warning("watcher %s connected again; closing its older connection", watcher_id)
        await previous.close(code=CLOSE_REPLACED, message=b"replaced by a newer connection")
    sockets[watcher_id] = ws
    address = request.remote or ""
    app[PUBLISH]([await store.watcher_connected(watcher_id, key.name, hello.software,
                                                address, hello.backlog, time.time())])
    log.info("watcher %s connected from %s (key %s)", watcher_id, address, key.name)
    guard = asyncio.create_task(guard_socket(request, ws, CLOSE_REVOKED))
    try:
        await _send(ws, Welcome(protocol=PROTOCOL_VERSION, hub=f"dicomhub {__version__}"))
        await _serve(ws, app, watcher_id)
    finally:
        guard.cancel()
        if sockets.get(watcher_id) is ws:
            del sockets[watcher_id]
            change = await store.watcher_disconnected(watcher_id, time.time())
            if change is not None:
                app[PUBLISH]([change])
            log.info("watcher %s disconnected", watcher_id)
    return ws


async def _serve(ws: web.WebSocketResponse, app: web.Application, watcher_id: str) -> None:
    store, metrics = app[STORE_KEY], app[METRICS_KEY]
    bucket = TokenBucket(MAX_FRAMES_PER_SECOND, FRAME_BURST, time.monotonic())
    violations = 0

    async def refuse(error: Error) -> bool:
        """Answer a bad frame; True when the connection has had enough of them."""
        nonlocal violations
        violations += 1
        if violations > MAX_VIOLATIONS:
            await _fatal(ws, f"more than {MAX_VIOLATIONS} malformed messages; "
                             "fix the client and reconnect")
            return True
        await _send(ws, error)
        return False

    async for msg in ws:
        arrived = time.monotonic()
        if not bucket.take(arrived):
            await _fatal(ws, f"more than {MAX_FRAMES_PER_SECOND} messages a second; slow down "
                             "and reconnect")
            return
        if msg.type != WSMsgType.TEXT:
            if msg.type == WSMsgType.BINARY and await refuse(
                    Error(message="binary frames are not part of the protocol")):
                return
            continue
        try:
            message = parse_message(msg.data)
        except ProtocolError as exc:
            if await refuse(Error(message=str(exc), batch_id=_batch_id(msg.data))):
                return
            continue
        if isinstance(message, Status):
            await store.watcher_backlog(watcher_id, message.backlog, time.time())
            continue
        if not isinstance(message, Batch):
            if await refuse(Error(message=f"unexpected {message.type!r} message")):
                return
            continue
        try:
            result = await store.ingest(watcher_id, message.records, time.time(),
                                        message.backlog)
        except Exception:
            log.exception("storing batch %d from watcher %s failed", message.batch_id,
                          watcher_id)
            await _fatal(ws, "the hub could not store this batch; retry later",
                         CLOSE_INTERNAL)
            return
        # Committed: the series timers and live clients hear of it now, before the ack,
        # which a watcher gone meanwhile (killed, cut off) can no longer receive; the
        # commit stands all the same, and so must its announcements.
        app[TOUCH](result.touched)
        app[PUBLISH](result.changes)
        await _send(ws, Ack(batch_id=message.batch_id, stored=result.stored,
                            duplicates=result.duplicates, rejected=result.rejected))
        metrics.batch_acknowledged(result, time.monotonic() - arrived)


def _batch_id(data: str) -> int | None:
    """Best effort: name the batch an error is about, so the watcher can log it."""
    try:
        value = json.loads(data).get("batch_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None
