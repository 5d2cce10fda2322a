"""What `dicomhub doctor` concludes from what it found (no I/O).

Each function takes what the doctor gathered (a mount table, limits, counts,
sizes, times, a hub's answers) and returns a `Finding`: ok, warn or fail, what
was found and, unless ok, what to do. dicomhub/doctor.py gathers the inputs.
"""

from __future__ import annotations

import email.utils
import enum
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MiB = 1024**2
GiB = 1024**3
FREE_FAIL = 100 * MiB  # below this SQLite soon cannot write at all
FREE_WARN = 1 * GiB
FREE_WARN_FRACTION = 0.05
WATCHES_HEADROOM = 0.8  # other programs of the same user share max_user_watches
QUEUE_MIN = 16384  # the kernel's default max_queued_events
SKEW_WARN = 5.0  # seconds
SKEW_FAIL = 60.0
CERT_WARN_DAYS = 30
NEW_KEY = ("create an ingest key on the hub's machine (dicomhub keys create --role ingest "
           "--name NAME) and put it in [watcher] key_file or $DICOMHUB_KEY")

# Shares whose changes made by other machines produce no kernel (inotify) events here.
NETWORK_FILE_SYSTEMS = frozenset({
    "cifs", "smb3", "smbfs", "nfs", "nfs4", "9p", "afs", "ceph", "glusterfs", "lustre",
    "gpfs", "ncpfs", "coda", "davfs", "virtiofs", "vboxsf", "fuse.sshfs", "fuse.glusterfs",
    "fuse.cephfs", "fuse.rclone", "fuse.s3fs", "fuse.davfs2", "fuse.vmhgfs-fuse",
})


class Status(enum.IntEnum):
    """Ordered by severity: a run's exit code is the worst status found."""

    OK = 0
    WARN = 1
    FAIL = 2

    @property
    def label(self) -> str:
        return ("ok", "warn", "FAIL")[self]


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    found: str
    fix: str = ""  # what to do; empty when ok

    def line(self) -> str:
        text = f"{self.status.label:<5} {self.check:<16} {self.found}"
        return f"{text} -> {self.fix}" if self.fix else text

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.label.lower(),
                "found": self.found, "fix": self.fix}


def ok(check: str, found: str) -> Finding:
    return Finding(check, Status.OK, found)


def warn(check: str, found: str, fix: str) -> Finding:
    return Finding(check, Status.WARN, found, fix)


def fail(check: str, found: str, fix: str) -> Finding:
    return Finding(check, Status.FAIL, found, fix)


def exit_code(findings: Iterable[Finding]) -> int:
    """0 when all is ok, 1 for warnings only, 2 for any failure."""
    return int(max((f.status for f in findings), default=Status.OK))


def size(n: float) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n:.0f} B"


# config and folders ----------------------------------------------------------------------


def config_broken(message: str) -> Finding:
    return fail("config", message, "correct the config file (the other checks need a "
                                   "valid config and were skipped)")


def watch_folder(folder: str, problem: str, subfolders: int) -> Finding:
    """`problem` is "" (listable), "missing", "not a folder", or why it cannot be listed."""
    if problem == "missing":
        return fail("watch folder", f"{folder} does not exist",
                    f"create it (mkdir -p {folder}), mount the share it should be, or "
                    "correct [watcher] watch; the watcher would watch an empty new folder")
    if problem == "not a folder":
        return fail("watch folder", f"{folder} is not a folder",
                    "point [watcher] watch at a folder")
    if problem:
        return fail("watch folder", f"{folder} cannot be listed: {problem}",
                    "give the watcher's user read and execute permission on it "
                    "(and run the doctor as that user)")
    return ok("watch folder", f"{folder}: listable, {subfolders:,} folders in all")


