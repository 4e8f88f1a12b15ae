"""First-stage restorers registered in :mod:`semsr.methods`.

Importing this module registers one method per entry of
:func:`semsr.models.catalog.catalog` plus ``default``:

- ``bicubic``: MATLAB-compatible bicubic (``scale=N`` build option, default 4);
- ``realesrgan-x4plus``, ``realesrgan-x4plus-anime``, ``realsr-df2k-x4``:
  semsr's PyTorch :class:`~semsr.models.rrdbnet.RRDBNet` with weights read
  from the ncnn blobs of the pip packages;
- ``realesrgan-pth``: RRDBNet from a user's Real-ESRGAN ``.pth`` (``weights=PATH``);
- ``realesr-animevideov3-x{2,3,4}`` and ``realcugan[-pro]-{2,3,4}x[-variant]``:
  the ncnn runtime on CPU;
- ``default`` (registered by :mod:`semsr.methods.default_alias`): builds
  :data:`~semsr.models.catalog.DEFAULT_TARGET`.

Every method is a callable ``(x: (B, 3, H, W) float in [0, 1]) -> (B, 3, sH, sW)
float32 in [0, 1]`` on the device of ``x``, with attributes ``name``,
``scale`` and ``tiles_itself = False`` (callers tile in pixels). Common build
options: ``device`` ("cpu", "cuda", "cuda:N"), ``dtype`` (torch dtype or
"fp32"/"bf16"/"fp16"), ``threads`` (sets ``torch.set_num_threads`` and the ncnn
thread count). ``None`` means "default"; unknown options raise
:class:`~semsr.core.errors.SemsrError`. The ncnn runtime computes in fp32 on CPU
whatever ``dtype``/``device`` say (its result is moved to ``x``'s device).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import SemsrError, UnavailableError
from semsr.methods import MethodSpec, register
from semsr.models import catalog as cat
from semsr.models.catalog import ModelInfo
from semsr.models.ncnn_runtime import NcnnNet
from semsr.models.realcugan import RealCUGAN
from semsr.models.rrdbnet import RRDBNet, rrdbnet_from_ncnn, rrdbnet_from_pth
from semsr.ops.imresize import imresize

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}

# Fastest accurate settings measured by benchmarks/restorers.py on a 2-core
# AVX-512 (bf16-capable) Xeon: fp32 with channels_last beat bf16 and fp16 there.
CPU_DEFAULT_DTYPE = torch.float32
CUDA_DEFAULT_DTYPE = torch.float16


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """Map ``dtype`` (or ``None`` = the device's default) to a floating torch dtype."""
    if dtype is None:
        return CUDA_DEFAULT_DTYPE if device.type == "cuda" else CPU_DEFAULT_DTYPE
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise SemsrError(f"dtype must be floating point, not {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise SemsrError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return _DTYPES[key]


def parse_device(device: torch.device | str | None) -> torch.device:
    """Map ``device`` (``None`` = CPU) to a torch device; CUDA must exist."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as err:
        raise SemsrError(f"unknown device {device!r}; use cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("device 'cuda' requested but this PyTorch has no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise SemsrError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def _apply_threads(threads: int | None) -> None:
    if threads is not None:
        if int(threads) < 1:
            raise SemsrError(f"threads must be >= 1, not {threads}")
        torch.set_num_threads(int(threads))


def _reject_unknown(name: str, opts: dict[str, Any]) -> None:
    unknown = sorted(k for k, v in opts.items() if v is not None)
    if unknown:
        raise SemsrError(f"method {name!r} has no option(s) {', '.join(unknown)}")


def _model_paths(info: ModelInfo) -> list[Path]:
    paths = info.paths()
    if paths is None:
        raise UnavailableError(f"model {info.name!r} needs the pip package {info.package} (pip install {info.package})")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UnavailableError(f"model {info.name!r}: file missing from {info.package}", missing[0])
    return paths


# --------------------------------------------------------------------------- methods


class Bicubic:
    """MATLAB-compatible bicubic upscaling; ``(B, 3, H, W) -> (B, 3, ceil(sH), ceil(sW))``."""

    tiles_itself = False

    def __init__(self, scale: float = 4, dtype: torch.dtype = torch.float32) -> None:
        self.name = "bicubic"
        self.scale = int(scale) if float(scale).is_integer() else float(scale)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        compute = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        return imresize(x.to(compute), scale=self.scale).float().clamp_(0, 1)


class TorchRestorer:
    """A PyTorch super-resolution module as a semsr method.

    Args:
        name: registry name.
        model: module mapping ``(B, 3, H, W)`` to ``(B, 3, sH, sW)``; it is moved
            to ``device``/``dtype`` (and channels_last) here.
        device, dtype: where and in what precision to compute.
        channels_last: use NHWC memory format (faster convolutions on CPU).
    """

    tiles_itself = False

    def __init__(self, name: str, model: RRDBNet, device: torch.device, dtype: torch.dtype, channels_last: bool = True) -> None:
        self.name = name
        self.scale = model.scale
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype, memory_format=self.memory_format)

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        # no_grad rather than inference_mode: callers (tiling) may update the
        # result in place, which inference tensors forbid outside the mode.
        with torch.no_grad():
            inp = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)
            out = self.model(inp)
            return out.float().clamp_(0, 1).to(x.device).contiguous()


class NcnnRestorer:
    """An ncnn network whose output is the upscaled image, as a semsr method."""

    tiles_itself = False

    def __init__(self, name: str, scale: int, net: NcnnNet) -> None:
        self.name = name
        self.scale = scale
        self.net = net

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        return self.net(x.detach().float().cpu()).clamp_(0, 1).to(x.device)


# --------------------------------------------------------------------------- factories


def build_bicubic(scale: float = 4, device: Any = None, dtype: Any = None, threads: int | None = None, **opts: Any) -> Bicubic:
    """``bicubic`` factory: ``scale`` (> 0, default 4); computes on the input's device."""
    _reject_unknown("bicubic", opts)
    _apply_threads(threads)
    parse_device(device)
    try:
        ok = float(scale) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SemsrError(f"bicubic scale must be a positive number, not {scale!r}")
    return Bicubic(scale, parse_dtype(dtype, torch.device("cpu")))


def build_rrdb_blob(info: ModelInfo, device: Any = None, dtype: Any = None, threads: int | None = None,
                    channels_last: bool = True, **opts: Any) -> TorchRestorer:
    """Factory of the RRDBNet methods whose weights come from an ncnn blob pair."""
    _reject_unknown(info.name, opts)
    _apply_threads(threads)
    dev = parse_device(device)
    param, bin_ = _model_paths(info)
    return TorchRestorer(info.name, rrdbnet_from_ncnn(param, bin_), dev, parse_dtype(dtype, dev), channels_last)


def build_rrdb_pth(weights: str | Path | None = None, device: Any = None, dtype: Any = None,
                   threads: int | None = None, channels_last: bool = True, checkpoint: str | Path | None = None,
                   **opts: Any) -> TorchRestorer:
    """``realesrgan-pth`` factory: ``weights`` (or the CLI's ``--checkpoint``) = path of a Real-ESRGAN ``.pth``."""
    _reject_unknown("realesrgan-pth", opts)
    weights = weights if weights is not None else checkpoint
    if weights is None:
        raise SemsrError("method 'realesrgan-pth' needs weights=PATH (CLI: --checkpoint PATH, a Real-ESRGAN .pth file)")
    _apply_threads(threads)
    dev = parse_device(device)
    return TorchRestorer("realesrgan-pth", rrdbnet_from_pth(weights), dev, parse_dtype(dtype, dev), channels_last)


def build_ncnn(info: ModelInfo, device: Any = None, dtype: Any = None, threads: int | None = None, **opts: Any):  # noqa: ANN201
    """Factory of the ncnn-runtime methods (Real-CUGAN, animevideov3)."""
    _reject_unknown(info.name, opts)
    _apply_threads(threads)
    parse_device(device)
    parse_dtype(dtype, torch.device("cpu"))  # validated; ncnn computes in fp32
    param, bin_ = _model_paths(info)
    if info.name.startswith("realcugan"):
        return RealCUGAN(info.name, info.scale, param, bin_, threads=threads)
    net = NcnnNet(param, bin_, info.extra["input"], info.extra["output"], threads=threads)
    return NcnnRestorer(info.name, info.scale, net)


def _factory(info: ModelInfo):  # noqa: ANN202
    if info.name == "bicubic":
        return build_bicubic
    if info.name == "realesrgan-pth":
        return build_rrdb_pth
    if info.runtime == "pytorch":
        return partial(build_rrdb_blob, info)
    return partial(build_ncnn, info)


def _register_all() -> None:
    for info in cat.catalog():
        register(MethodSpec(info.name, _factory(info), info.scale, info.summary, extra={"model_info": info}))


_register_all()
