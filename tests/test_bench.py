"""`dicomhub bench`: a tiny real run through the CLI, and its pure parts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from conftest import TIMEOUT
from dicomhub.bench import corpus, pgcluster
from dicomhub.bench.figures import (
    Row,
    epoch,
    percentile,
    render,
    rows,
    schedule,
    summary_ms,
    verdicts,
)
from dicomhub.bench.context import Context
from dicomhub.bench.machine import file_system
from dicomhub.bench.options import STEPS, Options
from dicomhub.bench.procs import BenchError, Services
from dicomhub.bench.scale import scale

TINY = ["--files", "40", "--clients", "3", "--live-files", "10", "--live-rate", "20",
        "--series-db", "300", "--watcher-files", "300", "--cstore-files", "20",
        "--scale-files", "40", "--scale-live-files", "5"]
# The figures each step must report as positive numbers.
POSITIVE = {
    "corpus": ("files", "series", "mean_file_kib", "written_files_per_second"),
    "reference": ("files_per_second",),
    "e2e": ("files", "files_per_second", "ratio_to_reference"),
    "live": ("files", "p50_ms", "p99_ms", "max_ms"),
    "fanout": ("clients", "delivery_p50_ms", "delivery_p99_ms", "ingest_files_per_second",
               "ingest_ratio_to_e2e", "hub_peak_rss_mib"),
    "reads": ("series", "patients", "series_p50_ms", "series_p99_ms",
              "series_by_patient_p50_ms", "series_by_patient_p99_ms"),
    "watcher": ("files", "files_per_second", "main_peak_rss_mib", "parser_peak_rss_mib",
                "parsers"),
    "cstore": ("files", "files_per_second"),
    "scale": ("files", "live_files", "sqlite_files_per_second", "pg1_files_per_second",
              "pg2_files_per_second", "pg1_ratio_to_sqlite", "pg2_ratio_to_pg1",
              *(f"{c}_live_{p}_ms" for c in ("sqlite", "pg1", "pg2") for p in ("p50", "p99"))),
}


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomhub", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=4 * TIMEOUT)


@pytest.mark.slow
def test_a_tiny_run_measures_every_step_and_cleans_up(tmp_path: Path) -> None:
    result = bench(*TINY, "--json", "figures.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "figures.json").read_text())
    assert set(report) >= {"machine", "versions", "options", "steps", "targets", "seconds"}
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["file_system"]
    assert set(report["versions"]) == {"python", "dicomhub", "pydicom", "aiohttp",
                                       "websockets", "sqlite"}
    assert report["options"]["files"] == 40 and report["options"]["clients"] == 3
    steps = report["steps"]
    assert list(steps) == list(STEPS)
    postgres = pgcluster.bin_dir() is not None  # CI installs it
    for name, figures in POSITIVE.items():
        if name == "scale" and not postgres:
            assert steps[name]["error"] == "PostgreSQL is not installed (apt-get install " \
                                           "postgresql)"
            continue
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert steps[name]["seconds"] >= 0
        for figure in figures:
            assert steps[name]["figures"][figure] > 0, (name, figure, steps[name])
    assert steps["fanout"]["figures"]["lost_messages"] == 0
    assert steps["fanout"]["details"]["messages_checked_per_client"] > 0
    assert steps["live"]["figures"]["lost"] == 0
    assert steps["live"]["figures"]["settle_s"] == 0
    assert len(report["targets"]) == 9
    orthanc = steps["cstore"]["details"]["sender"] == "storescu" and shutil.which("Orthanc")
    for target in report["targets"]:
        if (target["step"], target["figure"]) == ("cstore", "ratio_to_orthanc") and not orthanc:
            assert target["value"] is None and target["pass"] is None  # not measured
        else:
            assert target["pass"] in (True, False), target
    assert "ratio_to_reference" in result.stdout and "result" in result.stdout
    assert "7/9 watcher" in result.stderr  # progress goes to stderr
    assert steps["cstore"]["details"]["sender"] in ("storescu", "pynetdicom")
    if postgres:
        scale = steps["scale"]
        assert [scale["figures"][f"{c}_live_lost"] for c in ("sqlite", "pg1", "pg2")] \
            == [0, 0, 0]
        assert scale["details"]["fsync"] == "on" and scale["details"]["postgresql"]
        assert scale["details"]["pg2"]["hubs"] == 2
        assert "hub B" in scale["details"]["pg2"]["live"]["latency"]
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]  # work folder gone


def test_a_failing_step_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    result = bench("--skip", "corpus", "live", "fanout", "reads", "watcher", "cstore",
                   "scale", "--dir", "work", cwd=tmp_path)
    assert result.returncode == 1
    steps = json.loads((tmp_path / "bench.json").read_text())["steps"]
    assert steps["reference"] == {"status": "failed", "error": "needs the corpus (step corpus)",
                                  "seconds": steps["reference"]["seconds"],
                                  "stop_seconds": steps["reference"]["stop_seconds"]}
    assert steps["e2e"]["status"] == "failed"  # tried, although reference failed
    assert steps["live"] == {"status": "skipped"}
    assert "reference failed: needs the corpus" in result.stdout
    assert not (tmp_path / "work").exists()


async def test_the_scale_step_fails_cleanly_without_postgresql(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgcluster, "bin_dir", lambda: None)  # no server binaries found
    ctx = Context(Options(), tmp_path, Services(), lambda message: None)
    with pytest.raises(BenchError) as raised:
        await scale(ctx)
    assert str(raised.value) == "PostgreSQL is not installed (apt-get install postgresql)"
    assert ctx.services.running == []  # failed before starting anything


def test_a_work_folder_that_holds_something_is_refused(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "precious.txt").write_text("keep me")
    result = bench("--dir", "work", cwd=tmp_path)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert (tmp_path / "work" / "precious.txt").read_text() == "keep me"


# pure helpers ------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="not between"):
        percentile([1.0], 101)


def test_summary_schedule_and_times() -> None:
    assert summary_ms([0.001, 0.002, 0.003]) == {"p50_ms": 2.0, "p99_ms": 3.0, "max_ms": 3.0}
    assert schedule(10.0, 50.0, 3) == [10.0, 10.02, 10.04]
    assert epoch("1970-01-01T00:00:01.500Z") == 1.5


def test_rows_mark_targets_and_failed_steps() -> None:
    steps = {
        "e2e": {"status": "ok", "figures": {"files_per_second": 5000, "ratio_to_reference": 0.8}},
        "live": {"status": "ok", "figures": {"p99_ms": 12.5, "settle_s": 0.0}},
        "reads": {"status": "failed", "error": "boom"},
        "watcher": {"status": "skipped"},
    }
    assert rows(steps) == [
        Row("e2e", "files_per_second", "5,000"),
        Row("e2e", "ratio_to_reference", "0.80", ">= 1.0", "fail"),
        Row("live", "p99_ms", "12.5", "< 250", "pass"),
        Row("live", "settle_s", "0.00", "(not in latency)"),
        Row("reads", "failed", "-", "", "fail"),
        Row("watcher", "skipped", "-"),
    ]
    by_figure = {(t["step"], t["figure"]): t["pass"] for t in verdicts(steps)}
    assert by_figure[("e2e", "ratio_to_reference")] is False
    assert by_figure[("live", "p99_ms")] is True
    assert by_figure[("reads", "series_p99_ms")] is None  # not measured


def test_render_aligns_columns() -> None:
    text = render([Row("e2e", "files_per_second", "5,000"),
                   Row("live", "p99_ms", "12.5", "< 250", "pass")])
    assert text.splitlines() == [
        "step  figure            value  target  result",
        "----  ----------------  -----  ------  ------",
        "e2e   files_per_second  5,000",
        "live  p99_ms             12.5  < 250   pass",
    ]


def test_patched_copies_are_valid_files_with_their_own_uids(tmp_path: Path) -> None:
    spec = corpus.Spec(corpus.new_root(), count=12, series=3, image_size=8)
    paths = corpus.write(tmp_path, spec)
    seen = set()
    for n, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        series = spec.series_of(n)
        assert ds.SOPInstanceUID == corpus.uid(spec.root, corpus.INSTANCE, n)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SeriesInstanceUID == spec.series_uid(series)
        assert ds.StudyInstanceUID == corpus.uid(spec.root, corpus.STUDY, series // 2)
        assert ds.PatientID == corpus.patient_id(series // 2)
        for value in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert UID(value).is_valid and len(value) <= 64
        assert ds.Rows == ds.Columns == 8 and len(ds.PixelData) == 8 * 8 * 2
        seen.add(ds.SOPInstanceUID)
    assert len(seen) == 12 and len({p.parent for p in paths}) == 3


def test_header_only_corpus_and_folder_limit(tmp_path: Path) -> None:
    spec = corpus.Spec(corpus.new_root(), count=25, series=1, image_size=8, pixels=False,
                       per_folder=10)
    assert spec.series_count == 3  # more series than asked, to keep folders small
    paths = corpus.write(tmp_path, spec)
    folders = {p.parent for p in paths}
    assert len(folders) == 3
    assert all(len(list(f.iterdir())) <= 10 for f in folders)
    ds = pydicom.dcmread(paths[-1])
    assert "PixelData" not in ds and ds.SOPInstanceUID.endswith(str(corpus.NUMBER_BASE + 24))


def test_patch_refuses_a_value_of_another_length() -> None:
    spec = corpus.Spec(corpus.new_root(), count=1, series=1, image_size=8, pixels=False)
    template = corpus.build(spec)
    with pytest.raises(ValueError, match="series value"):
        corpus.patch(template, {"series": "1.2.3"})


def test_file_system_of_the_root() -> None:
    assert file_system(Path("/")) != "unknown"
