"""CoSeR's All-in-Attention (AiA): LR, reference and cognition in every UNet transformer block.

Each ``BasicTransformerBlock`` of a pretrained (frozen) diffusers
``UNet2DConditionModel`` gets two new attention steps *before* its own
self-attention, cross-attention and feed-forward::

    lr  = proj_lr(GroupNorm(F_lr))             # (B, N, C) tokens of the LR features at this resolution
    ref = proj_ref(GroupNorm(F_ref))           # (B, M, C) tokens of the reference features
    x  += zero_ref(HardAttention(q=lr, k=ref, v=ref))   # argmax over keys, value * max score, no softmax
    x  += zero_lr(Attention(q=LayerNorm(x), k=lr, v=lr))
    x   = block(x, context=cognitive embedding)           # pretrained self-attn, cross-attn, FFN

``zero_*`` are the 1x1 "zero convolutions" of ControlNet: a 1x1 convolution
over the token grid is a Linear over channels, so they are zero-initialised
``nn.Linear`` layers and the wrapped UNet equals the plain one at
initialisation. The two new attentions start as copies of the block's
pretrained self-attention (``init_from_self_attention``, CoSeR's
``use_atten_init``). ``F_lr`` and ``F_ref`` come from two ControlNet-style
encoders (:class:`ConditionEncoder`: trainable copies of the UNet's encoder
path, time-conditioned) run on the VAE latents of the bicubic-upsampled LR
image and of the reference image; they give one feature map per UNet
resolution level.

How it is wired (no change to the UNet's weights or state dict):
:func:`install_aia` registers a forward pre-hook on every transformer block;
the hook looks for ``cross_attention_kwargs["aia"]`` (an :class:`AiAInputs`:
the :class:`AiAFusion` weights plus the per-level features), applies the two
AiA steps to the block's input and removes the key before the block runs.
Calls without that key (e.g. reference generation) run the plain UNet.
:meth:`AiAFusion.unet_forward` does all of this for one UNet call.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.layers import zero_linear

#: ``config.json`` kind of an AiA checkpoint folder.
CHECKPOINT_KIND = "coser-aia"
#: Scores held at a time by hard attention (``B * heads * query rows * keys``; 2**24 floats = 64 MB).
HARD_ATTENTION_BUDGET = 2**24


# ----------------------------------------------------------------------------- hard attention


def hard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   chunk: int | None = None) -> torch.Tensor:
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
        scores = torch.matmul(q[..., start:start + chunk, :], kt)  # (B, H, c, Nk)
        best, index = scores.max(dim=-1)  # (B, H, c)
        picked = torch.gather(v, 2, index.unsqueeze(-1).expand(*index.shape, v.shape[-1]))
        outs.append(picked * best.unsqueeze(-1))
    return torch.cat(outs, dim=-2)


class HardAttnProcessor:
    """diffusers attention processor computing :func:`hard_attention` with the ``Attention``'s projections.

    ``attn(hidden_states (B, Nq, C), encoder_hidden_states (B, Nk, C))`` ->
    ``(B, Nq, C)``: heads split as usual, ``to_out`` applied to the merged heads.
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
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
        feature_channels: channels ``Cf`` of the encoder features at the block's level.
        groups: GroupNorm groups of the feature projections.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, feature_channels: int, groups: int = 32) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.lr_tokens = FeatureTokens(feature_channels, dim, groups)
        self.ref_tokens = FeatureTokens(feature_channels, dim, groups)
        self.ref_attn = Attention(dim, cross_attention_dim=dim, heads=heads, dim_head=dim_head,
                                  processor=HardAttnProcessor())
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

    def forward(self, hidden: torch.Tensor, lr_feat: torch.Tensor | None,
                ref_feat: torch.Tensor | None) -> torch.Tensor:
        """``hidden (B, N, C)`` + AiA terms; ``lr_feat (B, Cf, h, w)`` with ``h*w == N``; ``ref_feat`` any size.

        Without LR features the input is returned unchanged (the reference
        attention needs LR queries); without reference features only the LR
        attention is added (the no-reference ablation).
        """
        if lr_feat is None:
            return hidden
        lr = self.lr_tokens(lr_feat.to(hidden.dtype))
        if lr.shape[1] != hidden.shape[1] or lr.shape[0] != hidden.shape[0]:
            raise SemsrError(f"AiA: LR features give {tuple(lr.shape[:2])} tokens but the block has "
                             f"{tuple(hidden.shape[:2])}")
        if ref_feat is not None:
            ref = self.ref_tokens(ref_feat.to(hidden.dtype))
            hidden = hidden + self.ref_zero(self.ref_attn(lr, encoder_hidden_states=ref))
        return hidden + self.lr_zero(self.lr_attn(self.lr_norm(hidden), encoder_hidden_states=lr))


