"""A prior store: every prior of every training image computed once, in one folder, read by training.

``semsr priors build`` writes it, training reads it (``data.priors: DIR``)::

    DIR/index.sqlite                 # one row per (image, prior): kind, text value, array file, meta
    DIR/arrays/<prior>/<h>.npy       # spatial / embedding values (numpy .npy, read memory-mapped)

An image is named by its file (:func:`image_id`: ``{data}/...`` under the data root, else the
absolute path), so an LR prior belongs to one fixed LR file (a pairs folder of ``semsr data
make-pairs``); LR images drawn on the fly by training have no file and hence no cached prior.
Values by kind: ``text`` in the row; ``tags`` as a JSON list in the row; ``spatial`` as ``uint8
(C, H, W)`` (the [0, 1] map times 255, rounded); ``embedding`` as ``float32`` of the provider's
shape without its batch dimension. Nothing is pickled (``np.load(..., allow_pickle=False)``).

Writes are safe for several processes on one file system (SQLite, WAL journal, a busy timeout);
an array file is written atomically before its row, so a row always has its data and a killed
run leaves at most unused files. :meth:`PriorStore.done` tells a resumed run what is finished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semsr.core.errors import SemsrError
from semsr.core.io import atomic_write
from semsr.core.paths import data_root
from semsr.core.wal import connect_wal
from semsr.priors.base import PriorResult

INDEX = "index.sqlite"
_SCHEMA = """CREATE TABLE IF NOT EXISTS priors (
    image TEXT NOT NULL, prior TEXT NOT NULL, kind TEXT NOT NULL, text TEXT, array TEXT, meta TEXT NOT NULL,
    PRIMARY KEY (image, prior))"""


def image_id(path: str | Path) -> str:
    """The store's name of an image file: ``{data}/REL`` under the data root, else its absolute path (a
    ``{data}/...`` name, as neighbour priors list them, is kept)."""
    if isinstance(path, str) and path.startswith("{data}/"):
        return path
    resolved = Path(path).expanduser().resolve()
    root = data_root()
    if root is not None:
        try:
            return "{data}/" + resolved.relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return resolved.as_posix()


class PriorStore:
    """The prior store in folder ``root`` (module docstring).

    Args:
        root: the store folder.
        create: make it when missing (``semsr priors build``); otherwise a missing store is a
            one-line error (training).
    """

    def __init__(self, root: str | Path, create: bool = False) -> None:
        self.root = Path(root).expanduser()
        index = self.root / INDEX
        if not create and not index.is_file():
            raise SemsrError("no prior store here (make it with: semsr priors build)", self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = connect_wal(index, _SCHEMA + ";")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> PriorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done(self, prior: str) -> set[str]:
        """The images that already have ``prior``."""
        return {r[0] for r in self.db.execute("SELECT image FROM priors WHERE prior = ?", (prior,))}

    def priors(self) -> dict[str, int]:
        """``{prior: number of images}`` in the store."""
        return dict(self.db.execute("SELECT prior, COUNT(*) FROM priors GROUP BY prior ORDER BY prior"))

    def put_many(self, rows: Iterable[tuple[str | Path, str, PriorResult]]) -> int:
        """Store ``(image file, prior name, result)`` rows in one transaction; returns how many."""
        records = []
        for image, prior, result in rows:
            name = image_id(image)
            text = array = None
            if result.kind == "text":
                text = str(result.value)
            elif result.kind == "tags":
                text = json.dumps(list(result.value))
            else:
                value = result.value.detach().float().cpu()[0]  # type: ignore[union-attr]
                arr = (
                    value.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
                    if result.kind == "spatial"
                    else value.numpy().astype(np.float32)
                )
                array = f"arrays/{prior}/{hashlib.sha1(name.encode()).hexdigest()}.npy"
                target = self.root / array
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(target) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
            records.append((name, prior, result.kind, text, array, json.dumps(dict(result.meta), default=str)))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO priors VALUES (?, ?, ?, ?, ?, ?)", records)
        return len(records)

    def _row(self, image: str | Path, prior: str) -> tuple[str, str | None, str | None]:
        row = self.db.execute(
            "SELECT kind, text, array FROM priors WHERE image = ? AND prior = ?", (image_id(image), prior)
        ).fetchone()
        if row is None:
            raise SemsrError(
                f"prior store {self.root} has no '{prior}' of this image (run semsr priors build for it)", image
            )
        return row

    def meta(self, image: str | Path, prior: str) -> dict[str, Any]:
        """The metadata the provider recorded with ``prior`` of ``image`` (one-line error when missing)."""
        self._row(image, prior)
        row = self.db.execute(
            "SELECT meta FROM priors WHERE image = ? AND prior = ?", (image_id(image), prior)
        ).fetchone()
        return dict(json.loads(row[0]))

    def text(self, image: str | Path, prior: str) -> str:
        """The ``text`` prior ``prior`` of ``image`` (one-line error when missing)."""
        kind, text, _ = self._row(image, prior)
        if kind != "text" or text is None:
            raise SemsrError(f"prior '{prior}' is a {kind} prior, not text", self.root)
        return text

    def tags(self, image: str | Path, prior: str) -> tuple[str, ...]:
        """The ``tags`` prior ``prior`` of ``image``."""
        kind, text, _ = self._row(image, prior)
        if kind != "tags" or text is None:
            raise SemsrError(f"prior '{prior}' is a {kind} prior, not tags", self.root)
        return tuple(json.loads(text))

    def array(self, image: str | Path, prior: str) -> np.ndarray:
        """The array of a spatial (``uint8 (C, H, W)``) or embedding (``float32``) prior, memory-mapped."""
        kind, _, array = self._row(image, prior)
        if array is None:
            raise SemsrError(f"prior '{prior}' is a {kind} prior, not an array", self.root)
        try:
            return np.load(self.root / array, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise SemsrError(f"cannot read the array of prior '{prior}' ({err})", self.root / array) from None

    def spatial(self, image: str | Path, prior: str) -> torch.Tensor:
        """A spatial prior as ``(C, H, W)`` float in [0, 1]."""
        arr = self.array(image, prior)
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise SemsrError(f"prior '{prior}' is not a spatial map", self.root)
        return torch.from_numpy(np.array(arr)).float().div(255)

    def describe(self) -> dict[str, Any]:
        """Counts per prior and the store's size on disk in bytes."""
        size = sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
        return {"priors": self.priors(), "bytes": size}
