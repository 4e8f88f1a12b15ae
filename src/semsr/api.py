"""Python API: ``semsr.upscale(...)`` and ``semsr.load(...)``.

    import semsr
    img = semsr.upscale("photo.jpg")                      # bundled default, 4x
    img = semsr.upscale(pil_image, model="bicubic", outscale=3.5, tile=256)
    method = semsr.load("realesrgan-x4plus", dtype="bf16")  # a Method, cached

Built methods are cached per (name, build options), so repeated calls do not
reload weights. Options are split in two kinds:

- *build options* configure how a method is constructed (``device``,
  ``dtype``, ``threads``, weight paths such as ``checkpoint``/``controlnet``/
  ``base``/``vlm``/``clip``, or any keyword the method's factory names);
- *run options* are passed on every call (``prompt``, ``negative_prompt``,
  ``steps``, ``guidance_scale``, ``seed``, ``colour_fix``...); methods ignore
  the ones that do not apply to them.

:func:`upscale_picture` is the core shared with the CLI: model at its native
scale (tiled, written straight into a ``uint8``/``uint16`` array), alpha
upscaled separately, then a resize to the exact ``outscale`` (area filter when
shrinking, Lanczos when enlarging, as Real-ESRGAN does).
"""
from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from semsr.errors import InputError, SemsrError
from semsr.io import (
    DEFAULT_MAX_PIXELS,
    Picture,
    check_frames,
    check_size,
    picture_from_array,
    picture_from_pil,
    picture_to_pil,
    read_image,
)
from semsr.methods import Method, MethodSpec, resolve
from semsr.pipeline.tiling import scaled_size, tiled_apply

log = logging.getLogger("semsr.api")

#: Build options every front end knows (weight paths); forwarded only when given.
PATH_OPTIONS = ("base", "controlnet", "checkpoint", "vlm", "clip")
#: How an alpha plane is upscaled: MATLAB-like cubic resize, or the method itself.
ALPHA_MODES = ("bicubic", "model")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
_CACHE_SIZE = 4
_cache: OrderedDict[tuple[Any, ...], Method] = OrderedDict()


def normalise_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32"|"bf16"|"fp16"`` (or a ``torch.dtype``) -> ``torch.dtype``; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise SemsrError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16") from None


def factory_accepts(spec: MethodSpec) -> tuple[set[str], bool]:
    """Keyword names ``spec.factory`` declares, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(spec.factory).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def declared_build_options(spec: MethodSpec) -> set[str]:
    """Build-option names a method declares: factory parameters plus its ``build`` CLI options."""
    names, _ = factory_accepts(spec)
    for opt in spec.extra.get("cli_options", ()):
        if opt.get("target", "run") == "build":
            names.add(option_dest(opt))
    return names


def option_dest(opt: Mapping[str, Any]) -> str:
    """The keyword name of a ``cli_options`` entry (``dest`` or its first long flag)."""
    if "dest" in opt:
        return str(opt["dest"])
    flags = list(opt["flags"])
    long = next((f for f in flags if f.startswith("--")), flags[0])
    return long.lstrip("-").replace("-", "_")


def filter_build_options(spec: MethodSpec, opts: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Keep the options ``spec.factory`` can take; return ``(kept, dropped_names)``."""
    names, var_kw = factory_accepts(spec)
    kept = {k: v for k, v in opts.items() if var_kw or k in names}
    return kept, [k for k in opts if k not in kept]


def _cache_key(name: str, opts: Mapping[str, Any]) -> tuple[Any, ...]:
    def hashable(v: Any) -> Any:
        try:
            hash(v)
            return v
        except TypeError:
            return repr(v)

    return (name, tuple(sorted((k, hashable(v)) for k, v in opts.items())))


