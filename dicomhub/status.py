"""`dicomhub status`: what a running hub knows, on one screen, for the operator.

    hub URL + read key ─> fetch (REST, two /api/stats samples) ─> summarize (pure)
                                                               ─> render (text) or JSON

Exit code 0 when the hub answered; 2, with one line saying what and how to fix
it, when it cannot be reached or refuses the key (raised as StatusError, which
the CLI prints).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from . import keys
from .config import ENV_KEY, Config, load
from .errors import DicomhubError

HELP = "show what a running hub knows: watchers, ingest rate, series, rejections"
REQUEST_TIMEOUT = 10.0  # seconds for each request
RECENT = 100  # newest rejections summarized by reason
NEWEST_PATHS = 3  # newest rejected paths shown
MAKE_KEY = "make one with: dicomhub keys create --role read --name NAME"


class StatusError(DicomhubError):
    """The hub cannot be reached or refuses the key; the message says how to fix it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub", metavar="URL",
                        help="the hub's base URL, e.g. https://hub.example.org:8080 (default: "
                             "[hub] host, port and TLS of the config when the hub's database "
                             "is on this machine, else [watcher] hub_url made http(s))")
    parser.add_argument("--key-file", metavar="PATH", type=Path,
                        help=f"file holding a read (or admin) key (default: ${ENV_KEY})")
    parser.add_argument("--ca-file", metavar="PATH", type=Path,
                        help="CA for an https:// hub (default: from the config, else the "
                             "system store)")
    parser.add_argument("--interval", metavar="SECONDS", type=float, default=1.0,
                        help="seconds between the two samples that give the ingest rate "
                             "(default 1; 0: no rate)")
    parser.add_argument("--json", action="store_true",
                        help="print the same as one JSON object")


# where and with what -----------------------------------------------------------------


