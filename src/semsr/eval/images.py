"""Small image helpers of the benchmark: 8-bit quantisation and the HR crop convention.

Benchmark images travel as uint8 files on disk (the SR convention rounds LR
inputs and SR outputs to 8 bits) and as float tensors ``(1, C, H, W)`` in
[0, 1] in memory, ``C = 1`` for grey and ``C = 3`` for colour (read with
:func:`semsr.eval.metrics.image.load_eval_image`).
"""

from __future__ import annotations

import numpy as np
import torch

from semsr.ops.color import to_255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(1, C, H, W)`` float in [0, 1] -> uint8 ``(H, W)`` (C = 1) or ``(H, W, 3)``.

    Rounds half away from zero, as MATLAB does when it stores ``uint8``.
    """
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (1, 1|3, H, W), got {tuple(x.shape)}")
    arr = to_255(x[0]).to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Snap ``x`` (float in [0, 1]) to the 8-bit grid exactly, as float64 ``k / 255``."""
    return to_255(x) / 255.0


def crop_to_multiple(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop ``(..., H, W)`` at the bottom/right to multiples of ``scale`` (the SR convention)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % scale, : w - w % scale]
