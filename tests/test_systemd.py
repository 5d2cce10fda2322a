"""The README's systemd units: systemd itself must accept them, and their
ExecStart lines must be commands the CLI takes. (No systemd runs as PID 1 here;
what the units rely on, a clean exit 0 on SIGTERM, is tested in test_cli.)"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomhub.cli import _parser

README = Path(__file__).resolve().parent.parent / "README.md"
UNIT = re.compile(r"`/etc/systemd/system/(dicomhub-[a-z]+\.service)`:\n\n```ini\n(.*?)```", re.S)
INSTALLED = "/opt/dicomhub/.venv/bin/dicomhub"


def units() -> dict[str, str]:
    found = dict(UNIT.findall(README.read_text()))
    assert set(found) == {"dicomhub-hub.service", "dicomhub-watcher.service"}, sorted(found)
    return found


def test_the_units_start_commands_the_cli_takes() -> None:
    for name, text in units().items():
        [line] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
        program, *args = shlex.split(line.removeprefix("ExecStart="))
        assert program == INSTALLED, name
        parsed = _parser().parse_args(args)
        assert parsed.command == name.removeprefix("dicomhub-").removesuffix(".service") \
            .replace("watcher", "watch")
        assert parsed.log_format == "json" and parsed.config == "/etc/dicomhub/config.toml"


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    here = str(Path(sys.executable).parent / "dicomhub")  # an executable that exists
    paths = []
    for name, text in units().items():
        path = tmp_path / name
        path.write_text(text.replace(INSTALLED, here))
        paths.append(str(path))
    result = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr
