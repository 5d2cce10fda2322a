"""Logging that keeps patient data out.

dicomhub's own messages carry UIDs and counts only. Some libraries log more at
debug level: watchdog logs file paths (folder names often hold patient names),
aiosqlite logs SQL parameters (patient IDs). Those loggers are held at WARNING
whatever level the user asks for.
"""

from __future__ import annotations

import logging

PHI_UNSAFE = ("watchdog", "aiosqlite", "websockets", "pynetdicom")  # pynetdicom dumps data sets


def keep_phi_out() -> None:
    for name in PHI_UNSAFE:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
