"""Watchers with several hubs: which one they use, and what happens when it goes.

The rotation policy is pure and tested with a fake backoff. The rest runs real
hubs on ephemeral ports and real watchers: a hub where nothing listens is skipped,
TLS is chosen per URL, and a hub killed with SIGKILL loses nothing the watcher held.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import signal
import socket
import sqlite3
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import factory
from conftest import RunningHub, start_hub, wait_for
from dicomhub import keys
from hub.sqlite_store import SQLiteStore
from procs import Service, hub_with_keys, outbox_size, write_config
from watcher.link import Rotation, _shown


def counting() -> Iterator[float]:
    """A stand-in backoff: 1.0, 2.0, 3.0, ... so each delay shows which one it is."""
    return itertools.count(1.0)


@contextlib.contextmanager
def nothing_listens() -> Iterator[str]:
    """A ws:// URL on a port that is bound but not listening: connecting is refused,
    and no other process can take the port while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws/ingest"


def drop_files(folder: Path, count: int, study: str) -> set[str]:
    """`count` small CT instances of one series; their SOP Instance UIDs."""
    return {factory.write(folder / f"{n}.dcm", StudyInstanceUID=study,
                          SeriesInstanceUID=f"{study}.1", InstanceNumber=n).SOPInstanceUID
            for n in range(count)}


def indexed(database: Path) -> set[str]:
    """The SOP Instance UIDs a hub's database holds (read beside a running hub)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return {uid for (uid,) in db.execute("SELECT sop_instance_uid FROM instances")}


# The rotation policy --------------------------------------------------------------------


def test_one_hub_waits_after_every_attempt_as_before() -> None:
    rotation = Rotation(["ws://a"], counting)
    assert [rotation.advance(False) for _ in range(3)] == [1.0, 2.0, 3.0]
    assert rotation.url == "ws://a"
    assert rotation.advance(True) == 1.0  # a session that got going resets the backoff


def test_the_next_hub_is_tried_at_once_and_a_full_round_waits() -> None:
    rotation = Rotation(["ws://a", "ws://b", "ws://c"], counting)
    steps = [(rotation.advance(False), rotation.url) for _ in range(7)]
    assert steps == [(None, "ws://b"), (None, "ws://c"), (1.0, "ws://a"),
                     (None, "ws://b"), (None, "ws://c"), (2.0, "ws://a"), (None, "ws://b")]


def test_a_session_that_got_going_fails_over_at_once_with_a_new_backoff() -> None:
    rotation = Rotation(["ws://a", "ws://b"], counting)
    assert [rotation.advance(False) for _ in range(4)] == [None, 1.0, None, 2.0]
    assert rotation.url == "ws://a"
    assert (rotation.advance(True), rotation.url) == (None, "ws://b")  # a went away
    assert (rotation.advance(False), rotation.url) == (1.0, "ws://a")  # so did b


def test_hubs_that_welcome_and_then_refuse_do_not_make_it_spin() -> None:
    rotation = Rotation(["ws://a", "ws://b"], counting)
    # Sessions that end without an acknowledgement are failed attempts, however
    # far they got: every full round still waits.
    assert [rotation.advance(False) for _ in range(6)] == [None, 1.0, None, 2.0, None, 3.0]


def test_a_rotation_needs_a_hub() -> None:
    with pytest.raises(ValueError, match="at least one hub URL"):
        Rotation([], counting)


def test_logged_urls_leave_out_credentials() -> None:
    assert _shown("wss://user:secret@hub.example:443/ws/ingest?token=abc#x") == \
        "wss://hub.example:443/ws/ingest"
    assert _shown("ws://127.0.0.1:8080/ws/ingest") == "ws://127.0.0.1:8080/ws/ingest"


# Real hubs, one watcher ---------------------------------------------------------------


async def test_a_hub_where_nothing_listens_is_skipped(
        hub: RunningHub, run_watcher: Any, caplog: pytest.LogCaptureFixture) -> None:
    with nothing_listens() as dead, caplog.at_level(logging.WARNING, "dicomhub.watcher"):
        running = await run_watcher(hub, hub_url=dead, failover_urls=(hub.ws_url,))
        link = running.watcher.link
        assert link.urls == (dead, hub.ws_url) and link.url == hub.ws_url
        assert f"connection to the hub at {dead} lost or refused" in caplog.text
        drop_files(running.inbox, 20, "1.2.40")

        async def delivered() -> bool:
            return (await hub.store.stats())["instances"] == 20 \
                and running.watcher.state.backlog == 0

        await wait_for(delivered, "the files to reach the live hub")
        assert link.url == hub.ws_url


async def test_tls_applies_per_url(tmp_path: Path, run_watcher: Any) -> None:
    """A ws:// hub and a wss:// hub requiring a client certificate in one list."""
    trustme = pytest.importorskip("trustme", reason="trustme is not installed")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    pem = {name: tmp_path / f"{name}.pem" for name in
           ("ca", "cert", "key", "client_ca", "client_cert", "client_key")}
    issued = server_ca.issue_cert("127.0.0.1")
    client = client_ca.issue_cert("watcher-1.example")
    server_ca.cert_pem.write_to_path(pem["ca"])
    issued.cert_chain_pems[0].write_to_path(pem["cert"])
    issued.private_key_pem.write_to_path(pem["key"])
    client_ca.cert_pem.write_to_path(pem["client_ca"])
    client.cert_chain_pems[0].write_to_path(pem["client_cert"])
    client.private_key_pem.write_to_path(pem["client_key"])
    hub = await start_hub(tmp_path, tls_cert=pem["cert"], tls_key=pem["key"],
                          client_ca=pem["client_ca"])
    try:
        with nothing_listens() as dead:
            running = await run_watcher(hub, hub_url=dead, failover_urls=(hub.ws_url,),
                                        ca_file=pem["ca"], client_cert=pem["client_cert"],
                                        client_key=pem["client_key"])
            assert running.watcher.link.url == hub.ws_url
            assert hub.ws_url.startswith("wss://")
            drop_files(running.inbox, 5, "1.2.41")

            async def delivered() -> bool:
                return (await hub.store.stats())["instances"] == 5

            await wait_for(delivered, "the files to arrive over mutual TLS")
            await running.stop()
    finally:
        await hub.stop()


