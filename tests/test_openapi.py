"""The OpenAPI document is true: it names every REST route, and schemathesis,
fuzzing the running hub from it, finds no server error and no answer that
breaks it."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import TIMEOUT, RunningHub
from dicomhub.protocol import InstanceRecord, Rejection

pytestmark = pytest.mark.asyncio

# Not in the document: the document itself, and the browser's session endpoints
# (described in the README with the dashboard).
UNDOCUMENTED = {"/api/openapi.json", "/api/session"}


async def test_the_document_names_every_route(hub: RunningHub,
                                              http: aiohttp.ClientSession) -> None:
    async with http.get(hub.url + "/api/openapi.json") as resp:
        assert resp.status == 200
        spec = await resp.json()
    served = {r.resource.canonical for r in hub.runner.app.router.routes()
              if r.method == "GET" and r.resource is not None
              and r.resource.canonical.startswith("/api/")}
    documented = set(spec["paths"])
    assert documented == served - UNDOCUMENTED


async def test_schemathesis_finds_no_error_and_no_broken_answer(hub: RunningHub,
                                                                tmp_path: Path) -> None:
    if shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("schemathesis is not installed")
    await hub.store.watcher_connected("w", "k", "", "", 0, time.time())
    await hub.store.ingest("w", [
        InstanceRecord(path=f"s/{n}.dcm", size=1, mtime=1.0, sop_instance_uid=f"1.5.{n}",
                       series_instance_uid=f"1.5.{n % 3}.0", study_instance_uid="1.5",
                       patient_id=f"P{n % 2}", patient_name="Doe^Jane", modality="CT")
        for n in range(12)] + [Rejection(path="junk", size=1, mtime=1.0, reason="not_dicom")],
        time.time())
    admin = await hub.key("admin")
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run",
        hub.url + "/api/openapi.json", "--header", f"Authorization: Bearer {admin}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        # A long poll may rightly hold a request for minutes; /api/changes has its own tests.
        "--exclude-path", "/api/changes",
        # Valid requests by the document: invalid ones have their own tests, and
        # arbitrarily long invented values would only meet the HTTP parser's limits.
        "--mode", "positive",
        "--max-examples", "25", "--request-timeout", "10", "--no-color",
        "--generation-deterministic", "--seed", "2026",  # the same cases on every run
    ]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), TIMEOUT * 3)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
