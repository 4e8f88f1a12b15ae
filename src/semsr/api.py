"""Python API: ``semsr.upscale(...)`` and ``semsr.load(...)``.

    import semsr
    img = semsr.upscale("photo.jpg")                       # bundled default, 4x
    img = semsr.upscale(pil_image, "bicubic", outscale=3.5, tile=256)
    pipe = semsr.load("realesrgan-x4plus").to("cpu", torch.bfloat16)  # a Pipeline, cached
    res = pipe("photo.jpg", tile=256)                      # Result: .images, .priors, .timings
    res = pipe(["a.png", "b.png"], output_type="np")       # a list in, a list out

The image-level calls follow diffusers' habits: ``num_inference_steps`` is accepted
for ``steps`` and a ``torch.Generator`` (``generator=``) for ``seed``; ``output_type``
is ``"pil"``, ``"np"`` or ``"pt"``; ``return_dict=False`` returns ``(images,)``; and an
unknown keyword raises :class:`UnknownKeyword` (a ``TypeError``) naming the closest
valid one.

Other keyword options are the method's options (:mod:`semsr.core.options`; ``semsr
upscale -n NAME -h`` lists them): they are validated by the method's options
class, so a misspelt name or a bad value is one :class:`~semsr.core.options.OptionError`
line (``method 'default' has no option stepz; did you mean steps?``). Each
option has a stage:

- *build options* configure how a method is constructed (``device``,
  ``dtype``, ``threads``, weight paths such as ``checkpoint``/``controlnet``/
  ``base``...); built methods are cached per (name, build options), so
  repeated calls do not reload weights;
- *run options* are read on every call (``prompt``, ``negative_prompt``,
  ``steps``, ``guidance_scale``, ``seed``, ``colour_fix``, ``tile``...).

:func:`upscale_picture` is the core shared with the CLI: model at its native
scale (tiled, written straight into a ``uint8``/``uint16`` array), alpha
upscaled separately, then a resize to the exact ``outscale`` (area filter when
shrinking, Lanczos when enlarging, as Real-ESRGAN does).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
from semsr.core.loading import partial_loading
from semsr.core.method import Method, MethodSpec, ProgressFn, SuggestsPriors
from semsr.core.options import MethodOptions, OptionError, closest
from semsr.core.outputs import SROutput
from semsr.methods import resolve
from semsr.pipeline.tiling import count_tiles, resolve_tile, scaled_size, upscale_tiled

#: How an alpha plane is upscaled: MATLAB-like cubic resize, or the method itself.
ALPHA_MODES = ("bicubic", "model")
_CACHE_SIZE = 4
_cache: OrderedDict[tuple[Any, ...], Method] = OrderedDict()

#: ``on_progress(stage, done, total)``: called as work advances (stage names:
#: ``"tiles"`` for pixel tiling, ``"denoise"`` for diffusion steps...).
ProgressCallback = Callable[[str, int, int], None]

#: diffusers' keyword names accepted by the image-level calls -> semsr's option names.
KEYWORD_ALIASES: dict[str, str] = {"num_inference_steps": "steps"}
#: What :class:`Pipeline` calls return images as (diffusers' names).
OUTPUT_TYPES = ("pil", "np", "pt")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class UnknownKeyword(OptionError, TypeError):
    """A keyword the call does not take (both an :class:`OptionError` and a ``TypeError``)."""


def method_keywords(spec: MethodSpec, values: Mapping[str, Any], who: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``values`` with diffusers' names mapped to ``spec``'s options (``num_inference_steps`` -> ``steps``,
    ``generator`` -> ``seed``: the generator's initial seed).

    Raises:
        UnknownKeyword: a name that is neither an option of ``spec`` nor in ``extra``,
            naming the closest valid one.
    """
    names = spec.options.names()
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = KEYWORD_ALIASES.get(key, key)
        if name == "generator" and "seed" in names:
            name, value = "seed", _generator_seed(value)
        if name not in names:
            near = closest(key, [*names, *KEYWORD_ALIASES, *(["generator"] if "seed" in names else []), *extra])
            hint = f"; did you mean {near!r}?" if near else ""
            raise UnknownKeyword(f"{who} got an unexpected keyword argument {key!r}{hint}")
        out[name] = value
    return out


