"""XPSR's Semantic-Fusion Attention (SFA) in the SR ControlNet, and the UNet's conditional attention.

The structure follows XPSR's released code (``models/xpsr``): every attention *layer* is a whole
diffusers ``Transformer2DModel`` (norm, projections, self-attention, cross-attention, feed-forward,
residual), and the new layers sit beside the pretrained ones.

**ControlNet side.** For each transformer layer ``T_h`` of the ControlNet (``down_blocks.i.attentions.j``
and ``mid_block.attentions.j``; it runs after the layer's resnet) SFA adds two layers of the same shape:
``attentions_lowlevel`` ``T_l`` and ``attentions_connect`` ``T_c``. With ``x`` the resnet output
``(B, C, h, w)`` and the prompts ``c_h`` (high-level, semantic) and ``c_l`` (low-level, quality /
degradation), each ``(B, L, D)``, the layer's output becomes::

    parallel (SFA):  T_c(H, tokens(T_l(x, c_l)))  with H = T_h(x, c_h)   XPSR eq. (2), released; default
    serial:          T_l(T_h(x, c_h), c_l)                               XPSR eq. (1), Table 3 ablation
    high:            T_h(x, c_h)                                         high-level branch only (= plain ControlNet)
    low:             T_l(x, c_l)                                         low-level branch only

``tokens`` flattens ``(B, C, h, w)`` to ``(B, h*w, C)``: the connecting layer cross-attends from the
high-level output to the low-level one (its cross-attention width is ``C``). Each ``Transformer2DModel``
adds its input back, so ``T_c(H, .) = H + ...``: the high-level output (and through it the caption)
reaches the features through the residual, and the low-level branch adds to it.

Initialisation as released (``ControlNetModel.from_unet``): ``T_l`` is a copy of ``T_h``; ``T_c`` copies
every tensor of ``T_h`` whose shape fits (all but its cross-attention keys/values when ``D != C``; those
keep diffusers' random initialisation).

**UNet side** (*conditional attention*, released as ``pixel_attentions``). In the UNet's **up-blocks
only**, after each layer (resnet, and its transformer in a cross-attention up-block) a
``Transformer2DModel`` ``P`` attends from the UNet features to the ControlNet residual that is added to
that layer's skip connection: ``h <- P(h, tokens(r_k))``, ``r_k`` ``(B, C_k, h_k, w_k)`` (scaled by the
conditioning scale, as the UNet receives it). Down and mid blocks carry no such layer. The UNet keeps
its frozen high-level cross-attention. ``P``'s output projection starts at zero, so the UNet is exactly
the pretrained one until trained (released: random initialisation; see docs/xpsr.md).

Wiring: the new layers live in one :class:`SFAFusion` component whose state-dict keys are the released
ones (``down_blocks.0.attentions_lowlevel.0.*``, ``mid_block.attentions_connect.0.*``,
``up_blocks.1.pixel_attentions.2.*``), so the released weights map onto it by name; the ControlNet's and
UNet's own state dicts are untouched. :meth:`SFAFusion.install` puts forward hooks on the pretrained
layers (``T_h``; the UNet's up-block layers); :meth:`SFAFusion.controlnet_unet_forward` is the one model
call of inference and training and hands the hooks ``c_l`` and the residuals. The config records every
layer's ``Transformer2DModel`` arguments, so the component is rebuilt from its folder alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.models import Transformer2DModel
from torch import nn

from semsr.core.components import Component, register_component, register_to_config
from semsr.core.errors import SemsrError

SFA_MODES = ("parallel", "serial", "high", "low")
#: Submodule names of the new layers (as in XPSR's released checkpoints).
LOWLEVEL, CONNECT, PIXEL = "attentions_lowlevel", "attentions_connect", "pixel_attentions"


def transformer_config(layer: nn.Module) -> dict[str, Any]:
    """The constructor arguments (JSON values) of a diffusers ``Transformer2DModel``."""
    if not isinstance(layer, Transformer2DModel):
        raise SemsrError(f"SFA: expected a Transformer2DModel layer, got {type(layer).__name__}")
    return {k: v for k, v in layer.config.items() if not k.startswith("_")}


def controlnet_layers(controlnet: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """``(block path, index, layer)`` of every transformer layer of a ControlNet's down and mid blocks."""
    out = []
    for i, block in enumerate(controlnet.down_blocks):
        out += [(f"down_blocks.{i}", j, layer) for j, layer in enumerate(getattr(block, "attentions", None) or ())]
    mid = getattr(controlnet, "mid_block", None)
    out += [("mid_block", j, layer) for j, layer in enumerate(getattr(mid, "attentions", None) or ())]
    return out


