"""AdaIN adapters (RFA stage 2): steer a UNet's transformer blocks toward a control embedding.

For every ``BasicTransformerBlock`` of a diffusers UNet (or ControlNet) the
adapter adds, per block:

- ``alpha``: AdaIN on the cross-attention queries and keys (``attn2``): the
  token statistics (mean/std over tokens, per channel) of Q and K are
  replaced by statistics predicted from the control embedding;
- ``beta``: AdaIN on the output of the LayerNorm before cross-attention (``norm2``);
- ``gamma``: AdaIN on the output of the LayerNorm before the FFN (``norm3``).

Each modulation is blended in as ``x + tanh(g) * (AdaIN(x, c) - x)`` with the
learnable gate ``g`` initialised to 0, so at initialisation the base model's
output is unchanged exactly. Statistics come from the control embedding ``c``
``(B, Dc)`` through a per-block linear layer (initialised to mean 0, std 1).

:class:`AdaINAdapters` is a :class:`~semsr.core.components.Component`: its
config records ``control_dim`` and, per block, the widths its layers need, so
it is built (and loaded) without the UNet. One instance serves one model; RFA
attaches one to the UNet and one to the ControlNet and sets both controls
with :func:`adain_control`. Usage::

    adapters = attach_adain(unet, AdaINAdapters.for_model(unet, control_dim=1024))
    with adapters.control(embedding):          # (B, Dc); repeated over CFG batches
        eps = unet(x, t, encoder_hidden_states=ctx).sample

Outside a ``control`` block the adapters are off (the UNet is the base one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from semsr.core.components import Component, register_component, register_to_config
from semsr.core.errors import SemsrError

EPS = 1e-5


def adain(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """AdaIN over tokens: ``x (B, L, C)`` normalised per channel, then scaled by ``std`` and shifted by ``mean`` ``(B, C)``."""
    mu = x.mean(dim=1, keepdim=True)
    sigma = x.var(dim=1, keepdim=True, unbiased=False).add(EPS).sqrt()
    return (x - mu) / sigma * std.unsqueeze(1) + mean.unsqueeze(1)


class _ControlState:
    """The current control embedding shared by all adapters of one model."""

    def __init__(self) -> None:
        self.embedding: torch.Tensor | None = None

    def for_batch(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        c = self.embedding
        if c is None:
            return None
        if c.shape[0] != batch:
            if batch % c.shape[0]:
                raise ValueError(f"control batch {c.shape[0]} does not divide the model batch {batch}")
            c = c.repeat(batch // c.shape[0], 1)
        return c.to(like.device, like.dtype)


class StyleHead(nn.Module):
    """``(B, Dc)`` -> AdaIN ``(mean, std)`` each ``(B, C)``; initialised to mean 0, std 1."""

    def __init__(self, control_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(control_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.proj(c).chunk(2, dim=-1)
        return mean, log_std.exp()


def _gated(x: torch.Tensor, gate: torch.Tensor, head: StyleHead, c: torch.Tensor | None) -> torch.Tensor:
    """``x + tanh(gate) * (AdaIN(x, head(c)) - x)``; the head runs in its own dtype (fp32 adapters on a bf16
    model under mixed-precision training), the result is in ``x``'s."""
    if c is None:
        return x
    mean, std = head(c.to(head.proj.weight.dtype))
    return x + torch.tanh(gate).to(x.dtype) * (adain(x, mean.to(x.dtype), std.to(x.dtype)) - x)


class AdaINNorm(nn.Module):
    """Gated AdaIN applied to a block LayerNorm's output (``beta`` or ``gamma``) via a forward hook.

    The hook leaves the UNet's module tree and ``state_dict`` untouched.
    """

    def __init__(self, channels: int, control_dim: int, state: _ControlState) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))
        self.style = StyleHead(control_dim, channels)
        self._state = [state]  # list: keep it out of the module tree
        self._handle: Any = None

    def hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            return output
        return _gated(output, self.gate, self.style, self._state[0].for_batch(output.shape[0], output))

    def attach(self, norm: nn.Module) -> None:
        self.detach()
        self._handle = norm.register_forward_hook(self.hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class CrossAttnAdaIN(nn.Module):
    """Parameters of the gated AdaIN on cross-attention Q and K (``alpha``); see :class:`AdaINCrossAttnProcessor`."""

    def __init__(self, inner_dim: int, control_dim: int, state: _ControlState) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))
        self.style_q = StyleHead(control_dim, inner_dim)
        self.style_k = StyleHead(control_dim, inner_dim)
        self._state = [state]

    def processor(self) -> AdaINCrossAttnProcessor:
        return AdaINCrossAttnProcessor(self)


