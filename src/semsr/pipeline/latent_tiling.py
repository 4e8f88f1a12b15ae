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
``script`` (the StableSR-family inference scripts, XPSR's and SeeSR's released pipelines: square tiles of
``min(tile, H, W)`` on a stride of ``tile - overlap``, the last one flush with the edge, Gaussian sigma =
side / 10, tiles left to right and each column top to bottom; untiled when ``H * W <= tile**2``).

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
        style: ``even`` or ``script`` (module docstring; ``sigma_frac`` applies to ``even``).
    Returns:
        ``(B, C', H, W)`` float32, the weighted average of the tiles.
    """
    _, _, height, width = x.shape
    weight: torch.Tensor
    if style == "script":
        if height * width <= tile * tile:
            return fn(x, (0, 0, height, width)).float()
        th = tw = min(tile, height, width)
        weight = script_tile_weight(th, device=x.device)
        overlap = min(overlap, th - 1)  # a tile rounded down to the overlap or below still advances
        columns = script_tile_starts(width, tw, overlap)
        windows = [(top, left) for left in columns for top in script_tile_starts(height, th, overlap)]
    elif style == "even":
        th, tw = min(tile, height), min(tile, width)
        weight = gaussian_weight(th, tw, sigma_frac, device=x.device)
        lefts = tile_starts(width, tw, min(overlap, tw - 1))
        windows = [(top, left) for top in tile_starts(height, th, min(overlap, th - 1)) for left in lefts]
    else:
        raise ValueError(f"unknown tile style {style!r} (even, script)")
    out: torch.Tensor | None = None
    total = torch.zeros(height, width, dtype=torch.float32, device=x.device)
    for top, left in windows:
        y = fn(x[:, :, top : top + th, left : left + tw], (top, left, th, tw)).float()
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
    """Tile starts of the ``script`` layout (XPSR's, SeeSR's released pipelines): stride
    ``tile - overlap`` from 0, the last tile aligned to the end (its overlap may be larger); ``size <= tile``: ``[0]``.
    Raises ``ValueError`` when ``overlap >= tile`` would never advance."""
    if size > tile and overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile ({tile})")
    count, covered = 0, 0
    while covered < size:
        covered = max(count * (tile - overlap), 0) + tile
        count += 1
    return [i * (tile - overlap) for i in range(count - 1)] + [size - tile]


def script_tile_weight(tile: int, *, device: Any = None) -> torch.Tensor:
    """Float64 ``(tile, tile)`` Gaussian tile weights of the ``script`` layout: variance 0.01 of the side, centred at
    ``(tile - 1) / 2`` across and at ``tile / 2`` down (as released)."""
    var = 0.01
    pos = torch.arange(tile, dtype=torch.float64, device=device)
    norm = math.sqrt(2 * math.pi * var)
    across = torch.exp(-((pos - (tile - 1) / 2) ** 2) / (tile * tile) / (2 * var)) / norm
    down = torch.exp(-((pos - tile / 2) ** 2) / (tile * tile) / (2 * var)) / norm
    return down[:, None] * across[None, :]


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
