"""A persistent reference database of HR images: FAISS vectors + SQLite metadata.

On disk a database is one folder::

    DB/meta.sqlite    images(vid, path, sha256 UNIQUE, width, height, caption) + meta(key, value)
    DB/vectors.f32    raw float32 rows, row ``vid`` = image ``vid`` (append-only, read memory-mapped)
    DB/index.faiss    FAISS index over the rows (ids = row numbers)

- Vectors are unit-norm embeddings (:mod:`.embedders`), so the inner product is
  the cosine similarity.
- Index kind ``auto`` picks exact ``IndexFlatIP`` up to ``FLAT_MAX`` vectors,
  HNSW (``IndexHNSWFlat``, inner product) up to ``HNSW_MAX``, IVF-PQ beyond;
  ``flat``/``hnsw``/``ivfpq`` force a kind. With ``auto`` the kind is
  re-evaluated when images are added, and the index is rebuilt from
  ``vectors.f32`` when the size crosses a threshold.
- De-duplication is by SHA-256 of the file bytes: adding a file whose content
  is already in the database (under any path) is a no-op.
- Reading opens the index with ``faiss.IO_FLAG_MMAP`` and the raw vectors with
  ``numpy.memmap``, so databases larger than RAM can be searched (the OS pages
  them in); IVF-PQ keeps only compact codes in any case.
- Building can be split into shards (separate processes or machines, each a
  full database over ``files[rank::world]``) merged by :func:`merge_databases`.

Writes are crash-tolerant: vectors are appended and flushed before the SQLite
commit, the index is written to a temporary file and renamed; on opening for
writing, surplus vector rows (from an interrupted add) are cut off and an index
whose size disagrees with the metadata is rebuilt.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semsr.core.errors import InputError, SemsrError
from semsr.core.io import IMAGE_EXTENSIONS, atomic_write, read_image

FLAT_MAX = 50_000
HNSW_MAX = 1_000_000
KINDS = ("auto", "flat", "hnsw", "ivfpq")
META_DB, VECTORS, INDEX = "meta.sqlite", "vectors.f32", "index.faiss"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    vid INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    caption TEXT
);
"""


@dataclass
class Entry:
    """Metadata of one database image (``vid`` = its row in the vector file)."""

    vid: int
    path: str
    sha256: str
    width: int
    height: int
    caption: str | None = None


