"""Colour conversions with MATLAB conventions (ITU-R BT.601 ``rgb2ycbcr``).

The SR literature measures PSNR/SSIM on the Y channel of MATLAB's
``rgb2ycbcr``: for ``R, G, B`` in [0, 255]

    Y  =  16 + ( 65.481 R + 128.553 G +  24.966 B) / 255
    Cb = 128 + (-37.797 R -  74.203 G + 112.0   B) / 255
    Cr = 128 + (112.0   R -  93.786 G -  18.214 B) / 255

so Y lies in [16, 235]. On ``uint8`` input MATLAB returns ``uint8``, i.e. the
values are rounded (half away from zero); :func:`y_channel_255` reproduces
that, which is what the published bicubic anchors need.

All tensors here are float, channels first: ``(..., 3, H, W)`` in [0, 1]
unless stated otherwise.
"""

from __future__ import annotations

import torch

# rows: Y, Cb, Cr; columns: R, G, B (coefficients for 0-255 input, divided by 255)
_RGB2YCBCR = (
    (65.481, 128.553, 24.966),
    (-37.797, -74.203, 112.0),
    (112.0, -93.786, -18.214),
)
_OFFSET = (16.0, 128.0, 128.0)
# BT.601 luma without offset/range compression (PIL ``convert("L")``); the
# weights sum to 1, so equal channels map to exactly that grey value.
_LUMA = (0.299, 0.587, 0.114)


def _matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(_RGB2YCBCR, dtype=dtype, device=device) / 255.0


def rgb2ycbcr(img: torch.Tensor, y_only: bool = False) -> torch.Tensor:
    """MATLAB ``rgb2ycbcr`` on floats.

    Args:
        img: ``(..., 3, H, W)`` RGB float in [0, 1].
        y_only: return only the Y channel.

    Returns:
        ``(..., 3, H, W)`` YCbCr (or ``(..., 1, H, W)`` Y) float scaled to
        [0, 1] like the input (Y in [16/255, 235/255]); not rounded.
    """
    if img.shape[-3] != 3:
        raise ValueError(f"rgb2ycbcr expects 3 channels, got shape {tuple(img.shape)}")
    mat = _matrix(img.dtype, img.device)
    off = torch.tensor(_OFFSET, dtype=img.dtype, device=img.device) / 255.0
    if y_only:
        mat, off = mat[:1], off[:1]
    out = torch.einsum("oc,...chw->...ohw", mat, img)
    return out + off.view(-1, 1, 1)


def ycbcr2rgb(img: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb2ycbcr`: ``(..., 3, H, W)`` YCbCr in [0, 1] -> RGB in [0, 1] (unclamped)."""
    if img.shape[-3] != 3:
        raise ValueError(f"ycbcr2rgb expects 3 channels, got shape {tuple(img.shape)}")
    mat = torch.linalg.inv(_matrix(torch.float64, img.device)).to(img.dtype)
    off = torch.tensor(_OFFSET, dtype=img.dtype, device=img.device).view(-1, 1, 1) / 255.0
    return torch.einsum("oc,...chw->...ohw", mat, img - off)


def luma(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B``: ``(..., 3, H, W)`` -> ``(..., 1, H, W)``, same range."""
    w = torch.tensor(_LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img * w).sum(dim=-3, keepdim=True)


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """MATLAB ``round`` for non-negative values (half away from zero), unlike ``torch.round``."""
    return torch.floor(x + 0.5)


def to_255(img: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """``[0, 1]`` float -> float64 in [0, 255]; rounded to integers when ``quantize`` (as a saved 8-bit image)."""
    out = img.detach().to(torch.float64).clamp(0.0, 1.0) * 255.0
    return round_half_up(out) if quantize else out


def y_channel_255(img: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """The plane PSNR-Y/SSIM/NIQE are computed on, float64 in [0, 255].

    Colour ``(..., 3, H, W)``: MATLAB Y of the (8-bit quantised) RGB, rounded
    like MATLAB's ``uint8`` result. Grey ``(..., 1, H, W)``: the grey values
    themselves (the MATLAB scripts skip ``rgb2ycbcr`` for single-channel
    images). Returns ``(..., 1, H, W)``.
    """
    x = to_255(img, quantize)
    if x.shape[-3] == 1:
        return x
    y = rgb2ycbcr(x / 255.0, y_only=True) * 255.0
    return round_half_up(y) if quantize else y
