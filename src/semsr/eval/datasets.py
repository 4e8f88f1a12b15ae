"""Benchmark datasets: resolve a name (``Set5``) or a folder path to a list of images.

Two kinds of sets exist:

- *ground-truth sets* (``has_gt=True``): the files are HR images; the
  benchmark makes their LR inputs with a degradation (see
  :mod:`semsr.eval.lrsets`) and full-reference metrics compare against them.
  Set5, Set14, B100, Urban100 and any plain folder path are of this kind.
- *LR-only sets* (``has_gt=False``): the files are real low-resolution
  photographs without ground truth (RealSRSet); they are upscaled as they are
  and only no-reference metrics apply.

Named sets live under :func:`semsr.core.paths.data_root` (``benchmarks/<name>``,
``real-lr/RealSRSet``). A folder path is taken as a ground-truth set; prefix it
with ``lr:`` to declare it LR-only (``lr:/photos/old-scans``), or ``hr:`` to be
explicit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from semsr.core.errors import SemsrError
from semsr.core.paths import data_root
from semsr.eval.metrics.image import list_images

# lower-case lookup name -> (display name, folder under data_root, has ground truth)
BUILTIN: dict[str, tuple[str, str, bool]] = {
    "set5": ("Set5", "benchmarks/Set5", True),
    "set14": ("Set14", "benchmarks/Set14", True),
    "b100": ("B100", "benchmarks/B100", True),
    "bsd100": ("B100", "benchmarks/B100", True),
    "urban100": ("Urban100", "benchmarks/Urban100", True),
    "realsrset": ("RealSRSet", "real-lr/RealSRSet", False),
}


@dataclass(frozen=True)
class Dataset:
    """A set of benchmark images.

    Attributes:
        name: display name used in tables (``"Set5"``, or the folder's name).
        root: the folder holding the images.
        has_gt: True when the files are ground-truth HR images.
        files: the image files, sorted by name.
    """

    name: str
    root: Path
    has_gt: bool
    files: tuple[Path, ...]

    @property
    def uid(self) -> str:
        """Stable identifier for caches: name plus a digest of the folder's absolute path."""
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"

    def limited(self, limit: int | None) -> Dataset:
        """The first ``limit`` images (all when ``limit`` is None)."""
        if limit is None:
            return self
        if limit < 1:
            raise SemsrError(f"--limit must be >= 1, got {limit}")
        return replace(self, files=self.files[:limit])


def _from_folder(name: str, folder: Path, has_gt: bool) -> Dataset:
    if not folder.is_dir():
        raise SemsrError("dataset folder not found", folder)
    files = tuple(list_images(folder))
    if not files:
        raise SemsrError("no images in dataset folder", folder)
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[0]
        raise SemsrError(f"two images share the name {dup!r} (different extensions)", folder)
    return Dataset(name=name, root=folder, has_gt=has_gt, files=files)


def resolve_dataset(spec: str, root: Path | None = None) -> Dataset:
    """Turn a dataset name or folder path into a :class:`Dataset`.

    Args:
        spec: a builtin name (case-insensitive: ``Set5``, ``Set14``, ``B100``,
            ``Urban100``, ``RealSRSet``), a folder path, or a folder path
            prefixed with ``lr:`` (LR-only) / ``hr:`` (ground truth).
        root: data root for builtin names (default :func:`semsr.core.paths.data_root`).

    Raises:
        SemsrError: unknown name, missing folder or folder without images.
    """
    spec = spec.strip()
    if not spec:
        raise SemsrError("empty dataset name")
    for prefix, has_gt in (("lr:", False), ("hr:", True)):
        if spec.lower().startswith(prefix):
            folder = Path(spec[len(prefix) :]).expanduser()
            return _from_folder(folder.resolve().name, folder, has_gt)
    entry = BUILTIN.get(spec.lower())
    if entry is not None:
        name, sub, has_gt = entry
        base = root if root is not None else data_root()
        if base is None:
            raise SemsrError(f"dataset {name} needs the data folder; set SEMSR_DATA", sub)
        return _from_folder(name, base / sub, has_gt)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _from_folder(folder.resolve().name, folder, True)
    known = ", ".join(sorted({v[0] for v in BUILTIN.values()}))
    raise SemsrError(f"unknown dataset (known: {known}; or give a folder path)", spec)


def parse_datasets(specs: str | list[str], root: Path | None = None) -> list[Dataset]:
    """Resolve a comma-separated string (or list) of dataset specs, keeping order."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    found: dict[str, Dataset] = {}
    for s in items:
        if s.strip():
            ds = resolve_dataset(s, root)
            found.setdefault(ds.uid, ds)  # the same set named twice runs once
    return list(found.values())
