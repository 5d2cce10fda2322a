"""The audit trail: who read patient data, who made or revoked keys, who failed
to log in; from where and when.

Entries are buffered and written in one transaction about once a second (or
every 200 entries), so that a busy poller does not turn every read into a
write; the buffer is flushed when the hub stops. The table is append-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web

from dicomhub.aio import stop_task

from .store import AuditEntry, Store

log = logging.getLogger("dicomhub.hub")

FLUSH_INTERVAL = 1.0
FLUSH_SIZE = 200

# Routes whose answers hold patient data: reading them is audited.
PHI_ROUTES = frozenset({
    "/api/series", "/api/series/{uid}", "/api/studies", "/api/studies/{uid}",
    "/api/patients", "/api/patients/{patient_id}", "/api/changes", "/api/rejections",
})


class Auditor:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[AuditEntry] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit")

    async def stop(self) -> None:
        await stop_task(self._task)
        await self.flush()

    def record(self, request: web.BaseRequest, actor: str, role: str, action: str,
               target: str | None = None, outcome: str = "ok") -> None:
        self._pending.append(AuditEntry(
            time=time.time(), actor=actor, role=role, action=action,
            target=target if target is not None else request.path_qs,
            address=request.remote or "", outcome=outcome))
        if len(self._pending) >= FLUSH_SIZE:
            self._wake.set()

    async def flush(self) -> None:
        entries, self._pending = self._pending, []
        if entries:
            try:
                await self.store.audit(entries)
            except Exception:
                self._pending[:0] = entries  # keep them for the next try
                raise

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("writing %d audit entries failed; retrying",
                              len(self._pending))


AUDITOR_KEY = web.AppKey("auditor", Auditor)
