"""`dicomhub doctor`: the pure checks with given inputs, and the command as IT staff run
it, against real hubs, folders, mounts and kernel limits."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import RunningHub
from dicomhub import checks, doctor
from dicomhub.checks import Mount, Status
from procs import Service, hub_with_keys, mounted_tmpfs, run_cli, write_config

NOW = 1_800_000_000.0  # a fixed "now" for the pure checks
DAY = 86400.0
INOTIFY_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


def ws_url(http_url: str) -> str:
    return http_url.replace("http", "ws", 1) + "/ws/ingest"


def run_doctor(cwd: Path, *args: str, env: dict[str, str] | None = None
               ) -> tuple[int, list[dict[str, str]]]:
    """Exit code and findings of `dicomhub doctor --json`."""
    result = run_cli("doctor", "--json", *args, cwd=cwd, env=env)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == result.returncode
    return result.returncode, report["findings"]


def named(findings: list[dict[str, str]], check: str) -> list[dict[str, str]]:
    return [f for f in findings if f["check"] == check]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound by the test and never listened on: connecting to it is refused,
    and nothing else can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def watcher_config(folder: Path, port: int, **extra: str) -> Path:
    """A config with a [watcher] part only."""
    lines = [f'hub_url = "ws://127.0.0.1:{port}/ws/ingest"', *(f"{k} = {v}"
                                                              for k, v in extra.items())]
    path = folder / "watcher.toml"
    path.write_text("[watcher]\n" + "\n".join(lines) + "\n")
    return path


# the pure checks ------------------------------------------------------------------------


MOUNTINFO = textwrap.dedent("""\
    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
    40 27 0:50 / /mnt/scanner rw,relatime shared:5 - cifs //pacs/scans rw,vers=3.1.1
    41 27 0:51 / /mnt/scanner2 rw - nfs4 pacs:/export rw
    42 27 0:52 / /home/ops/remote\\040share rw - fuse.sshfs ops@pacs:/in rw
    43 27 0:53 / /data rw - xfs /dev/sdb1 rw
    44 43 0:54 / /data rw - tmpfs tmpfs rw
    not a mountinfo line
    """)


def test_mountinfo_gives_the_longest_prefix_by_whole_components() -> None:
    mounts = checks.parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 6
    assert checks.mount_of("/mnt/scanner/in", mounts) == Mount("/mnt/scanner", "cifs",
                                                               "//pacs/scans")
    fstype = {path: getattr(checks.mount_of(path, mounts), "fstype", None) for path in (
        "/mnt/scanner2", "/mnt/scannerX", "/home/ops/remote share/a", "/data/x", "/")}
    assert fstype == {"/mnt/scanner2": "nfs4", "/mnt/scannerX": "ext4",  # whole components
                      "/home/ops/remote share/a": "fuse.sshfs",  # \040 is a space
                      "/data/x": "tmpfs",  # the later of two on one point is on top
                      "/": "ext4"}
    assert checks.mount_of("/srv", []) is None


@pytest.mark.parametrize("path", ["/mnt/scanner/in", "/mnt/scanner2/x",
                                  "/home/ops/remote share"])
def test_a_network_file_system_asks_for_polling_unless_set(path: str) -> None:
    mount = checks.mount_of(path, checks.parse_mountinfo(MOUNTINFO))
    finding = checks.file_system(path, mount, polling=False)
    assert finding.status is Status.WARN and "polling = true" in finding.fix
    assert mount is not None and mount.fstype in finding.found
    assert checks.file_system(path, mount, polling=True).status is Status.OK


def test_a_local_file_system_is_ok() -> None:
    mount = checks.mount_of("/data/in", checks.parse_mountinfo(MOUNTINFO))
    finding = checks.file_system("/data/in", mount, polling=False)
    assert finding.status is Status.OK and "tmpfs" in finding.found
    assert checks.file_system("/x", None, polling=False).status is Status.OK


def test_the_dicom_spool_without_extended_attributes_warns() -> None:
    assert checks.dicom_spool("/in/dicom", True, "ext4").status == Status.OK
    slower = checks.dicom_spool("/mnt/share/dicom", False, "cifs")
    assert slower.status == Status.WARN and "two more syncs" in slower.fix
    assert "(cifs)" in slower.found
    assert checks.dicom_spool("/in/dicom", None, "").status == Status.OK


def test_inotify_watches_against_folders() -> None:
    assert checks.inotify_watches(8192, 1000).status is Status.OK
    assert checks.inotify_watches(8192, 7000).status is Status.WARN  # over 80 %
    full = checks.inotify_watches(8192, 9000)
    assert full.status is Status.FAIL
    assert "sysctl fs.inotify.max_user_watches=524288" in full.fix
    assert "/etc/sysctl.d/" in full.fix
    assert checks.suggested_watches(10) == 524288
    assert checks.suggested_watches(300_000) == 1048576
    assert checks.inotify_queue(16384).status is Status.OK
    low = checks.inotify_queue(1024)
    assert low.status is Status.WARN and "fs.inotify.max_queued_events=" in low.fix


def test_free_space_thresholds() -> None:
    GiB, MiB = checks.GiB, checks.MiB
    assert checks.free_space("watcher state", "/s", 50 * GiB, 100 * GiB).status is Status.OK
    assert checks.free_space("watcher state", "/s", 4 * GiB, 100 * GiB).status is Status.WARN
    assert checks.free_space("watcher state", "/s", 900 * MiB, 2 * GiB).status is Status.WARN
    low = checks.free_space("hub database", "/d", 99 * MiB, 100 * GiB)
    assert low.status is Status.FAIL and "hub database /d" in low.found
    assert checks.free_space("x", "/", 0, 0).status is Status.FAIL


def test_watch_folder_findings() -> None:
    missing = checks.watch_folder("/srv/in", "missing", 0)
    assert missing.status is Status.FAIL and "mkdir -p /srv/in" in missing.fix
    assert checks.watch_folder("/srv/in", "not a folder", 0).status is Status.FAIL
    denied = checks.watch_folder("/srv/in", "Permission denied", 0)
    assert denied.status is Status.FAIL and "Permission denied" in denied.found
    assert checks.watch_folder("/srv/in", "", 12).status is Status.OK


def test_http_base_from_the_ingest_url() -> None:
    assert checks.http_base("ws://127.0.0.1:8080/ws/ingest") == "http://127.0.0.1:8080"
    assert checks.http_base("wss://hub.example.org/ws/ingest/") == "https://hub.example.org"
    assert checks.http_base("wss://proxy.example.org/dicomhub/ws/ingest") \
        == "https://proxy.example.org/dicomhub"


def test_key_role_from_the_hubs_answer() -> None:
    url, source = "http://hub", "$DICOMHUB_KEY"
    assert checks.key_role(url, source, 200, {"name": "w", "role": "ingest"}).status \
        is Status.OK
    read = checks.key_role(url, source, 200, {"name": "r", "role": "read"})
    assert read.status is Status.FAIL and "'read'" in read.found and "ingest" in read.fix
    assert checks.key_role(url, source, 200, {"name": "a", "role": "admin"}).status \
        is Status.WARN
    unknown = checks.key_role(url, source, 401, {"message": "unknown or revoked key"})
    assert unknown.status is Status.FAIL and "unknown or revoked" in unknown.found
    assert checks.key_role(url, source, 429, {"message": "try again"}).status is Status.FAIL
    assert checks.key_role(url, source, 404, None).status is Status.WARN
    assert checks.key_role(url, source, 500, None).status is Status.FAIL


def test_health_and_reach() -> None:
    assert checks.health("http://h", 200, {"status": "ok", "version": "1"}).status \
        is Status.OK
    assert checks.health("http://h", 200, {"hello": "nginx"}).status is Status.FAIL
    refused = checks.unreachable("http://h", "Connection refused", untrusted=False)
    assert "cannot reach http://h" in refused.found and "start the hub" in refused.fix
    assert "ca_file" in checks.unreachable("https://h", "expired", untrusted=True).fix


@pytest.mark.parametrize("offset, status", [(0, Status.OK), (4, Status.OK),
                                            (-4, Status.OK), (12, Status.WARN),
                                            (-30, Status.WARN), (61.5, Status.FAIL),
                                            (-3600, Status.FAIL)])
def test_clock_skew_from_the_date_header(offset: float, status: Status) -> None:
    hub_time = NOW - offset  # this machine is `offset` seconds ahead of the hub
    header = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(hub_time))
    finding = checks.clock_skew("http://h", header, NOW, NOW + 0.02)
    assert finding.status is status, finding
    if status is not Status.OK:
        assert "NTP" in finding.fix


def test_clock_skew_without_a_date_header() -> None:
    assert checks.clock_skew("http://h", None, NOW, NOW).status is Status.WARN
    assert checks.clock_skew("http://h", "yesterday", NOW, NOW).status is Status.WARN


def test_certificate_expiry_thresholds() -> None:
    assert checks.certificate_expiry("c", NOW + 90 * DAY, NOW).status is Status.OK
    soon = checks.certificate_expiry("c", NOW + 10 * DAY, NOW)
    assert soon.status is Status.WARN and "in 10 days" in soon.found
    gone = checks.certificate_expiry("c", NOW - DAY, NOW)
    assert gone.status is Status.FAIL and "expired" in gone.found


def test_exit_code_and_line() -> None:
    ok, warning = checks.ok("a", "fine"), checks.warn("b", "meh", "do x")
    assert checks.exit_code([]) == 0 and checks.exit_code([ok]) == 0
    assert checks.exit_code([ok, warning]) == 1
    assert checks.exit_code([warning, checks.fail("c", "bad", "do y")]) == 2
    assert ok.line().split() == ["ok", "a", "fine"]
    assert warning.line().startswith("warn  b") and warning.line().endswith("meh -> do x")


# the hub's answer about a key -----------------------------------------------------------


async def test_any_valid_key_can_ask_for_its_role(hub: RunningHub,
                                                  http: aiohttp.ClientSession) -> None:
    for role in ("ingest", "read", "admin"):
        key = await hub.key(role, name=f"k-{role}")
        async with http.get(hub.url + "/api/key",
                            headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"name": f"k-{role}", "role": role}
    async with http.get(hub.url + "/api/key") as resp:
        assert resp.status == 401
    async with http.get(hub.url + "/api/key",
                        headers={"Authorization": "Bearer dhk_" + "x" * 43}) as resp:
        assert resp.status == 401


# the command -------------------------------------------------------------------------------


def roomy(folder: Path) -> bool:
    """Whether the disk under `folder` has the room the doctor asks for."""
    usage = shutil.disk_usage(folder)
    return usage.free >= checks.FREE_WARN and usage.free >= 0.05 * usage.total


async def test_against_a_real_hub(tmp_path: Path, services: list[Service]) -> None:
    _, url, ingest, read = await hub_with_keys(tmp_path, services)
    site = tmp_path / "site"
    (site / "inbox" / "2026" / "ct").mkdir(parents=True)
    write_config(site, watcher=f'hub_url = "{ws_url(url)}"')

    result = run_cli("doctor", cwd=site, env={"DICOMHUB_KEY": ingest})
    lines = result.stdout.splitlines()
    allowed = ("ok ", "warn  free space") if not roomy(site) else ("ok ",)
    assert result.returncode == (0 if roomy(site) else 1), result.stdout + result.stderr
    assert all(line.startswith(allowed) for line in lines), result.stdout
    assert result.stderr == ""
    code, findings = run_doctor(site, env={"DICOMHUB_KEY": ingest})
    assert [f["check"] for f in findings] == [
        "config", "watch folder", "file system", "inotify watches", "inotify queue",
        "free space", "hub", "key", "clock", "free space"]
    assert "3 folders" in named(findings, "watch folder")[0]["found"]
    assert "with role 'ingest'" in named(findings, "key")[0]["found"]

    unknown = run_cli("doctor", cwd=site, env={"DICOMHUB_KEY": "dhk_" + "A" * 43})
    assert unknown.returncode == 2
    assert [line for line in unknown.stdout.splitlines() if line.startswith("FAIL")] == [
        line for line in unknown.stdout.splitlines() if line.startswith("FAIL  key")]
    assert "unknown or revoked key" in unknown.stdout and "keys create --role ingest" \
        in unknown.stdout

    code, findings = run_doctor(site, env={"DICOMHUB_KEY": read})
    assert code == 2
    [key] = named(findings, "key")
    assert key["status"] == "fail" and "role 'read'" in key["found"]

    malformed = run_cli("doctor", cwd=site, env={"DICOMHUB_KEY": "abc"})
    assert malformed.returncode == 2 and "FAIL  key" in malformed.stdout
    assert "not a dicomhub key" in malformed.stdout


def test_a_hub_that_is_not_running(tmp_path: Path, closed_port: int) -> None:
    (tmp_path / "inbox").mkdir()
    watcher_config(tmp_path, closed_port)
    result = run_cli("doctor", "--config", "watcher.toml", cwd=tmp_path,
                     env={"DICOMHUB_KEY": "dhk_" + "A" * 43})
    assert result.returncode == 2
    [hub] = [line for line in result.stdout.splitlines() if " hub " in line]
    assert hub.startswith("FAIL") and f"cannot reach http://127.0.0.1:{closed_port}" in hub
    assert "start the hub" in hub
    # [watcher] only: no hub part
    assert "hub database" not in result.stdout


@pytest.mark.parametrize("text", ['[hub]\nport = "abc"\n', "[watcher\n"])
def test_a_broken_config_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    result = run_cli("doctor", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stdout.splitlines()
    assert line.startswith("FAIL  config") and "skipped" in line
    assert ("'hub.port' has value 'abc'" in line) or ("not valid TOML" in line)
    assert "Traceback" not in result.stderr


def test_the_listeners_file_system_is_asked_for_extended_attributes(
        tmp_path: Path, closed_port: int) -> None:
    watcher_config(tmp_path, closed_port)
    _, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    assert named(findings, "dicom spool") == []  # the listener is off
    (tmp_path / "watcher.toml").write_text((tmp_path / "watcher.toml").read_text()
                                           + "[watcher.dicom]\nenabled = true\n")
    _, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    [spool] = named(findings, "dicom spool")
    assert spool["status"] == "ok" and "one sync per instance" in spool["found"]
    assert "inbox/dicom" in spool["found"]  # not made yet: asked where it will be
    assert not (tmp_path / "inbox").exists()  # and nothing written to find out


def test_a_missing_watch_folder(tmp_path: Path, closed_port: int) -> None:
    watcher_config(tmp_path, closed_port, watch='["scans"]')
    code, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    assert code == 2
    [folder] = named(findings, "watch folder")
    assert folder["status"] == "fail" and "does not exist" in folder["found"]
    assert f"mkdir -p {tmp_path / 'scans'}" in folder["fix"]
    assert named(findings, "file system") == []  # nothing to tell of a missing folder


def test_the_real_inotify_limits_are_read(tmp_path: Path, closed_port: int) -> None:
    if not INOTIFY_WATCHES.exists():
        pytest.skip("no inotify on this system")
    for n in range(3):
        (tmp_path / "inbox" / f"s{n}").mkdir(parents=True)
    watcher_config(tmp_path, closed_port)
    _, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    limit = int(INOTIFY_WATCHES.read_text())
    [watches] = named(findings, "inotify watches")
    assert f"max_user_watches is {limit:,} for 4 folders" in watches["found"]
    assert len(named(findings, "inotify queue")) == 1
    watcher_config(tmp_path, closed_port, polling="true")
    _, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    assert named(findings, "inotify") == [
        {"check": "inotify", "status": "ok", "found": "not used: polling = true", "fix": ""}]


def inotify_watches_in_use() -> int:
    """Watches held now by every process we can see."""
    total = 0
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            total += sum(line.startswith("inotify") for line in fdinfo.read_text().split("\n"))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return total


def test_a_low_inotify_limit_warns(tmp_path: Path, closed_port: int) -> None:
    """The limit is the machine's, shared by every process of the user: it is set
    just under what this tree needs and far above what is in use, for one run."""
    folders = 3000
    for n in range(folders - 1):
        (tmp_path / "inbox" / f"s{n:04}").mkdir(parents=True)
    watcher_config(tmp_path, closed_port)
    limit = int(folders / 0.9)  # the tree takes 90 % of it
    in_use = inotify_watches_in_use()
    if in_use > limit // 2:
        pytest.skip(f"{in_use} inotify watches in use: a limit of {limit} could starve them")
    original = INOTIFY_WATCHES.read_text()
    try:
        INOTIFY_WATCHES.write_text(f"{limit}\n")
    except OSError as exc:
        pytest.skip(f"cannot set max_user_watches here: {exc.strerror}")
    try:
        _, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    finally:
        INOTIFY_WATCHES.write_text(original)
    [watches] = named(findings, "inotify watches")
    assert watches["status"] == "warn", watches
    assert f"for {folders:,} folders" in watches["found"]
    assert "sysctl fs.inotify.max_user_watches=" in watches["fix"]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 160 MiB tmpfs (mounting needs root, as in CI)."""
    with mounted_tmpfs(tmp_path / "share", "160m") as mount:
        yield mount


