"""XPSR's Semantic-Fusion Attention (SFA) in the SR ControlNet, and the UNet's conditional attention.

**ControlNet side.** In every ``BasicTransformerBlock`` of a diffusers
``ControlNetModel`` the cross-attention ``attn2`` (which runs after each
resnet) becomes, with ``x`` the block's normalised hidden states
``(B, N, C)`` and the two prompts ``c_h`` (high-level, semantic) and ``c_l``
(low-level, quality/degradation), each ``(B, L, D)``::

    parallel (SFA):  CA_f(q = CA_h(x, c_h), kv = CA_l(x, c_l))      XPSR eq. (2), default
    serial:          CA_l(CA_h(x, c_h), c_l)                        XPSR eq. (1), Table 3 ablation
    high:            CA_h(x, c_h)                                   high-level branch only (= plain ControlNet)
    low:             CA_l(x, c_l)                                   low-level branch only

``CA_h`` is the block's own pretrained cross-attention (its weights and
state-dict keys are unchanged); ``CA_l`` starts as a copy of it; the fusion
attention ``CA_f`` (query and key/value both of width ``C``) starts as a copy of
the block's pretrained self-attention ``attn1``. The block's residual
connection around ``attn2`` is kept, so the block computes
``x + SFA(norm(x))`` where it computed ``x + CA(norm(x), c)``.

**Identities at initialisation** (tested): with ``c_h == c_l == c``,
``CA_l(x, c) == CA_h(x, c)`` exactly, so ``parallel`` gives
``attn1(attn2(x, c))`` — the pretrained cross-attention output passed through
the pretrained self-attention — and ``serial`` gives ``attn2(attn2(x, c), c)``;
``high`` reproduces the plain ControlNet exactly for any ``c_l``.

The two prompts travel as one context ``cat([c_h, c_l], dim=1)`` of shape
``(B, 2L, D)`` (both encoded to the same length ``L``) through the ControlNet's
ordinary ``encoder_hidden_states``; each SFA processor splits it in halves.

**UNet side.** The UNet keeps its (frozen) high-level cross-attention on
``c_h`` and gains a *conditional attention* to the ControlNet's features: in
every UNet transformer block, ``attn2``'s output gets
``+ zero_linear(CA_c(q = x, kv = F))`` where ``F`` are the tokens ``(B, N, C)``
of the ControlNet residual at the block's resolution (the mid-block residual
at the lowest one). ``CA_c`` starts as a copy of the block's self-attention and
``zero_linear`` is zero, so the UNet is exactly the plain UNet at
initialisation. Features are handed over with :meth:`SFAFusion.unet_features`.

How it is wired: diffusers attention *processors* (plain objects, not modules)
are set on the ``attn2`` of each block; the new weights live in one
:class:`SFAFusion` component (trainable; ``config.json`` +
``diffusion_pytorch_model.safetensors``, see :mod:`semsr.core.components`).
Its config records the block names and the constructor arguments of every
attention it holds, so it is rebuilt from its folder alone;
:meth:`SFAFusion.from_models` makes a new one from a ControlNet (and UNet).
The ControlNet's and UNet's state dicts are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from semsr.core.components import Component, register_component, register_to_config
from semsr.core.errors import SemsrError
from semsr.fusion.layers import zero_linear

SFA_MODES = ("parallel", "serial", "high", "low")


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every diffusers ``BasicTransformerBlock`` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]


def _slot(name: str) -> str:
    return name.replace(".", "__")


def attention_config(attn: Attention) -> dict[str, Any]:
    """The ``Attention`` constructor arguments (JSON values) that rebuild ``attn``'s structure.

    Covers the attentions of SD's transformer blocks (projections, heads, bias,
    dropout, upcast); any other variant is refused.
    """
    if (
        attn.residual_connection
        or attn.rescale_output_factor != 1.0
        or attn.norm_cross is not None
        or attn.group_norm is not None
        or attn.spatial_norm is not None
        or attn.norm_q is not None
        or attn.added_kv_proj_dim is not None
        or attn.out_dim != attn.query_dim
    ):
        raise SemsrError("SFA: unsupported attention variant (norms, residual or extra projections)")
    return {
        "query_dim": int(attn.query_dim),
        "cross_attention_dim": int(attn.cross_attention_dim) if attn.is_cross_attention else None,
        "heads": int(attn.heads),
        "dim_head": int(attn.inner_dim // attn.heads),
        "dropout": float(attn.dropout),
        "bias": bool(attn.use_bias),
        "upcast_attention": bool(attn.upcast_attention),
        "out_bias": attn.to_out[0].bias is not None,
    }


def _new_attention(config: dict[str, Any]) -> Attention:
    """A trainable ``Attention`` built from :func:`attention_config`, with the default processor.

    Its weights are always overwritten (by a pretrained attention or a checkpoint), so it is
    built without advancing the global RNG: making an SFA draws exactly what the zero layers draw.
    """
    with torch.random.fork_rng(devices=[]):
        attn = Attention(**config)
    attn.set_processor(AttnProcessor2_0())
    return attn


def split_context(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2L, D)`` two-prompt context -> ``(c_h, c_l)``, each ``(B, L, D)``."""
    if context.shape[1] % 2:
        raise SemsrError(f"SFA context must be cat([c_h, c_l], 1) of two equal lengths, got {context.shape[1]} tokens")
    high, low = context.chunk(2, dim=1)
    return high, low


