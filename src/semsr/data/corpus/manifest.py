"""SQLite manifest of a training corpus: images, provenance, licences and cached priors.

One file (``manifest.sqlite``) beside the corpus images holds:

- ``images``: one row per image, keyed by its *content hash* — where the file
  is (relative to the corpus folder), its size in pixels and bytes, which
  source/package/path (and container member) it came from, the package
  version, its licence and how that was determined, a split name and free JSON
  metadata;
- ``priors``: values extracted from an image (captions, quality text, tags,
  degradation labels, embeddings...), keyed by ``(content hash, prior name,
  provider version)`` so each prior is computed once per provider version.
  Values are JSON, raw bytes, or arrays/tensors stored as ``.npy`` bytes.

The content hash is :func:`semsr.core.fingerprint.image_key` (SHA-256 of the
16-bit-quantised pixels and shape), the same key the prior providers' on-disk
cache uses, so a file and the same pixels held in memory share their priors.

    with Manifest(out / "manifest.sqlite") as m:
        key = m.add_image(path="lxqt/fog.png", content_hash=h, width=w, height=h_, source="lxqt", ...)
        caption = m.get_prior(key, "caption")
        if caption is None:
            m.put_prior(key, "caption", "a foggy field", provider_version="blip2-1")

The database uses WAL journaling so several processes (e.g. data-loader
workers) can read while one writes.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semsr.core.fingerprint import image_key
from semsr.core.wal import connect_wal

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    content_hash TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    file_bytes INTEGER,
    source TEXT NOT NULL,
    package TEXT,
    package_version TEXT,
    path_in_package TEXT,
    member TEXT,
    source_bytes INTEGER,
    licence TEXT NOT NULL,
    licence_origin TEXT,
    split TEXT NOT NULL DEFAULT 'train',
    extra TEXT NOT NULL DEFAULT '{}',
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_source ON images(source);
CREATE TABLE IF NOT EXISTS priors (
    content_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    provider_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    value BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (content_hash, name, provider_version)
);
"""

_IMAGE_FIELDS = (
    "content_hash",
    "path",
    "width",
    "height",
    "file_bytes",
    "source",
    "package",
    "package_version",
    "path_in_package",
    "member",
    "source_bytes",
    "licence",
    "licence_origin",
    "split",
    "extra",
    "added",
)


def content_hash(image: torch.Tensor | np.ndarray) -> str:
    """Content hash of an image: a ``(1, 3, H, W)`` float tensor in [0, 1] or a uint8 ``(H, W, 3)`` array."""

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
        image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float() / 255.0
    return image_key(image)


