"""Where semsr finds data, caches and user-provided weights.

All locations are overridable by environment variables so tests, CI and users
with unusual layouts can point semsr elsewhere:

- ``SEMSR_DATA``: benchmark/training data root (default: a folder
  ``shared/data`` beside the repository or the working folder, when there is one).
- ``SEMSR_CACHE``: cache for derived files (LR sets, priors, NIQE params);
  default ``~/.cache/semsr``.
- ``SEMSR_WEIGHTS``: folder with user-provided weights (LPIPS/DISTS backbones,
  Inception for FID, CLIP...); default ``<cache>/weights``.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = PACKAGE_DIR.parent.parent  # valid for editable/source checkouts only


def data_root() -> Path | None:
    """Return the data root, or ``None`` when no data folder can be found."""
    env = os.environ.get("SEMSR_DATA")
    if env:
        return Path(env).expanduser()
    for cand in (REPO_DIR.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def cache_dir() -> Path:
    """Return (and create) the cache folder."""
    env = os.environ.get("SEMSR_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "semsr"
    path.mkdir(parents=True, exist_ok=True)
    return path


def weights_dir() -> Path:
    """Return the folder where user-provided weights are looked up."""
    env = os.environ.get("SEMSR_WEIGHTS")
    return Path(env).expanduser() if env else cache_dir() / "weights"


def assets_dir() -> Path:
    """Return the folder of files shipped inside the package (weights, samples)."""
    return PACKAGE_DIR / "assets"