#: A command-line flag in a message, with its metavar: ``--base PATH``, ``--no-vlm``.
_FLAG = re.compile(r"--([a-z0-9][a-z0-9-]*)(?: ([A-Z][A-Z0-9_]*)\b)?")


def as_keywords(err: SemsrError, spec: MethodSpec) -> SemsrError:
    """``err`` with the command-line flags of ``spec``'s options written as Python keywords.

    ``pass --base PATH`` becomes ``pass base=PATH`` and ``--no-vlm`` ``no_vlm=True``; flags that are not options
    of ``spec`` stay as they are. Returns ``err`` itself when nothing changed.
    """
    infos = spec.options.infos()

    def keyword(m: re.Match[str]) -> str:
        name = m.group(1).replace("-", "_")
        if name not in infos:
            return m.group(0)
        if m.group(2):
            return f"{name}={m.group(2)}"
        return f"{name}=True" if infos[name].kind == "bool" else f"{name}=..."

    text = _FLAG.sub(keyword, err.message)
    if text == err.message:
        return err
    new = type(err).__new__(type(err))
    new.__dict__.update(err.__dict__)
    new.message = text
    Exception.__init__(new, str(new))
    return new


@contextmanager
def keyword_errors(spec: MethodSpec) -> Iterator[None]:
    """Re-raise a :class:`SemsrError` of the block with Python keywords instead of CLI flags (:func:`as_keywords`)."""
    try:
        yield
    except SemsrError as err:
        new = as_keywords(err, spec)
        if new is err:
            raise
        raise new from err


def _with_keyword_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`Pipeline` method whose errors name Python keywords (:func:`keyword_errors` of ``self.spec``)."""

    @functools.wraps(fn)
    def wrapper(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        with keyword_errors(self.spec):
            return fn(self, *args, **kwargs)

    return wrapper


def _generator_seed(generator: Any) -> int | None:
    """The seed of a ``torch.Generator`` (its initial seed; its state is not used or advanced)."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return int(generator.initial_seed())
    raise OptionError(f"generator must be a torch.Generator, got {type(generator).__name__}")


# ---------------------------------------------------------------- options and methods


def parse_options(
    spec: MethodSpec, options: MethodOptions | None = None, values: Mapping[str, Any] | None = None
) -> MethodOptions:
    """``spec``'s options: ``options`` (an object of ``spec.options``, or the defaults) with ``values`` applied.

    Raises:
        OptionError: an option ``spec`` does not have (naming the closest one) or a bad value.
    """
    if options is not None and not isinstance(options, spec.options):
        raise OptionError(f"method {spec.name!r} takes {spec.options.__name__}, not {type(options).__name__}")
    if options is None:
        return spec.parse(values)
    given = {k: v for k, v in (values or {}).items() if v is not None}
    if not given:
        return options
    parsed = spec.parse(given)  # validates the new values (an unknown name names the closest option)
    return dataclasses.replace(options, **{k: getattr(parsed, k) for k in given})


def _options_key(options: MethodOptions) -> tuple[Any, ...]:
    def hashable(v: Any) -> Any:
        if isinstance(v, dict):
            return tuple(sorted(v.items()))
        return str(v) if isinstance(v, Path) else v

    return tuple((k, hashable(v)) for k, v in options.values().items())


def build_cached(spec: MethodSpec, options: MethodOptions) -> tuple[Method, float]:
    """The method ``spec`` built with the build part of ``options`` (cached per ``(name, build key)``)
    and the seconds building took (0 when it came from the cache)."""
    key = (spec.name, options.build_key())
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key], 0.0
    t0 = time.perf_counter()
    with partial_loading(bool(getattr(options, "partial_load", False))):
        built = spec.factory(options)
    _cache[key] = built
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return built, time.perf_counter() - t0


