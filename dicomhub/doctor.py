"""`dicomhub doctor`: check this machine's setup and say, for each finding, what to do.

This module gathers the facts (the config, the watched folders, the mount table,
inotify limits, free space, the hubs' answers, certificates); dicomhub.checks
decides what they mean. One line per finding (or JSON with --json); the exit
code is 0 when all is ok, 1 for warnings only, 2 for any failure.
"""

from __future__ import annotations

import argparse
import errno
import functools
import http.client
import json
import os
import re
import socket
import ssl
import stat
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checks
from .checks import Finding, fail, ok
from .cli import _watcher_key
from .config import ENV_KEY, Config, HubConfig, WatcherConfig, load
from .errors import DicomhubError
from .keys import KeyFormatError

HELP = "check this machine's setup (config, folders, limits, space, hub, key, clock, TLS)"
TIMEOUT = 10.0  # seconds for each request to a hub
MAX_BODY = 64 * 1024
MOUNTINFO = Path("/proc/self/mountinfo")
INOTIFY = Path("/proc/sys/fs/inotify")
CERT_HAS_EXPIRED = 10  # OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--only", choices=("hub", "watcher"),
                        help="check this part only (default: the parts the config file "
                             "has, [hub] and/or [watcher]; both without a file)")


def main(args: argparse.Namespace) -> int:
    try:
        findings = diagnose(getattr(args, "config", None), args.only, os.environ)
    except KeyboardInterrupt:
        return 130
    code = checks.exit_code(findings)
    if args.json:
        print(json.dumps({"exit_code": code, "findings": [f.to_json() for f in findings]},
                         indent=2))
    else:
        print("\n".join(f.line() for f in findings), flush=True)
    return code


def diagnose(config_path: str | None, only: str | None,
             environ: Mapping[str, str]) -> list[Finding]:
    try:
        config = load(config_path, environ)
    except DicomhubError as exc:
        return [checks.config_broken(str(exc))]
    hub_part, watcher_part = _parts(config, only)
    parts = {(True, True): "hub and watcher parts", (True, False): "hub part",
             (False, True): "watcher part"}[hub_part, watcher_part]
    source = f"{config.source} is valid" if config.source else \
        "no config file: the built-in defaults apply"
    findings = [ok("config", f"{source}; checking the {parts}")]
    if watcher_part:
        findings += _watcher(config.watcher, environ)
    if hub_part:
        findings += _hub_part(config.hub)
    return findings


def _parts(config: Config, only: str | None) -> tuple[bool, bool]:
    """(hub, watcher): --only, else the sections the file has, else both (as `up`)."""
    if only is not None:
        return only == "hub", only == "watcher"
    sections: set[str] = set()
    if config.source is not None:
        try:
            with config.source.open("rb") as fh:
                sections = set(tomllib.load(fh)) & {"hub", "watcher"}
        except (OSError, tomllib.TOMLDecodeError):
            pass  # it loaded a moment ago; check both parts
    if not sections:
        return True, True
    return "hub" in sections, "watcher" in sections


def _guarded(check: str, run: Callable[[], list[Finding]]) -> list[Finding]:
    """A check that breaks becomes a failure of its own; the others still run."""
    try:
        return run()
    except Exception as exc:  # never a traceback for the operator
        return [fail(check, f"the check itself failed: {type(exc).__name__}: {exc}",
                     "report this to dicomhub's maintainers with the line above")]


# the watcher's part ------------------------------------------------------------------------


def _watcher(config: WatcherConfig, environ: Mapping[str, str]) -> list[Finding]:
    findings: list[Finding] = []
    mounts = _mounts()
    folders = 0
    for root in config.watch:
        problem, count = _folder(root)
        folders += count
        findings.append(checks.watch_folder(str(root), problem, count))
        if not problem:
            mount = checks.mount_of(os.path.realpath(root), mounts)
            findings.append(checks.file_system(str(root), mount, config.polling))
    if config.dicom.enabled:
        findings += _guarded("dicom spool", lambda: [_dicom_spool(config, mounts)])
    findings += _guarded("inotify", lambda: _inotify(config.polling, folders))
    findings += _guarded("free space", lambda: [_free_space("watcher state",
                                                            config.state_dir)])
    findings += _hubs(config, environ)
    return findings


