"""Reference-Finding Aligner (RFA, seed 003 stage 1a).

The aligner maps the embedder tokens of a *low-resolution* image (32x32 in
the seed, upsampled to the embedder's input size) to the global embedding the
*high-resolution* image would have, so the reference database (built from HR
images) can be searched with an LR query.

Architecture: tokens ``(B, N, T)`` are projected to width ``W`` and given a
learned position embedding; a learnable CLS query attends to them through
``depth`` cross-attention decoder layers (``nn.TransformerDecoderLayer``,
pre-norm); a LayerNorm + linear head gives the predicted HR embedding
``(B, D)``. Trained with ``L_align = ||C_hat_LR - C_HR||_2^2`` (the seed's L2).

``residual=True`` (default) adds the raw LR embedding to the head output and
initialises the head to zero, so the untrained aligner *is* the raw LR
embedding and training learns the LR -> HR correction. With a few hundred
training pairs (our offline corpus, not the seed's 100k ImageNet images) this
keeps the aligner from being worse than no alignment; the seed maps tokens to
the CLS directly (``residual=False``).

A checkpoint is one folder: ``config.json`` + ``model.safetensors``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.errors import SemsrError, UnavailableError


@dataclass
class AlignerConfig:
    """Shape of an aligner (stored as ``config.json``)."""

    token_dim: int
    out_dim: int
    num_tokens: int
    width: int = 256
    depth: int = 2
    heads: int = 4
    residual: bool = True
    embedder: str | None = None  # embedder spec the aligner was trained for


class ReferenceFindingAligner(nn.Module):
    """LR tokens (+ learnable CLS) -> predicted HR embedding.

    ``forward(tokens (B, N, T), lr_embed (B, D) | None) -> (B, D)`` (not normalised).
    """

    def __init__(self, config: AlignerConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.proj = nn.Linear(config.token_dim, w)
        self.pos = nn.Parameter(torch.zeros(1, config.num_tokens, w))
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(w, config.heads, dim_feedforward=2 * w, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, config.out_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        if config.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, lr_embed: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[1] != self.config.num_tokens or tokens.shape[2] != self.config.token_dim:
            raise SemsrError(f"aligner expects {self.config.num_tokens} tokens of {self.config.token_dim}, "
                             f"got {tuple(tokens.shape[1:])} (is it for another embedder?)")
        mem = self.proj(tokens) + self.pos
        q = self.cls.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, mem)
        out = self.head(self.norm(q[:, 0]))
        if self.config.residual:
            if lr_embed is None:
                raise SemsrError("a residual aligner needs the raw LR embedding")
            out = out + lr_embed
        return out

    @torch.no_grad()
    def query(self, embedder: Any, lr: torch.Tensor) -> torch.Tensor:
        """Search vector for LR images ``(B, 3, h, w)`` in [0, 1]: ``(B, D)`` unit vectors."""
        vec, tok = encode(embedder, lr)
        return F.normalize(self(tok, vec), dim=-1)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save

        from semsr.eval.atomic import write_bytes, write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(folder / "model.safetensors", save({k: v.contiguous() for k, v in self.state_dict().items()}))
        write_text(folder / "config.json", json.dumps(asdict(self.config), indent=2))
        return folder


def align_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Seed's ``L_align = ||pred - target||^2`` averaged over the batch; both ``(B, D)``."""
    return (pred - target).pow(2).sum(-1).mean()


def encode(embedder: Any, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embedding (B, D), tokens (B, N, T))`` of ``img`` — one pass when the embedder supports it."""
    if hasattr(embedder, "encode"):
        return embedder.encode(img)
    return embedder.embed(img), embedder.tokens(img)


def default_aligner_dir(embedder_spec: str) -> Path:
    """The shipped aligner for an embedder (``assets/weights/rfa/aligner-<embedder>``)."""
    from semsr.paths import assets_dir

    safe = embedder_spec.replace(":", "-").replace("/", "_")
    return assets_dir() / "weights" / "rfa" / f"aligner-{safe}"


def load_aligner(folder: str | Path, embedder_spec: str | None = None) -> ReferenceFindingAligner:
    """Load an aligner folder (``'default'``: the shipped one for ``embedder_spec``)."""
    from safetensors.torch import load_file

    if str(folder) == "default":
        if embedder_spec is None:
            raise SemsrError("the default aligner needs the embedder spec")
        folder = default_aligner_dir(embedder_spec)
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UnavailableError("no aligner checkpoint (config.json + model.safetensors) here; "
                               "train one with `semsr bench-retrieval --save-aligner DIR`", folder)
    config = AlignerConfig(**json.loads((folder / "config.json").read_text()))
    if embedder_spec is not None and config.embedder not in (None, embedder_spec):
        raise SemsrError(f"aligner was trained for embedder {config.embedder!r}, database uses {embedder_spec!r}",
                         folder)
    model = ReferenceFindingAligner(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
