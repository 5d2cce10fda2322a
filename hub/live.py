"""`/ws/live`: every change-log entry as it happens, resumable by seq.

`?since=SEQ` replays the log after SEQ, then says `{"kind": "live"}` and
streams; no gap and no duplicate (see Feed.replay). Once a second a `stats`
message follows. A browser authenticates with its session cookie; an expired
or missing session is answered after the upgrade with close code 4401, which a
page can see (a refused handshake shows up in a browser only as 1006).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from aiohttp import WSMsgType, web

from dicomhub import keys

from . import query
from .auth import (
    authenticate_bearer,
    bearer_token,
    from_cookie,
    guard_socket,
    json_error,
    public,
    same_origin,
)
from .audit import AUDITOR_KEY
from .feed import Client, Feed
from .metrics import METRICS_KEY
from .store import KeyInfo

log = logging.getLogger("dicomhub.hub")

FEED_KEY = web.AppKey("feed", Feed)
LIVE_SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("live_sockets")

CLOSE_TOO_SLOW = 4008
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403

routes = web.RouteTableDef()


async def _who(request: web.Request) -> KeyInfo | None:
    if bearer_token(request) is not None:
        return await authenticate_bearer(request)  # scripts: a plain 401/403
    if not same_origin(request):
        raise json_error(web.HTTPForbidden, "cross-origin WebSocket refused")
    return await from_cookie(request)


@routes.get("/ws/live")
@public  # authenticates itself, so that a browser can be told why it is refused
async def live(request: web.Request) -> web.StreamResponse:
    info = await _who(request)
    try:
        query.check_known(request.query, {"since"})
        since = query.integer(request.query, "since", -1, 0, 2**62) \
            if "since" in request.query else None
    except query.BadQuery as exc:
        raise json_error(web.HTTPBadRequest, str(exc)) from None
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
    await ws.prepare(request)
    if info is None:
        await ws.close(code=CLOSE_UNAUTHORIZED, message=b"no session; log in again")
        return ws
    if not keys.allows(info.role, "read"):
        await ws.close(code=CLOSE_FORBIDDEN, message=b"this needs a read key")
        return ws
    request.app[AUDITOR_KEY].record(request, info.name, info.role, "live.subscribe")
    feed, sockets = request.app[FEED_KEY], request.app[LIVE_SOCKETS]
    cutting: set[asyncio.Task[None]] = set()

    def too_slow(client: Client) -> None:
        request.app[METRICS_KEY].live_clients_dropped.inc()
        task = asyncio.get_running_loop().create_task(_cut_off(request, ws, client))
        cutting.add(task)
        task.add_done_callback(cutting.discard)

    masked = feed.masks(info.role)
    client = feed.subscribe(too_slow, masked)
    sockets.add(ws)
    sender: asyncio.Task[None] | None = None
    guard: asyncio.Task[None] | None = None
    try:
        start = feed.last_seq if since is None else since

        async def send(seq: int, text: str) -> None:
            await ws.send_str(text)
            client.last_sent = seq

        client.last_sent = start
        last = await feed.replay(start, send, masked) if since is not None else start
        await ws.send_str(json.dumps({"kind": "live", "last_seq": last}))
        sender = asyncio.create_task(_drain(ws, client))
        guard = asyncio.create_task(guard_socket(request, ws, CLOSE_UNAUTHORIZED))
        async for msg in ws:  # only this task may read; clients have nothing to say
            if msg.type == WSMsgType.ERROR:
                break
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away (or was cut off) mid-send
    finally:
        feed.unsubscribe(client)
        sockets.discard(ws)
        for task in (sender, guard):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionResetError,
                                         RuntimeError):
                    await task
    return ws


async def _drain(ws: web.WebSocketResponse, client: Client) -> None:
    """Copy the client's queue onto its socket, skipping what the replay already sent."""
    while True:
        seq, text = await client.queue.get()
        if seq and seq <= client.last_sent:
            continue
        await ws.send_str(text)
        if seq:
            client.last_sent = seq


async def _cut_off(request: web.Request, ws: web.WebSocketResponse, client: Client) -> None:
    reason = f"too slow; resume with ?since={client.last_sent}"
    log.warning("live client cut off: it fell more than %d messages behind",
                client.queue.maxsize)
    try:
        async with asyncio.timeout(5.0):
            await ws.close(code=CLOSE_TOO_SLOW, message=reason.encode())
    except (TimeoutError, ConnectionResetError, RuntimeError):
        if request.transport is not None:
            request.transport.abort()  # it will not even read a close frame
