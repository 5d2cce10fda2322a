"""The dashboard in a real browser: Chromium driven by Playwright against a real
hub and a real watcher.

Every wait is Playwright's auto-waiting `expect` (or conftest's wait_for) on a
condition, never a guessed sleep. Uncaught page errors and Content Security
Policy violations fail the test that caused them.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import factory
from conftest import REPO, TIMEOUT, RunningHub, start_hub, wait_for
from dicomhub.protocol import InstanceRecord
from hub import ingest
from hub.session import new_login_link

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} not found: the browser tests drive Debian's Chromium "
    "(apt-get install chromium)")

playwright = pytest.importorskip(
    "playwright.async_api",
    reason="Playwright for Python is not installed (pip install playwright)")
async_playwright, expect = playwright.async_playwright, playwright.expect

# Ingest takes the watcher's settle time plus a round trip; a restart adds both
# sides' reconnect backoff. A third of the suite's deadline is plenty.
expect.set_options(timeout=TIMEOUT * 1000 / 3)

XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_TEXT = "<script>alert(2)</script><b>bold</b>"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            await chromium.close()


class Dashboard:
    """One page of the dashboard, recording what would go unseen in a headless
    browser: uncaught errors, CSP violations and dialogs (alert() included)."""

    def __init__(self, page: Any, hub: RunningHub) -> None:
        self.page, self.hub = page, hub
        self.problems: list[str] = []
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.problems.append(f"CSP violation: {message.text}")

    def _dialog(self, dialog: Any) -> None:
        self.problems.append(f"dialog opened: {dialog.message!r}")
        asyncio.ensure_future(dialog.dismiss())

    @classmethod
    async def open(cls, browser: Any, hub: RunningHub) -> Dashboard:
        context = await browser.new_context(viewport={"width": 1400, "height": 900})
        dashboard = cls(await context.new_page(), hub)
        await dashboard.page.goto(hub.url + "/")
        return dashboard

    async def login(self, key: str) -> None:
        page = self.page
        await expect(page.locator("#login-form")).to_be_visible()
        await page.fill("#key", key)
        await page.click("#login-form button[type=submit]")
        await expect(page.locator("#connection")).to_have_text("live")
        # A reload would clear this, so its survival proves updates came in place.
        await page.evaluate("window.dashboardTestMarker = 'no reload'")

    async def assert_not_reloaded(self) -> None:
        assert await self.page.evaluate("window.dashboardTestMarker") == "no reload"

    def series(self, uid: str) -> Any:
        return self.page.locator(f'tr[data-series-uid="{uid}"]')

    def check(self) -> None:
        assert not self.problems, self.problems


async def logged_in(browser: Any, hub: RunningHub) -> Dashboard:
    dashboard = await Dashboard.open(browser, hub)
    await dashboard.login(await hub.key("read"))
    return dashboard


def write(folder: Path, name: str, series: str, study: str = "1.2.99.1", **attrs: Any) -> None:
    factory.write(folder / name, SeriesInstanceUID=series, StudyInstanceUID=study, **attrs)


async def test_series_appear_and_counts_climb_without_reload(hub: RunningHub, run_watcher,
                                                             browser) -> None:
    running = await run_watcher(hub)
    dashboard = await logged_in(browser, hub)
    page = dashboard.page
    await expect(page.locator("#watchers [data-watcher-id='w1'] .state")).to_have_text("connected")

    write(running.inbox, "a/1.dcm", "1.2.99.1.1", InstanceNumber=1, SeriesDescription="Axial")
    row = dashboard.series("1.2.99.1.1")
    await expect(row.locator(".count")).to_have_text("1")
    await expect(row.locator(".description")).to_have_text("Axial")
    await expect(row.locator(".status")).to_have_text("receiving")

    for n in range(2, 5):
        write(running.inbox, f"a/{n}.dcm", "1.2.99.1.1", InstanceNumber=n)
    write(running.inbox, "b/1.dcm", "1.2.99.1.2", Modality="SR", SeriesNumber=4)
    await expect(row.locator(".count")).to_have_text("4")
    await expect(dashboard.series("1.2.99.1.2").locator(".modality")).to_have_text("SR")
    # Both series sit under one study header, which reads the patient's name.
    study = page.locator('tr.study[data-study-uid="1.2.99.1"]')
    await expect(study.locator(".patient")).to_have_text("Patient Test")
    await expect(study.locator(".study-count")).to_have_text("2 series · 5 instances")

    # A click shows the series' instances in the side panel.
    await row.click()
    panel = page.locator("#instances")
    await expect(panel).to_be_visible()
    await expect(panel.locator("tr[data-sop-instance-uid]")).to_have_count(4)
    await expect(panel.locator("tr[data-sop-instance-uid] .path").first).to_have_text("a/1.dcm")
    await page.click("#instances-close")
    await expect(panel).to_be_hidden()

    await dashboard.assert_not_reloaded()
    dashboard.check()


async def test_reconnects_after_hub_restart_and_catches_up(tmp_path: Path, run_watcher,
                                                           browser) -> None:
    hub = await start_hub(tmp_path)
    port = int(hub.url.rsplit(":", 1)[1])
    running = None
    try:
        running = await run_watcher(hub)
        dashboard = await logged_in(browser, hub)
        connection = dashboard.page.locator("#connection")
        write(running.inbox, "1.dcm", "1.2.99.2.1", InstanceNumber=1)
        row = dashboard.series("1.2.99.2.1")
        await expect(row.locator(".count")).to_have_text("1")

        await hub.stop()
        await expect(connection).to_have_text("reconnecting")
        # Dropped while the hub is down: the watcher holds them in its outbox.
        for n in (2, 3):
            write(running.inbox, f"{n}.dcm", "1.2.99.2.1", InstanceNumber=n)
        write(running.inbox, "new/1.dcm", "1.2.99.2.2", Modality="MR")

        hub = await start_hub(tmp_path, port=port)  # same port and database
        await expect(connection).to_have_text("live")
        await expect(row.locator(".count")).to_have_text("3")
        await expect(dashboard.series("1.2.99.2.2").locator(".modality")).to_have_text("MR")
        await dashboard.assert_not_reloaded()
        dashboard.check()
    finally:
        if running is not None:
            await running.stop()
        await hub.stop()


async def test_rejections_panel_shows_reasons(hub: RunningHub, run_watcher, browser) -> None:
    running = await run_watcher(hub)
    (running.inbox / "early.dcm").write_bytes(b"")  # rejected before the page opens

    async def rejected() -> bool:
        return (await hub.store.stats())["rejections"] >= 1

    await wait_for(rejected, "the empty file to be rejected")
    dashboard = await logged_in(browser, hub)
    rejections = dashboard.page.locator("#rejections")
    await expect(rejections.locator('[data-path="early.dcm"] .reason')).to_have_text("empty")

    (running.inbox / "bad.dcm").write_text("this is a text file, not DICOM\n")
    bad = rejections.locator('[data-path="bad.dcm"]')
    await expect(bad.locator(".reason")).to_have_text("not_dicom")
    await expect(rejections.locator("[data-path]").first).to_have_attribute("data-path", "bad.dcm")
    dashboard.check()


async def test_dicom_text_is_rendered_as_text(hub: RunningHub, run_watcher, browser) -> None:
    running = await run_watcher(hub)
    dashboard = await logged_in(browser, hub)
    page = dashboard.page
    write(running.inbox, "x.dcm", "1.2.99.4.1", study="1.2.99.4", PatientName=XSS_NAME,
          PatientID=XSS_TEXT, SeriesDescription=XSS_TEXT, StudyDescription=XSS_NAME)
    row = dashboard.series("1.2.99.4.1")
    await expect(row.locator(".description")).to_have_text(XSS_TEXT)
    study = page.locator('tr.study[data-study-uid="1.2.99.4"]')
    await expect(study.locator(".study-description")).to_have_text(XSS_NAME)
    await expect(study.locator(".patient-id")).to_have_text(XSS_TEXT)
    # '=' separates the groups of a DICOM person name, so this one reads as an
    # alphabetic group with an ideographic one; the raw value is in the title.
    patient = study.locator(".patient")
    await expect(patient).to_have_text("<img src (x onerror)")
    await expect(patient).to_have_attribute("title", XSS_NAME)

    await row.click()
    await expect(page.locator("#instances-title")).to_have_text(XSS_TEXT)
    await expect(page.locator("#instances tr[data-sop-instance-uid]")).to_have_count(1)
    assert await page.locator("img, script:not([src]), b").count() == 0
    dashboard.check()  # no alert() dialog, no page error


async def test_login_rejects_a_wrong_key_and_logout_ends_the_session(hub: RunningHub,
                                                                     browser) -> None:
    dashboard = await Dashboard.open(browser, hub)
    page = dashboard.page
    await expect(page.locator("#login-form")).to_be_visible()
    error = page.locator("#login-error")
    for wrong in ("dhk_" + "x" * 43, await hub.key("ingest")):
        await page.fill("#key", wrong)
        await page.click("#login-form button[type=submit]")
        await expect(error).to_be_visible()
        await expect(error).to_contain_text("not accepted")
        await expect(page.locator("#live-view")).to_be_hidden()

    await dashboard.login(await hub.key("read"))
    await expect(error).to_be_hidden()
    await page.click("#logout")
    await expect(page.locator("#login-form")).to_be_visible()
    await page.reload()  # the cookie is gone: still the login page
    await expect(page.locator("#login-form")).to_be_visible()
    await expect(page.locator("#live-view")).to_be_hidden()

    # The one-time link `dicomhub up` prints logs in once, and only once.
    await hub.key("read", name="link")
    token = await new_login_link(hub.store, "link")
    assert token is not None
    await page.goto(f"{hub.url}/login?token={token}")
    await expect(page.locator("#connection")).to_have_text("live")
    await expect(page.locator("#whoami")).to_have_text("link (read)")
    await page.click("#logout")
    await page.goto(f"{hub.url}/login?token={token}")
    await expect(error).to_contain_text("expired or was already used")
    await expect(page.locator("#live-view")).to_be_hidden()
    dashboard.check()


async def test_a_revoked_key_ends_the_session_at_the_next_reconnect(tmp_path: Path,
                                                                     browser) -> None:
    hub = await start_hub(tmp_path)
    port = int(hub.url.rsplit(":", 1)[1])
    try:
        dashboard = await Dashboard.open(browser, hub)
        await dashboard.login(await hub.key("read", name="dashboard"))
        assert await hub.store.revoke_key("dashboard", time.time())
        await hub.stop()
        await expect(dashboard.page.locator("#connection")).to_have_text("reconnecting")
        hub = await start_hub(tmp_path, port=port)
        # The feed is refused (close code 4401): back to the login page, saying why.
        await expect(dashboard.page.locator("#login-form")).to_be_visible()
        await expect(dashboard.page.locator("#login-error")).to_contain_text("session has ended")
        await expect(dashboard.page.locator("#live-view")).to_be_hidden()
        dashboard.check()
    finally:
        await hub.stop()


def _bulk_record(series: int, instance: int) -> Any:
    study = series // 4
    return InstanceRecord(
        path=f"bulk/{series}/{instance}.dcm", size=1000, mtime=1.0,
        sop_instance_uid=f"2.25.{series}.{instance}", series_instance_uid=f"2.25.{series}",
        study_instance_uid=f"2.25.{study}", patient_id=f"P{study}",
        patient_name=f"Patient{study}^Test", modality=("CT", "MR", "US", "CR")[series % 4],
        series_number=series % 4 + 1, series_description=f"Series {series}",
        study_description=f"Study {study}", instance_number=instance)


async def test_ten_thousand_series_one_page_at_a_time(hub: RunningHub, browser) -> None:
    # A watcher would take minutes to deliver this much; the store takes a second.
    await hub.store.watcher_connected("bulk", "bulk", "test", "127.0.0.1", 0, time.time())
    for start in range(0, 10_000, 1000):
        await hub.store.ingest("bulk", [_bulk_record(s, 1) for s in range(start, start + 1000)],
                               time.time())
    dashboard = await logged_in(browser, hub)
    page = dashboard.page
    await expect(page.locator("#page-info")).to_have_text("Studies 1–50 of 2500 · page 1 of 50")
    await expect(page.locator("tr.study")).to_have_count(50)
    await expect(page.locator("tr.series")).to_have_count(200)
    first = await page.locator("tr.series").first.get_attribute("data-series-uid")

    # Every series gets a new instance, published as the ingest endpoint would,
    # in watcher-sized batches; the page must keep up without a long freeze.
    await page.evaluate("""() => {
        window.longestTask = 0;
        new PerformanceObserver((list) => {
            for (const e of list.getEntries()) {
                window.longestTask = Math.max(window.longestTask, e.duration);
            }
        }).observe({type: "longtask"});
    }""")
    publish = hub.runner.app[ingest.PUBLISH]
    for start in range(0, 10_000, 500):
        result = await hub.store.ingest(
            "bulk", [_bulk_record(s, 2) for s in range(start, start + 500)], time.time())
        publish(result.changes)
        await asyncio.sleep(0)
    await expect(dashboard.series(first).locator(".count")).to_have_text("2")
    await expect(page.locator("#totals")).to_contain_text("20\u202f000 instances")
    await expect(page.locator("#connection")).to_have_text("live")
    assert await page.evaluate("window.longestTask") < 1000

    await page.click("#next")
    await expect(page.locator("#page-info")).to_have_text("Studies 51–100 of 2500 · page 2 of 50")
    await expect(page.locator("tr.study")).to_have_count(50)
    await page.fill("#search", "Patient2400^")
    await expect(page.locator("tr.study")).to_have_count(1)
    await expect(page.locator("tr.series")).to_have_count(4)
    await expect(page.locator("#page-info")).to_have_text("Studies 1–1 of 1")
    await dashboard.assert_not_reloaded()
    dashboard.check()


async def test_names_module_reads_dicom_person_names(hub: RunningHub, browser) -> None:
    dashboard = await Dashboard.open(browser, hub)
    cases = {
        "Doe^John^^Dr": "Dr John Doe",
        "Doe^John^Q^Dr^Jr": "Dr John Q Doe Jr",
        "Doe": "Doe",
        " Doe ^ Jane ": "Jane Doe",
        "Yamada^Tarou=山田^太郎=やまだ^たろう": "Tarou Yamada (山田 太郎)",
        "=山田^太郎": "山田 太郎",
        "==やまだ^たろう": "やまだ たろう",
        "^^^^": "",
        "": "",
    }
    got = await dashboard.page.evaluate(
        "async (names) => { const m = await import('/names.js');"
        " return names.map((n) => m.readableName(n)); }", list(cases))
    assert dict(zip(cases, got, strict=True)) == cases
    dashboard.check()


async def test_search_and_screenshot(tmp_path: Path, run_watcher, browser) -> None:
    hub = await start_hub(tmp_path, stable_after=2.0)
    running = None
    try:
        running = await run_watcher(hub)
        inbox = running.inbox
        ct = dict(study="1.2.99.6.1", PatientName="Doe^Jane", PatientID="P-1001",
                  AccessionNumber="ACC-CT-1", StudyDescription="CT chest with contrast",
                  Modality="CT", BodyPartExamined="CHEST")
        write(inbox, "ct/scout.dcm", "1.2.99.6.1.1", SeriesNumber=1, SeriesDescription="Scout",
              **ct)
        for n in range(1, 9):
            write(inbox, f"ct/axial/{n}.dcm", "1.2.99.6.1.2", SeriesNumber=2, InstanceNumber=n,
                  SeriesDescription="Axial 1.25 mm", **ct)
        # (Latin-1 only: the test machine may have no CJK font for the picture.)
        mr = dict(study="1.2.99.6.2", PatientName="Müller^Anna^Maria", PatientID="P-2002",
                  SpecificCharacterSet="ISO_IR 192", AccessionNumber="ACC-MR-7",
                  StudyDescription="MR brain", Modality="MR", BodyPartExamined="HEAD")
        for number, name in ((3, "T1 SAG"), (5, "FLAIR AX")):
            for n in range(1, 4):
                write(inbox, f"mr/{number}/{n}.dcm", f"1.2.99.6.2.{number}", SeriesNumber=number,
                      InstanceNumber=n, SeriesDescription=name, **mr)
        (inbox / "notes.dcm").write_text("not an image\n")
        (inbox / "copying.dcm").write_bytes(b"")

        dashboard = await logged_in(browser, hub)
        page = dashboard.page
        rows = page.locator("tr.series")
        await expect(rows).to_have_count(4)
        await expect(dashboard.series("1.2.99.6.1.2").locator(".count")).to_have_text("8")
        await expect(dashboard.series("1.2.99.6.1.2").locator(".status")).to_have_text("stable")

        await expect(page.locator('tr.study[data-study-uid="1.2.99.6.2"] .patient')).to_have_text(
            "Anna Maria Müller")

        search = page.locator("#search")
        for query, expected in (("mr", 2), ("müller", 2), ("acc-ct-1", 2), ("P-1001 axial", 1),
                                ("flair", 1), ("nothing like this", 0), ("", 4)):
            await search.fill(query)
            await expect(rows).to_have_count(expected)
        await expect(page.locator("#empty")).to_be_hidden()

        await search.blur()

        # One more series, arriving in bursts while the page watches: the chart
        # gets something to show, and it is still receiving in the picture.
        cr = dict(study="1.2.99.6.3", PatientName="Smith^John^^Dr", PatientID="P-3003",
                  Modality="CR", SeriesDescription="PA chest", StudyDescription="Chest X-ray",
                  AccessionNumber="ACC-CR-2")
        count = dashboard.series("1.2.99.6.3.1").locator(".count")
        # The watcher's counters come with the once-a-second stats: waiting for
        # them spreads the bursts over several samples of the chart.
        indexed = page.locator("#watchers [data-watcher-id='w1'] .counts")
        total = 0
        for burst in (4, 12, 6):
            for _ in range(burst):
                total += 1
                write(inbox, f"cr/{total}.dcm", "1.2.99.6.3.1", InstanceNumber=total, **cr)
            await expect(count).to_have_text(str(total))
            await expect(indexed).to_contain_text(f"{15 + total} indexed")
        await expect(page.locator("#totals")).to_have_text(
            "5 series (1 receiving) · 37 instances · 2 rejected")
        await expect(dashboard.series("1.2.99.6.3.1").locator(".status")).to_have_text("receiving")
        await expect(page.locator("#rejections [data-path]")).to_have_count(2)
        await expect(page.locator("#rate-chart path.files")).to_have_attribute("d", re.compile("L"))
        docs = REPO / "docs"
        docs.mkdir(exist_ok=True)
        await page.screenshot(path=str(docs / "dashboard.png"))
        assert (docs / "dashboard.png").stat().st_size > 10_000
        dashboard.check()
    finally:
        if running is not None:
            await running.stop()
        await hub.stop()


async def test_a_study_sent_by_storescu_appears_live(hub: RunningHub, run_watcher, browser,
                                                     tmp_path: Path) -> None:
    """A modality, simulated by dcmtk's storescu, sends a study over DICOM."""
    import subprocess

    from dicomhub.config import DicomConfig

    from dicomhub.bench.cstore import dcmtk_storescu

    storescu = dcmtk_storescu()
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk; CI does)")
    running = await run_watcher(hub, dicom=DicomConfig(enabled=True, port=0))
    dashboard = await logged_in(browser, hub)
    study = tmp_path / "modality"
    for n in range(12):
        write(study, f"{n}.dcm", f"1.2.99.7.{n % 2 + 1}", study="1.2.99.7",
              InstanceNumber=n, Modality="MR", SeriesDescription=f"Sequence {n % 2 + 1}")
    sent = await asyncio.to_thread(
        subprocess.run, [storescu, "-aet", "MRI1", "-aec", "DICOMHUB", "+sd",
                         "127.0.0.1", str(running.watcher.listener.port), str(study)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
    assert sent.returncode == 0, sent.stderr
    for series in ("1.2.99.7.1", "1.2.99.7.2"):
        await expect(dashboard.series(series).locator(".count")).to_have_text("6")
        await expect(dashboard.series(series).locator(".modality")).to_have_text("MR")
    header = dashboard.page.locator('tr.study[data-study-uid="1.2.99.7"]')
    await expect(header.locator(".study-count")).to_have_text("2 series · 12 instances")
    await dashboard.assert_not_reloaded()
    dashboard.check()