def test_file_system_type_and_free_space_on_a_real_tmpfs(tmp_path: Path, small_tmpfs: Path,
                                                         closed_port: int) -> None:
    inbox = small_tmpfs / "inbox"
    inbox.mkdir()
    watcher_config(tmp_path, closed_port, watch=f'["{inbox}"]',
                   state_dir=f'"{small_tmpfs / "state"}"')
    _, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    [fs] = named(findings, "file system")
    assert fs["status"] == "ok" and f"tmpfs (tmpfs on {small_tmpfs})" in fs["found"]
    [space] = named(findings, "free space")
    assert space["status"] == "warn" and "measured at " + str(small_tmpfs) in space["found"]

    fd = os.open(small_tmpfs / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 100 * checks.MiB)  # leaves under 100 MiB
    finally:
        os.close(fd)
    _, findings = run_doctor(tmp_path, "--config", "watcher.toml")
    [space] = named(findings, "free space")
    assert space["status"] == "fail" and "larger disk" in space["fix"]


# TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> Any:
    module = pytest.importorskip("trustme", reason="trustme is not installed")
    return module.CA()


def write_pair(ca: Any, folder: Path, name: str, **dates: datetime.datetime) -> tuple[Path, Path]:
    leaf = ca.issue_cert("127.0.0.1", "localhost", **dates)
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    return cert, key


