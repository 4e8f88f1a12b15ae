"""SQLite files shared by several processes (``accelerate launch``): one way to open them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def connect_wal(path: str | Path, schema: str, timeout: float = 120.0, patience: float = 60.0) -> sqlite3.Connection:
    """Open the SQLite file ``path`` in WAL mode and run the ``schema`` script on it.

    Several processes opening one file at once is the normal case under ``accelerate launch``.
    Switching a file to WAL takes an exclusive lock that SQLite's busy ``timeout`` does not wait
    for, so the switch and the schema script are retried while another process holds it (for at
    most ``patience`` seconds); any other error is raised at once.
    """
    db = sqlite3.connect(path, timeout=timeout)
    deadline = time.monotonic() + patience
    while True:
        try:
            db.executescript("PRAGMA journal_mode=WAL;\n" + schema)
            return db
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.05)