def load_method(method: str = "default", options: MethodOptions | None = None, **values: Any) -> Method:
    """Build (or fetch from the cache) the bare method ``method`` (tensor in, :class:`SROutput` out).

    :func:`load` wraps the result in a :class:`Pipeline`.

    Args:
        method: registry name or alias (``semsr models list`` shows them).
        options: an options object of the method (``None``: the defaults).
        **values: option values on top of ``options`` (only the build options
            matter here: ``device``, ``dtype``, ``threads``, weight paths...).
    """
    spec = resolve(method)
    return build_cached(spec, parse_options(spec, options, values))[0]


def clear_cache() -> None:
    """Forget every cached method and pipeline (frees their weights)."""
    _cache.clear()
    _pipelines.clear()


# ---------------------------------------------------------------- pictures


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
    method: Method, arr: np.ndarray, options: MethodOptions | None, progress: ProgressFn | bool | None
) -> tuple[np.ndarray, SROutput]:
    """Run ``method`` on ``(H, W, 3)`` integer ``arr``; returns ``(sH, sW, 3)`` of the same dtype and the call's output."""
    top = float(np.iinfo(arr.dtype).max)
    arr = np.require(arr, requirements=["C", "W"])  # torch wants writable memory (copies only if not)
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float().div_(top)
    out = np.empty((*scaled_size(arr.shape[0], arr.shape[1], method.scale), 3), dtype=arr.dtype)
    view = torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0)  # (1, 3, sH, sW) view of out
    with partial_loading(bool(getattr(options, "partial_load", False))):  # priors a method loads on first use
        result = upscale_tiled(method, x, options, progress=progress, out=view)
    return out, result


@dataclass
class PictureOutput:
    """What :func:`upscale_picture_output` produced: the picture and what the method reported.

    Attributes:
        picture: the upscaled picture (dtype and metadata of the input).
        priors, timings, side_images: as in :class:`~semsr.core.outputs.SROutput`
            (of the colour planes' run; timings summed over pixel tiles).
    """

    picture: Picture
    priors: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    side_images: dict[str, torch.Tensor] = field(default_factory=dict)


def upscale_picture_output(
    method: Method,
    pic: Picture,
    options: MethodOptions | None = None,
    *,
    outscale: float | None = None,
    alpha: str = "bicubic",
    progress: ProgressFn | bool | None = False,
) -> PictureOutput:
    """Upscale a :class:`~semsr.core.io.Picture` (the core of the CLI and :func:`upscale`).

    Args:
        method: a built method (native factor ``s = method.scale``).
        pic: input picture (``uint8`` or ``uint16``).
        options: the method's options object, passed to every call; its
            ``tile``/``tile_pad`` drive the pixel tiling (see
            :func:`~semsr.pipeline.tiling.upscale_tiled`; ``None``: automatic).
        outscale: final factor; the ``s``-times result is resized to
            ``round(outscale * size)``. ``None`` keeps ``s``.
        alpha: ``"bicubic"`` (cubic resize of the alpha plane) or ``"model"``
            (the method run on the alpha plane replicated to RGB).
        progress: per-tile progress: a bar (True / ``None`` on a terminal) or ``callable(done, total)``.

    Returns:
        The new picture (same dtype and metadata as ``pic``) and the method's report.
    """
    if alpha not in ALPHA_MODES:
        raise SemsrError(f"unknown alpha mode {alpha!r}; choose {' or '.join(ALPHA_MODES)}")
    if outscale is not None and not outscale > 0:
        raise SemsrError(f"--outscale must be > 0, got {outscale}")
    rgb, result = _apply_to_planes(method, pic.rgb, options, progress)
    target = rgb.shape[:2] if outscale is None else output_size(pic.height, pic.width, outscale)
    rgb = resize_plane(rgb, target)
    out_alpha = None
    if pic.alpha is not None:
        if alpha == "model":
            a3 = np.repeat(pic.alpha[..., None], 3, axis=2)
            a = cv2.cvtColor(_apply_to_planes(method, a3, options, progress)[0], cv2.COLOR_RGB2GRAY)
            out_alpha = resize_plane(a, target)
        else:
            out_alpha = resize_plane(pic.alpha, target, enlarge=cv2.INTER_CUBIC)
    return PictureOutput(
        pic.with_pixels(rgb, out_alpha),
        priors=dict(result.priors),
        timings=dict(result.timings),
        side_images=dict(result.side_images),
    )


