"""`dicomhub bench`: measures the whole pipeline with real processes in one run.

    corpus     synthetic CT files, written fast            corpus.py
    reference  one pydicom loop over them (files/s)        ingest.py
    e2e        hub + watcher, the corpus renamed in        ingest.py
    live       rename-to-live-client latency               latency.py
    fanout     many live clients during an ingest          ingest.py
    reads      /api/series on a large database             reads.py
    watcher    watcher memory on many waiting files        memory.py
    cstore     instances sent over DICOM (C-STORE)         cstore.py
    scale      SQLite, PostgreSQL, two hubs on PostgreSQL  scale.py

The runner (run.py) isolates the steps; the pure parts (percentiles, the
table, the UID patching) live in figures.py and corpus.py. This module stays
light: the CLI imports it to build its parser.
"""

from __future__ import annotations

import argparse

from .options import add_arguments, from_namespace

__all__ = ["add_arguments", "main"]


def main(args: argparse.Namespace) -> int:
    try:
        from .run import main as run
    except KeyboardInterrupt:  # Ctrl-C while importing: nothing was started yet
        return 130
    return run(from_namespace(args))