@dataclass
class Hit:
    """One search result: the entry and its cosine similarity to the query."""

    entry: Entry
    score: float
    rank: int

    def as_dict(self) -> dict:
        e = self.entry
        return {
            "rank": self.rank,
            "score": round(float(self.score), 6),
            "path": e.path,
            "sha256": e.sha256,
            "width": e.width,
            "height": e.height,
            "caption": e.caption,
            "id": e.vid,
        }


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def choose_kind(n: int, kind: str = "auto") -> str:
    """Resolve ``auto`` to ``flat``/``hnsw``/``ivfpq`` for ``n`` vectors."""
    if kind not in KINDS:
        raise SemsrError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind != "auto":
        return kind
    return "flat" if n <= FLAT_MAX else "hnsw" if n <= HNSW_MAX else "ivfpq"


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of ``dim`` not above 64 (PQ needs ``dim % m == 0``)."""
    return max(m for m in range(1, min(64, dim) + 1) if dim % m == 0)


def build_faiss_index(vectors: np.ndarray, kind: str):  # -> faiss.Index
    """A FAISS inner-product index of ``kind`` over ``vectors (N, D) float32`` (rows added in order)."""
    import faiss  # optional heavy dependency

    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    elif kind == "ivfpq":
        if n < 64:
            raise SemsrError(f"an IVF-PQ index needs at least 64 vectors to train, have {n}; use --kind flat")
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        nbits = 8 if n >= 256 * 39 else max(4, min(8, int(math.log2(n // 4))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, _pq_subquantizers(dim), nbits, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(n, 100_000), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    else:
        raise SemsrError(f"unknown index kind {kind!r}")
    for start in range(0, n, 65_536):  # chunked so a memory-mapped matrix is paged in piecewise
        index.add(np.ascontiguousarray(vectors[start : start + 65_536], dtype=np.float32))
    return index


def index_kind(index) -> str:
    """``flat`` | ``hnsw`` | ``ivfpq``: the kind of a FAISS index."""
    import faiss  # optional heavy dependency

    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivfpq"
    return "flat"


class ReferenceDB:
    """A reference database folder (see module docstring).

    Args:
        folder: database folder.
        create: create it when missing (with ``embedder`` and ``kind``).
        embedder: embedder spec string (required when creating).
        kind: ``auto`` | ``flat`` | ``hnsw`` | ``ivfpq`` (when creating; later
            changed with :meth:`set_kind`).
    """

    def __init__(
        self, folder: str | Path, *, create: bool = False, embedder: str | None = None, kind: str = "auto"
    ) -> None:
        self.folder = Path(folder).expanduser()
        if not (self.folder / META_DB).is_file():
            if not create:
                raise InputError(
                    "not a reference database (no meta.sqlite); create it with `semsr index build`", self.folder
                )
            if embedder is None:
                raise SemsrError("an embedder is needed to create a database")
            choose_kind(0, kind)
            self.folder.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.folder / META_DB)
        self.conn.executescript(_SCHEMA)
        if self.meta("embedder") is None:
            if embedder is None:
                raise InputError("database has no embedder recorded", self.folder)
            self._set_meta(embedder=embedder, kind=kind)
            self.conn.commit()
        elif embedder is not None and embedder != self.meta("embedder"):
            raise SemsrError(
                f"database was built with embedder {self.meta('embedder')!r}, not {embedder!r}", self.folder
            )
        self._index = None
        self._dim: int | None = int(self.meta("dim")) if self.meta("dim") else None

    # ------------------------------------------------------------------ metadata

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, **values: object) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [(k, str(v)) for k, v in values.items()]
        )

    @property
    def embedder_spec(self) -> str:
        return str(self.meta("embedder"))

    @property
    def dim(self) -> int | None:
        return self._dim

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def has_hash(self, sha: str) -> bool:
        return self.conn.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone() is not None

    def entries(self, vids: Iterable[int] | None = None) -> list[Entry]:
        """Entries in ``vid`` order (all, or those listed)."""
        cols = "vid, path, sha256, width, height, caption"
        if vids is None:
            rows = self.conn.execute(f"SELECT {cols} FROM images ORDER BY vid").fetchall()
            return [Entry(*r) for r in rows]
        wanted = [int(v) for v in vids]
        found = (
            {
                r[0]: Entry(*r)
                for r in self.conn.execute(
                    f"SELECT {cols} FROM images WHERE vid IN ({','.join('?' * len(wanted))})", wanted
                )
            }
            if wanted
            else {}
        )
        return [found[v] for v in wanted if v in found]

    def entry_by_hash(self, sha: str) -> Entry | None:
        r = self.conn.execute(
            "SELECT vid, path, sha256, width, height, caption FROM images WHERE sha256 = ?", (sha,)
        ).fetchone()
        return None if r is None else Entry(*r)

    # ------------------------------------------------------------------ vectors

    def vectors(self) -> np.ndarray:
        """All vectors, ``(N, D) float32``, memory-mapped read-only (empty array when none)."""
        n, path = len(self), self.folder / VECTORS
        if n == 0 or self._dim is None:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        return np.memmap(path, dtype=np.float32, mode="r", shape=(n, self._dim))

    def _truncate_surplus(self) -> None:
        path = self.folder / VECTORS
        if self._dim is None or not path.exists():
            return
        want = len(self) * self._dim * 4
        if path.stat().st_size > want:
            with open(path, "r+b") as f:
                f.truncate(want)

    def add_vectors(self, entries: Sequence[Entry], vectors: np.ndarray, *, update_index: bool = True) -> int:
        """Append ``entries`` with their ``vectors (N, D)``; entries whose hash is known are skipped.

        Returns the number actually added. Updates the FAISS index (rebuilding it
        when ``auto`` moves to another kind) unless ``update_index`` is false —
        then call :meth:`sync_index` after a batch of additions.
        """
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(entries), -1)
        if self._dim is None and len(entries):
            self._dim = int(vectors.shape[1])
            self._set_meta(dim=self._dim)
        if len(entries) and vectors.shape[1] != self._dim:
            raise SemsrError(f"vector size {vectors.shape[1]} differs from the database's {self._dim}", self.folder)
        self._truncate_surplus()
        keep, seen = [], set()
        for i, e in enumerate(entries):
            if e.sha256 in seen or self.has_hash(e.sha256):
                continue
            seen.add(e.sha256)
            keep.append(i)
        if not keep:
            self.conn.commit()
            return 0
        start = len(self)
        new = np.ascontiguousarray(vectors[keep])
        with open(self.folder / VECTORS, "ab") as f:
            f.write(new.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.conn.executemany(
            "INSERT INTO images(vid, path, sha256, width, height, caption) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (start + j, entries[i].path, entries[i].sha256, entries[i].width, entries[i].height, entries[i].caption)
                for j, i in enumerate(keep)
            ],
        )
        self.conn.commit()
        if update_index:
            self.sync_index()
        return len(keep)

    # ------------------------------------------------------------------ index

    def set_kind(self, kind: str) -> None:
        """Change the index kind (``auto`` included) and rebuild the index."""
        choose_kind(len(self), kind)
        self._set_meta(kind=kind)
        self.conn.commit()
        self.rebuild_index()

    def rebuild_index(self) -> None:
        """Rebuild ``index.faiss`` from the raw vectors."""
        if len(self) == 0:
            return
        kind = choose_kind(len(self), self.meta("kind") or "auto")
        self._write_index(build_faiss_index(self.vectors(), kind))

    def _write_index(self, index) -> None:
        import faiss  # optional heavy dependency

        with atomic_write(self.folder / INDEX) as tmp:
            faiss.write_index(index, str(tmp))
        self._index = None

    def sync_index(self) -> None:
        """Bring ``index.faiss`` up to date: add the rows it lacks, or rebuild it when the kind changed."""
        import faiss  # optional heavy dependency

        n = len(self)
        if n == 0:
            return
        kind = choose_kind(n, self.meta("kind") or "auto")
        path = self.folder / INDEX
        index = faiss.read_index(str(path)) if path.is_file() else None
        if index is None or index.ntotal > n or index_kind(index) != kind:
            self.rebuild_index()
            return
        if index.ntotal == n:
            return
        vecs = self.vectors()
        for start in range(index.ntotal, n, 65_536):
            index.add(np.ascontiguousarray(vecs[start : min(n, start + 65_536)]))
        self._write_index(index)

    def index(self):  # -> faiss.Index
        """The FAISS index, opened memory-mapped (read-only); rebuilt if stale or missing."""
        import faiss  # optional heavy dependency

        if self._index is not None:
            return self._index
        path = self.folder / INDEX
        if not path.is_file() or faiss.read_index(
            str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        ).ntotal != len(self):
            self._truncate_surplus()
            self.sync_index()
        self._index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        if isinstance(self._index, faiss.IndexIVF):
            self._index.nprobe = min(self._index.nlist, 16)
        elif isinstance(self._index, faiss.IndexHNSW):
            self._index.hnsw.efSearch = 64
        return self._index

    def check_dim(self, dim: int) -> None:
        """Raise :class:`SemsrError` unless the database's vectors have ``dim`` values (an empty one fits any).

        A database built by an older semsr with a CLIP folder that has a projection holds the projected
        embedding (e.g. 768 values for ViT-L/14) where the embedder now gives the CLS token (1024).
        """
        if self._dim is not None and int(dim) != self._dim:
            raise SemsrError(
                f"the database holds {self._dim}-d vectors but its embedder {self.embedder_spec} gives {int(dim)}-d "
                "ones (built by an older semsr?): rebuild it with `semsr index build`",
                self.folder,
            )

    def search(self, queries: np.ndarray, k: int = 4) -> list[list[Hit]]:
        """Top-``k`` entries for each query ``(Q, D)`` (unit vectors), best first."""
        if len(self) == 0:
            return [[] for _ in range(len(queries))]
        queries = np.asarray(queries, dtype=np.float32)
        self.check_dim(queries.shape[-1])
        q = np.ascontiguousarray(queries.reshape(-1, self._dim))
        scores, ids = self.index().search(q, min(k, len(self)))
        out = []
        for srow, irow in zip(scores, ids):
            valid = [(float(s), int(i)) for s, i in zip(srow, irow) if i >= 0]
            entries = self.entries([i for _, i in valid])
            out.append([Hit(e, s, r) for r, ((s, _), e) in enumerate(zip(valid, entries), start=1)])
        return out

    def info(self) -> dict:
        """Summary for ``semsr index info``."""
        n = len(self)
        idx_path = self.folder / INDEX
        kind_setting = self.meta("kind") or "auto"
        return {
            "path": str(self.folder),
            "images": n,
            "embedder": self.embedder_spec,
            "dim": self._dim,
            "kind_setting": kind_setting,
            "kind": index_kind(self.index()) if n else choose_kind(n, kind_setting),
            "captions": int(self.conn.execute("SELECT COUNT(*) FROM images WHERE caption IS NOT NULL").fetchone()[0]),
            "vector_bytes": (self.folder / VECTORS).stat().st_size if (self.folder / VECTORS).exists() else 0,
            "index_bytes": idx_path.stat().st_size if idx_path.exists() else 0,
        }

    def close(self) -> None:
        self._index = None
        self.conn.close()

    def __enter__(self) -> ReferenceDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- building from images


def read_caption(path: Path) -> str | None:
    """Caption of an image from a sidecar ``<stem>.txt`` next to it, if present."""
    side = path.with_suffix(".txt")
    if side.is_file():
        text = side.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    return None


def list_image_files(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted; :data:`~semsr.core.io.IMAGE_EXTENSIONS`), or ``[root]``
    for a file."""
    root = Path(root).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError("no such file or folder", root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_rgb(path: Path) -> torch.Tensor:
    """Read an image as ``(1, 3, H, W)`` float in [0, 1]."""
    rgb = read_image(path).rgb
    scale = 65535.0 if rgb.dtype == np.uint16 else 255.0
    return torch.from_numpy(rgb.astype(np.float32) / scale).permute(2, 0, 1).unsqueeze(0)


def add_images(
    db: ReferenceDB,
    files: Sequence[Path],
    embedder,
    *,
    batch: int = 16,
    on_error: Callable[[Path, Exception], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Embed and add ``files`` to ``db``, skipping content already present.

    Returns counts ``{"added", "duplicates", "failed"}``. Unreadable files are
    reported through ``on_error`` and skipped.
    """
    counts = {"added": 0, "duplicates": 0, "failed": 0}
    pending: list[Entry] = []
    vecs: list[np.ndarray] = []
    seen: set[str] = set()

    def flush() -> None:
        if pending:
            counts["added"] += db.add_vectors(pending, np.concatenate(vecs), update_index=False)
            pending.clear()
            vecs.clear()

    for i, path in enumerate(files):
        try:
            sha = file_sha256(path)
            if sha in seen or db.has_hash(sha):
                counts["duplicates"] += 1
                continue
            img = load_rgb(path)
            with torch.inference_mode():
                vec = embedder.embed(img).cpu().numpy()
        except (InputError, OSError) as err:
            counts["failed"] += 1
            if on_error is not None:
                on_error(path, err)
            continue
        seen.add(sha)
        pending.append(Entry(-1, str(path.resolve()), sha, int(img.shape[-1]), int(img.shape[-2]), read_caption(path)))
        vecs.append(vec)
        if len(pending) >= batch:
            flush()
        if progress is not None:
            progress(i + 1, len(files))
    flush()
    db.sync_index()
    return counts


def shard_files(files: Sequence[Path], rank: int, world: int) -> list[Path]:
    """The files shard ``rank`` of ``world`` handles (round-robin over the sorted list)."""
    if not 0 <= rank < world:
        raise SemsrError(f"shard rank {rank} is outside 0..{world - 1}")
    return list(files[rank::world])


def merge_databases(out: str | Path, shards: Sequence[str | Path], *, kind: str | None = None) -> dict[str, int]:
    """Merge shard databases into ``out`` (created if needed), de-duplicating by hash.

    All shards must share one embedder. Returns ``{"added", "duplicates"}``.
    """
    shard_dbs = [ReferenceDB(s) for s in shards]
    try:
        specs = {d.embedder_spec for d in shard_dbs}
        if len(specs) > 1:
            raise SemsrError(f"shards were built with different embedders: {', '.join(sorted(specs))}")
        spec = specs.pop() if specs else None
        with ReferenceDB(out, create=True, embedder=spec, kind=kind or "auto") as dst:
            if kind is not None:
                dst._set_meta(kind=kind)
            before = len(dst)
            total = 0
            for src in shard_dbs:
                entries, vecs = src.entries(), src.vectors()
                total += len(entries)
                for start in range(0, len(entries), 65_536):
                    dst.add_vectors(
                        entries[start : start + 65_536], np.asarray(vecs[start : start + 65_536]), update_index=False
                    )
            dst.sync_index()
            added = len(dst) - before
    finally:
        for d in shard_dbs:
            d.close()
    return {"added": added, "duplicates": total - added}