# file systems --------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mountinfo as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts in the order of /proc/self/mountinfo (later ones stack on earlier ones).
    Lines that do not fit the format are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        after = fields.index("-", 6)
        if len(fields) < after + 3:
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[after + 1],
                            _unescape(fields[after + 2])))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount holding `path` (absolute, resolved): the mount point that is its
    longest prefix, by whole components; the last of equals, which is on top."""
    best: tuple[int, int, Mount] | None = None
    for n, mount in enumerate(mounts):
        point = mount.mount_point
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or (len(point), n) > best[:2]:
                best = (len(point), n, mount)
    return best[2] if best else None


def is_network(fstype: str) -> bool:
    return fstype in NETWORK_FILE_SYSTEMS or fstype.startswith(("nfs", "smb"))


def file_system(folder: str, mount: Mount | None, polling: bool) -> Finding:
    if mount is None:
        return ok("file system", f"{folder}: no mount table here to tell its type")
    where = f"{folder}: {mount.fstype} ({mount.source} on {mount.mount_point})"
    if not is_network(mount.fstype):
        return ok("file system", where)
    if polling:
        return ok("file system", f"{where}, a network file system; polling = true")
    return warn("file system", f"{where}, a network file system",
                "set polling = true in [watcher]: files written by other machines on "
                "a share raise no kernel events here")


def dicom_spool(folder: str, attributes: bool | None, fstype: str) -> Finding:
    """The DICOM listener's path to disk where it stores: `attributes` says whether
    the file system takes extended attributes (None: could not be told)."""
    where = f"{folder} ({fstype})" if fstype else folder
    if attributes is None:
        return ok("dicom spool", f"{where}: cannot tell whether it takes extended "
                                 "attributes; the listener says at start")
    if attributes:
        return ok("dicom spool", f"{where}: extended attributes, one sync per instance")
    return warn("dicom spool", f"{where}: no extended attributes",
                "instances are still stored safely, with two more syncs each; for the "
                "fastest path put store_into on a local file system (ext4, xfs)")


# inotify -----------------------------------------------------------------------------------


def suggested_watches(folders: int) -> int:
    """A max_user_watches with room to grow: a power of two, at least twice `folders`."""
    n = 524288
    while n < 2 * folders:
        n *= 2
    return n


def _sysctl(name: str, value: int) -> str:
    return (f"raise it: sysctl fs.inotify.{name}={value}, and keep it across reboots "
            f"with the line fs.inotify.{name}={value} in /etc/sysctl.d/90-dicomhub.conf")


def inotify_watches(limit: int, folders: int) -> Finding:
    """Each watched folder takes one watch from the user's max_user_watches."""
    found = f"max_user_watches is {limit:,} for {folders:,} folders to watch"
    if folders > limit:
        return fail("inotify watches", f"{found}: new files in the rest raise no event "
                    "and wait for the next rescan", _sysctl("max_user_watches",
                                                            suggested_watches(folders)))
    if folders > limit * WATCHES_HEADROOM:
        return warn("inotify watches", f"{found}: little room to grow, and the user's "
                    "other programs share the limit", _sysctl("max_user_watches",
                                                              suggested_watches(folders)))
    return ok("inotify watches", found)


def inotify_queue(limit: int) -> Finding:
    """Events wait in a queue of max_queued_events; when a burst overflows it, the
    files in it wait for the next reconciliation walk."""
    found = f"max_queued_events is {limit:,}"
    if limit < QUEUE_MIN:
        return warn("inotify queue", f"{found}, below the usual {QUEUE_MIN:,}: a burst of "
                    "new files can overflow it", _sysctl("max_queued_events", QUEUE_MIN * 4))
    return ok("inotify queue", found)


# free space ---------------------------------------------------------------------------------


def free_space(what: str, where: str, free: int, total: int) -> Finding:
    """`what` names the folder's job ("watcher state", "hub database")."""
    share = free / total if total else 0.0
    found = f"{what} {where}: {size(free)} free of {size(total)} ({share:.0%})"
    if free < FREE_FAIL:
        return fail("free space", found, f"free space there or move the {what} to a larger "
                    "disk: when it is full, SQLite stops writing and nothing new is indexed")
    if free < FREE_WARN or share < FREE_WARN_FRACTION:
        return warn("free space", found, f"free space there soon (below {size(FREE_FAIL)} "
                    "the doctor fails)")
    return ok("free space", found)


# the hub --------------------------------------------------------------------------------------


