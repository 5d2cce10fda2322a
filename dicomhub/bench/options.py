"""The `dicomhub bench` options: parsed once into a frozen object."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

STEPS = ("corpus", "reference", "e2e", "live", "fanout", "reads", "watcher", "cstore",
         "scale")


@dataclass(frozen=True)
class Options:
    files: int = 10_000
    image_size: int = 256
    clients: int = 200
    live_files: int = 250
    live_rate: float = 50.0
    series_db: int = 100_000
    watcher_files: int = 100_000
    cstore_files: int = 2000
    scale_files: int = 5000
    scale_live_files: int = 100
    json: Path = Path("bench.json")
    dir: Path | None = None
    keep: bool = False
    skip: tuple[str, ...] = ()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value <= 10_000:
        raise argparse.ArgumentTypeError(f"{text} is not a rate between 0 and 10000")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure the pipeline with real hub and watcher processes: ingest throughput "
        "against a plain pydicom loop, live-feed latency and fan-out, REST reads on a "
        "large database, watcher memory, DICOM C-STORE, and SQLite against one and two "
        "hubs on PostgreSQL. Progress on stderr, a table on stdout, "
        "every figure in JSON.")
    d = Options()
    parser.add_argument("--files", type=_positive, default=d.files, metavar="N",
                        help=f"CT files in the corpus (default {d.files})")
    parser.add_argument("--image-size", type=_positive, default=d.image_size, metavar="N",
                        help=f"rows = columns of the 16-bit images (default {d.image_size})")
    parser.add_argument("--clients", type=_positive, default=d.clients, metavar="N",
                        help=f"live clients for the fan-out step (default {d.clients})")
    parser.add_argument("--live-files", type=_positive, default=d.live_files, metavar="N",
                        help=f"files dropped one by one in the latency step "
                             f"(default {d.live_files})")
    parser.add_argument("--live-rate", type=_rate, default=d.live_rate, metavar="PER_S",
                        help=f"files per second in the latency step (default {d.live_rate:g})")
    parser.add_argument("--series-db", type=_positive, default=d.series_db, metavar="N",
                        help=f"series in the database of the reads step (default {d.series_db})")
    parser.add_argument("--watcher-files", type=_positive, default=d.watcher_files,
                        metavar="N", help=f"files already waiting when the watcher of the "
                                          f"memory step starts (default {d.watcher_files})")
    parser.add_argument("--cstore-files", type=_positive, default=d.cstore_files,
                        metavar="N", help=f"files sent over DICOM in the C-STORE step "
                                          f"(default {d.cstore_files})")
    parser.add_argument("--scale-files", type=_positive, default=d.scale_files,
                        metavar="N", help=f"files ingested by each configuration of the "
                                          f"scale step (default {d.scale_files})")
    parser.add_argument("--scale-live-files", type=_positive, default=d.scale_live_files,
                        metavar="N", help=f"files then dropped one by one in each "
                                          f"configuration of the scale step, at --live-rate "
                                          f"(default {d.scale_live_files})")
    parser.add_argument("--json", type=Path, default=d.json, metavar="PATH",
                        help=f"where to write the figures (default {d.json})")
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="work folder, made and removed by the run (default: a new "
                             "temporary folder in the current directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--skip", nargs="+", action="extend", choices=STEPS, default=[],
                        metavar="STEP", help=f"leave steps out: {', '.join(STEPS)}")


def from_namespace(args: argparse.Namespace) -> Options:
    return Options(files=args.files, image_size=args.image_size, clients=args.clients,
                   live_files=args.live_files, live_rate=args.live_rate,
                   series_db=args.series_db, watcher_files=args.watcher_files,
                   cstore_files=args.cstore_files, scale_files=args.scale_files,
                   scale_live_files=args.scale_live_files, json=args.json, dir=args.dir,
                   keep=args.keep, skip=tuple(args.skip))
