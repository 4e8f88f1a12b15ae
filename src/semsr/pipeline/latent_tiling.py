"""Tiling in latent space (Gaussian-weighted blending) and tiled VAE encode/decode.

A *spatial denoiser* is the per-step model call that also receives the
window it is applied to, so it can crop its spatial conditions (the
ControlNet hint, depth maps...) to match::

    spatial(x_tile, t, cond, window) -> out_tile
    # x_tile: (B, C, h, w) latent crop; window = (top, left, h, w) in latent pixels

:func:`tiled` turns it into a plain denoiser ``(x, t, cond) -> out`` that runs
overlapping tiles and blends them with Gaussian weights (centre-heavy, so tile
borders — where the model lacks context — contribute little); :func:`untiled`
runs it once on the whole latent. Peak memory of a tiled step is that of one
tile plus the latent-size accumulators.

Two tile layouts (``style``): ``even`` (semsr's: tiles spread evenly, Gaussian sigma = side / 4) and
``seesr`` (SeeSR's released pipeline: square tiles of ``min(tile, H, W)`` on a stride of ``tile - overlap``, the
last one flush with the edge, Gaussian sigma = side / 10; untiled when ``H * W <= tile**2``).

VAE tiling uses diffusers' ``AutoencoderKL`` tiling (overlapping tiles with
linear blending) with the tile size set per call (:func:`vae_tiling`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from semsr.pipeline.guidance import Denoiser

Window = tuple[int, int, int, int]  # top, left, height, width
SpatialDenoiser = Callable[[torch.Tensor, torch.Tensor, Any, Window], torch.Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with at least ``overlap`` overlap.

    The last tile is aligned to the end; ``size <= tile`` gives one tile at 0.
    """
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile): got overlap={overlap}, tile={tile}")
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    # spread tiles evenly so every overlap is >= the requested one
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def stride_starts(size: int, tile: int, overlap: int) -> list[int]:
    """SeeSR's tile offsets along one axis: ``k * (tile - overlap)`` while a tile starts inside ``size``, the last
    one moved to ``size - tile`` (flush with the end)."""
    n = 1
    while (n - 1) * (tile - overlap) + tile < size:
        n += 1
    return [k * (tile - overlap) for k in range(n - 1)] + [size - tile]


def seesr_weight(height: int, width: int, *, device: Any = None) -> torch.Tensor:
    """SeeSR's tile weights ``(height, width)``: Gaussian with variance 0.01 in units of the side, centred at
    ``(width - 1) / 2`` across and at ``height / 2`` down (as released)."""

    def axis(n: int, mid: float) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64, device=device) - mid
        return torch.exp(-(pos * pos) / (n * n) / (2 * 0.01)) / math.sqrt(2 * math.pi * 0.01)

    return (axis(height, height / 2)[:, None] * axis(width, (width - 1) / 2)[None, :]).float()


def gaussian_weight(height: int, width: int, sigma_frac: float = 0.25, *, device: Any = None) -> torch.Tensor:
    """Separable Gaussian window ``(height, width)``, peak 1 at the centre, sigma = ``sigma_frac`` * side."""

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (pos / (sigma_frac * n)) ** 2)

    return axis(height)[:, None] * axis(width)[None, :]