def upscale_picture(
    method: Method,
    pic: Picture,
    options: MethodOptions | None = None,
    *,
    outscale: float | None = None,
    alpha: str = "bicubic",
    progress: ProgressFn | bool | None = False,
) -> Picture:
    """The picture of :func:`upscale_picture_output`."""
    return upscale_picture_output(method, pic, options, outscale=outscale, alpha=alpha, progress=progress).picture


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


def upscale(
    image_or_path: str | Path | Image.Image | np.ndarray | Sequence[str | Path | Image.Image | np.ndarray],
    method: str = "default",
    outscale: float | None = None,
    *,
    alpha: str = "bicubic",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool | None = False,
    model: str | None = None,
    **options: Any,
) -> Image.Image | list[Image.Image]:
    """Upscale an image (or a list of images) and return Pillow images.

    Args:
        image_or_path: a file path, a Pillow image, or an ``(H, W[, 3|4])``
            ``uint8``/``uint16``/float-in-[0, 1] NumPy array (RGB order); or a list of them.
        method: method name (``"default"``, ``"bicubic"``, ``"realesrgan-x4plus"``...), as in
            :func:`load`.
        model: the former name of ``method`` (still accepted).
        outscale: final factor (any float > 0); ``None`` = the model's scale.
        alpha: ``"bicubic"`` or ``"model"`` for the alpha plane.
        max_pixels: refuse larger inputs (decompression-bomb guard).
        progress: show per-tile progress.
        **options: the method's options (``None`` = its default), e.g. ``tile``
            (input pixels; ``0``: whole image at once; default automatic, 512-pixel
            tiles for restorers, which are seamless), ``tile_pad``, ``device``,
            ``dtype``, ``threads``, weight paths, ``prompt``, ``steps``, ``seed``...

    Returns:
        ``L``/``LA``/``RGB``/``RGBA`` image (``I;16`` for 16-bit grey), with
        the input's ICC profile in ``info["icc_profile"]`` (a list of them for a list).
        16-bit colour comes back as 8-bit because Pillow has no 16-bit RGB mode; the CLI
        (:func:`semsr.core.io.write_picture`) keeps 16 bits on disk.

    Raises:
        UnknownKeyword: a keyword that is not an option of the method (a ``TypeError``, naming the closest).
        OptionError: a bad value (one line).
    """
    name = model if model is not None else method
    spec = resolve(name)
    opts = parse_options(spec, None, method_keywords(spec, options, f"semsr.upscale({name!r})"))
    with keyword_errors(spec):
        built, _ = build_cached(spec, opts)

        def one(image: Any) -> Image.Image:
            pic = as_picture(image, max_pixels=max_pixels)
            return picture_to_pil(upscale_picture(built, pic, opts, outscale=outscale, alpha=alpha, progress=progress))

        if _is_batch(image_or_path):
            return [one(image) for image in image_or_path]
        return one(image_or_path)


def _is_batch(images: Any) -> bool:
    """A list/tuple of images (an ``(H, W, C)`` array or a path is one image)."""
    return isinstance(images, (list, tuple))


# ---------------------------------------------------------------- pipelines


@dataclass
class Result:
    """What one :class:`Pipeline` call produced (diffusers' ``ImagePipelineOutput`` plus semsr's reports).

    Attributes:
        images: the upscaled images, one per input, as ``output_type`` asked: Pillow images
            (mode as :func:`upscale` returns), ``(H, W, C)`` float32 NumPy arrays in [0, 1]
            (``"np"``; C = 3, or 4 with alpha; 16-bit precision kept) or ``(C, H, W)`` float32
            tensors (``"pt"``).
        priors: the priors the method used for the first (or only) image (``SROutput.priors``)
            and its side images (``SROutput.side_images``, e.g. CoSeR's reference): text
            (``str``: ``"prompt"``, ``"caption"``, ``"degradation"``...), tags
            (``tuple[str, ...]``), numbers, and images (modality maps, references) converted
            to Pillow images. Restorers report nothing: ``{}``.
        timings: seconds per stage, summed over the images: ``"load"`` (0 when the method was
            cached), ``"read"``, ``"upscale"``, and any stage the method reports
            (``SROutput.timings``); ``"total"`` is read + upscale.
        image_priors: the priors of every image, in input order.
    """

    images: list[Any]
    priors: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    image_priors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def image(self) -> Any:
        """The first (or only) image."""
        return self.images[0]


