"""Pixel-space tiling: run any :class:`~semsr.core.method.Method` on images of any size.

The image is cut into a grid of tiles of at most ``tile`` x ``tile`` pixels
(tile sizes are spread evenly, so there is no sliver at the right/bottom
edge). Each tile is run with ``tile_pad`` pixels of surrounding context on
every side (less at the image border), the context is cropped off the
upscaled tile (``SROutput.images``), and the core is written straight into a
preallocated output. Peak memory is therefore one padded tile's worth of
model activations plus the input and output arrays; with enough context the
result matches the untiled one (a method may state the context it needs as a
``tile_pad`` attribute; otherwise :data:`AUTO_TILE_PAD` is used — deep GAN
restorers such as RRDBNet need far more than Real-ESRGAN's customary 10 pixels).

``tile``/``tile_pad`` come from the method's options (``options.tile``,
``options.tile_pad``; ``None`` = automatic) unless given as arguments.
Methods with ``tiles_itself = True`` (diffusion recipes tile in latent space)
are called once, with the options object whose ``tile``/``tile_pad`` are set
to the resolved values (input pixels; 0 = the method's own default).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from semsr.core.method import Method, ProgressFn
from semsr.core.outputs import SROutput

#: Tile side used when the caller asks for automatic tiling (``tile=None``).
AUTO_TILE = 512
#: Context used when neither the caller nor the method gives one (``tile_pad=None``).
#: Measured on realesrgan-x4plus (RRDBNet, 23 blocks) with a photo: 64 pixels of
#: context keep every output pixel within 1/255 of the untiled result (48: 0.007).
AUTO_TILE_PAD = 64


def resolve_tile(method: Method, tile: int | None) -> int:
    """``tile=None`` means automatic: :data:`AUTO_TILE` for pixel-tiled methods, 0
    (the method's own choice) for methods that tile themselves; ints pass through."""
    if tile is not None:
        return int(tile)
    return 0 if getattr(method, "tiles_itself", False) else AUTO_TILE


def resolve_tile_pad(method: Method, tile_pad: int | None) -> int:
    """``tile_pad=None`` means the method's ``tile_pad`` attribute (the context it
    needs to tile seamlessly) when it has one, else :data:`AUTO_TILE_PAD` (0, the
    method's own choice, for methods that tile themselves)."""
    if tile_pad is not None:
        return int(tile_pad)
    own = getattr(method, "tile_pad", None)
    if own is None and getattr(method, "tiles_itself", False):
        return 0
    return AUTO_TILE_PAD if own is None else int(own)


def tile_spans(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into ``ceil(length / tile)`` near-equal ``(start, stop)`` spans.

    ``tile <= 0`` (or ``tile >= length``) gives a single span.
    """
    if tile <= 0 or tile >= length:
        return [(0, length)]
    n = math.ceil(length / tile)
    edges = [round(i * length / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def tile_grid(h: int, w: int, tile: int) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """Yield ``((y0, y1), (x0, x1))`` core regions covering an ``h`` x ``w`` image row by row."""
    for ys in tile_spans(h, tile):
        for xs in tile_spans(w, tile):
            yield ys, xs


def count_tiles(h: int, w: int, tile: int) -> int:
    """Number of tiles :func:`upscale_tiled` runs for an ``h`` x ``w`` input."""
    return len(tile_spans(h, tile)) * len(tile_spans(w, tile))


def store(out: torch.Tensor, y: torch.Tensor) -> None:
    """Copy float ``y`` (values in [0, 1]) into ``out`` (same shape), quantising integer outputs.

    Integer ``out`` (``uint8``, ``uint16``...) gets ``round(clamp(y, 0, 1) * max)``;
    floating ``out`` gets ``y`` unchanged.
    """
    if out.dtype.is_floating_point:
        out.copy_(y)
        return
    top = float(torch.iinfo(out.dtype).max)
    q = y.detach().float().clamp(0.0, 1.0)  # a new tensor: the caller's y is never modified
    out.copy_(q.mul_(top).round_())


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Output size of a method with factor ``scale``: ``ceil(scale * size)`` (exact for integers)."""
    return math.ceil(h * scale - 1e-9), math.ceil(w * scale - 1e-9)


def _run(method: Method, x: torch.Tensor, options: Any, progress: ProgressFn | bool | None) -> SROutput:
    device = getattr(method, "device", None)
    if device is not None:
        x = x.to(device)
    with torch.inference_mode():
        result = method(x, options, progress=progress)
    y = result.images
    b, c, h, w = x.shape
    expected = (b, c, *scaled_size(h, w, method.scale))
    if tuple(y.shape) != expected:
        raise RuntimeError(
            f"method {method.name!r} returned shape {tuple(y.shape)} for input {tuple(x.shape)}; "
            f"expected {expected} (scale {method.scale})"
        )
    return result


def _with_tiles(method: Method, options: Any, tile: int, tile_pad: int) -> Any:
    """``options`` (or the method's default options) with ``tile``/``tile_pad`` set, for a self-tiling method."""
    if options is None:
        options_class = getattr(method, "options_class", None)
        if options_class is None:
            return None
        options = options_class()
    return dataclasses.replace(options, tile=tile, tile_pad=tile_pad)


def upscale_tiled(
    method: Method,
    x: torch.Tensor,
    options: Any = None,
    *,
    tile: int | None = None,
    tile_pad: int | None = None,
    progress: ProgressFn | bool | None = False,
    out: torch.Tensor | None = None,
) -> SROutput:
    """Upscale ``x`` with ``method``, tile by tile.

    Args:
        method: any method (``scale`` = factor ``s``).
        x: ``(B, C, H, W)`` float in [0, 1] (CPU); tiles are moved to
            ``method.device`` when the method has one.
        options: the method's options object, passed to every call (``None``: defaults).
        tile: maximum tile side in input pixels; ``0`` runs the whole image,
            ``None``: ``options.tile``, and when that is ``None`` too, automatic
            (:func:`resolve_tile`).
        tile_pad: context pixels added on each side of a tile and cropped off
            after the method ran (``s * tile_pad`` output pixels); ``None``:
            ``options.tile_pad``, else :func:`resolve_tile_pad` (seamless for the
            bundled restorers).
        progress: ``callable(done, total)`` per tile (for a self-tiling method: its own
            progress), True, ``None`` (a tqdm bar only on a terminal) or False.
        out: optional preallocated ``(B, C, s*H, s*W)`` tensor, any dtype and
            layout (e.g. a channels-last view of a ``uint8`` ``(H, W, 3)``
            NumPy array); integer outputs are quantised (see :func:`store`).

    Returns:
        :class:`~semsr.core.outputs.SROutput` whose ``images`` is ``out`` (allocated as
        float32 when not given) holding the upscaled image; ``priors`` and
        ``side_images`` of the first call, ``timings`` summed over the calls.
        A method with a non-integer ``scale`` is run on the whole image (tile
        edges would fall between output pixels).
    """
    tile = resolve_tile(method, tile if tile is not None else getattr(options, "tile", None))
    tile_pad = resolve_tile_pad(method, tile_pad if tile_pad is not None else getattr(options, "tile_pad", None))
    b, c, h, w = x.shape
    if tile < 0 or tile_pad < 0:
        raise ValueError("tile and tile_pad must be >= 0")
    shape = (b, c, *scaled_size(h, w, method.scale))
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")

    if getattr(method, "tiles_itself", False):
        result = _run(method, x, _with_tiles(method, options, tile, tile_pad), progress)
        store(out, result.images.to(out.device))
        return SROutput(out, priors=result.priors, timings=result.timings, side_images=result.side_images)

    if not float(method.scale).is_integer():
        tile = 0
    s = int(method.scale)
    n = count_tiles(h, w, tile)
    report = progress if callable(progress) else None
    disable = True if n < 2 or report else (None if progress is None else not progress)  # None: only on a terminal
    bar = tqdm(total=n, desc="tiles", unit="tile", leave=False, disable=disable)
    first: SROutput | None = None
    timings: dict[str, float] = {}
    try:
        for done, ((y0, y1), (x0, x1)) in enumerate(tile_grid(h, w, tile), start=1):
            py0, py1 = max(y0 - tile_pad, 0), min(y1 + tile_pad, h)
            px0, px1 = max(x0 - tile_pad, 0), min(x1 + tile_pad, w)
            result = _run(method, x[:, :, py0:py1, px0:px1], options, False)
            y = result.images
            core = y[:, :, (y0 - py0) * s : (y1 - py0) * s, (x0 - px0) * s : (x1 - px0) * s]
            store(out[:, :, y0 * s : y1 * s, x0 * s : x1 * s], core.to(out.device))
            first = first or result
            for key, value in result.timings.items():
                timings[key] = timings.get(key, 0.0) + float(value)
            del y, core, result
            bar.update(1)
            if report is not None:
                report(done, n)
    finally:
        bar.close()
    assert first is not None
    return SROutput(out, priors=first.priors, timings=timings, side_images=first.side_images)
