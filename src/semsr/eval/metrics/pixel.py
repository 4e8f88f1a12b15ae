"""PSNR and SSIM with the conventions of the SR literature's MATLAB scripts.

- Images are measured as 8-bit images: values in [0, 255], the prediction
  rounded to integers first (``quantize=True``, as if saved to PNG).
- ``psnry`` and ``ssim`` use the Y channel of MATLAB ``rgb2ycbcr`` rounded to
  integers (MATLAB returns ``uint8``); grey images are used as they are
  (see :func:`semsr.ops.color.y_channel_255`).
- SSIM is Wang et al.'s ``ssim_index.m`` as used by the SR papers: 11x11
  Gaussian window with sigma 1.5, ``'valid'`` filtering, K = (0.01, 0.03),
  L = 255, no downsampling, mean of the SSIM map.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from semsr.core.errors import InputError
from semsr.eval.metrics.base import Metric
from semsr.ops.color import to_255, y_channel_255


def psnr_255(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two float tensors in [0, 255] (``inf`` when identical)."""
    mse = torch.mean((a.to(torch.float64) - b.to(torch.float64)) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@lru_cache(maxsize=4)
def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian ``(size,)`` float64 (MATLAB ``fspecial('gaussian')`` is its outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable ``'valid'`` filtering of ``(..., H, W)`` float64 with the symmetric 1-D kernel ``g``."""
    r = len(g) // 2
    out = ndimage.correlate1d(ndimage.correlate1d(x, g, axis=-2), g, axis=-1)
    return out[..., r : x.shape[-2] - r, r : x.shape[-1] - r]


def ssim_255(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of ``(C, H, W)`` (or ``(1, C, H, W)``) tensors in [0, 255], averaged over channels."""
    a = a.detach().to(torch.float64).reshape(-1, *a.shape[-2:]).cpu().numpy()
    b = b.detach().to(torch.float64).reshape(-1, *b.shape[-2:]).cpu().numpy()
    if min(a.shape[-2:]) < window:
        raise InputError(f"ssim needs images of at least {window}x{window} pixels, got {a.shape[-1]}x{a.shape[-2]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = gaussian_kernel_1d(window, sigma)
    # one batched filtering of the five moment images (float64, as MATLAB's filter2 on doubles)
    mu1, mu2, e11, e22, e12 = _filter_valid(np.stack([a, b, a * a, b * b, a * b]), g)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s11, s22, s12 = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s11 + s22 + c2))
    return float(ssim_map.mean(axis=(1, 2)).mean())


class PSNR(Metric):
    """PSNR on all channels (RGB, 0-255)."""

    name = "psnr"
    higher_better = True
    needs_gt = True
    kind = "pixel"
    summary = "PSNR on RGB (dB)"

    def __init__(self, quantize: bool = True) -> None:
        self.quantize = quantize

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        assert gt is not None
        return psnr_255(to_255(pred, self.quantize), to_255(gt, self.quantize))


class PSNRY(PSNR):
    """PSNR on the MATLAB Y channel (grey images: on the grey values)."""

    name = "psnry"
    summary = "PSNR on the Y channel of MATLAB rgb2ycbcr (dB)"

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        assert gt is not None
        return psnr_255(y_channel_255(pred, self.quantize), y_channel_255(gt, self.quantize))


class SSIM(Metric):
    """MATLAB-style SSIM, on the Y channel by default (``y_channel=False``: mean over RGB channels)."""

    name = "ssim"
    higher_better = True
    needs_gt = True
    kind = "pixel"
    summary = "SSIM on the Y channel (11x11 Gaussian, sigma 1.5)"

    def __init__(self, y_channel: bool = True, quantize: bool = True) -> None:
        self.y_channel = y_channel
        self.quantize = quantize

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        assert gt is not None
        conv = y_channel_255 if self.y_channel else to_255
        return ssim_255(conv(pred, self.quantize), conv(gt, self.quantize))