# ----------------------------------------------------------------------------- encoders


class ConditionEncoder(nn.Module):
    """ControlNet-style feature encoder: a trainable copy of the UNet's encoder path (no attention).

    ``forward(z (B, 4, h, w), t)`` -> one feature map per UNet resolution level
    ``l``: ``(B, block_out_channels[l], h / 2**l, w / 2**l)``, taken after the
    level's resnets (the last level also goes through a copy of the mid
    block's first resnet). The time embedding, ``conv_in``, resnets and
    downsamplers start as copies of the UNet's.
    """

    def __init__(self, unet: nn.Module, latent_channels: int = 4) -> None:
        super().__init__()
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        if unet.conv_in.in_channels == latent_channels:
            self.conv_in = copy.deepcopy(unet.conv_in)
        else:
            self.conv_in = nn.Conv2d(latent_channels, unet.conv_in.out_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        for block in unet.down_blocks:
            level = nn.Module()
            level.resnets = copy.deepcopy(block.resnets)
            level.downsamplers = copy.deepcopy(block.downsamplers) if block.downsamplers is not None else None
            self.levels.append(level)
        self.mid = copy.deepcopy(unet.mid_block.resnets[0])

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
    from diffusers.models.attention import BasicTransformerBlock

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


def _slot(name: str) -> str:
    return name.replace(".", "__")


class AiAFusion(nn.Module):
    """All trainable AiA weights for one UNet: per-block :class:`AiABlock` s plus the LR and reference encoders.

    ``forward(unet, x, t, context, z_lr, z_ref=None)`` runs the (frozen) UNet
    with AiA: ``x (B, 4, h, w)`` noisy latent, ``context (B, L, D)`` the
    cross-attention context (cognitive embedding), ``z_lr (B, 4, h, w)`` the
    LR latent, ``z_ref (B, 4, hr, wr)`` the reference latent or None (no
    reference attention). Returns the UNet output ``(B, 4, h, w)``. The UNet
    is an argument (not a sub-module) so copies and state dicts of the fusion
    never include it.
    """

    def __init__(self, unet: nn.Module, *, init_from_self_attention: bool = True) -> None:
        super().__init__()
        cfg = unet.config
        groups = int(cfg.norm_num_groups or 32)
        self.levels: dict[str, int] = {}
        self.blocks = nn.ModuleDict()
        for name, level, block in transformer_blocks(unet):
            attn = block.attn1
            dim = int(block.norm1.normalized_shape[0])
            heads = int(attn.heads)
            part = AiABlock(dim, heads, attn.inner_dim // heads, int(cfg.block_out_channels[level]), groups)
            if init_from_self_attention:
                part.init_from_attention(attn)
            self.blocks[_slot(name)] = part
            self.levels[name] = level
        self.lr_encoder = ConditionEncoder(unet)
        self.ref_encoder = ConditionEncoder(unet)
        self.unet_signature = unet_signature(unet)
        self.init_from_self_attention = init_from_self_attention

    def block(self, name: str) -> AiABlock:
        """The AiA parts of the UNet block ``name``."""
        try:
            return self.blocks[_slot(name)]
        except KeyError:
            raise SemsrError(f"AiA weights have no block {name!r}: they were made for another UNet") from None

    def lr_features(self, z_lr: torch.Tensor, t: torch.Tensor | float | int) -> list[torch.Tensor]:
        """Per-level LR features of ``z_lr (B, 4, h, w)`` at timestep ``t``."""
        return self.lr_encoder(z_lr, t)

    def ref_features(self, z_ref: torch.Tensor, t: torch.Tensor | float | int) -> list[torch.Tensor]:
        """Per-level reference features of ``z_ref (B, 4, hr, wr)`` at timestep ``t``."""
        return self.ref_encoder(z_ref, t)

    def unet_forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     lr_feats: list[torch.Tensor] | None, ref_feats: list[torch.Tensor] | None) -> torch.Tensor:
        """UNet output with AiA given precomputed features (installs the hooks on first use)."""
        install_aia(unet)
        aia = AiAInputs(self, lr_feats, ref_feats)
        return unet(x, t, encoder_hidden_states=context, cross_attention_kwargs={"aia": aia}, return_dict=False)[0]

    def forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                z_lr: torch.Tensor, z_ref: torch.Tensor | None = None) -> torch.Tensor:
        lr_feats = self.lr_features(z_lr, t)
        ref_feats = None if z_ref is None else self.ref_features(z_ref, t)
        return self.unet_forward(unet, x, t, context, lr_feats, ref_feats)

    # -- checkpoints ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON description stored beside the weights."""
        return {"kind": CHECKPOINT_KIND, "version": 1, "unet": self.unet_signature,
                "init_from_self_attention": self.init_from_self_attention,
                "blocks": sorted(self.levels), "levels": len(self.lr_encoder.levels)}

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/config.json`` + ``folder/model.safetensors``."""
        from semsr.core.loading import save_checkpoint

        return save_checkpoint(folder, self.state_dict(), self.config())

    @classmethod
    def load(cls, folder: str | Path, unet: nn.Module) -> AiAFusion:
        """Load AiA weights saved by :meth:`save` for ``unet`` (must be the same architecture)."""
        from semsr.core.loading import load_checkpoint

        folder = Path(folder)
        tensors, config = load_checkpoint(folder)
        if config.get("kind") != CHECKPOINT_KIND:
            raise UnavailableError(f"not a CoSeR AiA checkpoint (config kind {config.get('kind')!r})",
                                   folder / "config.json")
        if config.get("unet") != unet_signature(unet):
            raise UnavailableError(f"AiA weights were made for another UNet ({config.get('unet')} vs "
                                   f"{unet_signature(unet)})", folder)
        fusion = cls(unet, init_from_self_attention=False)
        missing, unexpected = fusion.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise UnavailableError(f"AiA weights do not match: missing {sorted(missing)[:3]}, "
                                   f"unexpected {sorted(unexpected)[:3]}", folder)
        fusion.init_from_self_attention = bool(config.get("init_from_self_attention", True))
        return fusion


def unet_signature(unet: nn.Module) -> dict[str, Any]:
    """The UNet architecture facts AiA weights depend on (checked when loading)."""
    cfg = unet.config
    head_dim = cfg.attention_head_dim
    return {"block_out_channels": list(cfg.block_out_channels), "layers_per_block": int(cfg.layers_per_block),
            "cross_attention_dim": int(cfg.cross_attention_dim),
            "attention_head_dim": list(head_dim) if isinstance(head_dim, (list, tuple)) else int(head_dim),
            "down_block_types": list(cfg.down_block_types)}


# ----------------------------------------------------------------------------- hooks


@dataclass
class AiAInputs:
    """What travels to the transformer blocks in ``cross_attention_kwargs["aia"]``.

    Attributes:
        fusion: the AiA weights.
        lr: per-level LR features, or None (plain block).
        ref: per-level reference features, or None (no reference attention).
    """

    fusion: AiAFusion
    lr: list[torch.Tensor] | None
    ref: list[torch.Tensor] | None

    def apply(self, name: str, level: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.lr is None:
            return hidden
        ref = None if self.ref is None else self.ref[level]
        return self.fusion.block(name).forward(hidden, self.lr[level], ref)


_CAK_POSITION = 5  # cross_attention_kwargs in BasicTransformerBlock.forward(hidden_states, ...) positional form


def _make_hook(name: str, level: int):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = "cross_attention_kwargs" not in kwargs and len(args) > _CAK_POSITION
        cak = args[_CAK_POSITION] if positional else kwargs.get("cross_attention_kwargs")
        if not cak or "aia" not in cak:
            return None
        inputs: AiAInputs = cak["aia"]
        rest = {k: v for k, v in cak.items() if k != "aia"} or None
        args, kwargs = list(args), dict(kwargs)
        if args:
            args[0] = inputs.apply(name, level, args[0])
        else:
            kwargs["hidden_states"] = inputs.apply(name, level, kwargs["hidden_states"])
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
    handles = [block.register_forward_pre_hook(_make_hook(name, level), with_kwargs=True)
               for name, level, block in transformer_blocks(unet)]
    unet._semsr_aia_hooks = handles
    return unet


def remove_aia(unet: nn.Module) -> nn.Module:
    """Undo :func:`install_aia`."""
    for handle in getattr(unet, "_semsr_aia_hooks", None) or []:
        handle.remove()
    unet._semsr_aia_hooks = None
    return unet