def _residual_channels(unet: nn.Module) -> list[int]:
    """Channels of each skip connection of ``unet`` (= each ControlNet down residual), in order."""
    channels = [int(unet.conv_in.out_channels)]
    for block in unet.down_blocks:
        channels += [int(r.out_channels) for r in block.resnets]
        if getattr(block, "downsamplers", None):
            channels.append(int(block.resnets[-1].out_channels))
    return channels


def _per_block(value: Any, i: int) -> Any:
    """An int setting, or its entry for up-block ``i`` of a per-down-block list (reversed)."""
    return value if isinstance(value, int) else list(reversed(value))[i]


def unet_up_layers(unet: nn.Module) -> list[dict[str, Any]]:
    """Each up-block layer of ``unet`` with the ControlNet residual its skip connection receives.

    Returns dicts ``{"block": "up_blocks.i", "index": j, "residual": k, "channels": C, "residual_channels":
    C_k, "heads": n, "layers": m}``; the hooked module is the layer's transformer (cross-attention
    up-blocks) or its resnet.
    """
    channels = _residual_channels(unet)
    remaining = list(range(len(channels)))
    cfg = unet.config
    heads_cfg = cfg.num_attention_heads or cfg.attention_head_dim
    out = []
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        taken, remaining = remaining[-n:], remaining[:-n]
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            k = taken[-1 - j]  # skip states are consumed from the end, as the UNet does
            heads = attentions[j].config.num_attention_heads if attentions else _per_block(heads_cfg, i)
            out.append(
                {
                    "block": f"up_blocks.{i}",
                    "index": j,
                    "residual": k,
                    "channels": int(resnet.out_channels),
                    "residual_channels": channels[k],
                    "heads": int(heads),
                    "layers": int(_per_block(cfg.transformer_layers_per_block, i)),
                }
            )
    return out


def _pixel_attention_config(unet: nn.Module, layer: dict[str, Any]) -> dict[str, Any]:
    cfg = unet.config
    return {
        "num_attention_heads": layer["heads"],
        "attention_head_dim": layer["channels"] // layer["heads"],
        "in_channels": layer["channels"],
        "num_layers": layer["layers"],
        "cross_attention_dim": layer["residual_channels"],
        "norm_num_groups": int(cfg.norm_num_groups),
        "use_linear_projection": bool(cfg.use_linear_projection),
        "upcast_attention": bool(cfg.upcast_attention),
    }


def _hooked_module(model: nn.Module, block: str, index: int, unet_side: bool) -> nn.Module:
    parent = model.get_submodule(block)
    if unet_side and not getattr(parent, "attentions", None):
        return parent.resnets[index]
    return parent.attentions[index]