def test_the_hubs_own_certificate_file(tmp_path: Path, ca: Any) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    cert, key = write_pair(ca, tmp_path, "good")
    assert doctor._own_certificate(cert, key).status is Status.OK
    cert, key = write_pair(ca, tmp_path, "soon", not_after=now + datetime.timedelta(days=9))
    soon = doctor._own_certificate(cert, key)
    assert soon.status is Status.WARN and "in 9 days" in soon.found
    cert, key = write_pair(ca, tmp_path, "old", not_before=now - datetime.timedelta(days=90),
                           not_after=now - datetime.timedelta(days=1))
    old = doctor._own_certificate(cert, key)
    assert old.status is Status.FAIL and "expired" in old.found and "renew" in old.fix
    other_cert, _ = write_pair(ca, tmp_path, "other")
    mismatch = doctor._own_certificate(other_cert, key)
    assert mismatch.status is Status.FAIL and "tls_key" in mismatch.fix
    missing = doctor._own_certificate(tmp_path / "nope.pem", key)
    assert missing.status is Status.FAIL and "No such file" in missing.found


async def test_a_real_tls_hub_reports_its_expiry(tmp_path: Path, services: list[Service],
                                                 ca: Any) -> None:
    cert, key = write_pair(ca, tmp_path, "hub")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    write_config(tmp_path, hub=f'tls_cert = "{cert.name}"\ntls_key = "{key.name}"')
    ingest = run_cli("keys", "create", "--role", "ingest", "--name", "w", cwd=tmp_path)
    hub = await Service.start("hub", cwd=tmp_path, name="tls-hub")
    services.append(hub)
    url = (await hub.read_until(r"listening on (https://\S+)")).group(1)
    (tmp_path / "inbox").mkdir()
    write_config(tmp_path, hub=f'tls_cert = "{cert.name}"\ntls_key = "{key.name}"',
                 watcher=f'hub_url = "{ws_url(url)}"\nca_file = "ca.pem"')
    code, findings = run_doctor(tmp_path, env={"DICOMHUB_KEY": ingest.stdout.strip()})
    assert code == (0 if roomy(tmp_path) else 1), findings
    served, own = named(findings, "certificate")
    assert served["status"] == "ok" and f"the certificate {url} serves" in served["found"]
    assert own["status"] == "ok" and "[hub] tls_cert" in own["found"]
    assert named(findings, "key")[0]["status"] == "ok"

    write_config(tmp_path, watcher=f'hub_url = "{ws_url(url)}"')  # the system's CAs only
    code, findings = run_doctor(tmp_path, "--only", "watcher",
                                env={"DICOMHUB_KEY": ingest.stdout.strip()})
    [refused] = named(findings, "hub")
    assert code == 2 and "certificate is refused" in refused["found"]
    assert "ca_file" in refused["fix"]
