"""Baseline JPEG compression artefacts on batched tensors (encode + decode in torch).

A faithful model of a baseline JPEG round trip, vectorised over the batch so
each image can have its own (real-valued) quality:

1. RGB -> YCbCr (JFIF full range), chroma 4:2:0 by 2x2 averaging;
2. each plane padded to whole MCUs by edge replication (as libjpeg does);
3. 8x8 block DCT (orthonormal DCT-II = the JPEG FDCT), division by the
   Annex K quantisation tables scaled by the IJG quality rule
   (``5000 / q`` below 50, ``200 - 2 q`` above; entries kept >= 1),
   rounding, multiplication back, inverse DCT;
4. chroma upsampled with the triangle ("fancy") filter, YCbCr -> RGB,
   clipped and rounded to 8 bits, as a decoder outputs.

Real-ESRGAN does the same with its non-differentiable DiffJPEG; qualities are
floats drawn uniformly from ``jpeg_range``. Entropy coding is lossless and
therefore skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)  # fmt: skip

RGB2YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_YCC2RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


@lru_cache(maxsize=4)
def dct_matrix(dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix ``D`` (rows = frequencies): ``X = D x D^T``."""
    d = torch.empty(8, 8, dtype=torch.float64)
    for u in range(8):
        c = math.sqrt(1 / 8) if u == 0 else math.sqrt(2 / 8)
        for x in range(8):
            d[u, x] = c * math.cos((2 * x + 1) * u * math.pi / 16)
    return d.to(dtype)


def quality_scale(quality: torch.Tensor) -> torch.Tensor:
    """IJG quality (1..100, real-valued) -> multiplier of the base tables."""
    q = quality.clamp(1.0, 100.0)
    return torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q) / 100.0


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` with H, W multiples of 8 -> ``(B, H/8, W/8, 8, 8)``."""
    b, h, w = x.shape
    return x.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _unblocks(x: torch.Tensor) -> torch.Tensor:
    b, nh, nw, _, _ = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(b, nh * 8, nw * 8)


def _quantise_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT-quantise-dequantise-IDCT one ``(B, H, W)`` plane (values centred on 0).

    ``table`` is ``(B, 8, 8)``: the per-image scaled quantisation table.
    """
    d = dct_matrix(plane.dtype)
    blk = _blocks(plane)
    coef = d @ blk @ d.T
    t = table[:, None, None]
    coef = torch.round(coef / t) * t
    return _unblocks(d.T @ coef @ d)


def jpeg_compress(img: torch.Tensor, quality: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Simulate a JPEG round trip at the given quality.

    Args:
        img: ``(B, 3, H, W)`` float in [0, 1] (values outside are clipped first).
        quality: one quality for all, or one per image; real values in [1, 100].

    Returns:
        ``(B, 3, H, W)`` float in [0, 1], multiples of 1/255.
    """
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(img.shape)}")
    b, _, h, w = img.shape
    work = torch.float64 if img.dtype == torch.float64 else torch.float32
    q = torch.as_tensor(quality, dtype=work).flatten()
    q = q.expand(b) if q.numel() == 1 else q
    if q.numel() != b:
        raise ValueError(f"expected {b} qualities, got {q.numel()}")
    x = (img.to(work).clamp(0.0, 1.0) * 255.0).round()  # an encoder sees 8-bit samples
    ycc = torch.einsum("ij,bjhw->bihw", torch.tensor(RGB2YCC, dtype=work), x)
    ycc[:, 1:] += 128.0
    # pad to whole 16x16 MCUs by edge replication
    ph, pw = (-h) % 16, (-w) % 16
    ycc = F.pad(ycc, (0, pw, 0, ph), mode="replicate")
    scale = quality_scale(q).view(b, 1, 1)
    ytab = (torch.tensor(LUMA_TABLE, dtype=work).view(1, 8, 8) * scale).clamp(min=1.0)
    ctab = (torch.tensor(CHROMA_TABLE, dtype=work).view(1, 8, 8) * scale).clamp(min=1.0)
    y = _quantise_plane(ycc[:, 0] - 128.0, ytab) + 128.0
    chroma = F.avg_pool2d(ycc[:, 1:], 2)  # (B, 2, H/2, W/2)
    cb = _quantise_plane(chroma[:, 0] - 128.0, ctab) + 128.0
    cr = _quantise_plane(chroma[:, 1] - 128.0, ctab) + 128.0
    # decoders clamp each plane to 8 bits before upsampling and colour conversion
    c = torch.stack([cb, cr], dim=1).round().clamp(0, 255)
    c = F.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
    ycc = torch.cat([y.round().clamp(0, 255)[:, None], c], dim=1)[:, :, :h, :w]
    ycc[:, 1:] -= 128.0
    rgb = torch.einsum("ij,bjhw->bihw", torch.tensor(_YCC2RGB, dtype=work), ycc)
    return (rgb.round().clamp(0, 255) / 255.0).to(img.dtype)