def load(
    method: str = "default",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    threads: int | None = None,
    **build_opts: Any,
) -> Method:
    """Build (or fetch from the cache) the method ``method``.

    Args:
        method: registry name or alias (``semsr models list`` shows them).
        device: torch device string.
        dtype: ``"fp32"``/``"bf16"``/``"fp16"`` or a ``torch.dtype``; ``None``
            lets the method choose.
        threads: CPU threads (``torch.set_num_threads``; also given to the
            factory when it takes ``threads``).
        **build_opts: further factory options (weight paths...). ``None``
            values are dropped; options the factory does not take are dropped
            with a warning.

    Returns:
        The :class:`~semsr.methods.Method`.
    """
    spec = resolve(method)
    if threads:
        torch.set_num_threads(int(threads))
    opts = {"device": device, "dtype": normalise_dtype(dtype), "threads": threads}
    opts.update(build_opts)
    opts = {k: v for k, v in opts.items() if v is not None}
    kept, dropped = filter_build_options(spec, opts)
    for name in dropped:
        if name not in ("device", "dtype", "threads"):
            log.warning("method %s does not take option %r; ignored", spec.name, name)
    key = _cache_key(spec.name, kept)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    built = spec.factory(**kept)
    _cache[key] = built
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return built


def clear_cache() -> None:
    """Forget every cached method (frees their weights)."""
    _cache.clear()


def output_size(h: int, w: int, outscale: float) -> tuple[int, int]:
    """Output ``(h, w)`` for a factor: ``round(outscale * size)``, at least 1."""
    return max(1, int(h * outscale + 0.5)), max(1, int(w * outscale + 0.5))


def resize_plane(arr: np.ndarray, size: tuple[int, int], enlarge: int = cv2.INTER_LANCZOS4) -> np.ndarray:
    """Resize an ``(H, W[, C])`` uint8/uint16 array to ``size = (h, w)``.

    Area averaging when shrinking (no aliasing), ``enlarge`` (Lanczos by
    default) when growing; integer arrays are rounded and saturated by OpenCV.
    """
    h, w = size
    if (h, w) == arr.shape[:2]:
        return arr
    interp = cv2.INTER_AREA if h * w < arr.shape[0] * arr.shape[1] else enlarge
    return cv2.resize(arr, (w, h), interpolation=interp)


def _apply_to_planes(
    method: Method,
    arr: np.ndarray,
    tile: int | None,
    tile_pad: int | None,
    run_opts: Mapping[str, Any],
    progress: bool | None,
) -> np.ndarray:
    """Run ``method`` on ``(H, W, 3)`` integer ``arr``; returns ``(sH, sW, 3)`` of the same dtype."""
    top = float(np.iinfo(arr.dtype).max)
    arr = np.require(arr, requirements=["C", "W"])  # torch wants writable memory (copies only if not)
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float().div_(top)
    out = np.empty((*scaled_size(arr.shape[0], arr.shape[1], method.scale), 3), dtype=arr.dtype)
    view = torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0)  # (1, 3, sH, sW) view of out
    tiled_apply(method, x, tile=tile, tile_pad=tile_pad, run_opts=run_opts, progress=progress, out=view)
    return out


def upscale_picture(
    method: Method,
    pic: Picture,
    outscale: float | None = None,
    tile: int | None = None,
    tile_pad: int | None = None,
    alpha: str = "bicubic",
    progress: bool | None = False,
    run_opts: Mapping[str, Any] | None = None,
) -> Picture:
    """Upscale a :class:`~semsr.io.Picture` (the core of the CLI and :func:`upscale`).

    Args:
        method: a built method (native factor ``s = method.scale``).
        pic: input picture (``uint8`` or ``uint16``).
        outscale: final factor; the ``s``-times result is resized to
            ``round(outscale * size)``. ``None`` keeps ``s``.
        tile, tile_pad: pixel tiling (see :func:`~semsr.pipeline.tiling.tiled_apply`);
            ``None`` picks them automatically (memory-safe tiles, seamless context).
        alpha: ``"bicubic"`` (cubic resize of the alpha plane) or ``"model"``
            (the method run on the alpha plane replicated to RGB).
        progress: per-tile progress bar.
        run_opts: per-call method options.

    Returns:
        A new picture with the same dtype and metadata as ``pic``.
    """
    if alpha not in ALPHA_MODES:
        raise SemsrError(f"unknown alpha mode {alpha!r}; choose {' or '.join(ALPHA_MODES)}")
    if outscale is not None and not outscale > 0:
        raise SemsrError(f"--outscale must be > 0, got {outscale}")
    opts = dict(run_opts or {})
    rgb = _apply_to_planes(method, pic.rgb, tile, tile_pad, opts, progress)
    target = rgb.shape[:2] if outscale is None else output_size(pic.height, pic.width, outscale)
    rgb = resize_plane(rgb, target)
    out_alpha = None
    if pic.alpha is not None:
        if alpha == "model":
            a3 = np.repeat(pic.alpha[..., None], 3, axis=2)
            a = cv2.cvtColor(_apply_to_planes(method, a3, tile, tile_pad, opts, progress), cv2.COLOR_RGB2GRAY)
            out_alpha = resize_plane(a, target)
        else:
            out_alpha = resize_plane(pic.alpha, target, enlarge=cv2.INTER_CUBIC)
    return pic.with_pixels(rgb, out_alpha)