def _dicom_spool(config: WatcherConfig, mounts: list[checks.Mount]) -> Finding:
    """Read-only: asking for an attribute nobody set answers "no such attribute"
    where attributes are supported, "not supported" where they are not."""
    folder = Path(config.dicom_folder)
    existing = _nearest_existing(folder)
    mount = checks.mount_of(os.path.realpath(existing), mounts)
    attributes: bool | None = None
    try:
        if hasattr(os, "getxattr"):  # Linux
            os.getxattr(existing, "user.dicomhub.doctor")
            attributes = True
    except OSError as exc:
        attributes = True if exc.errno == errno.ENODATA else \
            False if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) else None
    return checks.dicom_spool(str(folder), attributes, mount.fstype if mount else "")


def _folder(root: Path) -> tuple[str, int]:
    """(problem, folders to watch): problem as checks.watch_folder takes it."""
    try:
        if not stat.S_ISDIR(root.stat().st_mode):
            return "not a folder", 0
        return "", _count_folders(root)
    except FileNotFoundError:
        return "missing", 0
    except OSError as exc:
        return exc.strerror or str(exc), 0


def _count_folders(root: Path) -> int:
    """Folders in the tree, `root` included, as the watcher watches them (symbolic
    links not followed). The root must be listable; a subfolder that is not is
    counted and not entered."""
    count, stack = 0, [str(root)]
    while stack:
        folder = stack.pop()
        count += 1
        try:
            with os.scandir(folder) as entries:
                stack += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            if folder == str(root):
                raise
    return count


def _mounts() -> list[checks.Mount]:
    try:
        return checks.parse_mountinfo(MOUNTINFO.read_text())
    except OSError:
        return []  # not Linux: file systems are reported as unknown


def _inotify(polling: bool, folders: int) -> list[Finding]:
    if polling:
        return [ok("inotify", "not used: polling = true")]
    try:
        watches = int((INOTIFY / "max_user_watches").read_text())
        queue = int((INOTIFY / "max_queued_events").read_text())
    except (OSError, ValueError):
        return [ok("inotify", "no inotify limits here to check")]
    return [checks.inotify_watches(watches, folders), checks.inotify_queue(queue)]