def blend_windows(
    fn: Callable[[torch.Tensor, Window], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    sigma_frac: float = 0.25,
    *,
    style: str = "even",
) -> torch.Tensor:
    """Apply ``fn(x_tile, window)`` on overlapping tiles of ``x`` and blend with Gaussian weights.

    Args:
        fn: maps a ``(B, C, h, w)`` crop and its window to a ``(B, C', h, w)`` tensor.
        x: ``(B, C, H, W)``.
        tile: tile side (latent pixels); tiles are clipped to the image.
        overlap: minimum overlap between neighbouring tiles.
        style: ``even`` or ``seesr`` (module docstring; ``sigma_frac`` applies to ``even``).
    Returns:
        ``(B, C', H, W)`` float32, the weighted average of the tiles.
    """
    _, _, height, width = x.shape
    if style == "seesr":
        if height * width <= tile * tile:
            return fn(x, (0, 0, height, width)).float()
        th = tw = min(tile, height, width)
        weight = seesr_weight(th, tw, device=x.device)
        tops, lefts = stride_starts(height, th, overlap), stride_starts(width, tw, overlap)
    elif style == "even":
        th, tw = min(tile, height), min(tile, width)
        weight = gaussian_weight(th, tw, sigma_frac, device=x.device)
        tops = tile_starts(height, th, min(overlap, th - 1))
        lefts = tile_starts(width, tw, min(overlap, tw - 1))
    else:
        raise ValueError(f"unknown tile style {style!r} (even, seesr)")
    out: torch.Tensor | None = None
    total = torch.zeros(height, width, dtype=torch.float32, device=x.device)
    for top in tops:
        for left in lefts:
            window = (top, left, th, tw)
            y = fn(x[:, :, top : top + th, left : left + tw], window).float()
            if out is None:
                out = torch.zeros(y.shape[0], y.shape[1], height, width, dtype=torch.float32, device=x.device)
            out[:, :, top : top + th, left : left + tw] += y * weight
            total[top : top + th, left : left + tw] += weight
    assert out is not None
    return out / total


def tiled(spatial: SpatialDenoiser, tile: int, overlap: int, *, style: str = "even") -> Denoiser:
    """Wrap a spatial denoiser so each call runs on Gaussian-blended latent tiles (``style``: module docstring)."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return blend_windows(lambda xt, window: spatial(xt, t, cond, window), x, tile, overlap, style=style)

    return denoise


def untiled(spatial: SpatialDenoiser) -> Denoiser:
    """Wrap a spatial denoiser to run once on the whole latent (window = everything)."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return spatial(x, t, cond, (0, 0, x.shape[-2], x.shape[-1]))

    return denoise


def script_tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts of the StableSR-family inference scripts (XPSR's, SeeSR's released pipelines): stride
    ``tile - overlap`` from 0, the last tile aligned to the end (its overlap may be larger); ``size <= tile``: ``[0]``."""
    count, covered = 0, 0
    while covered < size:
        covered = max(count * (tile - overlap), 0) + tile
        count += 1
    return [i * (tile - overlap) for i in range(count - 1)] + [size - tile]


def script_tile_weight(tile: int, *, device: Any = None) -> torch.Tensor:
    """Float64 ``(tile, tile)`` Gaussian tile weights of those scripts: variance 0.01 of the side, centred at
    ``(tile - 1) / 2`` across and at ``tile / 2`` down (as released)."""
    var = 0.01
    pos = torch.arange(tile, dtype=torch.float64, device=device)
    norm = math.sqrt(2 * math.pi * var)
    across = torch.exp(-((pos - (tile - 1) / 2) ** 2) / (tile * tile) / (2 * var)) / norm
    down = torch.exp(-((pos - tile / 2) ** 2) / (tile * tile) / (2 * var)) / norm
    return down[:, None] * across[None, :]


def script_tiled(spatial: SpatialDenoiser, tile: int, overlap: int) -> Denoiser:
    """Wrap a spatial denoiser as the StableSR-family scripts tile a step: a latent of ``h * w <= tile**2``
    runs whole; else square tiles of side ``min(tile, h, w)`` at :func:`script_tile_starts`, blended with
    :func:`script_tile_weight` (float32 sums, tiles left to right, each column top to bottom)."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height * width <= tile * tile:
            return spatial(x, t, cond, (0, 0, height, width))
        side = min(tile, height, width)
        weight = script_tile_weight(side, device=x.device)
        out: torch.Tensor | None = None
        total = torch.zeros(x.shape[0], 1, height, width, dtype=torch.float32, device=x.device)
        for left in script_tile_starts(width, side, overlap):
            for top in script_tile_starts(height, side, overlap):
                y = spatial(x[:, :, top : top + side, left : left + side], t, cond, (top, left, side, side)).float()
                if out is None:
                    out = torch.zeros(y.shape[0], y.shape[1], height, width, dtype=torch.float32, device=x.device)
                out[:, :, top : top + side, left : left + side] += y * weight
                total[:, :, top : top + side, left : left + side] += weight
        assert out is not None
        return out / total

    return denoise


def crop_window(t: torch.Tensor, window: Window, factor: int = 1, batch: int | None = None) -> torch.Tensor:
    """Crop a spatial condition ``(B, C, factor*H, factor*W)`` to the latent ``window``.

    ``batch`` (a multiple of ``B``, e.g. the CFG branches stacked on the latent)
    repeats the crop to ``batch`` rows.
    """
    top, left, h, w = window
    out = t[..., top * factor : (top + h) * factor, left * factor : (left + w) * factor]
    if batch is not None and batch != out.shape[0]:
        out = out.repeat(batch // out.shape[0], 1, 1, 1)
    return out


@contextmanager
def vae_tiling(vae: Any, tile_px: int | None, overlap: float = 0.25) -> Iterator[Any]:
    """Enable diffusers' VAE tiling with ``tile_px`` pixel tiles inside the block (None: untiled).

    Encode/decode then hold one tile's activations at a time (plus the blended
    output). The previous tiling state is restored on exit.
    """
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        if tile_px:
            tile_px = max(factor * 2, (int(tile_px) // factor) * factor)
            vae.use_tiling = True
            vae.tile_sample_min_size = tile_px
            vae.tile_latent_min_size = tile_px // factor
            vae.tile_overlap_factor = overlap
        else:
            vae.use_tiling = False
        yield vae
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved
