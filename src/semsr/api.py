"""Python API: ``semsr.upscale(...)`` and ``semsr.load(...)``.

    import semsr
    img = semsr.upscale("photo.jpg")                      # bundled default, 4x
    img = semsr.upscale(pil_image, model="bicubic", outscale=3.5, tile=256)
    pipe = semsr.load("realesrgan-x4plus", dtype="bf16")  # a Pipeline, cached
    res = pipe("photo.jpg", tile=256)                     # Result: .image, .priors, .timings

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
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from semsr.core.errors import InputError, SemsrError
from semsr.core.io import (
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
from semsr.priors.report import PRIORS_IN_PROMPT  # noqa: F401 - re-exported: semsr.api.PRIORS_IN_PROMPT

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


def load_method(
    method: str = "default",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    threads: int | None = None,
    **build_opts: Any,
) -> Method:
    """Build (or fetch from the cache) the bare method ``method`` (tensor in, tensor out).

    :func:`load` wraps the result in a :class:`~semsr.pipeline_api.Pipeline`.

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
    """Forget every cached method and pipeline (frees their weights)."""
    _cache.clear()
    _pipelines.clear()


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
    """Upscale a :class:`~semsr.core.io.Picture` (the core of the CLI and :func:`upscale`).

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
    """A :class:`~semsr.core.io.Picture` from a path, a Pillow image or a NumPy array."""
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
        (:func:`semsr.core.io.write_picture`) keeps 16 bits on disk.
    """
    spec = resolve(model)
    build, run = split_options(spec, options)
    method = load_method(spec.name, device=device, dtype=dtype, threads=threads, **build)
    pic = as_picture(image_or_path, max_pixels=max_pixels)
    result = upscale_picture(
        method, pic, outscale=outscale, tile=tile, tile_pad=tile_pad, alpha=alpha, progress=progress, run_opts=run
    )
    return picture_to_pil(result)


# ---------------------------------------------------------------- pipelines

#: ``on_progress(stage, done, total)``: called as work advances (stage names:
#: ``"tiles"`` for pixel tiling, ``"denoise"`` for diffusion steps...).
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class Result:
    """What one :class:`Pipeline` call produced.

    Attributes:
        image: the upscaled image (Pillow; mode as :func:`upscale` returns).
        priors: the priors the method actually used, as it reports them
            (:data:`PRIORS_ATTRIBUTE`): text (``str``: ``"prompt"``,
            ``"caption"``, ``"degradation"``...), tags (``tuple[str, ...]``),
            numbers, and images (modality maps, references) converted to
            Pillow images. Restorers report nothing: ``{}``.
        timings: seconds per stage: ``"load"`` (0 when the method was cached),
            ``"read"``, ``"upscale"``, and any stage the method reports
            (``last_timings``); ``"total"`` is read + upscale.
    """

    image: Image.Image
    priors: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


#: Attribute a method sets during its call to report the priors it used
#: (``dict[str, Any]``; tensors ``(1, C, H, W)`` in [0, 1] become images).
PRIORS_ATTRIBUTE = "last_priors"
#: Attribute a method may set to report its own per-stage seconds.
TIMINGS_ATTRIBUTE = "last_timings"
#: Optional method hook ``suggest_priors(x: Tensor (1, 3, H, W)) -> dict`` that
#: extracts priors *before* a run (e.g. an IRPAD/VLM prompt) so a user can edit
#: them; keys ``"prompt"``/``"negative_prompt"`` pre-fill the prompt fields (and
#: other run-option names, e.g. ``"low_prompt"``, the method's own fields). Pass
#: them back with the run option :data:`PRIORS_IN_PROMPT` (``priors_in_prompt=True``)
#: so the method uses them as given. Methods implement both through
#: :class:`semsr.priors.report.PriorReporter`.
SUGGEST_HOOK = "suggest_priors"


