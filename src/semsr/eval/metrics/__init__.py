"""Image-quality metrics, named and oriented as the community IQA toolbox spells them.

>>> from semsr.eval.metrics import get_metric, list_metrics
>>> psnry = get_metric("psnry")
>>> psnry(pred, gt, crop_border=4)          # pred, gt: (1, C, H, W) float in [0, 1]

``get_metric`` raises :class:`semsr.core.errors.UnavailableError` (with the reason)
when a metric's weights are missing. Deep metrics take ``weights_dir=`` (else
``SEMSR_WEIGHTS``/:func:`semsr.core.paths.weights_dir`); see
:mod:`semsr.core.weights` for the files each one expects.

===========  ===============  ========  ============  ==========================================
name         better           gt        kind          notes
===========  ===============  ========  ============  ==========================================
psnr         higher           yes       pixel         RGB, 0-255
psnry        higher           yes       pixel         Y of MATLAB rgb2ycbcr (grey: as is)
ssim         higher           yes       pixel         Y, 11x11 Gaussian sigma 1.5 (MATLAB)
lpips        lower            yes       deep          AlexNet (``net="vgg"`` or ``lpips-vgg``)
lpips-vgg    lower            yes       deep          VGG16
dists        lower            yes       deep          VGG16 + L2 pooling
niqe         lower            no        pixel         MATLAB reference, pristine params
noise_sigma  lower            no        pixel         Y, skimage ``estimate_sigma`` (db2 wavelet MAD)
gmsd         lower            yes       pixel         Y, Xue et al. 2014 (``GMSD.m``), T = 170
ms-ssim      higher           yes       pixel         Y, Wang et al. 2003, 5 scales, >= 176x176
fid          lower            yes (set) distribution  ``compute_folders(a, b)``
clipiqa      higher           no        deep          transformers CLIP, "Good/Bad photo."
musiq        higher           no        deep          not implemented: UnavailableError
maniqa       higher           no        deep          not implemented: UnavailableError
===========  ===============  ========  ============  ==========================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from semsr.core.errors import SemsrError
from semsr.eval.metrics.base import Metric, MetricInfo
from semsr.eval.metrics.image import list_images, load_eval_image

__all__ = ["Metric", "MetricInfo", "get_metric", "list_metrics", "metric_info", "load_eval_image", "list_images"]


@dataclass(frozen=True)
class _Entry:
    info: MetricInfo
    target: str  # "module:Class"
    defaults: dict[str, Any] = field(default_factory=dict)


def _entry(name: str, higher: bool, gt: bool, kind: str, target: str, summary: str, **defaults: Any) -> _Entry:
    return _Entry(MetricInfo(name, higher, gt, kind, summary), f"semsr.eval.metrics.{target}", defaults)


_ENTRIES: dict[str, _Entry] = {
    e.info.name: e
    for e in (
        _entry("psnr", True, True, "pixel", "pixel:PSNR", "PSNR on RGB (dB)"),
        _entry("psnry", True, True, "pixel", "pixel:PSNRY", "PSNR on the MATLAB Y channel (dB)"),
        _entry("ssim", True, True, "pixel", "pixel:SSIM", "SSIM on the MATLAB Y channel"),
        _entry("lpips", False, True, "deep", "lpips:LPIPS", "LPIPS v0.1, AlexNet", net="alex"),
        _entry("lpips-vgg", False, True, "deep", "lpips:LPIPS", "LPIPS v0.1, VGG16", net="vgg"),
        _entry("dists", False, True, "deep", "dists:DISTS", "DISTS (VGG16, L2 pooling)"),
        _entry("niqe", False, False, "pixel", "niqe:NIQE", "NIQE on the MATLAB Y channel"),
        _entry("noise_sigma", False, False, "pixel", "structure:NoiseSigma", "wavelet MAD noise estimate of Y (0-255)"),
        _entry("gmsd", False, True, "pixel", "structure:GMSD", "Gradient Magnitude Similarity Deviation on Y"),
        _entry("ms-ssim", True, True, "pixel", "structure:MSSSIM", "multi-scale SSIM on Y (5 scales)"),
        _entry("fid", False, True, "distribution", "fid:FID", "Frechet Inception Distance between two sets"),
        _entry("clipiqa", True, False, "deep", "clipiqa:CLIPIQA", "CLIP-IQA prompt pair on a local CLIP"),
        _entry("musiq", True, False, "deep", "unavailable:MUSIQ", "MUSIQ (not implemented)"),
        _entry("maniqa", True, False, "deep", "unavailable:MANIQA", "MANIQA (not implemented)"),
    )
}


def list_metrics() -> list[MetricInfo]:
    """All known metrics (available or not), in table order."""
    return [e.info for e in _ENTRIES.values()]


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of ``name`` without building the metric."""
    return _lookup(name).info


def _lookup(name: str) -> _Entry:
    key = name.strip().lower()
    if key not in _ENTRIES:
        raise SemsrError(f"unknown metric {name!r}; known metrics: {', '.join(_ENTRIES)}")
    return _ENTRIES[key]


def get_metric(name: str, **opts: Any) -> Metric:
    """Build the metric ``name`` (options are passed to its constructor).

    Raises:
        SemsrError: unknown name.
        UnavailableError: weights (or the implementation) are missing; the
            message says which file was expected where.
    """
    entry = _lookup(name)
    module_name, cls_name = entry.target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**{**entry.defaults, **opts})