def as_picture(image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Picture:
    """A :class:`~semsr.io.Picture` from a path, a Pillow image or a NumPy array."""
    if isinstance(image, Picture):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        check_size(image.width, image.height, max_pixels, None)
        check_frames(image, None)
        image.load()
        return picture_from_pil(image)
    if isinstance(image, np.ndarray):
        return picture_from_array(image)
    raise InputError(f"cannot upscale a {type(image).__name__}; give a path, PIL image or NumPy array")


def split_options(spec: MethodSpec, opts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into ``(build_opts, run_opts)`` for ``spec``.

    Build options are the weight-path options (:data:`PATH_OPTIONS`) and any
    name the method declares for building (factory parameters, ``cli_options``
    with ``target="build"``); everything else is a run option.
    """
    build_names = set(PATH_OPTIONS) | declared_build_options(spec)
    build = {k: v for k, v in opts.items() if k in build_names}
    run = {k: v for k, v in opts.items() if k not in build_names}
    return build, run


def upscale(
    image_or_path: str | Path | Image.Image | np.ndarray,
    model: str = "default",
    outscale: float | None = None,
    tile: int | None = None,
    tile_pad: int | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    threads: int | None = None,
    alpha: str = "bicubic",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool | None = False,
    **options: Any,
) -> Image.Image:
    """Upscale an image and return it as a Pillow image.

    Args:
        image_or_path: a file path, a Pillow image, or an ``(H, W[, 3|4])``
            ``uint8``/``uint16``/float-in-[0, 1] NumPy array (RGB order).
        model: method name (``"default"``, ``"bicubic"``, ``"realesrgan-x4plus"``...).
        outscale: final factor (any float > 0); ``None`` = the model's scale.
        tile: tile side in input pixels (``0``: whole image at once; ``None``:
            automatic, 512-pixel tiles for restorers, which are seamless).
        tile_pad: context pixels around each tile (``None``: what the method
            needs to be seamless, 64 by default).
        device, dtype: where and in which precision the method runs.
        threads: CPU threads for torch (``None``: leave as is).
        alpha: ``"bicubic"`` or ``"model"`` for the alpha plane.
        max_pixels: refuse larger inputs (decompression-bomb guard).
        progress: show per-tile progress.
        **options: build options (weight paths, factory keywords) and run
            options (prompt, steps, seed...); see :func:`split_options`.

    Returns:
        ``L``/``LA``/``RGB``/``RGBA`` image (``I;16`` for 16-bit grey), with
        the input's ICC profile in ``info["icc_profile"]``. 16-bit colour
        comes back as 8-bit because Pillow has no 16-bit RGB mode; the CLI
        (:func:`semsr.io.write_picture`) keeps 16 bits on disk.
    """
    spec = resolve(model)
    build, run = split_options(spec, options)
    method = load(spec.name, device=device, dtype=dtype, threads=threads, **build)
    pic = as_picture(image_or_path, max_pixels=max_pixels)
    result = upscale_picture(
        method, pic, outscale=outscale, tile=tile, tile_pad=tile_pad, alpha=alpha, progress=progress, run_opts=run
    )
    return picture_to_pil(result)