def _remove_hooks(module: nn.Module, kind: type) -> None:
    """Drop the forward hooks of type ``kind`` from ``module`` (a re-install replaces them)."""
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, kind):
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h*w, C)``."""
    return x.flatten(2).transpose(1, 2)


def _sample(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


def _like(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if isinstance(output, torch.Tensor):
        return sample
    return type(output)(sample=sample)


class _SFAHook:
    """Forward hook of a ControlNet transformer layer ``T_h``: applies the SFA mode (module docstring)."""

    def __init__(self, fusion: SFAFusion, block: str, index: int) -> None:
        self.fusion, self.block, self.index = fusion, block, index

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        fusion = self.fusion
        if fusion.mode == "high":
            return None
        low_ctx = fusion._low_context
        if low_ctx is None:
            raise SemsrError("SFA: the ControlNet ran without the low-level prompt (use controlnet_unet_forward)")
        x = args[0] if args else kwargs["hidden_states"]
        high = _sample(output)
        low_layer = fusion.layer(self.block, LOWLEVEL, self.index)
        c_l = low_ctx.to(x.dtype)
        if fusion.mode == "serial":
            new = low_layer(high, encoder_hidden_states=c_l, return_dict=False)[0]
        elif fusion.mode == "low":
            new = low_layer(x, encoder_hidden_states=c_l, return_dict=False)[0]
        else:
            low = low_layer(x, encoder_hidden_states=c_l, return_dict=False)[0]
            connect = fusion.layer(self.block, CONNECT, self.index)
            new = connect(high, encoder_hidden_states=_tokens(low), return_dict=False)[0]
        return _like(output, new)


class _PixelHook:
    """Forward hook of a UNet up-block layer: conditional attention to its ControlNet residual."""

    def __init__(self, fusion: SFAFusion, block: str, index: int, residual: int) -> None:
        self.fusion, self.block, self.index, self.residual = fusion, block, index, residual

    def __call__(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        residuals = self.fusion._residuals
        if residuals is None:  # a UNet call outside controlnet_unet_forward: plain UNet
            return None
        h = _sample(output)
        tokens = _tokens(residuals[self.residual]).to(h.dtype)
        layer = self.fusion.layer(self.block, PIXEL, self.index)
        return _like(output, layer(h, encoder_hidden_states=tokens, return_dict=False)[0])


@register_component
class SFAFusion(Component):
    """XPSR's new layers: per ControlNet transformer layer ``attentions_lowlevel`` and
    ``attentions_connect``; per UNet up-block layer ``pixel_attentions`` (the conditional attention).

    Args:
        controlnet_layers: one entry per ControlNet transformer layer, in module order:
            ``{"block": "down_blocks.0" | "mid_block", "index": j, "lowlevel": <Transformer2DModel
            arguments>, "connect": <arguments>}``.
        unet_layers: one entry per UNet up-block layer (:func:`unet_up_layers` plus ``"pixel"``: its
            arguments); empty: no conditional attention.
        mode: one of :data:`SFA_MODES` (switchable later by setting ``mode``).

    State-dict keys are XPSR's released ones (module docstring). :meth:`from_models` fills these
    from a ControlNet (and UNet) and initialises the layers.
    """

    #: Set only inside :meth:`conditions`; gradient checkpointing restores them when it recomputes a block.
    checkpoint_state_attrs = ("_low_context", "_residuals")

    @register_to_config
    def __init__(
        self,
        controlnet_layers: list[dict[str, Any]],
        unet_layers: list[dict[str, Any]] | None = None,
        mode: str = "parallel",
    ) -> None:
        super().__init__()
        self.mode = mode
        if not controlnet_layers:
            raise SemsrError("SFA: the ControlNet has no transformer layers")
        with torch.random.fork_rng(devices=[]):  # building never advances the caller's RNG
            for layer in controlnet_layers:
                self._add(layer["block"], LOWLEVEL, layer["index"], Transformer2DModel(**layer["lowlevel"]))
                self._add(layer["block"], CONNECT, layer["index"], Transformer2DModel(**layer["connect"]))
            for layer in unet_layers or ():
                pixel = Transformer2DModel(**layer["pixel"])
                nn.init.zeros_(pixel.proj_out.weight)
                nn.init.zeros_(pixel.proj_out.bias)
                self._add(layer["block"], PIXEL, layer["index"], pixel)
        self._low_context: torch.Tensor | None = None
        self._residuals: Sequence[torch.Tensor] | None = None

    def _add(self, block: str, kind: str, index: int, module: nn.Module) -> None:
        node: nn.Module = self
        for part in [*block.split("."), kind]:
            if part not in node._modules:
                node.add_module(part, nn.ModuleDict())
            node = node._modules[part]
        node.add_module(str(index), module)

    def layer(self, block: str, kind: str, index: int) -> nn.Module:
        """The new layer ``<block>.<kind>.<index>`` (e.g. ``down_blocks.0``, :data:`LOWLEVEL`, 1)."""
        return self.get_submodule(f"{block}.{kind}.{index}")

    @classmethod
    def from_models(cls, controlnet: nn.Module, unet: nn.Module | None = None, mode: str = "parallel") -> SFAFusion:
        """New SFA layers for ``controlnet`` (and the conditional attention for ``unet``, if given),
        initialised as the module docstring says."""
        cn_layers = controlnet_layers(controlnet)
        entries = []
        for block, j, layer in cn_layers:
            cfg = transformer_config(layer)
            entries.append(
                {
                    "block": block,
                    "index": j,
                    "lowlevel": cfg,
                    "connect": {**cfg, "cross_attention_dim": int(cfg["in_channels"])},
                }
            )
        up = unet_up_layers(unet) if unet is not None else []
        fusion = cls(
            controlnet_layers=entries,
            unet_layers=[{**u, "pixel": _pixel_attention_config(unet, u)} for u in up],
            mode=mode,
        )
        weight = next(controlnet.parameters())
        if (weight.device, weight.dtype) != (torch.device("cpu"), torch.float32):
            fusion.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for block, j, layer in cn_layers:
                pretrained = layer.state_dict()
                fusion.layer(block, LOWLEVEL, j).load_state_dict(pretrained)
                connect = fusion.layer(block, CONNECT, j)
                fits = {k: v for k, v in pretrained.items() if v.shape == connect.state_dict()[k].shape}
                connect.load_state_dict(fits, strict=False)
        return fusion

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in SFA_MODES:
            raise SemsrError(f"unknown SFA mode {value!r}; use one of {', '.join(SFA_MODES)}")
        self._mode = value
        self.register_to_config(mode=value)  # saved with the weights

    @property
    def conditional_attention(self) -> bool:
        """Whether this SFA carries the UNet's conditional attention."""
        return bool(self.config.unet_layers)

    def freeze_unused(self) -> None:
        """Stop gradients of the layers the current mode does not run (``attentions_connect`` outside
        ``parallel``, ``attentions_lowlevel`` in ``high``), so distributed training sees no unused
        trainable parameters."""
        unused = {CONNECT} if self.mode != "high" else {CONNECT, LOWLEVEL}
        if self.mode == "parallel":
            unused = set()
        for name, param in self.named_parameters():
            if any(f".{kind}." in f".{name}" for kind in unused):
                param.requires_grad_(False)

    # ------------------------------------------------------------------ wiring

    def install(self, controlnet: nn.Module, unet: nn.Module | None = None) -> None:
        """Hook these layers into ``controlnet`` (and ``unet``); a re-install replaces earlier hooks."""
        found = {(b, j) for b, j, _ in controlnet_layers(controlnet)}
        mine = {(e["block"], int(e["index"])) for e in self.config.controlnet_layers}
        if found != mine:
            missing = sorted(found ^ mine)[0]
            raise SemsrError(f"SFA weights do not fit this ControlNet (layer {missing[0]}.{missing[1]})")
        for block, j in sorted(found):
            target = _hooked_module(controlnet, block, j, unet_side=False)
            _remove_hooks(target, _SFAHook)
            target.register_forward_hook(_SFAHook(self, block, j), with_kwargs=True)
        if unet is None:
            return
        layers = unet_up_layers(unet)
        for layer in layers:
            _remove_hooks(_hooked_module(unet, layer["block"], layer["index"], unet_side=True), _PixelHook)
        if not self.conditional_attention:
            return
        mine_unet = [(e["block"], int(e["index"]), int(e["residual"])) for e in self.config.unet_layers]
        if [(u["block"], u["index"], u["residual"]) for u in layers] != mine_unet:
            raise SemsrError("SFA conditional-attention weights do not fit this UNet's up-blocks")
        for block, j, k in mine_unet:
            target = _hooked_module(unet, block, j, unet_side=True)
            target.register_forward_hook(_PixelHook(self, block, j, k))

    @contextlib.contextmanager
    def conditions(
        self, low: torch.Tensor | None = None, residuals: Sequence[torch.Tensor] | None = None
    ) -> Iterator[None]:
        """Give the hooks the low-level context ``low`` ``(B, L, D)`` (ControlNet calls) and the
        ControlNet down residuals (UNet calls) for the calls inside the ``with`` block."""
        self._low_context, self._residuals = low, residuals
        try:
            yield
        finally:
            self._low_context, self._residuals = None, None

    def controlnet_unet_forward(
        self,
        unet: nn.Module,
        controlnet: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        high: torch.Tensor,
        low: torch.Tensor,
        hint: torch.Tensor,
        conditioning_scale: float = 1.0,
        unet_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """XPSR's model call: ControlNet on ``(c_h, c_l)`` with SFA, UNet on ``c_h`` + conditional attention.

        The one forward of inference and training (the layers must be :meth:`install`-ed). The
        ControlNet residuals are cast to ``x``'s dtype (the frozen UNet's): under mixed precision a
        prepared trainable module returns fp32.

        Args:
            x: ``(B, 4, h, w)`` noisy latent in the UNet's dtype; t: scalar or ``(B,)`` timesteps.
            high, low: ``(B, L, D)`` high- and low-level contexts.
            hint: ``(B, 3, f*h, f*w)`` in [0, 1].
            unet_context: ``(B, L', D)`` the UNet's cross-attention context instead of ``high``
                (DaLPSR: both prompts, see :func:`semsr.methods.xpsr.unet_context`).
        Returns:
            ``(B, 4, h, w)`` model output.
        """
        with self.conditions(low=low):
            down, mid = controlnet(
                x,
                t,
                encoder_hidden_states=high,
                controlnet_cond=hint,
                conditioning_scale=conditioning_scale,
                return_dict=False,
            )
        down = [d.to(x.dtype) for d in down]
        mid = mid.to(x.dtype)
        with self.conditions(residuals=down):
            return unet(
                x,
                t,
                encoder_hidden_states=high if unet_context is None else unet_context,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
