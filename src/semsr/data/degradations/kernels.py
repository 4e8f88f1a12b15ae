"""Blur kernels of the Real-ESRGAN degradation model, and a batched 2-D filter.

Every kernel is a ``(K, K)`` float64 numpy array (``K`` odd) that sums to 1.
The Gaussian family is written with a rotated covariance
``Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T`` and the quadratic
form ``q(p) = p^T Sigma^-1 p`` over integer offsets ``p`` from the centre:

- Gaussian:              ``exp(-q / 2)``
- generalised Gaussian:  ``exp(-q^beta / 2)``   (beta < 1: heavy tails, > 1: flat top)
- plateau:               ``1 / (1 + q^beta)``

The "isotropic" variants use ``sigma_y = sigma_x`` and ``theta = 0``. The sinc
kernel is the ideal circular low-pass filter with cut-off ``omega_c`` (radians
per pixel, pi = Nyquist) truncated to ``K x K``; it produces ringing.

:func:`sample_kernel` draws one kernel the way Real-ESRGAN's data loader does
(random odd size 7..K, sinc with some probability, otherwise one of the six
Gaussian-family kernels), and :func:`filter2d` applies per-image kernels to a
batch with reflect padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special
from scipy.fft import next_fast_len

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """``(K, K)`` values of ``p^T Sigma^-1 p`` for the rotated covariance (x = column offset)."""
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigmas must be positive, got {sigma_x}, {sigma_y}")
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)  # xx varies along columns
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def _normalise(kernel: np.ndarray) -> np.ndarray:
    return kernel / kernel.sum()


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """Anisotropic (or, with ``sigma_y=None``, isotropic) Gaussian kernel ``(size, size)``."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return _normalise(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> np.ndarray:
    """Generalised Gaussian ``exp(-q^beta / 2)``; ``beta = 1`` is the Gaussian."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalise(np.exp(-0.5 * np.power(q, beta)))


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> np.ndarray:
    """Plateau-shaped kernel ``1 / (1 + q^beta)``."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    return _normalise(1.0 / (np.power(q, beta) + 1.0))


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """Circular low-pass (2-D "sinc", jinc) kernel with cut-off ``omega_c`` in (0, pi].

    The ideal filter's impulse response is ``omega_c J1(omega_c r) / (2 pi r)``
    with the limit ``omega_c^2 / (4 pi)`` at ``r = 0``; it is truncated to
    ``(size, size)`` and renormalised to sum 1.
    """
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    ax = np.arange(size, dtype=np.float64) - size // 2
    r = np.hypot(*np.meshgrid(ax, ax))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * special.j1(omega_c * r) / (2.0 * np.pi * r)
    k[size // 2, size // 2] = omega_c**2 / (4.0 * np.pi)
    return _normalise(k)


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a centred odd ``(k, k)`` kernel to ``(size, size)``."""
    k = kernel.shape[0]
    if k > size or (size - k) % 2:
        raise ValueError(f"cannot pad a {k}x{k} kernel to {size}x{size}")
    p = (size - k) // 2
    return np.pad(kernel, ((p, p), (p, p)))


def identity_kernel(size: int) -> np.ndarray:
    """The pulse kernel (no blur)."""
    k = np.zeros((size, size))
    k[size // 2, size // 2] = 1.0
    return k


@dataclass(frozen=True)
class KernelSpec:
    """Everything needed to rebuild one sampled kernel (also a degradation label).

    ``kind`` is one of :data:`KERNEL_TYPES`, ``"sinc"`` or ``"identity"``;
    ``size`` is the support before padding to ``pad_to``.
    """

    kind: str
    size: int
    pad_to: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    omega_c: float = 0.0

    def build(self) -> np.ndarray:
        """Return the ``(pad_to, pad_to)`` kernel this spec describes."""
        if self.kind == "identity":
            return identity_kernel(self.pad_to)
        if self.kind == "sinc":
            k = sinc_kernel(self.size, self.omega_c)
        elif self.kind in ("iso", "aniso"):
            k = gaussian_kernel(self.size, self.sigma_x, self.sigma_y, self.theta)
        elif self.kind.startswith("generalized_"):
            k = generalized_gaussian_kernel(self.size, self.sigma_x, self.sigma_y, self.theta, self.beta)
        elif self.kind.startswith("plateau_"):
            k = plateau_kernel(self.size, self.sigma_x, self.sigma_y, self.theta, self.beta)
        else:
            raise ValueError(f"unknown kernel kind {self.kind!r}")
        return pad_kernel(k, self.pad_to)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _sample_beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    """Half the time below 1, half above (Real-ESRGAN's shape sampling)."""
    lo, hi = beta_range
    if rng.uniform() < 0.5:
        return float(rng.uniform(lo, 1.0)) if lo < 1.0 else float(lo)
    return float(rng.uniform(1.0, hi)) if hi > 1.0 else float(hi)


def sample_gaussian_family(
    rng: np.random.Generator,
    kind: str,
    size: int,
    pad_to: int,
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
) -> KernelSpec:
    """Draw the parameters of one Gaussian-family kernel of the given ``kind``."""
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KERNEL_TYPES}")
    sx = float(rng.uniform(*sigma_range))
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sy, theta = sx, 0.0
    else:
        sy = float(rng.uniform(*sigma_range))
        theta = float(rng.uniform(-math.pi, math.pi))
    beta = 1.0
    if kind.startswith("generalized_"):
        beta = _sample_beta(rng, betag_range)
    elif kind.startswith("plateau_"):
        beta = _sample_beta(rng, betap_range)
    return KernelSpec(kind, size, pad_to, sx, sy, theta, beta)


def sample_sinc(rng: np.random.Generator, size: int, pad_to: int, omega_range: tuple[float, float]) -> KernelSpec:
    """Draw a sinc kernel with ``omega_c`` uniform in ``omega_range``."""
    return KernelSpec("sinc", size, pad_to, omega_c=float(rng.uniform(*omega_range)))


def sample_kernel(
    rng: np.random.Generator,
    max_size: int,
    kernel_list: tuple[str, ...],
    kernel_prob: tuple[float, ...],
    sinc_prob: float,
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
) -> KernelSpec:
    """Draw one stage blur kernel as Real-ESRGAN's data loader does.

    The support is a random odd size in ``7..max_size``; with probability
    ``sinc_prob`` it is a sinc kernel (``omega_c`` in ``[pi/3, pi]`` for sizes
    below 13, ``[pi/5, pi]`` otherwise), else a kernel type drawn from
    ``kernel_list`` with ``kernel_prob``. The result is padded to ``max_size``.
    """
    sizes = list(range(7, max_size + 1, 2)) or [max_size]
    size = int(rng.choice(sizes))
    if rng.uniform() < sinc_prob:
        lo = math.pi / 3 if size < 13 else math.pi / 5
        return sample_sinc(rng, size, max_size, (lo, math.pi))
    probs = np.asarray(kernel_prob, dtype=np.float64)
    kind = str(kernel_list[int(rng.choice(len(kernel_list), p=probs / probs.sum()))])
    return sample_gaussian_family(rng, kind, size, max_size, sigma_range, betag_range, betap_range)


def _fft_correlate(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """'Valid' 2-D cross-correlation by FFT.

    Args:
        x: ``(N, C, Hp, Wp)`` already padded input.
        kernel: ``(N or 1, 1, k, k)``.

    Returns:
        ``(N, C, Hp - k + 1, Wp - k + 1)``.
    """
    hp, wp = x.shape[-2:]
    k = kernel.shape[-1]
    fh, fw = next_fast_len(hp, real=True), next_fast_len(wp, real=True)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    fx = torch.fft.rfft2(x.to(work), s=(fh, fw))
    fk = torch.fft.rfft2(torch.flip(kernel.to(work), dims=(-2, -1)), s=(fh, fw))
    out = torch.fft.irfft2(fx * fk, s=(fh, fw))
    return out[..., k - 1 : hp, k - 1 : wp].to(x.dtype)


def _pad(img: torch.Tensor, p: int) -> torch.Tensor:
    """Reflect-pad by ``p`` (replicate when the image is too small to reflect)."""
    h, w = img.shape[-2:]
    return F.pad(img, (p, p, p, p), mode="reflect" if p < h and p < w else "replicate")


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter each image of a batch with its own kernel (reflect padding).

    Computes the cross-correlation (``F.conv2d``'s convention, equal to
    convolution for the point-symmetric kernels of this module); kernels of
    size >= 9 go through the FFT (cheaper than a direct convolution for large
    kernels).

    Args:
        img: ``(B, C, H, W)`` float.
        kernel: ``(K, K)`` (shared) or ``(B, K, K)`` (one per image), ``K`` odd.

    Returns:
        ``(B, C, H, W)``, same dtype as ``img``.
    """
    b, c, h, w = img.shape
    k = kernel.shape[-1]
    if k % 2 != 1 or kernel.shape[-2] != k:
        raise ValueError(f"kernel must be square with odd size, got {tuple(kernel.shape)}")
    kernel = kernel.to(img.dtype).reshape(-1, 1, k, k)
    if kernel.shape[0] not in (1, b):
        raise ValueError(f"{kernel.shape[0]} kernels for a batch of {b}")
    x = _pad(img, k // 2)
    if k >= 9:
        return _fft_correlate(x, kernel)
    if kernel.shape[0] == 1:
        out = F.conv2d(x.reshape(b * c, 1, *x.shape[-2:]), kernel)
    else:
        weight = kernel.repeat_interleave(c, dim=0)  # (B*C, 1, k, k)
        out = F.conv2d(x.reshape(1, b * c, *x.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def gaussian_blur(img: torch.Tensor, size: int, sigma: float = 0.0) -> torch.Tensor:
    """Gaussian blur of ``(B, C, H, W)``; ``sigma <= 0`` uses OpenCV's rule for the size."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    return filter2d(img, torch.from_numpy(gaussian_kernel(size, sigma)))


def usm_sharpen(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN applies to its ground truth before degrading.

    ``sharp = clip(img + weight * (img - blur(img)))``, blended in only where the
    residual exceeds ``threshold / 255`` (with a blurred, soft mask).

    Args:
        img: ``(B, C, H, W)`` float in [0, 1].
        radius: Gaussian support (made odd).
    """
    size = radius + 1 if radius % 2 == 0 else radius
    residual = img - gaussian_blur(img, size)
    mask = (residual.abs() * 255.0 > threshold).to(img.dtype)
    soft = gaussian_blur(mask, size)
    sharp = (img + weight * residual).clamp(0.0, 1.0)
    return soft * sharp + (1.0 - soft) * img