def hub_url(config: Config) -> tuple[str, Path | None]:
    """The hub's base URL and the CA to trust for it, from the config: the [hub]
    section for a hub on this machine (its database is here), else the watcher's
    first hub_url."""
    hub = config.hub
    if hub.database_url or hub.database.exists():
        if hub.port == 0:
            raise StatusError(f"[hub] port is 0 (any free port) in {_config_name(config)}: "
                              "pass --hub URL with the address the hub printed")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(hub.host, hub.host)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if hub.tls else 'http'}://{host}:{hub.port}", hub.tls_cert
    parts = urllib.parse.urlsplit(config.watcher.hub_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    path = parts.path.rstrip("/").removesuffix("/ws/ingest")
    return f"{scheme}://{parts.netloc}{path}", config.watcher.ca_file


def read_key(key_file: Path | None, environ: Mapping[str, str]) -> tuple[str, str]:
    """The key and where it came from: --key-file, else $DICOMHUB_KEY."""
    if key_file is not None:
        source = f"--key-file {str(key_file)!r}"
        try:
            text = key_file.read_text()
        except OSError as exc:
            raise StatusError(f"{source} cannot be read: {exc.strerror or exc}") from None
        return keys.check(text, source), source
    value = environ.get(ENV_KEY)
    if not value:
        raise StatusError(f"no key: pass --key-file PATH or set ${ENV_KEY} to a read key "
                          f"({MAKE_KEY})")
    return keys.check(value, f"${ENV_KEY}"), f"${ENV_KEY}"


def _config_name(config: Config) -> str:
    return repr(str(config.source)) if config.source is not None else "the built-in defaults"


# fetching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the hub answered, as it answered it."""

    url: str
    version: str
    first: dict[str, int]  # /api/stats, then again `elapsed` seconds later
    last: dict[str, int]
    elapsed: float
    watchers: list[dict[str, Any]]
    rejections: list[dict[str, Any]]  # newest first


class Client:
    """GETs against one hub with one key; every failure becomes a one-line StatusError."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: str, source: str) -> None:
        self.http, self.url, self.key, self.source = http, url, key, source

    async def get(self, path: str, keyed: bool = True, **params: str) -> Any:
        headers = {"Authorization": f"Bearer {self.key}"} if keyed else {}
        try:
            async with self.http.get(self.url + path, params=params, headers=headers) as resp:
                if resp.status != 200:
                    raise self._refused(path, resp.status, await resp.text())
                return await resp.json()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise StatusError(f"the TLS certificate of the hub at {self.url} is not trusted "
                              f"({exc.certificate_error}): pass --ca-file PATH") from None
        except aiohttp.ClientConnectorError as exc:
            raise StatusError(f"cannot reach the hub at {self.url}: {exc.strerror or exc}; "
                              "is it running? (pass --hub URL, or check [hub] host and "
                              "port in the config)") from None
        except TimeoutError:
            raise StatusError(f"no answer from the hub at {self.url} within "
                              f"{REQUEST_TIMEOUT:.0f} s; is it overloaded or the address "
                              "wrong? (check --hub)") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise StatusError(f"the hub at {self.url} gave no usable answer on {path}: "
                              f"{_flat(str(exc)) or type(exc).__name__}; check --hub") from None

    def _refused(self, path: str, status: int, body: str) -> StatusError:
        try:
            message = _flat(str(json.loads(body).get("message", "")))
        except (ValueError, AttributeError):
            message = ""
        if status == 401:
            return StatusError(f"the hub at {self.url} refused the key from {self.source} "
                               f"(unknown or revoked): use a live read key; {MAKE_KEY}")
        if status == 403:
            return StatusError(f"the hub at {self.url} refused the key from {self.source}: "
                               f"{message or 'forbidden'}; status needs a read key ({MAKE_KEY})")
        if status == 429:
            return StatusError(f"the hub at {self.url} refuses this address for now after "
                               "too many failed keys: wait a minute, then use a live key")
        if path == "/api/health":
            return StatusError(f"{self.url} does not answer like a dicomhub hub (HTTP "
                               f"{status} on /api/health): check --hub")
        return StatusError(f"the hub at {self.url} answered HTTP {status} on {path}: "
                           f"{message or 'no message'}; see the hub's log")


async def fetch(url: str, key: str, source: str, ca_file: Path | None,
                interval: float) -> Snapshot:
    """Ask the hub: its version (no key), stats now and `interval` seconds later, the
    watchers and the newest rejections."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(ssl=context if context is not None else True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        client = Client(http, url, key, source)
        health = await client.get("/api/health", keyed=False)
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise StatusError(f"{url} does not answer like a dicomhub hub: check --hub")
        first = await client.get("/api/stats")
        started = time.monotonic()
        watchers, rejections, _ = await asyncio.gather(
            client.get("/api/watchers"),
            client.get("/api/rejections", order="desc", limit=str(RECENT)),
            asyncio.sleep(interval))
        last = await client.get("/api/stats") if interval > 0 else first
        elapsed = time.monotonic() - started if interval > 0 else 0.0
    return Snapshot(url, str(health.get("version", "?")), first, last, elapsed,
                    watchers["items"], rejections["items"])


# summarizing and showing (no I/O) ---------------------------------------------------------


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _since(text: str | None, now: datetime) -> float | None:
    when = _parse_time(text)
    return None if when is None else round(max(0.0, (now - when).total_seconds()), 1)


def summarize(snap: Snapshot, now: datetime) -> dict[str, Any]:
    """The status as one JSON-ready object; text output is rendered from it."""
    last = snap.last
    watchers = [{**w, "seconds_since_contact": _since(w.get("last_seen"), now)}
                for w in snap.watchers]
    connected = sum(1 for w in watchers if w.get("connected"))
    ingest = None
    if snap.elapsed > 0:
        def rate(name: str) -> float:
            return round(max(0, last[name] - snap.first[name]) / snap.elapsed, 1)

        ingest = {"files_per_second": rate("files"),
                  "rejections_per_second": rate("rejections"),
                  "over_seconds": round(snap.elapsed, 2)}
    by_reason: dict[str, dict[str, Any]] = {}
    for item in snap.rejections:  # newest first: the first of a reason is its newest
        entry = by_reason.setdefault(item["reason"], {"reason": item["reason"], "count": 0,
                                                      "newest": item["time"]})
        entry["count"] += 1
    return {
        "hub": {"url": snap.url, "version": snap.version},
        "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "watchers": {"connected": connected, "disconnected": len(watchers) - connected,
                     "items": watchers},
        "ingest": ingest,
        "series": {"receiving": last["series_receiving"],
                   "stable": last["series"] - last["series_receiving"],
                   "total": last["series"]},
        "counts": {k: last[k] for k in ("patients", "studies", "series", "instances",
                                        "files", "rejections")},
        "rejections": {
            "total": last["rejections"],
            "recent": len(snap.rejections),
            "by_reason": sorted(by_reason.values(), key=lambda e: (-e["count"], e["reason"])),
            "newest": [{k: item.get(k) for k in ("time", "reason", "detail", "path",
                                                 "watcher_id")}
                       for item in snap.rejections[:NEWEST_PATHS]],
        },
    }


