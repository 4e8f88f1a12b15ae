"""One identity for model files: :func:`fingerprint`, used by every cache key that depends on weights."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from semsr.core.errors import InputError

#: Files up to this size are hashed whole; larger ones by size plus their first and last MiB.
WHOLE_FILE_BYTES = 64 << 20
_CHUNK = 1 << 20
# (resolved path, size, mtime_ns) -> digest of one file; each file is read once per process
_MEMO: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-1 of a file's content (files above :data:`WHOLE_FILE_BYTES`: of its size, first and last MiB)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        digest = hashlib.sha1(str(st.st_size).encode())
        with open(path, "rb") as fh:
            if st.st_size <= WHOLE_FILE_BYTES:
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    digest.update(chunk)
            else:
                digest.update(fh.read(_CHUNK))
                fh.seek(st.st_size - _CHUNK)
                digest.update(fh.read(_CHUNK))
        _MEMO[key] = digest.hexdigest()
    return _MEMO[key]


def _files(root: Path) -> list[tuple[str, Path]]:
    if root.is_dir():
        return [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    return [(root.name, root)]


def fingerprint(paths: Iterable[str | Path | None], length: int = 16) -> str:
    """Hex digest over the files under ``paths`` (files or folders; ``None`` entries skipped).

    Each file counts with its name relative to its root, its size and its
    content (:func:`file_digest`); a path that does not exist counts as missing,
    so adding the file later changes the fingerprint.
    """
    digest = hashlib.sha1()
    for root in paths:
        if root is None:
            continue
        root = Path(root).expanduser()
        digest.update(f"root\0{root.name}\n".encode())
        for rel, path in sorted(_files(root)):
            if path.is_file():
                digest.update(f"{rel}\0{file_digest(path)}\n".encode())
            else:
                digest.update(f"{rel}\0missing\n".encode())
    return digest.hexdigest()[:length]


def image_key(image: torch.Tensor) -> str:
    """Content hash of ``image`` ``(1, 3, H, W)`` in [0, 1] (hex SHA-256).

    The image is quantised to 16 bits first, so the same 8- or 16-bit file read
    by different loaders (or on different devices/dtypes) gets the same key.
    """
    if not (
        isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[:2] == (1, 3) and image.is_floating_point()
    ):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"a prior provider takes one RGB image (1, 3, H, W) float in [0, 1], got {shape}")
    q = (image.detach().float().cpu().clamp(0, 1) * 65535.0).round().to(torch.int32).numpy().astype("<u2")
    h = hashlib.sha256()
    h.update(repr(tuple(image.shape)).encode())
    h.update(q.tobytes())
    return h.hexdigest()