# Two hub processes, one killed ----------------------------------------------------------


async def second_hub(folder: Path, services: list[Service], ingest_key: str) -> Service:
    """Another hub process with its own database, accepting the same ingest key."""
    folder.mkdir()
    write_config(folder)
    store = SQLiteStore(folder / "data" / "hub.sqlite3")
    await store.open()
    try:
        await store.create_key("w", "ingest", keys.digest(ingest_key), time.time())
    finally:
        await store.close()
    hub = await Service.start("hub", cwd=folder, name="hub-b")
    services.append(hub)
    return hub


async def test_a_killed_hub_fails_over_and_nothing_is_lost(
        tmp_path: Path, services: list[Service]) -> None:
    folder_a, folder_b, folder_w = tmp_path / "a", tmp_path / "b", tmp_path / "w"
    folder_a.mkdir()
    hub_a, url_a, key, _ = await hub_with_keys(folder_a, services, "hub-a")
    hub_b = await second_hub(folder_b, services, key)
    url_b = (await hub_b.read_until(r"listening on (http://\S+)")).group(1)
    ws_a, ws_b = (url.replace("http", "ws", 1) + "/ws/ingest" for url in (url_a, url_b))
    db_a, db_b = (f / "data" / "hub.sqlite3" for f in (folder_a, folder_b))
    folder_w.mkdir()
    (folder_w / "watcher.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = ["{ws_a}", "{ws_b}"]
        settle = 0.3
        workers = 1
        batch_size = 25
        reconnect_max = 1.0
        """))
    state_dir, inbox = folder_w / "data" / "watcher", folder_w / "inbox"
    watcher = await Service.start("watch", "--config", "watcher.toml", cwd=folder_w,
                                  env={"DICOMHUB_KEY": key}, name="watcher")
    services.append(watcher)
    await watcher.logged(rf"connected to {re.escape(ws_a)} ")

    # 1. Hub A indexes and acknowledges the first files.
    first = drop_files(inbox / "first", 150, "1.2.42.1")

    async def acknowledged_by_a() -> bool:
        return indexed(db_a) == first and outbox_size(state_dir) == 0

    await wait_for(acknowledged_by_a, "hub A to index and acknowledge the first files")

    # 2. Hub A hangs: what arrives now reaches the outbox (and maybe A's socket) but
    # A never acknowledges it. Then it is killed.
    hub_a.proc.send_signal(signal.SIGSTOP)
    unacknowledged = drop_files(inbox / "second", 150, "1.2.42.2")

    async def held() -> bool:
        return outbox_size(state_dir) == len(unacknowledged)

    await wait_for(held, "the second files to wait in the outbox")
    assert await hub_a.stop(signal.SIGKILL) == -signal.SIGKILL

    # 3. The watcher switches to hub B, sends it what A never acknowledged, and then
    # what arrives after the kill.
    switched = await watcher.logged(r"connected to (\S+) \(.*\), failing over from (\S+);")
    assert switched.groups() == (ws_b, ws_a)
    after = drop_files(inbox / "third", 150, "1.2.42.3")

    async def delivered_to_b() -> bool:
        return indexed(db_b) == unacknowledged | after and outbox_size(state_dir) == 0

    await wait_for(delivered_to_b, "hub B to index everything A did not acknowledge")
    assert indexed(db_a) == first  # A's database, as the kill left it
    assert indexed(db_a) | indexed(db_b) == first | unacknowledged | after
    assert len(re.findall(r"failing over", watcher.log.read_text())) == 1
    assert await watcher.stop() == 0
    assert await hub_b.stop() == 0
