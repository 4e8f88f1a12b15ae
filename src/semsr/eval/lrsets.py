"""LR inputs for benchmarks: made once per (dataset, degradation, scale, seed), cached on disk.

Degradations:

- ``bicubic``: the classic protocol. The HR image is cropped (bottom/right) to
  a multiple of ``scale`` and shrunk with MATLAB-compatible bicubic
  ``imresize`` (antialiased), then rounded to uint8.
- ``realesrgan``: the Real-ESRGAN second-order pipeline
  (:class:`semsr.data.degradations.RealESRGANDegradation`) applied to the same
  cropped HR with a fixed seed per image, derived from the dataset name, the
  file name and the run seed, so every method sees identical LR inputs.
- LR-only sets (no ground truth) are used as they are; their degradation is
  recorded as ``real``.

Layout under ``cache_dir()/lrsets/<dataset uid>/<degradation>-x<scale>-seed<seed>-<config digest>/``:
one ``<stem>.png`` per image and ``manifest.json`` recording the degradation,
its configuration, scale, seed and, per image, the source path, its SHA-256,
the per-image seed, the HR/LR sizes and the LR file's SHA-256. An image is
regenerated when its source hash changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import SemsrError
from semsr.core.paths import cache_dir
from semsr.data.degradations import DegradationConfig, RealESRGANDegradation
from semsr.data.degradations.pipeline import image_seed
from semsr.eval import atomic
from semsr.eval.datasets import Dataset
from semsr.eval.images import crop_to_multiple, quantize, to_uint8
from semsr.eval.metrics.base import as_rgb
from semsr.eval.metrics.image import load_eval_image
from semsr.ops.imresize import imresize

DEGRADATIONS = ("bicubic", "realesrgan")
REAL = "real"  # degradation label of LR-only sets
MANIFEST = "manifest.json"
_FORMAT = 1  # bump when the on-disk layout or the LR recipe changes


@dataclass(frozen=True)
class EvalImage:
    """One benchmark item.

    Attributes:
        name: file name in the dataset (``"baby.png"``).
        key: identity for result caches: stem plus the first 12 hex digits of
            the source file's SHA-256, so edited sources never reuse old results.
        lr_path: the uint8 LR input (PNG in the cache, or the file itself for LR-only sets).
        gt_path: the original HR file, or None for LR-only sets.
        grey: True when the source image is single-channel (evaluated on raw grey values).
    """

    name: str
    key: str
    lr_path: Path
    gt_path: Path | None
    grey: bool


@dataclass(frozen=True)
class LRSet:
    """The LR inputs of one dataset under one degradation and scale."""

    dataset: Dataset
    degradation: str
    scale: int
    seed: int
    uid: str
    images: tuple[EvalImage, ...]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_source(path: Path) -> torch.Tensor:
    """Read a dataset image as ``(1, C, H, W)`` float64 on the 8-bit grid; grey stays ``C = 1``."""
    return quantize(load_eval_image(path))


def load_gt(item: EvalImage, scale: int) -> torch.Tensor:
    """Ground truth of ``item``: ``(1, C, H', W')`` float64, cropped to multiples of ``scale``."""
    if item.gt_path is None:
        raise ValueError(f"{item.name} has no ground truth")
    return crop_to_multiple(load_source(item.gt_path), scale)


def load_lr(item: EvalImage) -> torch.Tensor:
    """LR input of ``item``: ``(1, C, h, w)`` float64 in [0, 1] (C = 1 for grey)."""
    return load_source(item.lr_path)


# --------------------------------------------------------------------------- degradations

Degrade = Callable[[torch.Tensor, int], torch.Tensor]
"""``(hr (1, C, H, W) float in [0, 1], image_seed) -> lr (1, C', H/s, W/s) float``."""


def _bicubic(scale: int) -> tuple[Degrade, dict[str, Any]]:
    def degrade(hr: torch.Tensor, _seed: int) -> torch.Tensor:
        # float64 in the 0-255 range, as MATLAB computes on uint8 images
        return imresize(hr.to(torch.float64) * 255.0, scale=1.0 / scale) / 255.0

    return degrade, {"kind": "bicubic", "imresize": "matlab", "antialias": True}


def _realesrgan(scale: int) -> tuple[Degrade, dict[str, Any]]:
    # No unsharp masking of the input: Real-ESRGAN sharpens its *training* GT
    # before degrading it, but a benchmark LR must be a degradation of the very
    # ground truth the outputs are compared with.
    model = RealESRGANDegradation(DegradationConfig(scale=scale, sharpen_input=False))

    def degrade(hr: torch.Tensor, seed: int) -> torch.Tensor:
        return model(as_rgb(hr).to(torch.float32), seed=seed)

    return degrade, {"kind": "realesrgan", "config": model.config.to_dict()}


def get_degradation(name: str, scale: int) -> tuple[Degrade, dict[str, Any]]:
    """The degradation function and its JSON-able configuration (recorded in manifests)."""
    if scale < 1:
        raise SemsrError(f"scale must be a positive integer, got {scale}")
    if name == "bicubic":
        return _bicubic(scale)
    if name == "realesrgan":
        return _realesrgan(scale)
    raise SemsrError(f"unknown degradation {name!r} (choose from {', '.join(DEGRADATIONS)})")


# --------------------------------------------------------------------------- LR sets


def _config_digest(config: dict[str, Any]) -> str:
    blob = json.dumps({"format": _FORMAT, **config}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare(dataset: Dataset, degradation: str, scale: int, seed: int = 0) -> LRSet:
    """Return the LR set of ``dataset``, making missing or stale LR images first.

    Args:
        dataset: the dataset (use :meth:`Dataset.limited` to restrict it).
        degradation: ``"bicubic"`` or ``"realesrgan"``; ignored for LR-only sets.
        scale: integer scale factor.
        seed: run seed (only the ``realesrgan`` degradation is random).
    """
    hashes = {p.name: file_sha256(p) for p in dataset.files}
    if not dataset.has_gt:
        items = tuple(EvalImage(p.name, f"{p.stem}@{hashes[p.name][:12]}", p, None, _is_grey(p)) for p in dataset.files)
        uid = f"{dataset.uid}/{REAL}-x{scale}"
        return LRSet(dataset, REAL, scale, seed, uid, items)

    degrade, config = get_degradation(degradation, scale)
    sub = f"{degradation}-x{scale}-seed{seed}-{_config_digest(config)}"
    folder = cache_dir() / "lrsets" / dataset.uid / sub
    manifest_path = folder / MANIFEST
    manifest = _read_manifest(manifest_path) or {}
    entries: dict[str, Any] = dict(manifest.get("images", {}))
    changed = False
    items = []
    for path in dataset.files:
        lr_file = folder / f"{path.stem}.png"
        entry = entries.get(path.name)
        if entry is None or entry.get("source_sha256") != hashes[path.name] or not lr_file.is_file():
            entry = _make_lr(path, lr_file, degrade, scale, image_seed(seed, f"{dataset.name}/{path.name}"))
            entry["source_sha256"] = hashes[path.name]
            entries[path.name] = entry
            changed = True
        items.append(EvalImage(path.name, f"{path.stem}@{hashes[path.name][:12]}", lr_file, path, entry["grey"]))
    if changed or not manifest_path.is_file():
        atomic.write_json(
            manifest_path,
            {
                "format": _FORMAT,
                "dataset": dataset.name,
                "source_root": str(dataset.root.resolve()),
                "degradation": degradation,
                "degradation_config": config,
                "scale": scale,
                "seed": seed,
                "images": dict(sorted(entries.items())),
            },
        )
    return LRSet(dataset, degradation, scale, seed, f"{dataset.uid}/{sub}", tuple(items))


def _is_grey(path: Path) -> bool:
    return load_eval_image(path).shape[1] == 1


def _make_lr(src: Path, dst: Path, degrade: Degrade, scale: int, img_seed: int) -> dict[str, Any]:
    hr = crop_to_multiple(load_source(src), scale)
    h, w = hr.shape[-2:]
    if h < scale or w < scale:
        raise SemsrError(f"image smaller than the scale factor {scale}", src)
    lr = degrade(hr, img_seed)
    if tuple(lr.shape[-2:]) != (h // scale, w // scale):
        raise RuntimeError(f"degradation returned {tuple(lr.shape)} for HR {h}x{w} at x{scale}")
    arr = to_uint8(lr)
    atomic.write_png(dst, arr)
    return {
        "source": str(src.resolve()),
        "lr": dst.name,
        "lr_sha256": file_sha256(dst),
        "seed": img_seed,
        "hr_size": [h, w],
        "lr_size": [h // scale, w // scale],
        "grey": hr.shape[1] == 1,
    }
