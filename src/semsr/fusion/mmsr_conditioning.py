"""MMSR's trainable parts on a frozen Stable Diffusion UNet, and the one model call that uses them.

Three components (each saved as its own checkpoint sub-folder, see
:mod:`semsr.methods.mmsr`)::

    connector       MultimodalLatentConnector (semsr.fusion.mmlc): caption + modality tokens -> (B, 128, D)
    conv_in         ConcatConvIn: the UNet's conv_in widened to read [z_t ; z_LR] (2C channels)
    unet_attention  CrossAttentionLayers: trained copies of the UNet's cross-attentions (attn2), trained by
                    default: they read the connector's tokens, not the CLIP text tokens they were trained on

:class:`MMSRConditioning` holds them (it is the trainable module of the
``mmsr`` training task), installs ``conv_in`` and the attention copies into
the frozen UNet (:meth:`MMSRConditioning.attach`) and runs the model call
:func:`concat_unet_forward`, ``eps = UNet([z_t ; z_LR], t, context)``, which
both the inference pipeline and training use.

The widened ``conv_in`` keeps the pretrained weights for the noisy latent and
starts the LR-latent weights at zero (InstructPix2Pix), so before training
the UNet is the pretrained one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from semsr.core.components import Component, register_component, register_to_config
from semsr.core.errors import SemsrError
from semsr.fusion.mmlc import MultimodalLatentConnector


@register_component
class ConcatConvIn(Component):
    """The widened UNet ``conv_in``: ``(B, in_channels, h, w)`` -> ``(B, out_channels, h, w)``.

    Runs in its own dtype (fp32 master weights under a bf16 UNet) and returns
    the input's dtype. A fresh one is initialised like ``nn.Conv2d`` (the same
    random draws); :func:`widen_conv_in` then copies the pretrained weights in.

    Args:
        in_channels: ``2 * latent_channels`` (noisy latent + LR latent).
        out_channels: the UNet's first block width.
        kernel_size, padding: of the square convolution (stride 1).
        latent_channels: channels ``C`` of the noisy latent (the first ``C`` input channels).
    """

    @register_to_config
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1, latent_channels: int = 4
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.weight = conv.weight
        self.bias = conv.bias
        self.padding = int(padding)

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def out_channels(self) -> int:
        return int(self.config.out_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.to(self.weight.dtype), self.weight, self.bias, 1, self.padding).to(x.dtype)


def widen_conv_in(conv: nn.Conv2d, extra: int) -> ConcatConvIn:
    """A copy of ``conv`` with ``extra`` more input channels whose weights are zero (InstructPix2Pix)."""
    if conv.bias is None or conv.stride != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1]:
        raise SemsrError("the UNet's conv_in must be a square stride-1 convolution with a bias")
    new = ConcatConvIn(
        conv.in_channels + extra,
        conv.out_channels,
        conv.kernel_size[0],
        conv.padding[0],
        latent_channels=conv.in_channels,
    ).to(conv.weight)  # conv's device and dtype
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : conv.in_channels] = conv.weight
        new.bias.copy_(conv.bias)
    return new


def cross_attention_paths(unet: nn.Module) -> list[str]:
    """Module paths of the UNet's cross-attention layers (``...attn2``), the ones that read the context."""
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]


