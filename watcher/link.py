"""The one persistent WebSocket from the watcher to the hub.

It sends the outbox in batches, oldest first, keeping up to `window` batches
in flight, and deletes a batch from the outbox only when the hub acknowledges
it. On any disconnect everything unacknowledged is simply sent again after
reconnecting: the hub is idempotent by SOP Instance UID, so a batch that was
committed but whose acknowledgement was lost costs nothing but bandwidth.

With several hubs configured it is connected to one at a time and fails over
to the next when an attempt fails or a connection drops (see `Rotation`).
What the previous hub had not acknowledged is still in the outbox, so the new
hub receives it like any other unacknowledged batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from dicomhub import __version__
from dicomhub.aio import cancelled_quietly
from dicomhub.bucket import TokenBucket
from dicomhub.errors import DicomhubError
from dicomhub.protocol import (
    FRAME_BURST,
    MAX_FRAMES_PER_SECOND,
    PROTOCOL_VERSION,
    Ack,
    Error,
    Hello,
    ProtocolError,
    Status,
    Welcome,
    encode_message,
    parse_message,
)

from .backoff import backoff
from .state import State, StateError

log = logging.getLogger("dicomhub.watcher")

WELCOME_TIMEOUT = 30.0
# The pace kept below the hub's limit, which closes the connection of a faster client:
# records that arrive one by one (the DICOM listener's) then wait to share a batch.
PACE = 0.8 * MAX_FRAMES_PER_SECOND
PACE_BURST = FRAME_BURST // 2
MAX_FRAME = 16 * 1024 * 1024


def client_ssl(urls: Sequence[str], ca_file: Path | None, client_cert: Path | None,
               client_key: Path | None) -> ssl.SSLContext | None:
    """For wss:// hubs: verify each against `ca_file` (else the system store) and
    its own host name, and present a client certificate when one is configured.
    None when every hub is ws://."""
    if not any(url.startswith("wss://") for url in urls):
        return None
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        context.load_cert_chain(client_cert, client_key)
    return context


class LinkError(Exception):
    """The hub answered in a way that ends this connection."""


class KeyRefused(DicomhubError):
    """A hub refused the key, and the link was told not to retry (a one-shot import:
    nobody is there to fix the key while it waits)."""


class Rotation:
    """Which hub to try next, and how long to wait first (pure: no I/O, no clock).

    Hubs are tried in turn, round robin. After an attempt the next hub is tried at
    once, unless every hub has had an attempt since the last wait: then the next
    backoff delay applies, so a watcher whose hubs are all down does not spin, and
    a single hub is retried exactly as before there were several. A session that
    got going (the hub acknowledged records, or closed the connection cleanly)
    starts afresh: a new backoff, and that session counts as the round's first
    attempt. A welcome alone is not getting going, so hubs that welcome a watcher
    and then refuse its batches every time cannot make it spin.
    """

    def __init__(self, urls: Sequence[str], delays: Callable[[], Iterator[float]]) -> None:
        if not urls:
            raise ValueError("a link needs at least one hub URL")
        self.urls, self._new_delays = tuple(urls), delays
        self._delays = delays()
        self._index = 0
        self._tried = 0  # attempts since the last wait or the last session that got going

    @property
    def url(self) -> str:
        """The hub to try now (or the one connected to)."""
        return self.urls[self._index]

    def advance(self, got_going: bool) -> float | None:
        """Move on after an attempt on `url` ended: the seconds to wait before
        trying the (new) `url`, or None to try it at once."""
        if got_going:
            self._delays, self._tried = self._new_delays(), 0
        self._tried += 1
        self._index = (self._index + 1) % len(self.urls)
        if self._tried < len(self.urls):
            return None
        self._tried = 0
        return next(self._delays)