def _nearest_existing(folder: Path) -> Path:
    """`folder`, or the nearest of its ancestors that exists (it is not made yet)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _free_space(what: str, folder: Path) -> Finding:
    """Measured where the folder is, or will be: its nearest existing ancestor."""
    existing = _nearest_existing(folder)
    where = str(folder) if existing == folder else \
        f"{folder} (not made yet; measured at {existing})"
    st = os.statvfs(existing)
    return checks.free_space(what, where, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


# the hubs a watcher sends to ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the JSON, or None
    date: str | None  # the Date header
    sent: float
    received: float


class Unreachable(Exception):
    def __init__(self, reason: str, untrusted: bool) -> None:
        super().__init__(reason)
        self.reason, self.untrusted = reason, untrusted


def _hubs(config: WatcherConfig, environ: Mapping[str, str]) -> list[Finding]:
    findings: list[Finding] = []
    key: str | None = None
    source = f"${ENV_KEY}" if environ.get(ENV_KEY) else f"[watcher] key_file {config.key_file}"
    try:
        key = _watcher_key(config, dict(environ))
    except (DicomhubError, KeyFormatError) as exc:
        findings.append(fail("key", str(exc), checks.NEW_KEY))
    from watcher.link import client_ssl

    try:
        context = client_ssl(config.hub_urls, config.ca_file, config.client_cert,
                             config.client_key)
    except (OSError, ssl.SSLError) as exc:
        return findings + [fail("tls", f"cannot load the watcher's TLS files: {_describe(exc)}",
                                "check [watcher] ca_file, client_cert and client_key: "
                                "readable PEM files, the key matching the certificate")]
    for url in config.hub_urls:
        findings += _guarded("hub", functools.partial(_hub, url, key, source, context))
    return findings


def _hub(ws_url: str, key: str | None, source: str,
         context: ssl.SSLContext | None) -> list[Finding]:
    base = checks.http_base(ws_url)
    try:
        answer = _get(base + "/api/health", None, context)
    except Unreachable as exc:
        return [checks.unreachable(base, exc.reason, exc.untrusted)]
    findings = [checks.health(base, answer.status, answer.body)]
    if findings[0].status is not checks.Status.OK:
        return findings
    if key is not None:
        try:
            asked = _get(base + "/api/key", key, context)
            findings.append(checks.key_role(base, source, asked.status, asked.body))
        except Unreachable as exc:
            findings.append(checks.unreachable(base, exc.reason, exc.untrusted))
    findings.append(checks.clock_skew(base, answer.date, answer.sent, answer.received))
    if base.startswith("https://") and context is not None:
        findings.append(_served_certificate(base, context))
    return findings


def _get(url: str, key: str | None, context: ssl.SSLContext | None) -> Answer:
    """GET `url`; an HTTP error status is an answer too. Raises Unreachable."""
    headers = {"Accept": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    sent = time.time()
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT) as r:
            status, date, raw = r.status, r.headers.get("Date"), r.read(MAX_BODY)
    except urllib.error.HTTPError as exc:
        status, date, raw = exc.code, exc.headers.get("Date"), exc.read(MAX_BODY)
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, BaseException) else exc
        raise Unreachable(_describe(reason),
                          isinstance(reason, ssl.SSLCertVerificationError)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(_describe(exc), False) from None
    received = time.time()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return Answer(status, body, date, sent, received)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:.0f} s"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)


def _served_certificate(base: str, context: ssl.SSLContext) -> Finding:
    """The certificate the hub serves, verified as the watcher verifies it."""
    parts = urllib.parse.urlsplit(base)
    host = parts.hostname or ""
    with socket.create_connection((host, parts.port or 443), timeout=TIMEOUT) as sock, \
            context.wrap_socket(sock, server_hostname=host) as tls:
        cert = tls.getpeercert() or {}
    not_after = ssl.cert_time_to_seconds(str(cert["notAfter"]))
    return checks.certificate_expiry(f"the certificate {base} serves", not_after, time.time())


# the hub's part ----------------------------------------------------------------------------


def _hub_part(config: HubConfig) -> list[Finding]:
    if config.database_url:
        findings = [ok("free space", "hub database on PostgreSQL: its free space is the "
                                     "database server's to watch")]
    else:
        findings = _guarded("free space", lambda: [_free_space("hub database",
                                                               config.database.parent)])
    if config.tls_cert is not None and config.tls_key is not None:
        findings.append(_own_certificate(config.tls_cert, config.tls_key))
    return findings


def _own_certificate(cert: Path, key: Path) -> Finding:
    what = f"[hub] tls_cert {cert}"
    try:
        not_after = _not_after(cert, key)
    except ssl.SSLCertVerificationError as exc:
        return checks.certificate_refused(what, _describe(exc),
                                          exc.verify_code == CERT_HAS_EXPIRED)
    except OSError as exc:  # ssl.SSLError included: unreadable files, a key that does not fit
        return checks.certificate_refused(what, _describe(exc), False)
    return checks.certificate_expiry(what, not_after, time.time())


def _not_after(cert: Path, key: Path) -> float:
    """The end date of the hub's certificate, in seconds since the epoch.

    Loads certificate and key as the hub's TLS server does and shakes hands with
    them in memory, trusting the certificate itself: the standard library then
    reads the date, and a key that does not fit the certificate fails as it
    would at the hub's start. An expired certificate raises
    SSLCertVerificationError (verify_code CERT_HAS_EXPIRED)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # the file is checked here, not a host name
    client.load_verify_locations(cafile=cert)
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the certificate as its own anchor
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    sides = [client.wrap_bio(to_client, to_server),
             server.wrap_bio(to_server, to_client, server_side=True)]
    pending = list(sides)
    for _ in range(8):  # a TLS 1.3 handshake takes two rounds
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass  # waits for the other side's next flight
        if not pending:
            peer = sides[0].getpeercert() or {}
            return ssl.cert_time_to_seconds(str(peer["notAfter"]))
    raise ssl.SSLError("the TLS handshake did not complete")
