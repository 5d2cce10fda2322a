"""What the figures were measured on: the machine and the software versions."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
from importlib import metadata
from pathlib import Path
from typing import Any

from dicomhub import __version__


def _cpus() -> tuple[str, int]:
    """The CPU model and the number of logical CPUs, from /proc/cpuinfo where it exists."""
    model, count = "", 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("processor"):
                count += 1
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    return model or platform.processor() or "unknown", count or os.cpu_count() or 1


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (the longest matching mount point)."""
    target = str(path.resolve())
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def machine(work: Path) -> dict[str, Any]:
    model, count = _cpus()
    return {"cpu_model": model, "cpu_count": count,
            "memory_gib": _memory_gib(), "kernel": platform.release(),
            "file_system": file_system(work)}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "dicomhub": __version__,
            "pydicom": _version("pydicom"), "aiohttp": _version("aiohttp"),
            "websockets": _version("websockets"), "sqlite": sqlite3.sqlite_version}
