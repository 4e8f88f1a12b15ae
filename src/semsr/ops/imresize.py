"""MATLAB-compatible ``imresize`` (bicubic, with antialiasing when shrinking).

The SR literature makes LR test images and bicubic baselines with MATLAB's
``imresize``, whose results PyTorch/OpenCV/PIL bicubic do not reproduce.
This module reproduces MATLAB's algorithm: the cubic kernel with a = -0.5, the
kernel stretched by 1/scale when downscaling (antialiasing), sample positions
``u = x / scale + 0.5 * (1 - 1 / scale)`` and symmetric padding at the borders.

The resize is separable and linear, so it is computed as two matrix products
``W_h @ img @ W_w.T`` with weight matrices built once per (size, scale).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


@lru_cache(maxsize=64)
def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """Return the ``(out_len, in_len)`` float64 matrix of one 1-D MATLAB resize.

    Args:
        in_len: input length along the axis.
        out_len: output length along the axis.
        scale: the scale factor MATLAB uses for the kernel (``out/in`` when a
            size was given, the user's factor when a scale was given).
        antialias: stretch the kernel when ``scale < 1`` (MATLAB default).
    """
    if scale < 1 and antialias:
        kernel_width = 4.0 / scale

        def kernel(v: np.ndarray) -> np.ndarray:
            return scale * _cubic(scale * v)

    else:
        kernel_width = 4.0
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based
    weights = kernel(u[:, None] - idx)
    weights /= weights.sum(axis=1, keepdims=True)
    # symmetric (mirror) padding: 1..n, n..1 repeated
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.repeat(np.arange(out_len), taps)
    np.add.at(mat, (rows, src.ravel()), weights.ravel())
    return mat


def output_size(in_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """MATLAB's output size for a scale factor: ``ceil(scale * size)``."""
    return (int(math.ceil(in_hw[0] * scale - 1e-9)), int(math.ceil(in_hw[1] * scale - 1e-9)))


def imresize(
    img: torch.Tensor,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resize like MATLAB ``imresize(img, scale)`` / ``imresize(img, [h w])``.

    Args:
        img: float tensor ``(..., H, W)`` (e.g. ``(B, C, H, W)`` or ``(C, H, W)``),
            any value range; computed in the tensor's dtype (use float64 for
            bit-faithful metric work, float32 otherwise).
        scale: uniform scale factor (output size ``ceil(scale * H)``).
        size: explicit output ``(h, w)``; the kernel scale is then ``h/H``, ``w/W``.
        antialias: MATLAB's ``'Antialiasing'`` option (on by default).

    Returns:
        Tensor ``(..., h, w)`` of the same dtype; values are not clamped.
    """
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size")
    if not img.is_floating_point():
        raise TypeError("imresize expects a floating point tensor")
    in_h, in_w = img.shape[-2:]
    if size is None:
        assert scale is not None
        out_h, out_w = output_size((in_h, in_w), scale)
        sh = sw = float(scale)
    else:
        out_h, out_w = int(size[0]), int(size[1])
        sh, sw = out_h / in_h, out_w / in_w
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size {out_h}x{out_w} is empty")
    out = img
    if (out_h, out_w) == (in_h, in_w) and sh == 1 and sw == 1:
        return img.clone()
    wh = torch.from_numpy(resize_matrix(in_h, out_h, sh, antialias)).to(img.device, img.dtype)
    ww = torch.from_numpy(resize_matrix(in_w, out_w, sw, antialias)).to(img.device, img.dtype)
    out = torch.matmul(wh, out)
    out = torch.matmul(out, ww.T)
    return out


def imresize_np(img: np.ndarray, scale: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """NumPy convenience wrapper: ``(H, W)`` or ``(H, W, C)`` array in, same layout out.

    Integer inputs are converted to float64 and the result is rounded and
    clipped back to the input dtype, as MATLAB does for ``uint8`` images.
    """
    orig = img.dtype
    arr = img.astype(np.float64)
    t = torch.from_numpy(arr if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))
    out = imresize(t, scale=scale, size=size).numpy()
    if arr.ndim == 3:
        out = out.transpose(1, 2, 0)
    if np.issubdtype(orig, np.integer):
        info = np.iinfo(orig)
        out = np.clip(np.round(out), info.min, info.max).astype(orig)
    return out
