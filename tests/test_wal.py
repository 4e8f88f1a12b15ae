"""SQLite files opened by several processes at once (the prior store, the bench results, manifests)."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from semsr.core import wal
from semsr.core.wal import connect_wal

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT);"


class _Flaky:
    """A connection whose script raises ``error`` the first ``failures`` times."""

    def __init__(self, failures: int, error: str) -> None:
        self.failures, self.error, self.calls, self.closed = failures, error, 0, False

    def executescript(self, script: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise sqlite3.OperationalError(self.error)

    def close(self) -> None:
        self.closed = True


def test_locked_switch_is_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    flaky = _Flaky(3, "database is locked")
    monkeypatch.setattr(wal.sqlite3, "connect", lambda *a, **k: flaky)
    assert connect_wal(tmp_path / "a.sqlite", SCHEMA) is flaky
    assert flaky.calls == 4 and not flaky.closed


def test_other_errors_and_a_lock_past_patience_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    flaky = _Flaky(1, "near 'CREAT': syntax error")
    monkeypatch.setattr(wal.sqlite3, "connect", lambda *a, **k: flaky)
    with pytest.raises(sqlite3.OperationalError, match="syntax"):
        connect_wal(tmp_path / "a.sqlite", SCHEMA)
    assert flaky.calls == 1 and flaky.closed
    stuck = _Flaky(10**6, "database is locked")
    monkeypatch.setattr(wal.sqlite3, "connect", lambda *a, **k: stuck)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        connect_wal(tmp_path / "b.sqlite", SCHEMA, patience=0.2)
    assert stuck.closed


def _open_and_write(path: str, start: Any, results: Any, i: int) -> None:
    start.wait()
    try:
        db = connect_wal(path, SCHEMA)
        with db:
            db.execute("INSERT INTO t VALUES (?, ?)", (str(i), "x"))
        db.close()
        results.put("")
    except sqlite3.Error as err:
        results.put(str(err))


def test_processes_opening_a_new_file_together(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for round_ in range(4):
        path = str(tmp_path / f"r{round_}.sqlite")
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open_and_write, args=(path, start, results, i)) for i in range(6)]
        for proc in procs:
            proc.start()
        start.set()
        assert [results.get(timeout=60) for _ in procs] == [""] * 6
        for proc in procs:
            proc.join(timeout=60)
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 6
