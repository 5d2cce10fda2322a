"""Logs: one event per line with stable keys, text or JSON, and no patient data."""

from __future__ import annotations

import json
import logging
import re
import textwrap
from pathlib import Path

import aiohttp
import pytest

import factory
from conftest import Api, wait_for
from dicomhub.logs import fields
from procs import Service, config_with_keys, run_cli

TEXT_EVENT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
                        r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: ")
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PATIENT_NAME = "Zyxwvut^Qponml"
PATIENT_ID = "PID-98765-XQ"
BIRTH_DATE = "19321107"


def _record(exc: BaseException | None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("dicomhub.hub", logging.ERROR, __file__, 1,
                             "storing batch %d failed\nsecond line", (7,), info)


def test_an_event_has_the_stable_keys_and_an_error_on_one_line() -> None:
    try:
        raise OSError(28, "No space left on device")
    except OSError as exc:
        record = _record(exc)
    event = fields(record, debug=False)
    assert list(event) == ["time", "level", "logger", "message", "error"]
    assert ISO_UTC.fullmatch(event["time"])
    assert event["level"] == "error" and event["logger"] == "dicomhub.hub"
    assert event["message"] == "storing batch 7 failed | second line"
    assert event["error"] == "OSError: [Errno 28] No space left on device"
    with_debug = fields(record, debug=True)
    assert with_debug["traceback"].startswith("Traceback (most recent call last)")
    assert "traceback" not in fields(_record(None), debug=True)


@pytest.mark.slow
async def test_json_and_text_logs_and_no_patient_data_at_debug_level(
        tmp_path: Path, services: list[Service]) -> None:
    ingest_key, read_key = config_with_keys(tmp_path)
    hub = await Service.start("hub", "--log-format", "json", "--log-level", "debug",
                              cwd=tmp_path, name="hub")
    services.append(hub)
    url = (await hub.read_until(r"listening on (http://\S+)")).group(1)
    inbox = tmp_path / "inbox"
    (tmp_path / "watch.toml").write_text(textwrap.dedent(f"""\
        [watcher]
        hub_url = "{url.replace('http', 'ws', 1)}/ws/ingest"
        watch = ["{inbox}"]
        state_dir = "{tmp_path / 'state'}"
        settle = 0.2
        workers = 1
        """))
    watcher = await Service.start("watch", "--config", "watch.toml", "--log-level", "debug",
                                  cwd=tmp_path, env={"DICOMHUB_KEY": ingest_key},
                                  name="watcher")
    services.append(watcher)
    await watcher.logged(r"connected to")
    # Folder names often hold a patient's name: one here, with a file the watcher
    # rejects (its path is reported) and one it indexes.
    folder = inbox / PATIENT_NAME.replace("^", "_") / PATIENT_ID
    factory.write(folder / "1.dcm", PatientName=PATIENT_NAME, PatientID=PATIENT_ID,
                  PatientBirthDate=BIRTH_DATE)
    (folder / "notes.txt").write_text(f"{PATIENT_NAME} {PATIENT_ID}")
    async with aiohttp.ClientSession() as http:
        api = Api(http, url, read_key)

        async def arrived() -> bool:
            stats = await api.get("/api/stats")
            return (stats["instances"], stats["rejections"]) == (1, 1)

        await wait_for(arrived, "the file and the rejection to arrive")
        # Patient IDs in a path and in a query: the access log shows route patterns.
        assert (await api.get(f"/api/patients/{PATIENT_ID}"))["patient_id"] == PATIENT_ID
        await api.get("/api/series", patient_id=PATIENT_ID)
        await api.get("/api/rejections")
    assert await watcher.stop() == 0
    assert await hub.stop() == 0

    hub_events = [json.loads(line) for line in hub.log.read_text().splitlines()]
    for event in hub_events:
        assert {"time", "level", "logger", "message"} <= set(event), event
        assert ISO_UTC.fullmatch(event["time"]) and event["level"] in (
            "debug", "info", "warning", "error", "critical")
    loggers = {event["logger"] for event in hub_events}
    assert {"dicomhub", "dicomhub.hub", "dicomhub.access"} <= loggers, loggers
    assert any(e["logger"] == "dicomhub.access" and "/api/patients/{patient_id" in e["message"]
               for e in hub_events)
    assert any(e["message"] == "SIGTERM received: stopping" for e in hub_events)

    watcher_lines = watcher.log.read_text().splitlines()
    assert watcher_lines and all(TEXT_EVENT.match(line) for line in watcher_lines), \
        watcher_lines
    assert any(" DEBUG " in line for line in watcher_lines)  # debug level, truly
    for name, text in (("hub", hub.log.read_text()), ("watcher", watcher.log.read_text())):
        for secret in (PATIENT_NAME, PATIENT_NAME.replace("^", "_"), "Zyxwvut", PATIENT_ID,
                       BIRTH_DATE):
            assert secret not in text, f"{secret!r} in the {name} log"


@pytest.mark.slow
def test_a_fatal_error_in_json_is_one_event(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[hub]\nport = 0\nbogus = 1\n")
    result = run_cli("hub", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    event = json.loads(line)
    assert event["level"] == "error" and "bogus" in event["message"]
    assert "traceback" not in event
    debug = run_cli("--debug", "--log-format", "json", "hub", cwd=tmp_path)
    [line] = debug.stderr.splitlines()
    assert json.loads(line)["traceback"].startswith("Traceback")
