"""MMSR's Multimodal Latent Connector: many modality tokens -> 128 latent tokens.

Input sequence (``M = 77 + 256 * k`` tokens for ``k`` spatial modalities; 845 for 3)::

    caption : text-encoder tokens (B, 77, D_text)  --Linear-->            (B, 77, D)
    edge    : VQ codebook vectors (B, 256, 256)    --Linear + pos + type--> (B, 256, D)
    depth   : ...                                                         (B, 256, D)
    seg     : ...                                                         (B, 256, D)

A missing modality (or one dropped in training) is replaced by its learnable
*null token* ``m_null`` repeated over the modality's token slots, so ``M``
never changes. ``N = 128`` learnable latent tokens read the sequence with
cross-attention (``O(M N)``), then mix with self-attention (``O(N^2)``); the
``(B, N, D)`` output, ``D`` = the UNet's ``cross_attention_dim``, replaces the
text context of the UNet's cross-attention.

**Per-modality temperature** ``delta_m`` in ``[0.4, 10]`` (default 1 = the
trained model), as the paper defines it: in every cross-attention of the
connector the attention *logits* of modality ``m``'s tokens are divided by
``delta_m`` (``TEMPERATURE_MODES[0]``, ``"divide"``, the default)::

    a_ij = softmax_j( s_ij / delta_m(j) )

implemented by scaling the keys of the modality's slots by ``1 / delta``. A
smaller ``delta`` sharpens the attention over that modality's tokens (its
largest logits dominate); a larger one flattens it towards uniform.

``"bias"`` (an option, off by default) is semsr's earlier form: the
unnormalised attention weights of modality ``m`` are divided by ``delta_m``,
i.e. the logits get the bias ``-ln delta_m``, so the modality's share of
every query's attention, ``A / delta / (A / delta + B)``, is strictly
decreasing in ``delta`` whatever the logits are (dividing the logits moves
mass in a direction that depends on their signs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import Component, register_component, register_to_config
from semsr.core.errors import SemsrError

#: Modality names in their fixed sequence order (caption first, then the spatial ones).
CAPTION = "caption"
SPATIAL_MODALITIES: tuple[str, ...] = ("edge", "depth", "seg")
ALL_MODALITIES: tuple[str, ...] = (CAPTION, *SPATIAL_MODALITIES)
#: Allowed range of a modality temperature (paper: delta in [0.4, 10]).
TEMPERATURE_RANGE = (0.4, 10.0)
#: How a temperature acts: ``divide`` the modality's logits (the paper, default) or ``bias`` them by ``-ln delta``.
TEMPERATURE_MODES: tuple[str, ...] = ("divide", "bias")


def parse_temperatures(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"depth=0.5,edge=2"`` (or a dict) -> ``{"depth": 0.5, "edge": 2.0}``, checked against the range."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise SemsrError(f"modality temperature {part.strip()!r} is not NAME=VALUE (e.g. depth=0.5,edge=2)")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out: dict[str, float] = {}
    lo, hi = TEMPERATURE_RANGE
    for k, v in items:
        if k not in ALL_MODALITIES:
            raise SemsrError(f"unknown modality {k!r} in the modality temperature; known: {', '.join(ALL_MODALITIES)}")
        try:
            val = float(v)
        except (TypeError, ValueError):
            raise SemsrError(f"modality temperature {k}={v!r} is not a number") from None
        if not lo <= val <= hi:
            raise SemsrError(f"modality temperature {k}={val:g} is outside [{lo:g}, {hi:g}]")
        out[k] = val
    return out


class CrossAttention(nn.Module):
    """Multi-head attention ``(B, N, D)`` queries over ``(B, M, D)`` keys/values with an optional
    per-key logit scale ``(B or 1, M)`` (``1 / delta``: the logits are divided by the temperature)
    and per-key logit bias ``(B or 1, M)`` (``-ln delta``, the ``bias`` temperature mode)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(width, width, bias=False)
        self.to_v = nn.Linear(width, width, bias=False)
        self.to_out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        return_weights: bool = False,
        key_scale: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(B, N, D)`` (and the attention weights ``(B, heads, N, M)`` when asked).

        ``key_scale`` multiplies the logits of each key (applied to the keys, ``q . (k * s)``).
        """
        qh, kh, vh = self._split(self.to_q(q)), self._split(self.to_k(kv)), self._split(self.to_v(kv))
        if key_scale is not None:
            kh = kh * key_scale[:, None, :, None].to(kh.dtype)
        mask = None if key_bias is None else key_bias[:, None, None, :].to(qh.dtype)
        if return_weights:
            logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
            if mask is not None:
                logits = logits + mask
            weights = logits.softmax(-1)
            out = weights @ vh
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        b, h, n, dh = out.shape
        out = self.to_out(out.transpose(1, 2).reshape(b, n, h * dh))
        return (out, weights) if return_weights else out


class _Block(nn.Module):
    """Pre-norm attention + feed-forward block (cross-attention when ``kv`` is given, else self-attention)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width) if cross else None
        self.attn = CrossAttention(width, heads)
        self.norm_ff = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.ff = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
        weights_out: list[torch.Tensor] | None = None,
        key_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.norm_q(x)
        src = self.norm_kv(kv) if self.cross else q
        res = self.attn(
            q,
            src,
            key_bias if self.cross else None,
            return_weights=weights_out is not None,
            key_scale=key_scale if self.cross else None,
        )
        if weights_out is not None:
            res, w = res
            weights_out.append(w)
        x = x + res
        return x + self.ff(self.norm_ff(x))


