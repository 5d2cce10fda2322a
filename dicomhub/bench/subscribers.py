"""`/ws/live` clients inside the bench process, cheap enough to run hundreds.

A subscriber hands each text frame, with the time it arrived, to a collector:
`SeqTimes` keeps only the seq and time of change messages (a regex on the
frame's head, no JSON parse), `FirstArrivals` the first arrival of each
series it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Collection

import aiohttp

from .procs import BenchError, Hub

# The hub writes change messages compactly with seq and time first; stats and the
# "live" marker start otherwise and are not changes.
CHANGE_HEAD = re.compile(r'\{"seq":(\d+),"time":"([^"]*)"')
SERIES_KINDS = ("series.created", "series.updated")


class SeqTimes:
    """Seq, hub time and arrival time of every change message, in arrival order."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.times: list[str] = []
        self.arrivals: list[float] = []

    def __call__(self, text: str, arrived: float) -> None:
        if match := CHANGE_HEAD.match(text):
            self.seqs.append(int(match.group(1)))
            self.times.append(match.group(2))
            self.arrivals.append(arrived)

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else 0


class FirstArrivals:
    """When the first series.created or series.updated of each awaited series came."""

    def __init__(self) -> None:
        self.awaited: set[str] = set()
        self.arrived: dict[str, float] = {}
        self.changed = asyncio.Event()

    def expect(self, series_uids: Collection[str]) -> None:
        self.awaited.update(series_uids)

    def __call__(self, text: str, arrived: float) -> None:
        if not text.startswith('{"seq"'):
            return
        message = json.loads(text)
        uid = message.get("series_instance_uid")
        if message.get("kind") in SERIES_KINDS and uid in self.awaited \
                and uid not in self.arrived:
            self.arrived[uid] = arrived
            self.changed.set()


class Subscriber:
    """One live-feed connection, read by its own task until closed."""

    def __init__(self, collect: Callable[[str, float], None]) -> None:
        self.collect = collect
        self.start_seq: int | None = None  # the seq the feed started after
        self.live = asyncio.Event()
        self.close_code: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self, session: aiohttp.ClientSession, hub: Hub) -> None:
        url = hub.url.replace("http", "ws", 1) + "/ws/live"
        self._ws = await session.ws_connect(
            url, headers={"Authorization": f"Bearer {hub.read_key}"}, max_msg_size=0)
        self._task = asyncio.create_task(self._read(self._ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            arrived = time.time()
            if self.start_seq is None and message.data.startswith('{"kind": "live"'):
                self.start_seq = int(json.loads(message.data)["last_seq"])
                self.live.set()
            else:
                self.collect(message.data, arrived)
        self.close_code = ws.close_code

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def connect_all(session: aiohttp.ClientSession, hub: Hub,
                      subscribers: list[Subscriber], timeout: float = 60.0) -> None:
    """Connect every subscriber and wait until each has been told it is live."""
    await asyncio.gather(*(s.connect(session, hub) for s in subscribers))
    try:
        await asyncio.wait_for(asyncio.gather(*(s.live.wait() for s in subscribers)), timeout)
    except TimeoutError:
        waiting = sum(not s.live.is_set() for s in subscribers)
        raise BenchError(f"{waiting} live clients were not told they are live") from None


async def close_all(subscribers: list[Subscriber]) -> None:
    await asyncio.gather(*(s.close() for s in subscribers), return_exceptions=True)
