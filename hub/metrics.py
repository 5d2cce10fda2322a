"""`GET /metrics`: the hub's own numbers in the Prometheus text format.

Each application has its own registry (several hubs may share a process, as in
the tests), holding the standard process and platform collectors beside the
hub's metrics. Labels carry fixed vocabularies only (ingest outcomes, store
method names): never a patient name, ID, UID, path or key name.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Sized
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from .auth import STORE_KEY, requires
from .feed import Feed
from .store import IngestResult, Store

# A batch is acknowledged after its commit: a millisecond when all is well,
# seconds when the disk or the database struggles.
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Single reads of an embedded database take well under a millisecond.
DATABASE_BUCKETS = (0.0001, 0.00025, 0.0005, *INGEST_BUCKETS)
OUTCOMES = ("stored", "duplicate", "rejected")
UNTIMED = frozenset({"open", "close"})  # once per run, and before the loop serves anything


class HubMetrics:
    """One hub's metrics. Gauges that describe the present are read at scrape time."""

    def __init__(self, feed: Feed, watchers: Sized, live_clients: Sized) -> None:
        self.feed = feed
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.records = Counter(
            "dicomhub_ingest_records", "Records acknowledged to watchers, by outcome: stored "
            "(a new instance), duplicate (already indexed, or an unchanged rejection sent "
            "again), rejected (a file that is not a usable DICOM instance)",
            ["outcome"], registry=registry)
        for outcome in OUTCOMES:
            self.records.labels(outcome)  # present from the start, at zero
        self.batches = Counter("dicomhub_ingest_batches",
                               "Batches stored and acknowledged", registry=registry)
        self.ingest_latency = Histogram(
            "dicomhub_ingest_latency_seconds",
            "Time from a batch's arrival to its acknowledgement (after the commit)",
            buckets=INGEST_BUCKETS, registry=registry)
        self.database_latency = Histogram(
            "dicomhub_database_latency_seconds", "Time per store call, by store method",
            ["operation"], buckets=DATABASE_BUCKETS, registry=registry)
        self.change_log_lag = Gauge(
            "dicomhub_change_log_lag", "Change-log entries in the database that this hub "
            "has not yet published to its live clients", registry=registry)
        self.watchers = Gauge("dicomhub_watchers_connected", "Watchers connected now",
                              registry=registry)
        self.watchers.set_function(lambda: len(watchers))
        self.live_clients = Gauge("dicomhub_live_clients_connected",
                                  "Live clients (dashboards, scripts) connected now",
                                  registry=registry)
        self.live_clients.set_function(lambda: len(live_clients))
        self.live_clients_dropped = Counter(
            "dicomhub_live_clients_dropped",
            "Live clients cut off for falling too far behind", registry=registry)

    def batch_acknowledged(self, result: IngestResult, seconds: float) -> None:
        """Count a batch whose ack was sent `seconds` after the batch arrived."""
        self.records.labels("stored").inc(result.stored)
        self.records.labels("duplicate").inc(result.duplicates)
        self.records.labels("rejected").inc(result.rejected)
        self.batches.inc()
        self.ingest_latency.observe(seconds)

    def instrument(self, store: Store) -> None:
        """Time every coroutine method of the Store interface (but open and close) on
        this store, whatever its engine, by shadowing it with an instance attribute.

        Call once, before anything keeps a bound method of the store. Calling again
        (another app on the same store) moves the timing to this registry."""
        for name, _ in inspect.getmembers(Store, inspect.iscoroutinefunction):
            if name not in UNTIMED and not name.startswith("_"):
                method = getattr(type(store), name).__get__(store)
                setattr(store, name, _timed(method, self.database_latency.labels(name)))

    async def sample(self, store: Store) -> None:
        """Read what only the database knows, just before a scrape."""
        # Published first: every entry is committed before it is published, so the
        # difference can overstate the lag by what commits meanwhile, never go negative.
        published = self.feed.last_seq
        self.change_log_lag.set(await store.last_seq() - published)


def _timed(method: Callable[..., Awaitable[Any]],
           histogram: Histogram) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - started)

    return timed


METRICS_KEY = web.AppKey("metrics", HubMetrics)

routes = web.RouteTableDef()


@routes.get("/metrics")
@requires("read")
async def metrics(request: web.Request) -> web.Response:
    hub_metrics = request.app[METRICS_KEY]
    await hub_metrics.sample(request.app[STORE_KEY])
    return web.Response(body=generate_latest(hub_metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})
