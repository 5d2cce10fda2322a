"""The audit trail: reads of patient data, failed logins and key changes are
recorded, admins can page through them, and nobody can rewrite them."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import Api, RunningHub

async def audit(hub: RunningHub, admin: Api, **filters: Any) -> list[dict[str, Any]]:
    from hub.audit import AUDITOR_KEY

    await hub.runner.app[AUDITOR_KEY].flush()
    return await admin.all("/api/audit", **filters)


@pytest.mark.asyncio
async def test_reads_of_patient_data_are_audited(hub: RunningHub,
                                                 http: aiohttp.ClientSession) -> None:
    reader = Api(http, hub.url, await hub.key("read", name="radiologist"))
    admin = Api(http, hub.url, await hub.key("admin", name="security-officer"))
    await reader.get("/api/series", patient_id="P-42")
    await reader.get("/api/stats")  # counts only: not patient data
    ws = await http.ws_connect(hub.url + "/ws/live",
                               headers={"Authorization": f"Bearer {reader.key}"})
    await ws.receive()
    await ws.close()
    entries = await audit(hub, admin, actor="radiologist")
    assert [(e["action"], e["target"]) for e in entries] == [
        ("read", "/api/series?patient_id=P-42"), ("live.subscribe", "/ws/live")]
    assert entries[0]["role"] == "read" and entries[0]["address"] == "127.0.0.1"
    assert entries[0]["time"].endswith("Z")


@pytest.mark.asyncio
async def test_failed_authentication_is_audited(hub: RunningHub,
                                                http: aiohttp.ClientSession) -> None:
    admin = Api(http, hub.url, await hub.key("admin"))
    async with http.get(hub.url + "/api/patients/P-1",
                        headers={"Authorization": "Bearer dhk_" + "q" * 43}) as resp:
        assert resp.status == 401
    async with http.post(hub.url + "/api/session", json={"key": "dhk_" + "r" * 43}) as resp:
        assert resp.status == 401
    failed = await audit(hub, admin, action="auth.failed")
    assert [(e["target"], e["outcome"]) for e in failed] == [
        ("/api/patients/{patient_id}", "refused"), ("/api/session", "refused")]


@pytest.mark.asyncio
async def test_only_admins_read_the_audit_trail(hub: RunningHub, api: Api,
                                                http: aiohttp.ClientSession) -> None:
    async with http.get(hub.url + "/api/audit",
                        headers={"Authorization": f"Bearer {api.key}"}) as resp:
        assert resp.status == 403


@pytest.mark.asyncio
async def test_the_audit_table_is_append_only(hub: RunningHub, api: Api,
                                              http: aiohttp.ClientSession) -> None:
    from hub.audit import AUDITOR_KEY

    await api.get("/api/series")
    await hub.runner.app[AUDITOR_KEY].flush()
    con = sqlite3.connect(hub.config.database)
    try:
        assert con.execute("SELECT count(*) FROM audit").fetchone()[0] >= 1
        for statement in ("UPDATE audit SET actor = 'nobody'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                con.execute(statement)
    finally:
        con.close()


def test_key_changes_on_the_command_line_are_audited(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[hub]\nport = 0\n")
    cli = [sys.executable, "-m", "dicomhub"]
    for args in (["keys", "create", "--role", "read", "--name", "alice"],
                 ["keys", "revoke", "alice"]):
        subprocess.run([*cli, *args], cwd=tmp_path, check=True, capture_output=True)
    con = sqlite3.connect(tmp_path / "data" / "hub.sqlite3")
    try:
        rows = con.execute("SELECT actor, action, target FROM audit ORDER BY id").fetchall()
    finally:
        con.close()
    assert rows == [("cli", "key.create", "alice (read)"), ("cli", "key.revoke", "alice")]