@register_component
class MultimodalLatentConnector(Component):
    """Compress caption + spatial-modality tokens into ``N`` latent tokens (see the module docstring).

    Args:
        width: token width ``D`` (= the UNet's ``cross_attention_dim``).
        text_width: width of the text-encoder tokens (``D_text``).
        text_tokens: number of text tokens (77).
        spatial: spatial modalities, in sequence order (subset of ``edge``, ``depth``, ``seg``).
        grid_tokens: tokens per spatial modality (16 x 16 = 256).
        vq_dim: VQ codebook vector size (256).
        num_latents: learnable latent tokens ``N`` (128).
        heads: attention heads.
        cross_layers / self_layers: number of cross- then self-attention blocks.
        mlp_ratio: feed-forward expansion.
    """

    @register_to_config
    def __init__(
        self,
        width: int = 768,
        text_width: int = 768,
        text_tokens: int = 77,
        spatial: Sequence[str] = SPATIAL_MODALITIES,
        grid_tokens: int = 256,
        vq_dim: int = 256,
        num_latents: int = 128,
        heads: int = 8,
        cross_layers: int = 1,
        self_layers: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        unknown = [m for m in spatial if m not in SPATIAL_MODALITIES]
        if unknown:
            raise SemsrError(f"unknown spatial modalities {unknown}; known: {', '.join(SPATIAL_MODALITIES)}")
        if width % heads:
            raise SemsrError(f"connector width {width} is not divisible by {heads} heads")
        self.spatial: list[str] = list(spatial)
        d = int(width)
        self.text_proj = nn.Linear(text_width, d)
        self.spatial_proj = nn.ModuleDict({m: nn.Linear(vq_dim, d) for m in self.spatial})
        self.spatial_pos = nn.Parameter(torch.randn(grid_tokens, d) * 0.02)
        self.type_embed = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in self.modalities})
        self.null_tokens = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in self.modalities})
        self.latents = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.cross_blocks = nn.ModuleList(_Block(d, heads, mlp_ratio, True) for _ in range(cross_layers))
        self.self_blocks = nn.ModuleList(_Block(d, heads, mlp_ratio, False) for _ in range(self_layers))
        self.norm_out = nn.LayerNorm(d)

    @property
    def modalities(self) -> list[str]:
        """All modality slots in sequence order (caption first)."""
        return [CAPTION, *self.spatial]

    @property
    def sequence_length(self) -> int:
        """``M = text_tokens + grid_tokens * len(spatial)``."""
        return int(self.config.text_tokens) + int(self.config.grid_tokens) * len(self.spatial)

    # ------------------------------------------------------------------ sequence

    def slots(self) -> dict[str, slice]:
        """Token range of each modality inside the ``M``-token sequence."""
        text_tokens, grid_tokens = int(self.config.text_tokens), int(self.config.grid_tokens)
        out = {CAPTION: slice(0, text_tokens)}
        start = text_tokens
        for m in self.spatial:
            out[m] = slice(start, start + grid_tokens)
            start += grid_tokens
        return out

    def sequence(
        self,
        text: torch.Tensor | None,
        spatial: Mapping[str, torch.Tensor | None],
        drop: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The ``(B, M, D)`` token sequence.

        Args:
            text: ``(B, 77, D_text)`` text-encoder tokens, or None (caption missing: null tokens).
            spatial: per spatial modality, VQ codebook vectors ``(B, 256, vq_dim)`` or None (missing).
            drop: optional per modality ``(B,)`` bool; True replaces that sample's modality by its null token.
        """
        known = set(self.spatial)
        extra = [m for m, v in spatial.items() if v is not None and m not in known]
        if extra:
            raise SemsrError(f"this connector was built for modalities {self.modalities}; got also {extra}")
        ref = text if text is not None else next((v for v in spatial.values() if v is not None), None)
        batch = 1 if ref is None else ref.shape[0]
        dtype = self.latents.dtype
        device = self.latents.device
        parts: list[torch.Tensor] = []
        for m in self.modalities:
            n = int(self.config.text_tokens) if m == CAPTION else int(self.config.grid_tokens)
            value = text if m == CAPTION else spatial.get(m)
            null = self.null_tokens[m].view(1, 1, -1).expand(batch, n, -1)
            if value is None:
                parts.append(null)
                continue
            value = value.to(device, dtype)
            if value.shape[1] != n:
                raise SemsrError(f"modality {m!r} has {value.shape[1]} tokens, expected {n}")
            tokens = self.text_proj(value) if m == CAPTION else self.spatial_proj[m](value) + self.spatial_pos
            tokens = tokens + self.type_embed[m]
            if drop is not None and m in drop:
                tokens = torch.where(drop[m].to(device).view(-1, 1, 1), null, tokens)
            parts.append(tokens)
        return torch.cat(parts, dim=1)

    def _per_key(
        self,
        temperatures: Mapping[str, float] | None,
        fill: float,
        value: Callable[[float], float],
        device: torch.device | None,
        dtype: torch.dtype | None,
    ) -> torch.Tensor | None:
        """``(1, M)`` tensor: ``fill``, and ``value(delta_m)`` on modality ``m``'s slots (None when every delta is 1)."""
        temps = parse_temperatures(temperatures or {})
        if all(v == 1.0 for v in temps.values()):
            return None
        out = torch.full(
            (1, self.sequence_length), fill, device=device or self.latents.device, dtype=dtype or self.latents.dtype
        )
        slots = self.slots()
        for m, delta in temps.items():
            if m in slots:
                out[:, slots[m]] = value(delta)
        return out

    def key_bias(
        self,
        temperatures: Mapping[str, float] | None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """``(1, M)`` logit bias ``-ln delta_m`` over the sequence (``bias`` mode), or None when every delta is 1."""
        return self._per_key(temperatures, 0.0, lambda d: -math.log(d), device, dtype)

    def key_scale(
        self,
        temperatures: Mapping[str, float] | None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """``(1, M)`` logit factor ``1 / delta_m`` over the sequence (``divide`` mode), or None when every delta is 1."""
        return self._per_key(temperatures, 1.0, lambda d: 1.0 / d, device, dtype)

    def forward(
        self,
        text: torch.Tensor | None,
        spatial: Mapping[str, torch.Tensor | None],
        temperatures: Mapping[str, float] | None = None,
        drop: Mapping[str, torch.Tensor] | None = None,
        attention_out: list[torch.Tensor] | None = None,
        temperature_mode: str = "divide",
    ) -> torch.Tensor:
        """Latent tokens ``(B, N, D)`` (see :meth:`sequence` for the inputs).

        Args:
            temperatures: per-modality delta (default 1 each).
            attention_out: if a list, the cross-attention weights ``(B, heads, N, M)``
                of each cross block are appended (for inspection and tests).
            temperature_mode: ``divide`` (the paper: logits / delta) or ``bias`` (logits - ln delta).
        """
        if temperature_mode not in TEMPERATURE_MODES:
            raise SemsrError(
                f"unknown temperature mode {temperature_mode!r}; use one of {', '.join(TEMPERATURE_MODES)}"
            )
        seq = self.sequence(text, spatial, drop)
        bias = scale = None
        if temperature_mode == "bias":
            bias = self.key_bias(temperatures, seq.device, seq.dtype)
        else:
            scale = self.key_scale(temperatures, seq.device, seq.dtype)
        x = self.latents.unsqueeze(0).expand(seq.shape[0], -1, -1)
        for blk in self.cross_blocks:
            x = blk(x, seq, bias, attention_out, scale)
        for blk in self.self_blocks:
            x = blk(x)
        return self.norm_out(x)

    def modality_mass(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Share of attention each modality receives, averaged over batch, heads and latents.

        ``weights``: ``(B, heads, N, M)`` from ``attention_out``; returns ``{modality: scalar}``.
        """
        return {m: weights[..., s].sum(-1).mean() for m, s in self.slots().items()}
