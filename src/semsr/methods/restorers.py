"""First-stage restorers: one method per entry of :func:`semsr.models.catalog.catalog`.

- ``bicubic``: MATLAB-compatible bicubic (build option ``scale``, any number > 0, default 4);
- ``realesrgan-x4plus``, ``realesrgan-x4plus-anime``, ``realsr-df2k-x4``:
  semsr's PyTorch :class:`~semsr.models.rrdbnet.RRDBNet` with weights read
  from the ncnn blobs of the pip packages (build option ``channels_last``);
- ``realesrgan-pth``: RRDBNet from a user's Real-ESRGAN ``.pth`` (``weights`` or ``checkpoint``);
- ``realesr-animevideov3-x{2,3,4}`` and ``realcugan[-pro]-{2,3,4}x[-variant]``:
  the ncnn runtime on CPU.

``default`` (:mod:`semsr.methods.default_alias`) may point at one of them.

Every method is called as ``method(x, options=None, *, progress=False)`` with
``x`` ``(B, 3, H, W)`` float in [0, 1] and returns an
:class:`~semsr.core.outputs.SROutput` whose ``images`` are ``(B, 3, sH, sW)``
float32 in [0, 1] on the device of ``x`` (no priors, no timings); attributes
``name``, ``scale`` and ``tiles_itself = False`` (callers tile in pixels).
Build options shared by all (:class:`~semsr.core.options.MethodOptions`):
``device``, ``dtype`` (default ``auto``: bf16 on CPUs with native bf16, fp32 on other CPUs, bf16 or fp16
on CUDA) and ``threads``
(``torch.set_num_threads`` and the ncnn thread count). The ncnn runtime
computes in fp32 on CPU whatever ``dtype``/``device`` say (its result is moved
to ``x``'s device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from semsr.core.dtypes import apply_threads, resolve_device, resolve_dtype
from semsr.core.errors import UnavailableError
from semsr.core.method import MethodSpec, ProgressFn
from semsr.core.options import MethodOptions, OptionError, option
from semsr.core.outputs import SROutput
from semsr.methods import register
from semsr.models import catalog as cat
from semsr.models.catalog import ModelInfo
from semsr.models.ncnn_runtime import NcnnNet
from semsr.models.realcugan import RealCUGAN
from semsr.models.rrdbnet import RRDBNet, rrdbnet_from_ncnn, rrdbnet_from_pth
from semsr.ops.imresize import imresize

# Precision: the ``dtype`` option, ``auto`` by default (semsr.core.dtypes.auto_dtype): bf16 on CPUs with native
# bf16 (avx512_bf16/AMX; about 2x faster than fp32 for RRDBNet, benchmarks/restorers.py), fp32 on other CPUs, bf16 or
# fp16 on CUDA. channels_last on CPU.


# --------------------------------------------------------------------------- options


@dataclass(kw_only=True, frozen=True)
class BicubicOptions(MethodOptions):
    """Options of ``bicubic``."""

    scale: float = option(4, stage="build", help="scale factor, any number > 0", metavar="S")

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise OptionError(f"option scale: must be > 0, got {self.scale!r}")


@dataclass(kw_only=True, frozen=True)
class RRDBOptions(MethodOptions):
    """Options of the RRDBNet restorers (``realesrgan-x4plus``...)."""

    channels_last: bool = option(True, stage="build", help="channels-last memory format (faster CPU convolutions)")


@dataclass(kw_only=True, frozen=True)
class RRDBPthOptions(RRDBOptions):
    """Options of ``realesrgan-pth``: the ``.pth`` file as ``weights`` (or ``checkpoint``, the shared spelling)."""

    weights: Path | None = option(None, stage="build", metavar="PTH", help="Real-ESRGAN/BasicSR .pth file")
    checkpoint: Path | None = option(None, stage="build", metavar="PTH", help="same as --weights")


# --------------------------------------------------------------------------- methods


class Bicubic:
    """MATLAB-compatible bicubic upscaling; ``(B, 3, H, W) -> (B, 3, ceil(sH), ceil(sW))``."""

    name = "bicubic"
    tiles_itself = False

    def __init__(self, scale: float = 4, dtype: torch.dtype = torch.float32) -> None:
        self.scale = int(scale) if float(scale).is_integer() else float(scale)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, options: Any = None, *, progress: ProgressFn | bool | None = False) -> SROutput:
        compute = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        return SROutput(imresize(x.to(compute), scale=self.scale).float().clamp_(0, 1))


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

    def __init__(
        self, name: str, model: RRDBNet, device: torch.device, dtype: torch.dtype, channels_last: bool = True
    ) -> None:
        self.name = name
        self.scale = model.scale
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype, memory_format=self.memory_format)

    def __call__(self, x: torch.Tensor, options: Any = None, *, progress: ProgressFn | bool | None = False) -> SROutput:
        # no_grad rather than inference_mode: callers (tiling) may update the
        # result in place, which inference tensors forbid outside the mode.
        with torch.no_grad():
            inp = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)
            out = self.model(inp)
            return SROutput(out.float().clamp_(0, 1).to(x.device).contiguous())


class NcnnRestorer:
    """An ncnn network whose output is the upscaled image, as a semsr method.

    Args:
        name: registry name.
        scale: the network's factor.
        net: ``(B, 3, H, W)`` float CPU tensor -> ``(B, 3, sH, sW)`` (an
            :class:`~semsr.models.ncnn_runtime.NcnnNet`, or a network with its own
            padding rules such as :class:`~semsr.models.realcugan.RealCUGAN`).
    """

    tiles_itself = False

    def __init__(self, name: str, scale: int, net: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.name = name
        self.scale = scale
        self.net = net

    def __call__(self, x: torch.Tensor, options: Any = None, *, progress: ProgressFn | bool | None = False) -> SROutput:
        return SROutput(self.net(x.detach().float().cpu()).clamp_(0, 1).to(x.device))


# --------------------------------------------------------------------------- factories


def _model_paths(info: ModelInfo) -> list[Path]:
    paths = info.paths()
    if paths is None:
        raise UnavailableError(f"model {info.name!r} needs the pip package {info.package} (pip install {info.package})")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UnavailableError(f"model {info.name!r}: file missing from {info.package}", missing[0])
    return paths


def _dtype(options: MethodOptions, device: torch.device) -> torch.dtype:
    # None (a caller that passes no precision) means auto, like the option default; the ncnn runtime is fp32 only.
    return resolve_dtype(options.dtype or "auto", device)


def build_bicubic(options: BicubicOptions) -> Bicubic:
    """``bicubic`` factory; computes on the input's device (``device`` is only checked)."""
    apply_threads(options.threads)
    device = resolve_device(options.device)
    return Bicubic(options.scale, _dtype(options, device))


