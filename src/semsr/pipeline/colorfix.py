"""Colour correction of the diffusion output towards the (upsampled) LR image.

Diffusion SR tends to shift colours; the usual fix keeps the generated
details but takes colour from the LR input:

- ``adain``: per-image, per-channel mean and standard deviation of the output
  are set to those of the reference (XPSR / StableSR default);
- ``wavelet``: the output's high frequencies (a trous wavelet decomposition
  with a dilated 3x3 binomial kernel) are added to the reference's low
  frequencies;
- ``none``: unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semsr.core.errors import SemsrError

COLOUR_FIXES = ("adain", "wavelet", "none")


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match channel statistics of ``x`` to ``ref``.

    Args:
        x: ``(B, C, H, W)`` image to correct.
        ref: ``(B, C, h, w)`` reference (any spatial size).
    Returns:
        ``(B, C, H, W)`` with per-channel mean/std equal to ``ref``'s.
    """
    xf, rf = x.float(), ref.float()
    mx, sx = xf.mean(dim=(2, 3), keepdim=True), xf.std(dim=(2, 3), keepdim=True)
    mr, sr = rf.mean(dim=(2, 3), keepdim=True), rf.std(dim=(2, 3), keepdim=True)
    return ((xf - mx) / (sx + eps) * sr + mr).to(x.dtype)


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Dilated 3x3 binomial blur per channel, replicate padding. ``(B,C,H,W) -> (B,C,H,W)``."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    pad = dilation
    mode = "replicate" if min(x.shape[-2:]) > 1 else "constant"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(xp, kernel, dilation=dilation, groups=x.shape[1])


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` ``(B,C,H,W)`` into ``(high, low)`` with ``high + low == x``."""
    low = x
    for i in range(levels):
        low = _blur(low, 2**i)
    return x - low, low


def wavelet(x: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``x`` + low frequencies of ``ref`` (both ``(B,C,H,W)``, same size)."""
    if ref.shape[-2:] != x.shape[-2:]:
        ref = F.interpolate(ref.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
    high, _ = wavelet_split(x.float(), levels)
    _, low = wavelet_split(ref.float(), levels)
    return (high + low).to(x.dtype)


def colour_fix(x: torch.Tensor, ref: torch.Tensor, method: str | None = "adain") -> torch.Tensor:
    """Apply ``method`` (``adain`` | ``wavelet`` | ``none``) and clamp to [0, 1].

    Args:
        x: ``(B, 3, H, W)`` float in [0, 1], the diffusion output.
        ref: ``(B, 3, H, W)`` float in [0, 1], the LR upsampled to the output size (moved to
            ``x``'s device).

    Returns:
        ``(B, 3, H, W)`` on ``x``'s device, in ``x``'s dtype.
    """
    method = (method or "none").lower()
    ref = ref.to(x.device)
    if method == "adain":
        out = adain(x, ref)
    elif method == "wavelet":
        out = wavelet(x, ref)
    elif method == "none":
        out = x
    else:
        raise SemsrError(f"unknown colour fix {method!r}; use one of {', '.join(COLOUR_FIXES)}")
    return out.clamp(0, 1)