def http_base(ws_url: str) -> str:
    """The hub's HTTP(S) base for a watcher's hub_url: ws -> http, wss -> https,
    without the /ws/ingest path (a proxy's prefix before it stays)."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/").removesuffix("/ws/ingest")
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def unreachable(url: str, reason: str, untrusted: bool) -> Finding:
    """`untrusted`: the TLS handshake failed because the certificate was not verified."""
    if untrusted:
        return fail("hub", f"cannot reach {url}: its certificate is refused ({reason})",
                    "renew the hub's certificate if it expired, else set [watcher] ca_file "
                    "to the CA that signed it")
    return fail("hub", f"cannot reach {url}: {reason}",
                "start the hub (dicomhub hub, or dicomhub up), or correct [watcher] "
                "hub_url; check the address, the port and firewalls on the way")


def health(url: str, status: int, body: Any) -> Finding:
    if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
        return ok("hub", f"{url} answers: dicomhub {body.get('version', '?')}")
    return fail("hub", f"{url} answers HTTP {status} to /api/health, not as a dicomhub hub",
                "correct [watcher] hub_url: the hub's (or its proxy's) address, "
                "ending in /ws/ingest")


def _message(body: Any) -> str:
    return str(body.get("message", "")) if isinstance(body, Mapping) else ""


def key_role(url: str, source: str, status: int, body: Any) -> Finding:
    """From the hub's answer to GET /api/key with the watcher's key."""
    if status == 200 and isinstance(body, Mapping):
        name, role = body.get("name"), body.get("role")
        found = f"key {name!r} from {source} is accepted by {url} with role {role!r}"
        if role == "ingest":
            return ok("key", found)
        if role == "admin":
            return warn("key", f"{found}: it can send, and can do everything else too",
                        NEW_KEY)
        return fail("key", f"{found}; sending needs 'ingest'", NEW_KEY)
    if status == 401:
        return fail("key", f"{url} refuses the key from {source}: "
                    f"{_message(body) or 'unknown key'}", NEW_KEY)
    if status == 429:
        return fail("key", f"{url} refuses this address for now: {_message(body)}",
                    "wait a minute, then check the key: too many wrong keys came from here")
    if status == 404:
        return warn("key", f"{url} cannot tell a key's role (a hub older than this doctor)",
                    "upgrade the hub; until then the key is checked when the watcher connects")
    return fail("key", f"{url} answered HTTP {status} to /api/key: {_message(body)}",
                "see the hub's log")


def clock_skew(url: str, date_header: str | None, sent: float, received: float) -> Finding:
    """The hub's Date header (whole seconds) against this machine's clock halfway
    through the request."""
    try:
        hub_time = email.utils.parsedate_to_datetime(date_header or "").timestamp()
    except (TypeError, ValueError):
        return warn("clock", f"{url} sent no usable Date header ({date_header!r})",
                    "check what answers at hub_url (a proxy?)")
    skew = (sent + received) / 2 - (hub_time + 0.5)  # Date is truncated to the second
    ahead = "ahead of" if skew > 0 else "behind"
    found = f"this machine's clock is {abs(skew):.0f} s {ahead} {url}" if abs(skew) >= 1 \
        else f"this machine's clock agrees with {url} (within 1 s)"
    fix = ("synchronize both machines' clocks with NTP (e.g. timedatectl set-ntp true): "
           "settling, series stability, times in the index and certificate checks use them")
    if abs(skew) > SKEW_FAIL:
        return fail("clock", found, fix)
    if abs(skew) > SKEW_WARN:
        return warn("clock", found, fix)
    return ok("clock", found)


# certificates --------------------------------------------------------------------------------


def certificate_expiry(what: str, not_after: float, now: float) -> Finding:
    """`not_after` and `now` in seconds since the epoch."""
    date = time.strftime("%Y-%m-%d", time.gmtime(not_after))
    days = (not_after - now) / 86400
    if days < 0:
        return fail("certificate", f"{what} expired on {date}",
                    "renew it, then restart the hub with the new one")
    if days < CERT_WARN_DAYS:
        return warn("certificate", f"{what} expires on {date}, in {days:.0f} days",
                    "renew it before then and restart the hub with the new one")
    return ok("certificate", f"{what} is valid until {date} ({days:.0f} days)")


def certificate_refused(what: str, reason: str, expired: bool) -> Finding:
    if expired:
        return fail("certificate", f"{what} has expired", "renew it, then restart the hub "
                                                          "with the new one")
    return fail("certificate", f"{what} cannot be used: {reason}",
                "check [hub] tls_cert and tls_key: PEM files, the key matching the "
                "certificate")