def encode_value(value: Any) -> tuple[str, bytes]:
    """``value`` -> ``(kind, bytes)``: ``npy`` for arrays/tensors, ``bytes`` for bytes, else ``json``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return "npy", buf.getvalue()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes", bytes(value)
    return "json", json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")


def decode_value(kind: str, blob: bytes) -> Any:
    """Inverse of :func:`encode_value`."""
    if kind == "npy":
        return np.load(io.BytesIO(blob), allow_pickle=False)
    if kind == "bytes":
        return bytes(blob)
    if kind == "json":
        return json.loads(blob.decode("utf-8"))
    raise ValueError(f"unknown prior value kind {kind!r}")


@dataclass(frozen=True)
class ImageRecord:
    """One row of the ``images`` table."""

    content_hash: str
    path: str
    width: int
    height: int
    source: str
    licence: str
    file_bytes: int | None = None
    package: str | None = None
    package_version: str | None = None
    path_in_package: str | None = None
    member: str | None = None
    source_bytes: int | None = None
    licence_origin: str | None = None
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)
    added: float = 0.0


class Manifest:
    """A corpus manifest (created on first use).

    Args:
        path: the SQLite file.
        readonly: open an existing manifest without write access.
    """

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = connect_wal(self.path, _SCHEMA, timeout=30.0)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.db.commit()
        self.db.row_factory = sqlite3.Row

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ images
    def add_image(
        self,
        *,
        path: str,
        content_hash: str,
        width: int,
        height: int,
        source: str,
        licence: str,
        file_bytes: int | None = None,
        package: str | None = None,
        package_version: str | None = None,
        path_in_package: str | None = None,
        member: str | None = None,
        source_bytes: int | None = None,
        licence_origin: str | None = None,
        split: str = "train",
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Insert or replace the image with this content hash; returns the hash.

        ``path`` is relative to the corpus folder; ``path_in_package`` is the
        file inside the package (``member`` the entry inside a container file
        such as an ``.edj`` or ``.rcc``); ``source_bytes`` the size of the
        original file or entry, ``file_bytes`` that of the corpus file.
        """
        row = (
            content_hash,
            str(path),
            int(width),
            int(height),
            file_bytes,
            source,
            package,
            package_version,
            path_in_package,
            member,
            source_bytes,
            licence,
            licence_origin,
            split,
            json.dumps(extra or {}, sort_keys=True),
            time.time(),
        )
        self.db.execute(
            f"INSERT OR REPLACE INTO images ({', '.join(_IMAGE_FIELDS)}) VALUES "
            f"({', '.join('?' * len(_IMAGE_FIELDS))})",
            row,
        )
        self.db.commit()
        return content_hash

    @staticmethod
    def _record(row: sqlite3.Row) -> ImageRecord:
        d = dict(row)
        d["extra"] = json.loads(d["extra"])
        return ImageRecord(**d)

    def get_image(self, content_hash: str) -> ImageRecord | None:
        row = self.db.execute("SELECT * FROM images WHERE content_hash = ?", (content_hash,)).fetchone()
        return None if row is None else self._record(row)

    def update_licence(self, content_hash: str, licence: str, licence_origin: str | None) -> None:
        """Change the recorded licence of an image (provenance re-read without re-converting)."""
        self.db.execute(
            "UPDATE images SET licence = ?, licence_origin = ? WHERE content_hash = ?",
            (licence, licence_origin, content_hash),
        )
        self.db.commit()

    def find_path(self, path: str) -> ImageRecord | None:
        """The image stored at ``path`` (relative to the corpus folder), if any."""
        row = self.db.execute("SELECT * FROM images WHERE path = ?", (str(path),)).fetchone()
        return None if row is None else self._record(row)

    def images(self, source: str | None = None, split: str | None = None) -> list[ImageRecord]:
        """All images (optionally of one source / split), ordered by path."""
        sql, args = "SELECT * FROM images WHERE 1=1", []
        if source is not None:
            sql, args = sql + " AND source = ?", [*args, source]
        if split is not None:
            sql, args = sql + " AND split = ?", [*args, split]
        return [self._record(r) for r in self.db.execute(sql + " ORDER BY path", args)]

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def __contains__(self, content_hash: object) -> bool:
        return self.db.execute("SELECT 1 FROM images WHERE content_hash = ?", (content_hash,)).fetchone() is not None

    def remove_image(self, content_hash: str) -> None:
        """Delete an image row (its cached priors are kept: they depend only on the pixels)."""
        self.db.execute("DELETE FROM images WHERE content_hash = ?", (content_hash,))
        self.db.commit()

    # ------------------------------------------------------------------ priors
    def put_prior(self, content_hash: str, name: str, value: Any, provider_version: str = "") -> None:
        """Store (or replace) a prior value; see :func:`encode_value` for accepted types."""
        kind, blob = encode_value(value)
        self.db.execute(
            "INSERT OR REPLACE INTO priors VALUES (?, ?, ?, ?, ?, ?)",
            (content_hash, name, provider_version, kind, sqlite3.Binary(blob), time.time()),
        )
        self.db.commit()

    def get_prior(self, content_hash: str, name: str, provider_version: str = "") -> Any | None:
        """The cached value, or ``None`` when this prior was never stored for this version."""
        row = self.db.execute(
            "SELECT kind, value FROM priors WHERE content_hash = ? AND name = ? AND provider_version = ?",
            (content_hash, name, provider_version),
        ).fetchone()
        return None if row is None else decode_value(row["kind"], row["value"])

    def has_prior(self, content_hash: str, name: str, provider_version: str = "") -> bool:
        return (
            self.db.execute(
                "SELECT 1 FROM priors WHERE content_hash = ? AND name = ? AND provider_version = ?",
                (content_hash, name, provider_version),
            ).fetchone()
            is not None
        )

    def prior(self, content_hash: str, name: str, compute: Callable[[], Any], provider_version: str = "") -> Any:
        """Return the cached prior, computing and storing it with ``compute()`` the first time.

        The returned value is always the decoded stored one (so the first and
        later calls give equal results, e.g. tuples come back as lists).
        """
        row = self.db.execute(
            "SELECT kind, value FROM priors WHERE content_hash = ? AND name = ? AND provider_version = ?",
            (content_hash, name, provider_version),
        ).fetchone()
        if row is not None:
            return decode_value(row["kind"], row["value"])
        self.put_prior(content_hash, name, compute(), provider_version)
        return self.get_prior(content_hash, name, provider_version)

    def prior_names(self, content_hash: str) -> list[tuple[str, str]]:
        """``(name, provider_version)`` of every prior cached for an image."""
        return [
            (r["name"], r["provider_version"])
            for r in self.db.execute(
                "SELECT name, provider_version FROM priors WHERE content_hash = ? ORDER BY name, provider_version",
                (content_hash,),
            )
        ]

    def add_prior(self, record: Any) -> None:
        """:class:`semsr.priors.base.PriorSink` hook: remember where a provider cached a prior."""
        self.put_prior(
            record.image_key,
            record.provider,
            {"path": str(record.path), "kind": record.kind, "stored_by": "provider-cache"},
            provider_version=record.version,
        )

    # ------------------------------------------------------------------ reports
    def summary(self) -> dict[str, Any]:
        """Counts, pixels and bytes per source, licences, and prior counts (JSON-friendly)."""
        per_source = {}
        for r in self.db.execute(
            "SELECT source, COUNT(*) AS n, SUM(width * height) AS px, SUM(file_bytes) AS bytes, "
            "MIN(MIN(width, height)) AS min_side, MAX(MAX(width, height)) AS max_side, "
            "GROUP_CONCAT(DISTINCT package) AS packages FROM images GROUP BY source ORDER BY source"
        ):
            per_source[r["source"]] = {
                "images": r["n"],
                "megapixels": round((r["px"] or 0) / 1e6, 2),
                "bytes": r["bytes"] or 0,
                "min_side": r["min_side"],
                "max_side": r["max_side"],
                "packages": r["packages"],
                "licences": {
                    lr["licence"]: lr["n"]
                    for lr in self.db.execute(
                        "SELECT licence, COUNT(*) AS n FROM images WHERE source = ? GROUP BY licence ORDER BY n DESC",
                        (r["source"],),
                    )
                },
            }
        priors = {
            f"{r['name']}@{r['provider_version']}": r["n"]
            for r in self.db.execute(
                "SELECT name, provider_version, COUNT(*) AS n FROM priors GROUP BY name, provider_version"
            )
        }
        return {"images": len(self), "sources": per_source, "priors": priors}

    def iter_paths(self, root: str | Path) -> Iterator[Path]:
        """Absolute paths of all images given the corpus folder ``root``."""
        root = Path(root)
        for rec in self.images():
            yield root / rec.path