def two_prompt_context(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``c_h (B, L, D)`` and ``c_l (B, L, D)`` -> the ControlNet context ``(B, 2L, D)``."""
    if high.shape != low.shape:
        raise SemsrError(f"high- and low-level contexts differ in shape: {tuple(high.shape)} vs {tuple(low.shape)}")
    return torch.cat([high, low], dim=1)


class _SlotProcessor:
    """An attention processor bound to ``fusion``'s modules of one block (``slot``), over diffusers' own."""

    def __init__(self, fusion: SFAFusion, slot: str) -> None:
        self.fusion = fusion
        self.slot = slot
        self.base = AttnProcessor2_0()


class SFAProcessor(_SlotProcessor):
    """Attention processor of a ControlNet block's ``attn2`` (see the module docstring)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise SemsrError("SFA needs the two-prompt context cat([c_h, c_l], 1)")
        c_h, c_l = split_context(encoder_hidden_states)
        mode = self.fusion.mode
        low = self.fusion.low[self.slot]
        if mode == "high":
            return self.base(attn, hidden_states, c_h, attention_mask)
        if mode == "low":
            return low(hidden_states, encoder_hidden_states=c_l)
        high = self.base(attn, hidden_states, c_h, attention_mask)
        if mode == "serial":
            return low(high, encoder_hidden_states=c_l)
        return self.fusion.fuse[self.slot](high, encoder_hidden_states=low(hidden_states, encoder_hidden_states=c_l))


class ConditionalAttnProcessor(_SlotProcessor):
    """Processor of a UNet block's ``attn2``: high-level cross-attention + zero-gated attention to
    the ControlNet features of the block's resolution (when :meth:`SFAFusion.unet_features` set them)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask)
        feats = self.fusion._unet_features
        if not feats or self.slot not in self.fusion.cond:
            return out
        tokens = feats.get(hidden_states.shape[1])
        if tokens is None:
            return out
        if tokens.shape[0] != hidden_states.shape[0]:
            tokens = tokens.repeat(hidden_states.shape[0] // tokens.shape[0], 1, 1)
        extra = self.fusion.cond[self.slot](hidden_states, encoder_hidden_states=tokens.to(hidden_states.dtype))
        return out + self.fusion.cond_out[self.slot](extra)


@register_component
class SFAFusion(Component):
    """The new attention weights of XPSR: per ControlNet block ``low`` (copy of ``attn2``) and
    ``fuse`` (copy of ``attn1``); per UNet block ``cond`` (copy of ``attn1``) and ``cond_out`` (zero).

    Args:
        controlnet_blocks: one entry per ControlNet transformer block, in module order:
            ``{"name": <block module name>, "low": <attention config>, "fuse": <attention config>}``
            (:func:`attention_config`).
        unet_blocks: one entry per UNet transformer block, ``{"name": ..., "cond": <attention config>}``;
            empty: no conditional attention.
        mode: one of :data:`SFA_MODES` (switchable later by setting ``mode``).

    :meth:`from_models` fills these from a ControlNet and UNet and copies their
    pretrained attentions into the new ones.
    """

    @register_to_config
    def __init__(
        self,
        controlnet_blocks: list[dict[str, Any]],
        unet_blocks: list[dict[str, Any]] | None = None,
        mode: str = "parallel",
    ) -> None:
        super().__init__()
        self.mode = mode
        if not controlnet_blocks:
            raise SemsrError("SFA: the ControlNet has no transformer blocks")
        self.low = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        self.cond = nn.ModuleDict()
        self.cond_out = nn.ModuleDict()
        for block in controlnet_blocks:
            self.low[_slot(block["name"])] = _new_attention(block["low"])
            self.fuse[_slot(block["name"])] = _new_attention(block["fuse"])
        for block in unet_blocks or ():
            self.cond[_slot(block["name"])] = _new_attention(block["cond"])
            self.cond_out[_slot(block["name"])] = zero_linear(int(block["cond"]["query_dim"]))
        self._unet_features: dict[int, torch.Tensor] | None = None

    @classmethod
    def from_models(cls, controlnet: nn.Module, unet: nn.Module | None = None, mode: str = "parallel") -> SFAFusion:
        """A new SFA for ``controlnet`` (and the conditional attention for ``unet``, if given): the new
        attentions start as copies of the pretrained ones (see the module docstring), ``cond_out`` at zero."""
        cn_blocks = transformer_blocks(controlnet)
        unet_blocks = transformer_blocks(unet) if unet is not None else []
        fusion = cls(
            controlnet_blocks=[
                {"name": n, "low": attention_config(b.attn2), "fuse": attention_config(b.attn1)} for n, b in cn_blocks
            ],
            unet_blocks=[{"name": n, "cond": attention_config(b.attn1)} for n, b in unet_blocks],
            mode=mode,
        )
        pairs = [(fusion.low, n, b.attn2) for n, b in cn_blocks] + [(fusion.fuse, n, b.attn1) for n, b in cn_blocks]
        pairs += [(fusion.cond, n, b.attn1) for n, b in unet_blocks]
        with torch.no_grad():
            for modules, name, pretrained in pairs:
                weight = pretrained.to_q.weight
                modules[_slot(name)].to(device=weight.device, dtype=weight.dtype)
                modules[_slot(name)].load_state_dict(pretrained.state_dict())
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

    # ------------------------------------------------------------------ wiring

    def install(self, controlnet: nn.Module, unet: nn.Module | None = None) -> None:
        """Set the SFA processors on ``controlnet`` (and conditional ones on ``unet``)."""
        for name, block in transformer_blocks(controlnet):
            if _slot(name) not in self.low:
                raise SemsrError(f"SFA weights have no block {name}: ControlNet architecture differs")
            block.attn2.set_processor(SFAProcessor(self, _slot(name)))
        if unet is not None and len(self.cond):
            for name, block in transformer_blocks(unet):
                block.attn2.set_processor(ConditionalAttnProcessor(self, _slot(name)))

    @contextlib.contextmanager
    def unet_features(self, down: Sequence[torch.Tensor], mid: torch.Tensor) -> Iterator[None]:
        """Make the ControlNet residuals ``down`` (each ``(B, C_i, h_i, w_i)``) and ``mid`` the
        conditional attention's keys/values for UNet calls inside the ``with`` block."""
        feats: dict[int, torch.Tensor] = {}
        for f in list(down) + [mid]:  # later (deeper) features at a resolution win; mid wins at the lowest
            feats[f.shape[-2] * f.shape[-1]] = f.flatten(2).transpose(1, 2)
        self._unet_features = feats
        try:
            yield
        finally:
            self._unet_features = None

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

        The one forward of inference and training. The ControlNet residuals are cast to ``x``'s
        dtype (the frozen UNet's): under mixed precision a prepared trainable module returns fp32.

        Args:
            x: ``(B, 4, h, w)`` noisy latent in the UNet's dtype; t: scalar or ``(B,)`` timesteps.
            high, low: ``(B, L, D)`` high- and low-level contexts.
            hint: ``(B, 3, f*h, f*w)`` in [0, 1].
            unet_context: ``(B, L', D)`` the UNet's cross-attention context instead of ``high``
                (DaLPSR: both prompts, see :func:`semsr.methods.xpsr.unet_context`).
        Returns:
            ``(B, 4, h, w)`` model output.
        """
        down, mid = controlnet(
            x,
            t,
            encoder_hidden_states=two_prompt_context(high, low),
            controlnet_cond=hint,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        down = [d.to(x.dtype) for d in down]
        mid = mid.to(x.dtype)
        with self.unet_features(down, mid):
            return unet(
                x,
                t,
                encoder_hidden_states=high if unet_context is None else unet_context,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
