"""Encryption at rest with SQLCipher: hub database and watcher outbox."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import start_hub
from dicomhub.errors import StoreError
from dicomhub.protocol import InstanceRecord
from hub.sqlite_store import SQLiteStore

pytest.importorskip("sqlcipher3", reason="SQLCipher is not installed (dicomhub[encryption])")

KEY = "a3" * 32
RECORD = InstanceRecord(path="a.dcm", size=1, mtime=1.0, sop_instance_uid="9.1.1",
                        series_instance_uid="9.1", study_instance_uid="9",
                        patient_id="SECRET-PATIENT-ID", patient_name="Doe^Secret")


def assert_unreadable_without_key(path: Path) -> None:
    con = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="not a database"):
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    finally:
        con.close()
    for file in path.parent.glob(path.name + "*"):  # the WAL too
        assert b"SECRET-PATIENT-ID" not in file.read_bytes()


@pytest.mark.asyncio
async def test_hub_database_is_encrypted_and_usable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "hub.sqlite3", KEY)
    await store.open()
    await store.ingest("w", [RECORD], time.time())
    assert (await store.stats())["instances"] == 1
    await store.close()
    assert_unreadable_without_key(tmp_path / "hub.sqlite3")
    again = SQLiteStore(tmp_path / "hub.sqlite3", KEY)
    await again.open()
    try:
        assert (await again.get_series("9.1"))["patient_name"] == "Doe^Secret"
    finally:
        await again.close()
    for wrong in ("b4" * 32, None):
        store = SQLiteStore(tmp_path / "hub.sqlite3", wrong)
        with pytest.raises(StoreError):
            await store.open()
        await store.close()


@pytest.mark.asyncio
async def test_watcher_outbox_is_encrypted(tmp_path: Path) -> None:
    from watcher.state import Outcome, State, StateError

    state = State(tmp_path / "state", KEY)
    await state.open()
    await state.put([Outcome.of(b"/x/a.dcm", 1, 1, RECORD)])
    await state.close()
    assert_unreadable_without_key(tmp_path / "state" / "state.sqlite3")
    state = State(tmp_path / "state", KEY)
    await state.open()
    try:
        assert state.backlog == 1
        assert "SECRET-PATIENT-ID" in (await state.pending(0, 10))[0][1]
    finally:
        await state.close()
    plain = State(tmp_path / "state")
    with pytest.raises(StateError):
        await plain.open()
    await plain.close()


@pytest.mark.asyncio
async def test_hub_takes_its_key_from_the_named_variable(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DICOMHUB_DB_KEY", KEY)
    hub = await start_hub(tmp_path, encryption_key_env="TEST_DICOMHUB_DB_KEY")
    try:
        await hub.store.ingest("w", [RECORD], time.time())
    finally:
        await hub.stop()
    assert_unreadable_without_key(tmp_path / "hub.sqlite3")


def test_cli_needs_the_variable_it_is_told_about(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[hub]\nencryption_key_env = "DB_KEY"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
    env.pop("DB_KEY", None)
    cli = [sys.executable, "-m", "dicomhub", "keys", "create", "--role", "read", "--name", "x"]
    missing = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "$DB_KEY" in missing.stderr and "not set" in missing.stderr
    ok = subprocess.run(cli, cwd=tmp_path, env={**env, "DB_KEY": KEY}, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert_unreadable_without_key(tmp_path / "data" / "hub.sqlite3")