def priors_to_python(priors: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a method's reported priors to plain Python/Pillow values.

    Image tensors ``(1, C, H, W)`` / ``(C, H, W)`` float in [0, 1] (C = 1 or 3)
    become Pillow ``L``/``RGB`` images; other tensors become lists (small) or
    are summarised by shape; tuples/lists/str/numbers are kept.
    """
    out: dict[str, Any] = {}
    for key, value in priors.items():
        if isinstance(value, torch.Tensor):
            t = value.detach().float().cpu()
            if t.ndim == 4 and t.shape[0] == 1:
                t = t[0]
            if t.ndim == 3 and t.shape[0] in (1, 3) and min(t.shape[1:]) > 1:
                arr = (t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
                out[key] = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
            elif t.numel() <= 64:
                out[key] = t.tolist()
            else:
                out[key] = f"tensor{tuple(t.shape)}"
        elif isinstance(value, Mapping):
            out[key] = priors_to_python(value)
        else:
            out[key] = value
    return out


class _TileCounter:
    """Method proxy that reports each pixel tile through ``on_progress("tiles", ...)``."""

    def __init__(self, method: Method, total: int, on_progress: ProgressCallback) -> None:
        self._method, self._total, self._on_progress, self._done = method, total, on_progress, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        y = self._method(x, **run_opts)
        self._done += 1
        self._on_progress("tiles", min(self._done, self._total), self._total)
        return y


class Pipeline:
    """A loaded method plus image-level calls returning :class:`Result`.

    Made by :func:`load`::

        pipe = semsr.load("sd-controlnet", base="/models/sd15", controlnet="/models/cn-sr")
        res = pipe("photo.png", prompt="a red fox", steps=20, seed=1)
        res.image.save("fox_x4.png"); print(res.priors, res.timings)

    A pipeline is also a :class:`~semsr.methods.Method` (``name``, ``scale``,
    ``tiles_itself``; a ``(B, 3, H, W)`` tensor in [0, 1] in gives the
    method's tensor out), so it can be passed wherever a method is expected.
    """

    def __init__(self, method: Method, spec: MethodSpec, load_seconds: float = 0.0) -> None:
        self.method = method
        self.spec = spec
        self.load_seconds = load_seconds

    # Method protocol -------------------------------------------------
    @property
    def name(self) -> str:
        return self.method.name

    @property
    def scale(self) -> int:
        return self.method.scale

    @property
    def tiles_itself(self) -> bool:
        return bool(getattr(self.method, "tiles_itself", False))

    def __getattr__(self, name: str) -> Any:  # tile_pad, device... of the method
        if name == "method":
            raise AttributeError(name)
        return getattr(self.method, name)

    # Image-level API ----------------------------------------------------
    def __call__(
        self,
        image: str | Path | Image.Image | np.ndarray | Picture | torch.Tensor,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        tile: int | None = None,
        *,
        tile_pad: int | None = None,
        outscale: float | None = None,
        colour_fix: str | None = None,
        alpha: str = "bicubic",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        progress: bool | None = False,
        on_progress: ProgressCallback | None = None,
        **run_opts: Any,
    ) -> Result | torch.Tensor:
        """Upscale ``image``.

        Args:
            image: path, Pillow image, ``(H, W[, C])`` NumPy array or
                :class:`~semsr.core.io.Picture`. (A ``(B, 3, H, W)`` tensor calls
                the method directly and returns its tensor.)
            prompt, negative_prompt, steps, guidance_scale, seed, colour_fix:
                diffusion run options (``None`` = the method's default;
                restorers ignore them).
            tile, tile_pad: tiling (see :func:`upscale`).
            outscale: final factor (``None`` = the method's scale).
            alpha: ``"bicubic"`` or ``"model"`` for an alpha plane.
            max_pixels: refuse larger inputs.
            progress: tqdm bars.
            on_progress: ``callback(stage, done, total)`` as work advances.
            **run_opts: the method's own options (``extra["cli_options"]``), and
                ``priors_in_prompt=True`` when the prompts hold (edited)
                :meth:`suggest_priors` text that must not be extracted and added again.

        Returns:
            :class:`Result` with ``.image``, ``.priors`` and ``.timings``.
        """
        if isinstance(image, torch.Tensor):
            opts = dict(run_opts)
            for k, v in (("prompt", prompt), ("negative_prompt", negative_prompt), ("steps", steps),
                         ("guidance_scale", guidance_scale), ("seed", seed), ("tile", tile),
                         ("tile_pad", tile_pad), ("colour_fix", colour_fix)):
                if v is not None:
                    opts[k] = v
            return self.method(image, **opts)
        t0 = time.perf_counter()
        pic = as_picture(image, max_pixels=max_pixels)
        t1 = time.perf_counter()
        opts = {k: v for k, v in dict(run_opts, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                                      guidance_scale=guidance_scale, seed=seed, colour_fix=colour_fix).items()
                if v is not None}
        method: Method = self.method
        if on_progress is not None:
            if self.tiles_itself:
                opts["progress"] = lambda done, total: on_progress("denoise", done, total)
            else:
                from semsr.pipeline.tiling import count_tiles, resolve_tile

                n = count_tiles(pic.height, pic.width, resolve_tile(self.method, tile))
                n *= 2 if (pic.alpha is not None and alpha == "model") else 1
                method = _TileCounter(self.method, n, on_progress)  # type: ignore[assignment]
        for attr in (PRIORS_ATTRIBUTE, TIMINGS_ATTRIBUTE, "side_outputs"):
            if hasattr(self.method, attr):
                try:
                    setattr(self.method, attr, {} if attr != "side_outputs" else None)
                except AttributeError:
                    pass
        out = upscale_picture(method, pic, outscale=outscale, tile=tile, tile_pad=tile_pad, alpha=alpha,
                              progress=progress, run_opts=opts)
        t2 = time.perf_counter()
        result_image = picture_to_pil(out)
        timings = {"load": self.load_seconds, "read": t1 - t0}
        timings.update({str(k): float(v) for k, v in (getattr(self.method, TIMINGS_ATTRIBUTE, None) or {}).items()})
        timings.update(upscale=t2 - t1, total=time.perf_counter() - t0)
        self.load_seconds = 0.0  # later calls reuse the loaded method
        priors = dict(getattr(self.method, PRIORS_ATTRIBUTE, None) or {})
        priors.update(getattr(self.method, "side_outputs", None) or {})
        return Result(image=result_image, priors=priors_to_python(priors), timings=timings)

    def suggest_priors(self, image: str | Path | Image.Image | np.ndarray | Picture,
                       max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
        """Priors the method would extract from ``image`` (for editing before a run).

        Calls the method's ``suggest_priors(x)`` hook (:data:`SUGGEST_HOOK`,
        ``x`` = ``(1, 3, H, W)`` float in [0, 1]) when it has one; ``{}``
        otherwise (restorers). Keys ``"prompt"``/``"negative_prompt"`` are
        what a front end pre-fills its prompt fields with; passing the
        run-option keys back with ``priors_in_prompt=True`` reproduces the
        method's default conditioning::

            s = pipe.suggest_priors("photo.png")      # e.g. {"prompt": "<caption>", "low_prompt": "<IRPAD text>", ...}
            res = pipe("photo.png", prompt=s["prompt"] + ", freckles", low_prompt=s["low_prompt"],
                       priors_in_prompt=True)
        """
        hook = getattr(self.method, SUGGEST_HOOK, None)
        if not callable(hook):
            return {}
        pic = as_picture(image, max_pixels=max_pixels)
        top = float(np.iinfo(pic.rgb.dtype).max)
        x = torch.from_numpy(np.ascontiguousarray(pic.rgb)).permute(2, 0, 1).unsqueeze(0).float().div_(top)
        return priors_to_python(dict(hook(x) or {}))


_pipelines: dict[int, Pipeline] = {}


def load(
    method: str = "default",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    threads: int | None = None,
    **local_paths: Any,
) -> Pipeline:
    """Load ``method`` as a :class:`Pipeline` (cached per method and options).

    Args:
        method: registry name or alias (``semsr models list``).
        device, dtype, threads: see :func:`load_method`.
        **local_paths: weight paths (``base``, ``controlnet``, ``checkpoint``,
            ``vlm``, ``clip``) and other build options of the method; local
            files only, nothing is downloaded.

    Example::

        pipe = semsr.load("bicubic")
        res = pipe("photo.png")
        res.image.size, res.priors, res.timings["upscale"]
    """
    spec = resolve(method)
    t0 = time.perf_counter()
    built = load_method(spec.name, device=device, dtype=dtype, threads=threads, **local_paths)
    seconds = time.perf_counter() - t0
    cached = _pipelines.get(id(built))
    if cached is not None and cached.method is built:
        return cached
    live = {id(m) for m in _cache.values()}
    for key in [k for k in _pipelines if k not in live]:
        del _pipelines[key]
    pipe = Pipeline(built, spec, load_seconds=seconds)
    _pipelines[id(built)] = pipe
    return pipe