def _attention_kwargs(attn: Attention) -> dict[str, Any]:
    """The ``Attention`` arguments a UNet transformer block builds its ``attn2`` with."""
    return {
        "query_dim": int(attn.query_dim),
        "cross_attention_dim": int(attn.cross_attention_dim),
        "heads": int(attn.heads),
        "dim_head": int(attn.inner_dim // attn.heads),
        "dropout": float(attn.dropout),
        "bias": bool(attn.use_bias),
        "upcast_attention": bool(attn.upcast_attention),
        "out_bias": attn.to_out[0].bias is not None,
    }


def _same_layout(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


@register_component
class CrossAttentionLayers(Component):
    """Trained copies of UNet cross-attention layers, by module path.

    Args:
        specs: module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``) -> the
            diffusers ``Attention`` arguments of that layer (see :meth:`from_unet`).

    The copies are ``self.layers[path with "." -> "__"]``.
    """

    @register_to_config
    def __init__(self, specs: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({path.replace(".", "__"): Attention(**dict(kw)) for path, kw in specs.items()})

    @property
    def paths(self) -> list[str]:
        """Module paths of the layers, in order."""
        return [key.replace("__", ".") for key in self.layers]

    @classmethod
    def from_unet(cls, unet: nn.Module, paths: Iterable[str] | None = None) -> CrossAttentionLayers:
        """fp32 copies of ``unet``'s layers at ``paths`` (default: every cross-attention)."""
        paths = cross_attention_paths(unet) if paths is None else list(paths)
        layers = cls({p: _attention_kwargs(unet.get_submodule(p)) for p in paths})
        for path, key in zip(paths, layers.layers, strict=True):
            original = unet.get_submodule(path)
            if not _same_layout(layers.layers[key], original):
                raise SemsrError(f"UNet cross-attention {path} has a layout MMSR cannot rebuild")
            layers.layers[key].load_state_dict(original.state_dict())
        return layers.float()

    def attach(self, unet: nn.Module) -> None:
        """Put the copies into ``unet`` at their paths (checks that the UNet has matching layers)."""
        for key, module in self.layers.items():
            path = key.replace("__", ".")
            try:
                current = unet.get_submodule(path)
            except AttributeError:
                raise SemsrError(f"the checkpoint trains UNet module {path!r}, which --base does not have") from None
            if current is module:
                continue
            if not _same_layout(current, module):
                raise SemsrError(f"checkpoint weights of {path} do not fit --base's UNet")
            parent, _, name = path.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, name, module)


def concat_unet_forward(
    unet: nn.Module, x: torch.Tensor, z_lr: torch.Tensor, t: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """The MMSR model call (inference and training): ``UNet([x ; z_lr], t, context)``.

    Args:
        unet: the UNet with :class:`ConcatConvIn` installed (:meth:`MMSRConditioning.attach`).
        x: ``(B, C, h, w)`` noisy latent; z_lr: ``(B, C, h, w)`` LR latent.
        t: scalar or ``(B,)`` timesteps.
        context: ``(B, N, D)`` connector tokens.
    Returns:
        ``(B, C, h, w)`` model output (epsilon or v) in the UNet's dtype.

    The inputs take the dtype of the UNet's body (``conv_out``), not ``unet.dtype`` (its first parameter,
    the trainable fp32 conv_in when training with a bf16 frozen UNet, whose fp32 output CPU autocast would
    hand to bf16 group norms).
    """
    dtype = unet.conv_out.weight.dtype
    return unet(torch.cat([x, z_lr], dim=1).to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[0]


class MMSRConditioning(nn.Module):
    """The trained MMSR parts: connector + widened UNet ``conv_in`` (+ optionally the UNet's cross-attentions).

    :meth:`forward` is the whole model call (so a DDP-wrapped instance can be
    called in training): it installs ``conv_in`` (and the trained
    cross-attention layers) in the frozen ``unet`` (held outside the module's
    parameters), builds the context and runs :func:`concat_unet_forward`.

    Attributes:
        connector: :class:`~semsr.fusion.mmlc.MultimodalLatentConnector`.
        conv_in: :class:`ConcatConvIn`.
        unet_attention: :class:`CrossAttentionLayers` or None.
    """

    def __init__(
        self,
        connector: MultimodalLatentConnector,
        conv_in: ConcatConvIn,
        unet_attention: CrossAttentionLayers | None = None,
    ) -> None:
        super().__init__()
        self.connector = connector
        self.conv_in = conv_in
        self.unet_attention = unet_attention

    @property
    def latent_channels(self) -> int:
        """Channels ``C`` of the sampled latent."""
        return self.conv_in.latent_channels

    def components(self) -> dict[str, Component | None]:
        """The checkpoint components by name (``unet_attention`` None when not trained)."""
        return {"connector": self.connector, "conv_in": self.conv_in, "unet_attention": self.unet_attention}

    def attach(self, unet: nn.Module) -> nn.Module:
        """Put this ``conv_in`` (and the cross-attention copies) into ``unet`` (checks the widths); returns ``unet``."""
        old = unet.conv_in
        if old is not self.conv_in:
            if old.out_channels != self.conv_in.out_channels:
                raise SemsrError(
                    f"conv_in has {self.conv_in.out_channels} output channels, the UNet "
                    f"{old.out_channels}: checkpoint and --base do not match"
                )
            unet.conv_in = self.conv_in
        if self.unet_attention is not None:
            self.unet_attention.attach(unet)
        return unet

    def context(
        self,
        text: torch.Tensor | None,
        spatial: Mapping[str, torch.Tensor | None],
        temperatures: Mapping[str, float] | None = None,
        drop: Mapping[str, torch.Tensor] | None = None,
        temperature_mode: str = "divide",
    ) -> torch.Tensor:
        """Connector output ``(B, N, D)`` (see :meth:`MultimodalLatentConnector.sequence` for the inputs;
        ``temperature_mode`` as :meth:`MultimodalLatentConnector.forward`)."""
        return self.connector(text, spatial, temperatures, drop, temperature_mode=temperature_mode)

    def forward(
        self,
        unet: nn.Module,
        noisy: torch.Tensor,
        z_lr: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor | None,
        spatial: Mapping[str, torch.Tensor | None],
        drop: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``eps (B, C, h, w)`` for ``noisy`` / ``z_lr`` ``(B, C, h, w)`` latents (training call)."""
        self.attach(unet)
        return concat_unet_forward(unet, noisy, z_lr, t, self.context(text, spatial, None, drop))

    @classmethod
    def new(
        cls, unet: nn.Module, connector: MultimodalLatentConnector, cross_attention: bool = True
    ) -> MMSRConditioning:
        """Fresh conditioning for ``unet`` (not changed): conv_in widened by the latent channel count;
        with ``cross_attention`` also trainable copies of the UNet's cross-attention layers."""
        c = int(unet.conv_in.in_channels)
        conv_in = widen_conv_in(unet.conv_in, c).float()
        return cls(connector, conv_in, CrossAttentionLayers.from_unet(unet) if cross_attention else None)


__all__ = [
    "ConcatConvIn",
    "CrossAttentionLayers",
    "MMSRConditioning",
    "concat_unet_forward",
    "cross_attention_paths",
    "widen_conv_in",
]