def convert_picture(pic: Picture, output_type: str) -> Any:
    """``pic`` as ``output_type``: a Pillow image (``"pil"``), an ``(H, W, C)`` float32 array in [0, 1]
    (``"np"``) or a ``(C, H, W)`` float32 tensor in [0, 1] (``"pt"``); C = 3, or 4 with alpha."""
    if output_type == "pil":
        return picture_to_pil(pic)
    top = float(np.iinfo(pic.rgb.dtype).max)
    planes = pic.rgb if pic.alpha is None else np.concatenate([pic.rgb, pic.alpha[..., None]], axis=2)
    arr = planes.astype(np.float32) / top
    return arr if output_type == "np" else torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


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
                arr = t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
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


class _TileProgress:
    """``progress(done, total)`` of the pixel tiler, reported as ``on_progress("tiles", ...)`` across ``runs`` runs."""

    def __init__(self, on_progress: ProgressCallback, total: int) -> None:
        self.on_progress, self.total, self.offset, self.last = on_progress, total, 0, 0

    def __call__(self, done: int, total: int) -> None:
        if done < self.last:  # a new run (the alpha plane)
            self.offset += self.last
        self.last = done
        self.on_progress("tiles", min(self.offset + done, self.total), self.total)


class Pipeline:
    """A loaded method plus image-level calls returning :class:`Result`.

    Made by :func:`load`::

        pipe = semsr.load("sd-controlnet", base="/models/sd15", controlnet="/models/cn-sr")
        res = pipe("photo.png", prompt="a red fox", steps=20, seed=1)
        res.image.save("fox_x4.png"); print(res.priors, res.timings)

    A pipeline is also a :class:`~semsr.core.method.Method` (``name``, ``scale``,
    ``tiles_itself``; ``pipe(x, options)`` with a ``(B, 3, H, W)`` tensor in [0, 1]
    gives the method's :class:`~semsr.core.outputs.SROutput`), so it can be passed
    wherever a method is expected.

    Attributes:
        method: the built method.
        spec: its registry entry.
        options: the options it was loaded with (the defaults of every call).
    """

    def __init__(
        self, method: Method, spec: MethodSpec, options: MethodOptions | None = None, load_seconds: float = 0.0
    ) -> None:
        self.method = method
        self.spec = spec
        self.options = options if options is not None else spec.options()
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

    @property
    def options_class(self) -> type[MethodOptions]:
        return self.spec.options

    def __getattr__(self, name: str) -> Any:  # tile_pad, device... of the method
        if name == "method":
            raise AttributeError(name)
        return getattr(self.method, name)

    def call_options(
        self, options: MethodOptions | None = None, values: Mapping[str, Any] | None = None
    ) -> MethodOptions:
        """The options of one call: :attr:`options`, or ``options``, with ``values`` applied.

        Raises:
            OptionError: unknown option, bad value, or a build option other than
                the pipeline's (those are given to :func:`load`).
        """
        opts = parse_options(self.spec, options if options is not None else self.options, values)
        if opts.build_key() != self.options.build_key():
            loaded, asked = self.options.values("build"), opts.values("build")
            names = [n for n in asked if asked[n] != loaded[n]]
            raise OptionError(
                f"method {self.spec.name!r}: {', '.join(names)} "
                f"{'is a build option' if len(names) == 1 else 'are build options'}; "
                f"give {'it' if len(names) == 1 else 'them'} to semsr.load(...)"
            )
        return opts

    # diffusers habits ------------------------------------------------------
    @_with_keyword_errors
    def to(
        self, *args: Any, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
    ) -> Pipeline:
        """Move the pipeline to ``device`` and/or ``dtype`` (diffusers' ``pipe.to(...)``); returns ``self``.

        ``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``, ``pipe.to("cpu", torch.float32)``, ``pipe.to("auto")``
        (the default precision: bf16 on CPUs with native bf16, fp32 on other CPUs, bf16/fp16 on GPUs). The method is
        rebuilt with the new build options (from the cache when it was built that way before).
        """
        for arg in args:
            if isinstance(arg, (torch.dtype, str)) and (
                arg in _DTYPE_NAMES or arg in _DTYPE_NAMES.values() or arg == "auto"
            ):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            else:
                raise TypeError(f"Pipeline.to() takes a device and/or a dtype, got {arg!r}")
        changes: dict[str, Any] = {}
        if device is not None:
            changes["device"] = str(device)
        if dtype is not None:
            if isinstance(dtype, torch.dtype) and dtype not in _DTYPE_NAMES:
                raise OptionError(f"dtype {dtype} is not supported; use one of {', '.join(map(str, _DTYPE_NAMES))}")
            changes["dtype"] = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
        if changes:
            opts = parse_options(self.spec, self.options, changes)
            self.method, seconds = build_cached(self.spec, opts)
            self.options, self.load_seconds = opts, self.load_seconds + seconds
        return self

    @property
    def device(self) -> torch.device:
        """The device the method runs on."""
        return torch.device(self.options.device)

    # Image-level API ----------------------------------------------------
    @_with_keyword_errors
    def __call__(
        self,
        image: Any,
        options: MethodOptions | None = None,
        *,
        outscale: float | None = None,
        alpha: str = "bicubic",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        progress: ProgressFn | bool | None = False,
        on_progress: ProgressCallback | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **values: Any,
    ) -> Result | SROutput | tuple[list[Any]]:
        """Upscale ``image`` (or a list of images).

        Args:
            image: path, Pillow image, ``(H, W[, C])`` NumPy array or
                :class:`~semsr.core.io.Picture`, or a list of them. (A ``(B, 3, H, W)`` tensor calls
                the method directly and returns its :class:`~semsr.core.outputs.SROutput`.)
            options: an options object of the method (default: the pipeline's :attr:`options`).
            outscale: final factor (``None`` = the method's scale).
            alpha: ``"bicubic"`` or ``"model"`` for an alpha plane.
            max_pixels: refuse larger inputs.
            progress: tqdm bars.
            on_progress: ``callback(stage, done, total)`` as work advances.
            output_type: ``"pil"``, ``"np"`` or ``"pt"`` (see :class:`Result`).
            return_dict: ``False`` returns ``(images,)`` as diffusers does.
            **values: run options of the method (``prompt``, ``negative_prompt``, ``steps`` or
                ``num_inference_steps``, ``guidance_scale``, ``seed`` or ``generator``, ``colour_fix``,
                ``tile``, ``tile_pad``...; ``None`` = the method's default), and
                ``priors_in_prompt=True`` (methods that suggest priors) when the prompts hold (edited)
                :meth:`suggest_priors` text that must not be extracted and added again.

        Returns:
            :class:`Result` with ``.images``, ``.priors`` and ``.timings``.

        Raises:
            UnknownKeyword: a keyword the method does not take (a ``TypeError``, naming the closest).
        """
        if output_type not in OUTPUT_TYPES:
            raise OptionError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        opts = self.call_options(options, method_keywords(self.spec, values, f"pipeline {self.spec.name!r}"))
        if isinstance(image, torch.Tensor):
            with partial_loading(bool(getattr(opts, "partial_load", False))):
                return self.method(image, opts, progress=progress)
        images = list(image) if _is_batch(image) else [image]
        outputs, all_priors, timings = [], [], {"load": self.load_seconds}
        for item in images:
            t0 = time.perf_counter()
            pic = as_picture(item, max_pixels=max_pixels)
            t1 = time.perf_counter()
            report: ProgressFn | bool | None = progress
            if on_progress is not None:
                if self.tiles_itself:
                    report = lambda done, total: on_progress("denoise", done, total)  # noqa: E731
                else:
                    n = count_tiles(pic.height, pic.width, resolve_tile(self.method, opts.tile))
                    n *= 2 if (pic.alpha is not None and alpha == "model") else 1
                    report = _TileProgress(on_progress, n)
            out = upscale_picture_output(self.method, pic, opts, outscale=outscale, alpha=alpha, progress=report)
            t2 = time.perf_counter()
            outputs.append(convert_picture(out.picture, output_type))
            stages = {"read": t1 - t0, **{str(k): float(v) for k, v in out.timings.items()}}
            stages.update(upscale=t2 - t1, total=time.perf_counter() - t0)
            for key, value in stages.items():
                timings[key] = timings.get(key, 0.0) + value
            all_priors.append(priors_to_python({**out.priors, **out.side_images}))
        self.load_seconds = 0.0  # later calls reuse the loaded method
        if not return_dict:
            return (outputs,)
        return Result(images=outputs, priors=all_priors[0], timings=timings, image_priors=all_priors)

    @_with_keyword_errors
    def suggest_priors(
        self, image: str | Path | Image.Image | np.ndarray | Picture, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> dict[str, Any]:
        """Priors the method would extract from ``image`` (for editing before a run).

        Calls the method's ``suggest_priors(x)`` (:class:`~semsr.core.method.SuggestsPriors`,
        ``x`` = ``(1, 3, H, W)`` float in [0, 1]) when it has one; ``{}``
        otherwise (restorers). Keys ``"prompt"``/``"negative_prompt"`` are
        what a front end pre-fills its prompt fields with; passing the
        run-option keys back with ``priors_in_prompt=True`` reproduces the
        method's default conditioning::

            s = pipe.suggest_priors("photo.png")      # e.g. {"prompt": "<caption>", "low_prompt": "<IRPAD text>", ...}
            res = pipe("photo.png", prompt=s["prompt"] + ", freckles", low_prompt=s["low_prompt"],
                       priors_in_prompt=True)
        """
        if not isinstance(self.method, SuggestsPriors):
            return {}
        pic = as_picture(image, max_pixels=max_pixels)
        top = float(np.iinfo(pic.rgb.dtype).max)
        x = torch.from_numpy(np.ascontiguousarray(pic.rgb)).permute(2, 0, 1).unsqueeze(0).float().div_(top)
        return priors_to_python(dict(self.method.suggest_priors(x) or {}))


_pipelines: dict[tuple[Any, ...], Pipeline] = {}


def load(method: str = "default", options: MethodOptions | None = None, **values: Any) -> Pipeline:
    """Load ``method`` as a :class:`Pipeline` (cached per method and options).

    Args:
        method: registry name or alias (``semsr models list``).
        options: an options object of the method (``None``: the defaults).
        **values: option values on top of ``options``: build options (``device``,
            ``dtype``, ``threads``, weight paths such as ``base``, ``controlnet``,
            ``checkpoint``; local files only, nothing is downloaded) and run
            options, which become the defaults of the pipeline's calls.

    Raises:
        UnknownKeyword: a keyword that is not an option of the method (a ``TypeError``, naming the closest).
        OptionError: a bad value (one line).

    Example::

        pipe = semsr.load("bicubic")
        res = pipe("photo.png")
        res.image.size, res.priors, res.timings["upscale"]
    """
    spec = resolve(method)
    opts = parse_options(spec, options, method_keywords(spec, values, f"semsr.load({method!r})"))
    with keyword_errors(spec):
        built, seconds = build_cached(spec, opts)
    key = (spec.name, _options_key(opts))
    cached = _pipelines.get(key)
    if cached is not None and cached.method is built:
        return cached
    live = {id(m) for m in _cache.values()}
    for old in [k for k, p in _pipelines.items() if id(p.method) not in live]:
        del _pipelines[old]
    pipe = Pipeline(built, spec, opts, load_seconds=seconds)
    _pipelines[key] = pipe
    return pipe
