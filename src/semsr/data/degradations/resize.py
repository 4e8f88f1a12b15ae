"""Resizing with the interpolation modes of the Real-ESRGAN degradation model.

Real-ESRGAN resizes with PyTorch's ``area``, ``bilinear`` and ``bicubic``
(no antialiasing, ``align_corners=False``), picked at random; downscaling
without antialiasing adds aliasing, bicubic adds overshoot — both are part of
the degradation space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE_MODES = ("area", "bilinear", "bicubic")


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` to ``size = (h, w)`` with one of :data:`RESIZE_MODES`.

    Sizes are clamped to at least 1 pixel. Returns the input itself when the
    size does not change.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    h, w = max(1, int(size[0])), max(1, int(size[1]))
    if (h, w) == tuple(img.shape[-2:]):
        return img
    if mode == "area":
        return F.interpolate(img, size=(h, w), mode="area")
    return F.interpolate(img, size=(h, w), mode=mode, align_corners=False)


def scaled_size(hw: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(floor(h * factor), floor(w * factor))``, at least 1 — PyTorch's ``scale_factor`` rule."""
    return max(1, int(hw[0] * factor)), max(1, int(hw[1] * factor))
