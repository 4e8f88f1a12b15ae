"""Run-directory bookkeeping: full-state checkpoints and the JSON-lines log.

Layout of an output directory::

    config.yaml                 the resolved experiment config
    log.jsonl                   one JSON record per line ({"type": "train"|"val", "step": ...})
    curve.png                   training curve (semsr.train.curve)
    checkpoints/step_00000020/  accelerator.save_state(...) + trainer.json
    val/step_00000020.png       validation sample grids
    final/ (final_ema/)         trainable weights for inference

A checkpoint folder is written under a temporary name (:func:`staging_dir`,
known to every process) and moved into place when complete
(:func:`commit_checkpoint`, through :func:`semsr.core.io.atomic_move`), so a
kill during saving never leaves a half checkpoint that ``--resume`` would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from semsr.core.io import atomic_move
from semsr.eval.atomic import write_text
from semsr.train.curve import read_log

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
MARKER = "trainer.json"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimiser steps."""
    return f"step_{step:08d}"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output/checkpoints`` as ``(step, folder)``, oldest first."""
    root = output / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = CHECKPOINT_RE.match(child.name)
            if m and (child / MARKER).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(output)
    return found[-1] if found else None


def staging_dir(output: Path, step: int, clear: bool = False) -> Path:
    """Temporary folder a checkpoint is written into before :func:`commit_checkpoint`.

    ``clear=True`` (main process only) removes leftovers of an interrupted save.
    """
    path = output / "checkpoints" / f".tmp_{checkpoint_name(step)}"
    if clear and path.exists():
        shutil.rmtree(path)
    return path


def remove_staging_dirs(output: Path) -> None:
    """Delete leftovers of checkpoint saves that were interrupted (staging folders, replaced checkpoints)."""
    root = output / "checkpoints"
    if root.is_dir():
        for child in [*root.glob(".tmp_step_*"), *root.glob(".step_*.old.*")]:
            shutil.rmtree(child, ignore_errors=True)


def commit_checkpoint(output: Path, staging: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Mark ``staging`` complete, move it to its final name (replacing an older one) and prune old checkpoints."""
    write_text(staging / MARKER, json.dumps({"step": step, **meta}, indent=2) + "\n")
    final = atomic_move(staging, output / "checkpoints" / checkpoint_name(step))
    for _, old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class RunLog:
    """Append-only JSON-lines log; each record is flushed as soon as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
        if not self.path.is_file():
            return
        kept = [r for r in read_log(self.path) if int(r.get("step", 0)) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def records(self) -> list[dict[str, Any]]:
        """All records written so far."""
        return read_log(self.path)