class AdaINCrossAttnProcessor:
    """Cross-attention processor with gated AdaIN on Q and K (``alpha``).

    Same maths as diffusers' default processor (scaled dot-product attention,
    ``to_out``), masks supported. A plain object (not a module) so the UNet's
    ``state_dict`` does not change; the parameters live in :class:`CrossAttnAdaIN`.
    """

    def __init__(self, params: CrossAttnAdaIN) -> None:
        self.params = params

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        in_ndim = hidden_states.ndim
        if in_ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        bsz, seq, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], bsz)
            attention_mask = attention_mask.view(bsz, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        p = self.params
        c = p._state[0].for_batch(bsz, q)
        q = _gated(q, p.gate, p.style_q, c)
        k = _gated(k, p.gate, p.style_k, c)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(bsz, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(bsz, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if in_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@register_component
class AdaINAdapters(Component):
    """All adapters of one model; ``parameters()`` are the trainable ones.

    Args:
        control_dim: width ``Dc`` of the control embedding.
        block_widths: per adapted transformer block (the block's module path with ``.`` -> ``__``, in
            the model's module order), ``[channels, inner_dim]``: the width of its LayerNorms and of its
            cross-attention queries. :meth:`for_model` reads them from a model. The adapters of a block
            are ``blocks[key]`` (``attn2``, ``norm2``, ``norm3``).
    """

    #: Set only inside :meth:`control`; gradient checkpointing restores it when it recomputes a block.
    checkpoint_state_attrs = ("state.embedding",)

    @register_to_config
    def __init__(self, control_dim: int, block_widths: Mapping[str, Sequence[int]] | None = None) -> None:
        super().__init__()
        self.control_dim = int(control_dim)
        self.state = _ControlState()
        self.blocks = nn.ModuleDict()
        for key, (dim, inner) in (block_widths or {}).items():
            self.blocks[key] = nn.ModuleDict(
                {
                    "attn2": CrossAttnAdaIN(int(inner), self.control_dim, self.state),
                    "norm2": AdaINNorm(int(dim), self.control_dim, self.state),
                    "norm3": AdaINNorm(int(dim), self.control_dim, self.state),
                }
            )

    @classmethod
    def for_model(cls, model: nn.Module, control_dim: int) -> AdaINAdapters:
        """New adapters (gates at 0: the identity) for every cross-attention ``BasicTransformerBlock`` of ``model``."""
        widths = {key: [dim, inner] for key, (_block, dim, inner) in _transformer_blocks(model).items()}
        if not widths:
            raise SemsrError("no cross-attention transformer blocks found to attach AdaIN adapters to")
        return cls(control_dim=int(control_dim), block_widths=widths)

    @contextmanager
    def control(self, embedding: torch.Tensor | None) -> Iterator[None]:
        """Use ``embedding (B, Dc)`` as the control inside the block (None: adapters off)."""
        prev = self.state.embedding
        self.state.embedding = embedding
        try:
            yield
        finally:
            self.state.embedding = prev

    def gates(self) -> dict[str, torch.Tensor]:
        """``{"<block>.alpha|beta|gamma": gate}`` for inspection."""
        out = {}
        for name, mods in self.blocks.items():
            out[f"{name}.alpha"] = mods["attn2"].gate
            out[f"{name}.beta"] = mods["norm2"].gate
            out[f"{name}.gamma"] = mods["norm3"].gate
        return out


@contextmanager
def adain_control(adapters: Iterable[AdaINAdapters], embedding: torch.Tensor | None) -> Iterator[None]:
    """:meth:`AdaINAdapters.control` of several adapter sets (e.g. the UNet's and the ControlNet's) at once."""
    with ExitStack() as stack:
        for ad in adapters:
            stack.enter_context(ad.control(embedding))
        yield


def _transformer_blocks(model: nn.Module) -> dict[str, tuple[Any, int, int]]:
    """``{key: (block, channels, inner_dim)}`` of the cross-attention ``BasicTransformerBlock`` s of
    ``model`` in module order (a ``torch.compile`` d model is walked through its original module)."""
    model = getattr(model, "_orig_mod", model)
    out = {}
    for name, block in model.named_modules():
        if not isinstance(block, BasicTransformerBlock) or block.attn2 is None:
            continue
        dim = block.norm2.normalized_shape[0] if hasattr(block.norm2, "normalized_shape") else block.attn2.query_dim
        out[name.replace(".", "__")] = (block, int(dim), int(block.attn2.to_q.out_features))
    return out


def attach_adain(model: nn.Module, adapters: AdaINAdapters) -> AdaINAdapters:
    """Attach ``adapters`` to the transformer blocks of ``model`` (in place; other adapters are detached).

    The adapters must have been made for a model of this structure (:meth:`AdaINAdapters.for_model`);
    the model's ``state_dict`` is unchanged (hooks and attention processors only). Returns ``adapters``.
    """
    found = _transformer_blocks(model)
    want = {key: [int(v) for v in dims] for key, dims in (adapters.config.block_widths or {}).items()}
    have = {key: [dim, inner] for key, (_block, dim, inner) in found.items()}
    if want != have:
        missing, extra = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        raise SemsrError(
            f"the AdaIN adapters do not fit this model ({len(missing)} blocks without an adapter, "
            f"{len(extra)} adapters without a block, "
            f"{sum(want[k] != have[k] for k in set(want) & set(have))} of other widths)"
        )
    target = getattr(model, "_orig_mod", model)
    previous = getattr(target, "_semsr_adain", None)
    if previous is not None and previous is not adapters:
        detach_adain(model)
    for key, (block, _dim, _inner) in found.items():
        mods = adapters.blocks[key]
        block.attn2.set_processor(mods["attn2"].processor())
        mods["norm2"].attach(block.norm2)
        mods["norm3"].attach(block.norm3)
    object.__setattr__(target, "_semsr_adain", adapters)  # not a submodule: the model's state_dict stays unchanged
    return adapters


def detach_adain(model: nn.Module) -> None:
    """Remove the adapters attached to ``model`` (hooks and processors); the model is the base one again."""
    target = getattr(model, "_orig_mod", model)
    ad = getattr(target, "_semsr_adain", None)
    if ad is None:
        return
    for mods in ad.blocks.values():
        mods["norm2"].detach()
        mods["norm3"].detach()
    for block, _dim, _inner in _transformer_blocks(target).values():
        block.attn2.set_processor(AttnProcessor2_0())
    object.__setattr__(target, "_semsr_adain", None)
