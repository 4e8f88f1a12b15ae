"""Additive Gaussian and Poisson (shot) noise on batched images, colour or grey.

All functions take ``(B, 3, H, W)`` float images in [0, 1], per-image
parameters as length-``B`` sequences/tensors, and an explicit
``torch.Generator`` so results are reproducible. "Grey" noise is one noise
field shared by the three channels (luminance noise); colour noise is drawn
independently per channel. Outputs are clipped to [0, 1] (Real-ESRGAN's
``clip=True, rounds=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LUMA = (0.299, 0.587, 0.114)


def _per_image(values: float | Sequence[float] | torch.Tensor, b: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"expected {b} per-image values, got {t.numel()}")
    return t.view(b, 1, 1, 1)


def rgb_to_grey(img: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1, H, W)`` BT.601 luma."""
    w = torch.tensor(LUMA, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True)


def gaussian_noise(
    img: torch.Tensor,
    sigma: float | Sequence[float] | torch.Tensor,
    grey: bool | Sequence[bool] | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the Gaussian noise field (not added): ``(B, 3, H, W)``.

    Args:
        sigma: standard deviation per image, in 0-255 units.
        grey: per image, one field for all channels instead of one per channel.
    """
    b, c, h, w = img.shape
    s = _per_image(sigma, b, img) / 255.0
    g = _per_image(grey, b, img)
    colour = torch.randn(img.shape, generator=generator, dtype=img.dtype, device=img.device)
    mono = torch.randn((b, 1, h, w), generator=generator, dtype=img.dtype, device=img.device)
    return s * (colour * (1.0 - g) + mono.expand(b, c, h, w) * g)


def add_gaussian_noise(
    img: torch.Tensor,
    sigma: float | Sequence[float] | torch.Tensor,
    grey: bool | Sequence[bool] | torch.Tensor = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``clip(img + N(0, sigma/255))``; see :func:`gaussian_noise`."""
    return (img + gaussian_noise(img, sigma, grey, generator)).clamp(0.0, 1.0)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Per image, the number of distinct 8-bit values rounded up to a power of 2: ``(B, 1, 1, 1)``."""
    q = (x * 255.0).round().clamp(0, 255).to(torch.int64).flatten(1)
    counts = [int((torch.bincount(q[i], minlength=256) > 0).sum()) for i in range(x.shape[0])]
    return torch.tensor([2.0 ** np.ceil(np.log2(max(n, 1))) for n in counts], dtype=x.dtype).view(-1, 1, 1, 1)


def poisson_noise(
    img: torch.Tensor,
    scale: float | Sequence[float] | torch.Tensor,
    grey: bool | Sequence[bool] | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the Poisson noise field (not added): ``(B, 3, H, W)``.

    The image is read as photon counts ``x * L`` where ``L`` is its number of
    distinct 8-bit levels rounded up to a power of two (Real-ESRGAN's
    convention); the noise is ``(Poisson(x L) / L - x) * scale``. Grey noise
    uses the luma image and is shared by the channels.
    """
    b, c, h, w = img.shape
    s = _per_image(scale, b, img)
    g = _per_image(grey, b, img)
    q = (img * 255.0).round().clamp(0, 255) / 255.0
    lv = _levels(q).to(img.device)
    colour = torch.poisson(q * lv, generator=generator) / lv - q
    if bool((g > 0).any()):
        y = (rgb_to_grey(img) * 255.0).round().clamp(0, 255) / 255.0
        lvy = _levels(y).to(img.device)
        mono = (torch.poisson(y * lvy, generator=generator) / lvy - y).expand(b, c, h, w)
        colour = colour * (1.0 - g) + mono * g
    return colour * s


def add_poisson_noise(
    img: torch.Tensor,
    scale: float | Sequence[float] | torch.Tensor,
    grey: bool | Sequence[bool] | torch.Tensor = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``clip(img + poisson_noise(img))``; see :func:`poisson_noise`."""
    return (img + poisson_noise(img, scale, grey, generator)).clamp(0.0, 1.0)
