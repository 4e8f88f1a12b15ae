"""CoSeR's All-in-Attention (AiA): LR, reference and cognition in every UNet transformer block.

Each ``BasicTransformerBlock`` of a pretrained (frozen) diffusers
``UNet2DConditionModel`` gets two new attention steps *before* its own
self-attention, cross-attention and feed-forward::

    lr  = proj_lr(GroupNorm(F_lr))             # (B, N, C) tokens of the LR control features of this block
    ref = proj_ref(GroupNorm(F_ref))           # (B, M, C) tokens of the reference control features
    x  += zero_ref(HardAttention(q=lr, k=ref, v=ref))   # argmax over keys, value * max score, no softmax
    x  += zero_lr(Attention(q=LayerNorm(x), k=lr, v=lr))
    x   = block(x, context=cognitive embedding)           # pretrained self-attn, cross-attn, FFN

``zero_*`` are the 1x1 "zero convolutions" of ControlNet: a 1x1 convolution
over the token grid is a Linear over channels, so they are zero-initialised
``nn.Linear`` layers and the wrapped UNet equals the plain one at
initialisation. The two new attentions start as copies of the block's
pretrained self-attention (``init_from_self_attention``, CoSeR's
``use_atten_init``).

**Control features** ``F_lr`` and ``F_ref`` come from two branches, chosen by
the ``control`` config entry:

- ``"controlnet"`` (default, CoSeR's design): two diffusers ``ControlNetModel``
  s made ``from_unet`` (trainable copies of the UNet's encoder *with* its
  transformer blocks: self-attention and cross-attention to the cognitive
  embedding), reading a 4-channel latent hint through a zero-initialised
  ``conv_in -> SiLU -> zero conv`` embedding. The LR branch runs on the noisy
  latent with the LR latent as hint (ControlNet proper); the reference branch,
  whose reference is not pixel-aligned with the noisy latent (one global
  reference of its own size), runs on the reference latent with the same
  latent as hint. Both cross-attend to the branch's context (cognitive
  embedding or the negative). Their per-skip outputs feed the transformer
  block that sits at the same place: a down-block transformer reads the
  ControlNet output after the same resnet/attention pair, the mid block the
  mid output, an up-block transformer the skip connection its resnet
  concatenates (:func:`feature_slots`). ControlNet's output 1x1 convolutions
  start as identities (AiA's own zero layers already make the start exact).
- ``"encoder"`` (an option): the cheaper attention-free :class:`ConditionEncoder`
  s (resnets and downsamplers of the UNet's encoder, time-conditioned) on the
  LR and reference latents alone, one feature map per resolution level,
  independent of the noisy latent and of the context.

:class:`AiAFusion` is a :class:`~semsr.core.components.Component`: its
config records the UNet structure it was made for (``unet_config``), its
transformer blocks (``transformer_blocks``) and the branches' structure
(``control``, ``controlnet_config``), so the whole module is built from the
config alone (:func:`~semsr.core.components.load_component`, or the ``aia``
component of a CoSeR checkpoint); :meth:`AiAFusion.from_unet` makes a new one
for a UNet (branches copied from the UNet, attentions from its
self-attentions).

How it is wired (no change to the UNet's weights or state dict):
:func:`install_aia` registers a forward pre-hook on every transformer block;
the hook looks for ``cross_attention_kwargs["aia"]`` (an :class:`AiAInputs`:
the :class:`AiAFusion` weights plus the control features), applies the two
AiA steps to the block's input and removes the key before the block runs.
Calls without that key (e.g. reference generation) run the plain UNet.
:meth:`AiAFusion.unet_forward` does all of this for one UNet call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownBlock2D
from torch import nn

from semsr.core.components import Component, register_component, register_to_config
from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.layers import zero_linear

#: UNet config entries the AiA structure depends on (recorded in :attr:`AiAFusion.config` ``unet_config``).
UNET_KEYS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "cross_attention_dim",
    "attention_head_dim",
    "norm_num_groups",
    "norm_eps",
    "act_fn",
    "flip_sin_to_cos",
    "freq_shift",
    "time_embedding_type",
    "time_embedding_dim",
    "timestep_post_act",
    "time_cond_proj_dim",
    "conv_in_kernel",
    "resnet_time_scale_shift",
    "downsample_padding",
    "mid_block_scale_factor",
    "dropout",
    "class_embeddings_concat",
)
#: Down-block types whose resnets/downsamplers the encoders copy (attention, if any, is left out).
ENCODER_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
#: The control branches (:class:`AiAFusion` ``control``): ControlNets with attention, or attention-free encoders.
CONTROL_KINDS = ("controlnet", "encoder")
#: Scores held at a time by hard attention (``B * heads * query rows * keys``; 2**24 floats = 64 MB).
HARD_ATTENTION_BUDGET = 2**24


# ----------------------------------------------------------------------------- hard attention


def hard_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int | None = None
) -> torch.Tensor:
    """CoSeR's "one-hot" reference attention.

    For every query the key with the highest score ``s = scale * q.k`` is
    found; the output is that key's value multiplied by ``s`` (no softmax, no
    mixing of values, so reference textures are not blurred).

    Args:
        q: ``(B, H, Nq, d)`` queries.
        k: ``(B, H, Nk, d)`` keys.
        v: ``(B, H, Nk, dv)`` values.
        scale: score scale (``d ** -0.5``), positive.
        chunk: queries processed at a time (memory: ``B*H*chunk*Nk`` scores); default:
            as many as fit :data:`HARD_ATTENTION_BUDGET`.
    Returns:
        ``(B, H, Nq, dv)``. Differentiable in ``v`` (gather) and in ``q``, ``k``
        (through the max score).
    """
    if chunk is None:
        chunk = HARD_ATTENTION_BUDGET // max(1, q.shape[0] * q.shape[1] * k.shape[-2])
    chunk = max(1, int(chunk))
    outs = []
    kt = k.transpose(-1, -2)
    q = q * scale  # scale > 0: same argmax, and far cheaper than scaling the (c, Nk) scores
    for start in range(0, q.shape[-2], chunk):
        scores = torch.matmul(q[..., start : start + chunk, :], kt)  # (B, H, c, Nk)
        best, index = scores.max(dim=-1)  # (B, H, c)
        picked = torch.gather(v, 2, index.unsqueeze(-1).expand(*index.shape, v.shape[-1]))
        outs.append(picked * best.unsqueeze(-1))
    return torch.cat(outs, dim=-2)


class HardAttnProcessor:
    """diffusers attention processor computing :func:`hard_attention` with the ``Attention``'s projections.

    ``attn(hidden_states (B, Nq, C), encoder_hidden_states (B, Nk, C))`` ->
    ``(B, Nq, C)``: heads split as usual, ``to_out`` applied to the merged heads.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise SemsrError("hard attention takes no attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        bsz, n_q, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, -1, attn.heads, head_dim).transpose(1, 2)

        out = hard_attention(heads(query), heads(key), heads(value), attn.scale)
        out = out.transpose(1, 2).reshape(bsz, n_q, -1).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


# ----------------------------------------------------------------------------- per-block modules


class FeatureTokens(nn.Module):
    """``(B, Cf, h, w)`` feature map -> ``(B, h*w, C)`` tokens: GroupNorm, then a 1x1 projection."""

    def __init__(self, in_channels: int, dim: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(groups, in_channels), in_channels, eps=eps)
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        # contiguous: GroupNorm's backward on channels-last input crashes (torch 2.13 CPU)
        x = self.norm(feat.contiguous())
        return self.proj(x.flatten(2).transpose(1, 2))


class AiABlock(nn.Module):
    """The trainable AiA parts of one transformer block (see the module docstring).

    Args:
        dim: the block's hidden width ``C``.
        heads, dim_head: attention heads (those of the block's self-attention).
        feature_channels: channels ``Cf`` of the control features the block reads.
        groups: GroupNorm groups of the feature projections.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, feature_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.lr_tokens = FeatureTokens(feature_channels, dim, groups)
        self.ref_tokens = FeatureTokens(feature_channels, dim, groups)
        self.ref_attn = Attention(
            dim, cross_attention_dim=dim, heads=heads, dim_head=dim_head, processor=HardAttnProcessor()
        )
        self.ref_zero = zero_linear(dim)
        self.lr_norm = nn.LayerNorm(dim)
        self.lr_attn = Attention(dim, cross_attention_dim=dim, heads=heads, dim_head=dim_head)
        self.lr_zero = zero_linear(dim)

    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy ``attn``'s (the pretrained self-attention's) q/k/v/out weights into both new attentions."""
        for target in (self.ref_attn, self.lr_attn):
            for name in ("to_q", "to_k", "to_v"):
                getattr(target, name).load_state_dict(getattr(attn, name).state_dict())
            target.to_out[0].load_state_dict(attn.to_out[0].state_dict())

    def forward(
        self, hidden: torch.Tensor, lr_feat: torch.Tensor | None, ref_feat: torch.Tensor | None
    ) -> torch.Tensor:
        """``hidden (B, N, C)`` + AiA terms; ``lr_feat (B, Cf, h, w)`` with ``h*w == N``; ``ref_feat`` any size.

        Without LR features the input is returned unchanged (the reference
        attention needs LR queries); without reference features only the LR
        attention is added (the no-reference ablation).
        """
        if lr_feat is None:
            return hidden
        lr = self.lr_tokens(lr_feat.to(hidden.dtype))
        if lr.shape[1] != hidden.shape[1] or lr.shape[0] != hidden.shape[0]:
            raise SemsrError(
                f"AiA: LR features give {tuple(lr.shape[:2])} tokens but the block has {tuple(hidden.shape[:2])}"
            )
        if ref_feat is not None:
            ref = self.ref_tokens(ref_feat.to(hidden.dtype))
            hidden = hidden + self.ref_zero(self.ref_attn(lr, encoder_hidden_states=ref))
        return hidden + self.lr_zero(self.lr_attn(self.lr_norm(hidden), encoder_hidden_states=lr))


# ----------------------------------------------------------------------------- encoders


def unet_config(unet: nn.Module) -> dict[str, Any]:
    """The UNet config entries the AiA structure depends on, as JSON values (see :data:`UNET_KEYS`)."""
    cfg = unet.config
    return json.loads(json.dumps({k: getattr(cfg, k, None) for k in UNET_KEYS}))


class ConditionEncoder(nn.Module):
    """ControlNet-style feature encoder: a trainable copy of the UNet's encoder path (no attention).

    ``forward(z (B, 4, h, w), t)`` -> one feature map per UNet resolution level
    ``l``: ``(B, block_out_channels[l], h / 2**l, w / 2**l)``, taken after the
    level's resnets (the last level also goes through a copy of the mid
    block's first resnet). The structure is built from the UNet config
    entries of :func:`unet_config`; :meth:`copy_from` loads the UNet's time
    embedding, ``conv_in``, resnets and downsamplers.

    Args:
        unet: :func:`unet_config` of the UNet.
        latent_channels: channels of the encoded latents.
    """

    def __init__(self, unet: Mapping[str, Any], latent_channels: int = 4) -> None:
        super().__init__()
        channels = [int(c) for c in unet["block_out_channels"]]
        if (unet.get("time_embedding_type") or "positional") != "positional" or unet.get("class_embeddings_concat"):
            raise SemsrError("AiA encoders need a UNet with positional time embeddings (SD 1.x/2.x layout)")
        bad = [b for b in unet["down_block_types"] if b not in ENCODER_BLOCK_TYPES]
        if bad:
            raise SemsrError(f"AiA encoders support the down blocks {', '.join(ENCODER_BLOCK_TYPES)}, not {bad[0]}")
        time_dim = int(unet.get("time_embedding_dim") or channels[0] * 4)
        act, eps, groups = unet["act_fn"], float(unet["norm_eps"]), unet["norm_num_groups"]
        dropout, shift = float(unet.get("dropout") or 0.0), unet["resnet_time_scale_shift"]
        self.time_proj = Timesteps(channels[0], unet["flip_sin_to_cos"], unet["freq_shift"])
        self.time_embedding = TimestepEmbedding(
            channels[0],
            time_dim,
            act_fn=act,
            post_act_fn=unet["timestep_post_act"],
            cond_proj_dim=unet["time_cond_proj_dim"],
        )
        kernel = int(unet.get("conv_in_kernel") or 3)
        self.conv_in = nn.Conv2d(int(latent_channels), channels[0], kernel_size=kernel, padding=(kernel - 1) // 2)
        layers = unet["layers_per_block"]
        layers = [int(layers)] * len(channels) if isinstance(layers, int) else [int(n) for n in layers]
        self.levels = nn.ModuleList()
        out_ch = channels[0]
        for i in range(len(channels)):
            in_ch, out_ch = out_ch, channels[i]
            self.levels.append(
                DownBlock2D(
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=time_dim,
                    dropout=dropout,
                    num_layers=layers[i],
                    resnet_eps=eps,
                    resnet_time_scale_shift=shift,
                    resnet_act_fn=act,
                    resnet_groups=groups,
                    add_downsample=i < len(channels) - 1,
                    downsample_padding=unet["downsample_padding"],
                )
            )
        mid = channels[-1]
        self.mid = ResnetBlock2D(
            in_channels=mid,
            out_channels=mid,
            temb_channels=time_dim,
            eps=eps,
            groups=groups if groups is not None else min(mid // 4, 32),
            dropout=dropout,
            time_embedding_norm=shift,
            non_linearity=act,
            output_scale_factor=unet["mid_block_scale_factor"],
            pre_norm=True,
        )

    @torch.no_grad()
    def copy_from(self, unet: nn.Module) -> None:
        """Load the UNet's time embedding, ``conv_in``, the resnets and downsamplers of its down blocks and
        the first resnet of its mid block; a UNet whose ``conv_in`` reads another number of channels than the
        latents is an error (its input layer cannot be copied)."""
        if unet.conv_in.weight.shape != self.conv_in.weight.shape:
            raise SemsrError(
                f"AiA encoders: the UNet's conv_in takes {unet.conv_in.weight.shape[1]} channels, the latents have "
                f"{self.conv_in.weight.shape[1]} (latent_channels)"
            )
        self.time_embedding.load_state_dict(unet.time_embedding.state_dict())
        self.conv_in.load_state_dict(unet.conv_in.state_dict())
        for level, block in zip(self.levels, unet.down_blocks, strict=True):
            level.resnets.load_state_dict(block.resnets.state_dict())
            if block.downsamplers is not None:
                level.downsamplers.load_state_dict(block.downsamplers.state_dict())
        self.mid.load_state_dict(unet.mid_block.resnets[0].state_dict())

    def forward(self, z: torch.Tensor, t: torch.Tensor | float | int) -> list[torch.Tensor]:
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(t, device=z.device)
        t = (t[None] if t.ndim == 0 else t).expand(z.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        h = self.conv_in(z.to(dtype).contiguous())  # VAE latents may come channels-last
        feats = []
        for i, level in enumerate(self.levels):
            for res in level.resnets:
                h = res(h, emb)
            feats.append(self.mid(h, emb) if i == len(self.levels) - 1 else h)
            if level.downsamplers is not None:
                for down in level.downsamplers:
                    h = down(h)
        return feats


# ----------------------------------------------------------------------------- the fusion module


def transformer_blocks(unet: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """``(name, level, block)`` of every ``BasicTransformerBlock`` in ``unet``.

    ``level`` is the resolution level (0 = full latent resolution): ``down_blocks.i``
    -> ``i``, ``mid_block`` -> the last level, ``up_blocks.i`` -> ``n - 1 - i``.
    """
    n = len(unet.config.block_out_channels)
    out = []
    for name, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        part, _, rest = name.partition(".")
        if part == "down_blocks":
            level = int(rest.split(".")[0])
        elif part == "mid_block":
            level = n - 1
        elif part == "up_blocks":
            level = n - 1 - int(rest.split(".")[0])
        else:
            raise SemsrError(f"AiA: transformer block outside the UNet's blocks: {name}")
        out.append((name, level, module))
    if not out:
        raise SemsrError("AiA: the UNet has no transformer blocks")
    return out


def block_specs(unet: nn.Module) -> list[list[Any]]:
    """``[name, level, dim, heads, dim_head]`` of every transformer block of ``unet`` (AiA's config)."""
    specs = []
    for name, level, block in transformer_blocks(unet):
        attn = block.attn1
        heads = int(attn.heads)
        specs.append([name, level, int(block.norm1.normalized_shape[0]), heads, int(attn.inner_dim // heads)])
    return specs


def _layers(unet: Mapping[str, Any]) -> list[int]:
    layers, n = unet["layers_per_block"], len(unet["block_out_channels"])
    return [int(layers)] * n if isinstance(layers, int) else [int(k) for k in layers]


def skip_channels(unet: Mapping[str, Any]) -> list[int]:
    """Channels of the UNet's skip connections in the order its encoder makes them (those of a ControlNet's
    ``down_block_res_samples``): ``conv_in``, then per level its resnets and, but at the last level, its
    downsampler."""
    channels, layers = [int(c) for c in unet["block_out_channels"]], _layers(unet)
    out = [channels[0]]
    for i, ch in enumerate(channels):
        out += [ch] * layers[i] + ([ch] if i < len(channels) - 1 else [])
    return out


def feature_slots(unet: Mapping[str, Any], names: list[str]) -> dict[str, int]:
    """Index into ``[*down_block_res_samples, mid_block_res_sample]`` of the control feature each transformer
    block ``names[i]`` (``down_blocks.i.attentions.l...``, ``mid_block...``, ``up_blocks.i.attentions.l...``)
    reads: the ControlNet output after the same resnet/attention pair, the mid output, or the skip connection
    the up block's resnet ``l`` concatenates."""
    layers, skips = _layers(unet), len(skip_channels(unet))
    up_layers = [k + 1 for k in reversed(layers)]
    slots = {}
    for name in names:
        part, *rest = name.split(".")
        if part == "mid_block":
            slots[name] = skips
            continue
        if len(rest) < 3 or rest[1] != "attentions":
            raise SemsrError(f"AiA: cannot place the transformer block {name} in the UNet's skip connections")
        block, layer = int(rest[0]), int(rest[2])
        if part == "down_blocks":
            slots[name] = 1 + sum(k + 1 for k in layers[:block]) + layer
        else:
            slots[name] = skips - 1 - (sum(up_layers[:block]) + layer)
    return slots


def control_branch(unet: nn.Module) -> ControlNetModel:
    """A ControlNet branch for AiA made from ``unet``: diffusers' ``ControlNetModel.from_unet`` with a latent
    hint (4 channels, embedding ``conv_in -> SiLU -> zero conv`` at the latent resolution) and its output 1x1
    convolutions set to identities."""
    channels = int(unet.config.block_out_channels[0])
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(channels,), conditioning_channels=int(unet.config.in_channels)
    )
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.zero_()
            conv.weight[:, :, 0, 0].copy_(torch.eye(conv.weight.shape[0]))
            conv.bias.zero_()
    return controlnet


def _slot(name: str) -> str:
    return name.replace(".", "__")


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


@register_component
class AiAFusion(Component):
    """All trainable AiA weights for one UNet: per-block :class:`AiABlock` s plus the LR and reference branches.

    ``forward(unet, x, t, context, z_lr, z_ref=None)`` runs the (frozen) UNet
    with AiA: ``x (B, 4, h, w)`` noisy latent, ``context (B, L, D)`` the
    cross-attention context (cognitive embedding), ``z_lr (B, 4, h, w)`` the
    LR latent, ``z_ref (B, 4, hr, wr)`` the reference latent or None (no
    reference attention). Returns the UNet output ``(B, 4, h, w)``. The UNet
    is an argument (not a sub-module) so copies and state dicts of the fusion
    never include it.

    Args (the config; use :meth:`from_unet` for a new module):
        unet_config: :func:`unet_config` of the UNet it is made for.
        transformer_blocks: :func:`block_specs` of that UNet.
        init_from_self_attention: the new attentions started as copies of the blocks' self-attentions.
        latent_channels: channels of the LR / reference latents.
        control: ``"controlnet"`` (ControlNet branches with attention) or ``"encoder"`` (attention-free
            encoders); see the module docstring.
        controlnet_config: the branches' ``ControlNetModel`` config (``control="controlnet"``).
    """

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        transformer_blocks: list[list[Any]],
        init_from_self_attention: bool = True,
        latent_channels: int = 4,
        control: str = "controlnet",
        controlnet_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if control not in CONTROL_KINDS:
            raise SemsrError(f"AiA control must be one of {', '.join(CONTROL_KINDS)}, got {control!r}")
        if control == "controlnet" and not controlnet_config:
            raise UnavailableError(
                "AiA weights without a controlnet_config: made by an older semsr (attention-free encoders, "
                "retrain with coser-sr) or not by AiAFusion.from_unet"
            )
        self.control = control
        groups = int(unet_config.get("norm_num_groups") or 32)
        names = [str(spec[0]) for spec in transformer_blocks]
        if control == "controlnet":
            skips = skip_channels(unet_config)
            channels = [*skips, int(unet_config["block_out_channels"][-1])]
            self.slots = feature_slots(unet_config, names)
        else:
            channels = [int(c) for c in unet_config["block_out_channels"]]
            self.slots = {str(spec[0]): int(spec[1]) for spec in transformer_blocks}
        self.blocks = nn.ModuleDict()
        for name, _level, dim, heads, dim_head in transformer_blocks:
            feature_channels = channels[self.slots[str(name)]]
            self.blocks[_slot(name)] = AiABlock(int(dim), int(heads), int(dim_head), feature_channels, groups)
        # the branches are copies of the UNet's or loaded weights: their initialisation draws nothing
        # from the global RNG (the AiA blocks' initialisation depends on the seed alone)
        with torch.random.fork_rng(devices=[]):
            if control == "controlnet":
                cfg = {k: v for k, v in dict(controlnet_config).items() if not k.startswith("_")}
                self.lr_branch = ControlNetModel.from_config(cfg)
                self.ref_branch = ControlNetModel.from_config(cfg)
            else:
                self.lr_branch = ConditionEncoder(unet_config, latent_channels)
                self.ref_branch = ConditionEncoder(unet_config, latent_channels)

    @classmethod
    def from_unet(
        cls, unet: nn.Module, *, init_from_self_attention: bool = True, control: str = "controlnet"
    ) -> AiAFusion:
        """New AiA weights for ``unet``: zero-initialised residual layers (the wrapped UNet equals the plain
        one), branches copied from the UNet (:func:`control_branch` or :meth:`ConditionEncoder.copy_from`),
        attentions copied from the self-attentions when asked."""
        if control not in CONTROL_KINDS:
            raise SemsrError(f"AiA control must be one of {', '.join(CONTROL_KINDS)}, got {control!r}")
        branches = None
        controlnet_config = None
        if control == "controlnet":
            with torch.random.fork_rng(devices=[]):
                branches = (control_branch(unet), control_branch(unet))
            controlnet_config = _json({k: v for k, v in dict(branches[0].config).items() if not k.startswith("_")})
        fusion = cls(
            unet_config=unet_config(unet),
            transformer_blocks=block_specs(unet),
            init_from_self_attention=init_from_self_attention,
            control=control,
            controlnet_config=controlnet_config,
        )
        with torch.no_grad():
            if init_from_self_attention:
                for name, _, block in transformer_blocks(unet):
                    fusion.block(name).init_from_attention(block.attn1)
            if branches is not None:
                fusion.lr_branch.load_state_dict(branches[0].state_dict())
                fusion.ref_branch.load_state_dict(branches[1].state_dict())
            else:
                fusion.lr_branch.copy_from(unet)
                fusion.ref_branch.copy_from(unet)
        return fusion

    def check_unet(self, unet: nn.Module) -> None:
        """Raise :class:`~semsr.core.errors.UnavailableError` unless ``unet`` has the structure these weights
        were made for."""
        mine, theirs = _json(dict(self.config["unet_config"])), unet_config(unet)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        names = {n for n, _, _ in transformer_blocks(unet)}
        if diff or names != set(self.slots):
            what = ", ".join(f"{k} {mine.get(k)} vs {theirs.get(k)}" for k in diff[:3]) or "transformer blocks"
            raise UnavailableError(f"AiA weights were made for another UNet ({what})")

    def block(self, name: str) -> AiABlock:
        """The AiA parts of the UNet block ``name``."""
        try:
            return self.blocks[_slot(name)]
        except KeyError:
            raise SemsrError(f"AiA weights have no block {name!r}: they were made for another UNet") from None

    def slot(self, name: str) -> int:
        """Index of the control feature the UNet block ``name`` reads."""
        return self.slots[name]

    @property
    def context_dependent(self) -> bool:
        """The control features depend on the noisy latent and the context (ControlNet branches)."""
        return self.control == "controlnet"

    def _branch(
        self,
        branch: nn.Module,
        hint: torch.Tensor,
        t: torch.Tensor | float | int,
        sample: torch.Tensor | None,
        context: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        if self.control == "encoder":
            return branch(hint, t)
        if sample is None or context is None:
            raise SemsrError("AiA ControlNet branches need the sample and the context")
        dtype = next(branch.parameters()).dtype
        t = torch.as_tensor(t, device=sample.device)
        down, mid = branch(
            sample.to(dtype).contiguous(),
            t,
            encoder_hidden_states=context.to(dtype),
            controlnet_cond=hint.to(dtype).contiguous(),
            return_dict=False,
        )
        return [*down, mid]

    def lr_features(
        self,
        z_lr: torch.Tensor,
        t: torch.Tensor | float | int,
        *,
        sample: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """LR control features of ``z_lr (B, 4, h, w)`` at timestep ``t``: ControlNet branch on the noisy
        latent ``sample (B, 4, h, w)`` with ``z_lr`` as hint, cross-attending to ``context (B, L, D)``; the
        encoder option reads ``z_lr`` alone. One tensor per feature slot (:meth:`slot`)."""
        return self._branch(self.lr_branch, z_lr, t, sample, context)

    def ref_features(
        self, z_ref: torch.Tensor, t: torch.Tensor | float | int, *, context: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Reference control features of ``z_ref (B, 4, hr, wr)`` at timestep ``t`` (ControlNet branch on the
        reference latent, cross-attending to ``context (B, L, D)``; the encoder option reads ``z_ref`` alone)."""
        return self._branch(self.ref_branch, z_ref, t, z_ref, context)

    def unet_forward(
        self,
        unet: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        lr_feats: list[torch.Tensor] | None,
        ref_feats: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """UNet output with AiA given precomputed features (installs the hooks on first use)."""
        install_aia(unet)
        aia = AiAInputs(self, lr_feats, ref_feats)
        return unet(x, t, encoder_hidden_states=context, cross_attention_kwargs={"aia": aia}, return_dict=False)[0]

    def forward(
        self,
        unet: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        z_lr: torch.Tensor,
        z_ref: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lr_feats = self.lr_features(z_lr, t, sample=x, context=context)
        ref_feats = None if z_ref is None else self.ref_features(z_ref, t, context=context)
        return self.unet_forward(unet, x, t, context, lr_feats, ref_feats)


# ----------------------------------------------------------------------------- hooks


@dataclass
class AiAInputs:
    """What travels to the transformer blocks in ``cross_attention_kwargs["aia"]``.

    Attributes:
        fusion: the AiA weights.
        lr: LR control features (one per feature slot, :meth:`AiAFusion.slot`), or None (plain block).
        ref: reference control features, or None (no reference attention).
    """

    fusion: AiAFusion
    lr: list[torch.Tensor] | None
    ref: list[torch.Tensor] | None

    def apply(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        if self.lr is None:
            return hidden
        slot = self.fusion.slot(name)
        ref = None if self.ref is None else self.ref[slot]
        return self.fusion.block(name).forward(hidden, self.lr[slot], ref)


_CAK_POSITION = 5  # cross_attention_kwargs in BasicTransformerBlock.forward(hidden_states, ...) positional form


def _make_hook(name: str) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = "cross_attention_kwargs" not in kwargs and len(args) > _CAK_POSITION
        cak = args[_CAK_POSITION] if positional else kwargs.get("cross_attention_kwargs")
        if not cak or "aia" not in cak:
            return None
        inputs: AiAInputs = cak["aia"]
        rest = {k: v for k, v in cak.items() if k != "aia"} or None
        args, kwargs = list(args), dict(kwargs)
        if args:
            args[0] = inputs.apply(name, args[0])
        else:
            kwargs["hidden_states"] = inputs.apply(name, kwargs["hidden_states"])
        if positional:
            args[_CAK_POSITION] = rest
        else:
            kwargs["cross_attention_kwargs"] = rest
        return tuple(args), kwargs

    return hook


def install_aia(unet: nn.Module) -> nn.Module:
    """Make ``unet`` AiA-capable (idempotent): a forward pre-hook on each transformer block.

    The UNet's weights, state dict and plain behaviour are unchanged; blocks
    only act on calls whose ``cross_attention_kwargs`` carry ``"aia"``.
    """
    if getattr(unet, "_semsr_aia_hooks", None):
        return unet
    handles = [
        block.register_forward_pre_hook(_make_hook(name), with_kwargs=True)
        for name, _, block in transformer_blocks(unet)
    ]
    unet._semsr_aia_hooks = handles
    return unet


def remove_aia(unet: nn.Module) -> nn.Module:
    """Undo :func:`install_aia`."""
    for handle in getattr(unet, "_semsr_aia_hooks", None) or []:
        handle.remove()
    unet._semsr_aia_hooks = None
    return unet
