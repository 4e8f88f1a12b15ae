"""Hand-crafted metrics that punish added grain as well as blur: ``noise_sigma``, ``gmsd`` and ``ms-ssim``.

All three work on the Y channel of MATLAB ``rgb2ycbcr`` in [0, 255] (grey images: the grey values), computed
in float64 as PSNR-Y measures it (:func:`semsr.ops.color.y_channel_255`: RGB rounded to 8 bits, Y rounded like
MATLAB's ``uint8`` result, when ``quantize=True``).

- ``noise_sigma`` (no reference, lower is better): Donoho's wavelet estimate of the standard deviation of
  additive Gaussian noise, as ``skimage.restoration.estimate_sigma`` computes it for one channel: the diagonal
  detail coefficients ``dd`` of a one-level 2-D ``db2`` DWT (PyWavelets ``dwtn``, ``mode='symmetric'``), zeros
  removed, ``median(|dd|) / Phi^-1(0.75)``. Reported in 8-bit grey levels of Y.
- ``gmsd`` (full reference, lower is better): Gradient Magnitude Similarity Deviation (Xue, Zhang, Mou & Bovik,
  IEEE TIP 2014), after the authors' ``GMSD.m``: 2x2 average filter and downsampling by 2, Prewitt gradients
  (``[1 0 -1]/3`` kernels, zero-padded ``'same'`` filtering), ``GMS = (2 m1 m2 + T) / (m1^2 + m2^2 + T)`` with
  ``T = 170``, score = standard deviation (N - 1) of the GMS map. 0 for identical images.
- ``ms-ssim`` (full reference, higher is better): multi-scale SSIM (Wang, Simoncelli & Bovik, Asilomar 2003)
  with the paper's five weights, the SSIM window of :mod:`semsr.eval.metrics.pixel` (11x11 Gaussian, sigma 1.5,
  ``'valid'``), K = (0.01, 0.03), L = 255 and 2x2 average downsampling between scales (as the authors' ``msssim.m``);
  contrast-structure terms at every scale, luminance at the coarsest. Needs at least 176x176 pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from semsr.core.errors import InputError
from semsr.eval.metrics.base import Metric
from semsr.eval.metrics.pixel import _filter_valid, gaussian_kernel_1d
from semsr.ops.color import y_channel_255

# Daubechies-2 analysis high-pass filter as PyWavelets lists it (``pywt.Wavelet('db2').dec_hi``)
_S3 = math.sqrt(3.0)
DB2_DEC_HI = np.array([-(1 + _S3), 3 + _S3, -(3 - _S3), 1 - _S3], dtype=np.float64) / (4 * math.sqrt(2.0))
# Phi^-1(0.75): the median absolute value of a standard normal variable
NORM_PPF_075 = 0.6744897501960817
GMSD_T = 170.0
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _y(img: torch.Tensor, quantize: bool) -> np.ndarray:
    """``(1, C, H, W)`` in [0, 1] -> ``(H, W)`` float64 Y in [0, 255]."""
    y = y_channel_255(img.detach().cpu(), quantize)
    return y.to(torch.float64).reshape(y.shape[-2:]).numpy()


def dwt_detail_dd(x: np.ndarray, dec_hi: np.ndarray = DB2_DEC_HI) -> np.ndarray:
    """Diagonal detail ``dd`` of a one-level 2-D DWT of ``(H, W)`` (PyWavelets ``dwtn``, symmetric mode).

    Returns ``(floor((H + F - 1) / 2), floor((W + F - 1) / 2))`` for a filter of length F.
    """
    return _dwt_hi(_dwt_hi(x, dec_hi, 0), dec_hi, 1)


def _dwt_hi(x: np.ndarray, f: np.ndarray, axis: int) -> np.ndarray:
    """PyWavelets' ``downsampling_convolution`` with half-sample symmetric extension along ``axis``.

    ``out[j] = sum_t f[t] x[2j + 1 - t]`` for ``j < (n + len(f) - 1) // 2``, with ``x[-1 - i] = x[i]`` and
    ``x[n + i] = x[n - 1 - i]`` (periodically for signals shorter than the filter).
    """
    n, k = x.shape[axis], len(f)
    count = (n + k - 1) // 2
    out = np.zeros(x.shape[:axis] + (count,) + x.shape[axis + 1 :], dtype=np.float64)
    base = 2 * np.arange(count) + 1
    for t, ft in enumerate(f):
        m = np.mod(base - t, 2 * n)
        m = np.where(m >= n, 2 * n - 1 - m, m)
        out += ft * np.take(x, m, axis=axis)
    return out


def estimate_noise_sigma(y: np.ndarray) -> float:
    """Wavelet MAD noise estimate of a 2-D array (``skimage.restoration.estimate_sigma`` for one channel).

    Returns 0.0 when every detail coefficient is zero (a flat or piecewise-flat image).
    """
    dd = dwt_detail_dd(np.asarray(y, dtype=np.float64))
    dd = dd[np.nonzero(dd)]
    if dd.size == 0:
        return 0.0
    return float(np.median(np.abs(dd)) / NORM_PPF_075)


def gmsd_255(a: np.ndarray, b: np.ndarray, t: float = GMSD_T) -> float:
    """GMSD of two ``(H, W)`` float64 images in [0, 255] (``GMSD.m``); 0 when identical."""
    maps = []
    prewitt = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0
    for x in (a, b):
        # conv2(x, ones(2)/4, 'same') then x(1:2:end, 1:2:end): mean of x[i:i+2, j:j+2], zero beyond the edge
        avg = ndimage.correlate(x, np.full((2, 2), 0.25), mode="constant", origin=(-1, -1))[::2, ::2]
        gx = ndimage.correlate(avg, prewitt, mode="constant")
        gy = ndimage.correlate(avg, prewitt.T, mode="constant")
        maps.append(np.sqrt(gx * gx + gy * gy))
    m1, m2 = maps
    gms = (2 * m1 * m2 + t) / (m1 * m1 + m2 * m2 + t)
    return float(np.std(gms, ddof=1))


def ms_ssim_255(a: np.ndarray, b: np.ndarray, weights: tuple[float, ...] = MSSSIM_WEIGHTS) -> float:
    """MS-SSIM of two ``(H, W)`` float64 images in [0, 255] (1 when identical)."""
    need = 11 * 2 ** (len(weights) - 1)
    if min(a.shape) < need:
        raise InputError(f"ms-ssim needs images of at least {need}x{need} pixels, got {a.shape[1]}x{a.shape[0]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = gaussian_kernel_1d(11, 1.5)
    out = 1.0
    for i, w in enumerate(weights):
        mu1, mu2, e11, e22, e12 = _filter_valid(np.stack([a, b, a * a, b * b, a * b]), g)
        s11, s22, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
        cs = float(np.mean((2 * s12 + c2) / (s11 + s22 + c2)))
        if i == len(weights) - 1:
            lum = float(np.mean((2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1)))
            out *= (lum * cs) ** w if lum * cs > 0 else 0.0
        else:
            out *= max(cs, 0.0) ** w
            h, wd = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
            a = a[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
            b = b[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
    return out


class NoiseSigma(Metric):
    """No-reference wavelet noise estimate of Y in 8-bit levels (lower: less grain)."""

    name = "noise_sigma"
    higher_better = False
    needs_gt = False
    kind = "pixel"
    summary = "wavelet MAD noise estimate of Y (skimage estimate_sigma, 0-255)"

    def __init__(self, quantize: bool = True) -> None:
        self.quantize = quantize

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        return estimate_noise_sigma(_y(pred, self.quantize))


class _FullReferenceY(Metric):
    """A full-reference score of the Y channels (0-255) of ``pred`` and ``gt`` (``(1, 3, H, W)`` in [0, 1])."""

    needs_gt = True
    kind = "pixel"

    def __init__(self, quantize: bool = True) -> None:
        self.quantize = quantize

    @staticmethod
    def score(pred_y: np.ndarray, gt_y: np.ndarray) -> float:
        """The metric of two ``(H, W)`` float64 Y images in 0-255."""
        raise NotImplementedError

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        assert gt is not None
        return self.score(_y(pred, self.quantize), _y(gt, self.quantize))


class GMSD(_FullReferenceY):
    """Gradient Magnitude Similarity Deviation on Y (lower is better; rises with blur and with grain)."""

    name = "gmsd"
    higher_better = False
    summary = "GMSD on Y (Xue et al. 2014, T=170)"
    score = staticmethod(gmsd_255)


class MSSSIM(_FullReferenceY):
    """Multi-scale SSIM on Y (higher is better; images of at least 176x176)."""

    name = "ms-ssim"
    higher_better = True
    summary = "MS-SSIM on Y (Wang et al. 2003, 5 scales)"
    score = staticmethod(ms_ssim_255)