def build_rrdb_blob(info: ModelInfo, options: RRDBOptions) -> TorchRestorer:
    """Factory of the RRDBNet methods whose weights come from an ncnn blob pair."""
    apply_threads(options.threads)
    device = resolve_device(options.device)
    dtype = _dtype(options, device)
    param, bin_ = _model_paths(info)
    return TorchRestorer(info.name, rrdbnet_from_ncnn(param, bin_), device, dtype, options.channels_last)


def build_rrdb_pth(options: RRDBPthOptions) -> TorchRestorer:
    """``realesrgan-pth`` factory: ``weights`` (or ``checkpoint``) = path of a Real-ESRGAN ``.pth``."""
    weights = options.weights if options.weights is not None else options.checkpoint
    if weights is None:
        raise UnavailableError("method 'realesrgan-pth' needs a Real-ESRGAN .pth file: pass --weights PATH")
    apply_threads(options.threads)
    device = resolve_device(options.device)
    dtype = _dtype(options, device)
    return TorchRestorer("realesrgan-pth", rrdbnet_from_pth(weights), device, dtype, options.channels_last)


def build_ncnn(info: ModelInfo, options: MethodOptions) -> NcnnRestorer:
    """Factory of the ncnn-runtime methods (Real-CUGAN, animevideov3)."""
    apply_threads(options.threads)
    _dtype(options, resolve_device(options.device))  # checked; ncnn computes in fp32 on the CPU
    param, bin_ = _model_paths(info)
    net: Callable[[torch.Tensor], torch.Tensor]
    if info.name.startswith("realcugan"):
        net = RealCUGAN(info.scale, param, bin_, threads=options.threads)
    else:
        net = NcnnNet(param, bin_, info.extra["input"], info.extra["output"], threads=options.threads)
    return NcnnRestorer(info.name, info.scale, net)


def spec_for(info: ModelInfo) -> MethodSpec:
    """The :class:`MethodSpec` of catalogue entry ``info``."""
    common: dict[str, Any] = dict(
        name=info.name, scale=info.scale, summary=info.summary, info=info, aliases=info.aliases
    )
    if info.name == "bicubic":
        return MethodSpec(factory=build_bicubic, options=BicubicOptions, **common)
    if info.name == "realesrgan-pth":
        return MethodSpec(
            factory=build_rrdb_pth, options=RRDBPthOptions, weight_paths=("weights", "checkpoint"), **common
        )
    if info.runtime == "pytorch":
        return MethodSpec(factory=partial(build_rrdb_blob, info), options=RRDBOptions, **common)
    return MethodSpec(factory=partial(build_ncnn, info), options=MethodOptions, **common)


for _info in cat.catalog():
    register(spec_for(_info))