def ago(seconds: float | None) -> str:
    """A duration as people say it: "3 s ago", "4 min ago", "2 h ago", "5 d ago"."""
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _flat(text: str) -> str:
    """Shown on a terminal: control characters (a hostile file name's escape
    sequences, line breaks) escaped, never interpreted."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render(status: dict[str, Any]) -> str:
    """The status as the text `dicomhub status` prints."""
    counts, watchers, rejections = status["counts"], status["watchers"], status["rejections"]
    lines = [f"hub          {status['hub']['url']}  (dicomhub {status['hub']['version']})",
             f"watchers     {watchers['connected']} connected, "
             f"{watchers['disconnected']} disconnected"]
    now = _parse_time(status["time"])
    assert now is not None
    for w in watchers["items"]:
        lines.append(f"  {_flat(w['watcher_id']):<24} "
                     f"{'connected' if w.get('connected') else 'disconnected':<13}"
                     f"backlog {w.get('backlog', 0):<8,} "
                     f"last contact {ago(w['seconds_since_contact'])}")
    ingest = status["ingest"]
    lines.append("ingest       " + (
        f"{ingest['files_per_second']:,} files/s, {ingest['rejections_per_second']:,} "
        f"rejections/s (over {ingest['over_seconds']:.1f} s)" if ingest else "not measured"))
    series = status["series"]
    lines.append(f"series       {series['receiving']:,} receiving, {series['stable']:,} stable")
    lines.append(f"indexed      {counts['instances']:,} instances in {counts['series']:,} "
                 f"series, {counts['studies']:,} studies, {counts['patients']:,} patients")
    head = f"rejections   {rejections['total']:,}"
    if rejections["recent"]:
        head += f"; the newest {rejections['recent']} by reason:"
    lines.append(head)
    for entry in rejections["by_reason"]:
        lines.append(f"  {_flat(entry['reason']):<14} {entry['count']:>5,}   newest "
                     f"{entry['newest']} ({ago(_since(entry['newest'], now))})")
    if rejections["newest"]:
        lines.append("  newest files:")
    for item in rejections["newest"]:
        lines.append(f"    {item['time']}  {_flat(item['reason']):<12} "
                     f"{_flat(item['path'] or '')}")
    return "\n".join(lines)


# the command ------------------------------------------------------------------------------


def _is_http_url(text: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def main(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Print the hub's status; raises StatusError (exit 2 from the CLI) when the hub
    cannot be reached or refuses the key."""
    if args.interval < 0 or args.interval > 60:
        raise StatusError(f"--interval has value {args.interval}: must be between 0 and 60")
    key, source = read_key(args.key_file, os.environ if environ is None else environ)
    if args.hub is not None:
        if not _is_http_url(args.hub):
            raise StatusError(f"--hub has value {args.hub!r}: expected an http:// or "
                              "https:// URL, e.g. http://127.0.0.1:8080")
        url, ca_file = args.hub.rstrip("/"), None
    else:
        url, ca_file = hub_url(load(getattr(args, "config", None)))
    snapshot = asyncio.run(fetch(url, key, source, args.ca_file or ca_file, args.interval))
    status = summarize(snapshot, datetime.now(UTC))
    print(json.dumps(status) if args.json else render(status), file=sys.stdout)
    return 0