class Link:
    def __init__(self, urls: Sequence[str], key: str, watcher_id: str, state: State, *,
                 batch_size: int = 200, window: int = 4,
                 delays: Callable[[], Iterator[float]] = backoff,
                 tls: ssl.SSLContext | None = None, refusal_is_final: bool = False) -> None:
        """`urls`: the hubs, tried in this order; `tls` is used for the wss:// ones."""
        self.key, self.watcher_id, self.state = key, watcher_id, state
        self.tls = tls
        self.refusal_is_final = refusal_is_final  # a refused key ends run() (KeyRefused)
        self.batch_size, self.window = batch_size, window
        self._rotation = Rotation(urls, delays)
        self._last_hub: str | None = None  # the hub of the last session welcomed
        self._acknowledged_any = False  # in the current session
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self.delivered = 0  # records acknowledged since start
        # What the hub said of them, summed: new instances, duplicates, rejections.
        self.stored = self.duplicates = self.rejected = 0
        # Acknowledged outbox ranges the state folder refused to delete (a full disk):
        # retried until they go, so the outbox and the backlog shrink again.
        self._unremoved: list[tuple[int, int]] = []
        self._refused = asyncio.Event()
        self._reported = -1  # the backlog the hub last heard of

    @property
    def url(self) -> str:
        """The hub in use: connected to, or being tried."""
        return self._rotation.url

    @property
    def urls(self) -> tuple[str, ...]:
        return self._rotation.urls

    def wake(self) -> None:
        """New records are in the outbox."""
        self._wake.set()

    async def run(self) -> None:
        """Stay connected until cancelled: after a failed attempt or a lost connection
        try the next hub, waiting with backoff and jitter after each full round."""
        while True:
            url = self.url
            self._acknowledged_any = False
            closed_cleanly = False
            try:
                async with connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self.key}"},
                    user_agent_header=f"dicomhub-watcher/{__version__}",
                    proxy=None, open_timeout=10, ping_interval=20, ping_timeout=20,
                    max_size=MAX_FRAME, compression=None,
                    ssl=self.tls if url.startswith("wss://") else None,
                ) as ws:
                    await self._session(ws)
                    closed_cleanly = True
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    message = (f"the hub at {_shown(url)} refused the ingest key (HTTP "
                               f"{status}): check $DICOMHUB_KEY or [watcher] key_file, and "
                               "the key's role")
                    if self.refusal_is_final:
                        raise KeyRefused(message) from None
                    log.error("%s", message)
                else:
                    log.warning("the hub at %s refused the connection: HTTP %d",
                                _shown(url), status)
            except ssl.SSLCertVerificationError as exc:
                log.error("the TLS certificate of the hub at %s is not trusted (%s): "
                          "refusing to connect; check [watcher] ca_file", _shown(url),
                          exc.verify_message)
            except StateError as exc:
                log.error("%s; retrying", exc)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, LinkError) as exc:
                log.warning("connection to the hub at %s lost or refused: %s%s", _shown(url),
                            _describe(exc), _hint(exc))
            finally:
                self.connected.clear()
            cancelled_quietly()
            delay = self._rotation.advance(closed_cleanly or self._acknowledged_any)
            if delay is not None:
                log.info("reconnecting in %.1f s (%d records waiting)", delay,
                         self.state.backlog)
                await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send(encode_message(Hello(watcher_id=self.watcher_id, protocol=PROTOCOL_VERSION,
                                           software=f"dicomhub-watcher {__version__}",
                                           backlog=self.state.backlog)))
        async with asyncio.timeout(WELCOME_TIMEOUT):
            reply = _parse(await ws.recv())
        if isinstance(reply, Error):
            raise LinkError(f"hub refused the hello: {reply.message}")
        if not isinstance(reply, Welcome):
            raise LinkError(f"expected a welcome, got {reply.type!r}")
        previous, self._last_hub = self._last_hub, self.url
        if previous is not None and previous != self.url:
            log.warning("connected to %s (%s), failing over from %s; %d records waiting",
                        _shown(self.url), reply.hub, _shown(previous), self.state.backlog)
        else:
            log.info("connected to %s (%s); %d records waiting", _shown(self.url), reply.hub,
                     self.state.backlog)
        self.connected.set()
        self._reported = self.state.backlog
        in_flight: collections.deque[tuple[int, int, int]] = collections.deque()
        sender = asyncio.create_task(self._send_loop(ws, in_flight), name="link-sender")
        remover = asyncio.create_task(self._remove_later(), name="link-remover")
        try:
            async for frame in ws:
                message = _parse(frame)
                if isinstance(message, Ack):
                    await self._acknowledged(message, in_flight)
                elif isinstance(message, Error):
                    # A refused batch stays in the outbox; reconnecting later (after the
                    # backoff) retries it, rather than spinning on it or dropping it.
                    what = "the connection" if message.fatal else "a batch"
                    raise LinkError(f"hub refused {what}: {message.message}")
                else:
                    raise LinkError(f"unexpected {message.type!r} message from the hub")
            if sender.done():
                sender.result()  # surface a failed sender rather than hiding it
        finally:
            for task in (sender, remover):
                task.cancel()
            for task in (sender, remover):
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

    async def _acknowledged(self, ack: Ack,
                            in_flight: collections.deque[tuple[int, int, int]]) -> None:
        if not in_flight or in_flight[0][1] != ack.batch_id:
            raise LinkError(f"acknowledgement for unknown batch {ack.batch_id}")
        first, last, count = in_flight.popleft()
        self._acknowledged_any = True
        self.stored += ack.stored
        self.duplicates += ack.duplicates
        self.rejected += ack.rejected
        try:
            self.delivered += await self.state.acknowledge(first, last)
        except StateError as exc:
            # The records stay in the outbox until a retry removes them; if the watcher
            # stops first they go again, and the hub, idempotent, only counts them once.
            log.warning("%s; %d acknowledged records stay in the outbox for now",
                        exc, count)
            self._unremoved.append((first, last))
            self._refused.set()
        self._wake.set()

    async def _remove_later(self) -> None:
        """Retry deleting acknowledged records the state folder refused to delete."""
        delays = backoff(initial=1.0, cap=5.0)
        while True:
            if not self._unremoved:
                self._refused.clear()
                await self._refused.wait()
            await asyncio.sleep(next(delays))
            while self._unremoved:
                first, last = self._unremoved[0]
                try:
                    self.delivered += await self.state.acknowledge(first, last)
                except StateError:
                    break
                self._unremoved.pop(0)
                delays = backoff(initial=1.0, cap=5.0)
                self._wake.set()

    async def _send_loop(self, ws: ClientConnection,
                         in_flight: collections.deque[tuple[int, int, int]]) -> None:
        last_sent = 0
        pace = TokenBucket(PACE, PACE_BURST, time.monotonic())  # the hub's starts full too
        while True:
            self._wake.clear()
            if len(in_flight) < self.window:
                if wait := pace.delay(time.monotonic()):
                    await asyncio.sleep(wait)
                rows = await self.state.pending(last_sent, self.batch_size)
                if rows:
                    first, last_sent = rows[0][0], rows[-1][0]
                    # The backlog once this batch is stored: what is not already on its way.
                    backlog = max(0, self.state.backlog - len(rows)
                                  - sum(count for _, _, count in in_flight))
                    # Records are stored as JSON already: splice them, don't re-encode.
                    frame = (f'{{"type":"batch","batch_id":{last_sent},'
                             f'"backlog":{backlog},"records":['
                             + ",".join(text for _, text in rows) + "]}")
                    in_flight.append((first, last_sent, len(rows)))
                    self._reported = backlog
                    pace.take(time.monotonic())
                    await ws.send(frame)
                    continue
                if not in_flight and self.state.backlog != self._reported:
                    # Nothing left to send, but the hub's figure is stale (records
                    # removed late, or records only this watcher still holds).
                    self._reported = self.state.backlog
                    pace.take(time.monotonic())
                    await ws.send(encode_message(Status(backlog=self._reported)))
            await self._wake.wait()


def _parse(frame: str | bytes) -> Ack | Error | Welcome:
    try:
        message = parse_message(frame)
    except ProtocolError as exc:
        raise LinkError(f"unreadable message from the hub: {exc}") from None
    if not isinstance(message, (Ack, Error, Welcome)):
        raise LinkError(f"unexpected {message.type!r} message from the hub")
    return message


def _shown(url: str) -> str:
    """The URL as logged: without a user:password part, a query or a fragment."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="",
                          fragment="").geturl()


def _hint(exc: BaseException) -> str:
    """How to fix a hub that cannot be reached at all (nothing for a dropped session)."""
    if isinstance(exc, socket.gaierror):
        return " (no such host name: check [watcher] hub_url)"
    if isinstance(exc, ConnectionRefusedError):
        return " (nothing listens there: is the hub running? check [watcher] hub_url)"
    return ""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."
