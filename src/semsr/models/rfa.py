"""Stage-1 models of the RFA recipe (seed 003): Reference-Finding Aligner and I2T Embedding Enhancer.

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

from semsr.core.errors import SemsrError, UnavailableError


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
        return _save_module(self, folder)


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
    from semsr.core.paths import assets_dir

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
                               "train one with `semsr train --config configs/rfa-aligner.yaml` (-> RUN/final/aligner) "
                               "or `semsr bench-retrieval --save-aligner DIR`", folder)
    config = AlignerConfig(**json.loads((folder / "config.json").read_text()))
    if embedder_spec is not None and config.embedder not in (None, embedder_spec):
        raise SemsrError(f"aligner was trained for embedder {config.embedder!r}, database uses {embedder_spec!r}",
                         folder)
    model = ReferenceFindingAligner(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


# ============================================================================ I2T embedding enhancer


@dataclass
class EnhancerConfig:
    """Shape of the I2T Embedding Enhancer (stored as ``config.json``)."""

    token_dim: int
    out_dim: int
    num_tokens: int
    lm_dim: int
    num_refs: int = 4
    width: int = 256
    depth: int = 2
    heads: int = 4
    prefix_len: int = 4
    embedder: str | None = None


class EmbeddingEnhancer(nn.Module):
    """I2T Embedding Enhancer (seed 003 stage 1b).

    LR tokens are the queries; keys/values are the LR tokens plus the tokens of
    the K retrieved references (each slot with a learned type embedding), in
    ``depth`` pre-norm decoder layers (self-attention over LR tokens +
    cross-attention over LR+references + FFN).

    ``forward(lr_tokens (B, N, T), ref_tokens (B, K, N, T))`` returns
    ``(image_embed (B, D), prefix (B, P, lm_dim))``: the enhanced image
    embedding (trained by cosine alignment to the GT HR embedding, see
    :func:`enhancer_loss`) and the token-pooled summary projected to ``P``
    prefix embeddings that condition the text decoder.
    """

    def __init__(self, config: EnhancerConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.proj = nn.Linear(config.token_dim, w)
        self.pos = nn.Parameter(torch.zeros(1, config.num_tokens, w))
        self.slot = nn.Parameter(torch.zeros(1 + config.num_refs, 1, w))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(w, config.heads, dim_feedforward=2 * w, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w)
        self.image_head = nn.Linear(w, config.out_dim)
        self.prefix_head = nn.Linear(w, config.prefix_len * config.lm_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.slot, std=0.02)

    def forward(self, lr_tokens: torch.Tensor, ref_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = lr_tokens.shape
        k = ref_tokens.shape[1]
        if n != self.config.num_tokens or k > self.config.num_refs:
            raise SemsrError(f"enhancer expects {self.config.num_tokens} tokens and <= {self.config.num_refs} "
                             f"references, got {n} and {k}")
        q = self.proj(lr_tokens) + self.pos + self.slot[0]
        refs = self.proj(ref_tokens) + self.pos.unsqueeze(1) + self.slot[1:1 + k].unsqueeze(0)
        mem = torch.cat([q, refs.reshape(b, k * n, -1)], dim=1)
        for layer in self.layers:
            q = layer(q, mem)
        pooled = self.norm(q).mean(dim=1)
        prefix = self.prefix_head(pooled).view(b, self.config.prefix_len, self.config.lm_dim)
        return self.image_head(pooled), prefix

    def save(self, folder: str | Path) -> Path:
        return _save_module(self, folder)


def enhancer_loss(image_embed: torch.Tensor, hr_embed: torch.Tensor) -> torch.Tensor:
    """Cosine alignment ``1 - cos(enhanced, GT HR embedding)`` averaged; both ``(B, D)``."""
    return (1 - F.cosine_similarity(image_embed, hr_embed, dim=-1)).mean()


def caption_loss(lm: Any, prefix: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced LM loss of caption tokens ``(B, L)`` after the prefix ``(B, P, lm_dim)``.

    An auxiliary term (``rfa_caption_nll``); the seed's supervision — the CLIP
    text embedding of the generated text aligned to the caption's — is
    :mod:`semsr.models.rfa_text` (loss ``rfa_text_clip``).
    """
    emb = lm.get_input_embeddings()(input_ids)
    inputs = torch.cat([prefix.to(emb.dtype), emb], dim=1)
    labels = torch.cat([input_ids.new_full(prefix.shape[:2], -100), input_ids], dim=1)
    if attention_mask is not None:
        labels[:, prefix.shape[1]:][attention_mask == 0] = -100
        attention_mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], 1)
    return lm(inputs_embeds=inputs, attention_mask=attention_mask, labels=labels).loss


@torch.no_grad()
def generate_text(lm: Any, tokenizer: Any, prefix: torch.Tensor, max_new_tokens: int = 24) -> list[str]:
    """Greedy decoding from prefix embeddings ``(B, P, lm_dim)``; one string per image."""
    emb_layer = lm.get_input_embeddings()
    eos = tokenizer.eos_token_id
    inputs = prefix.to(emb_layer.weight.dtype)
    out: list[list[int]] = [[] for _ in range(prefix.shape[0])]
    done = torch.zeros(prefix.shape[0], dtype=torch.bool)
    past = None
    for _ in range(max_new_tokens):
        res = lm(inputs_embeds=inputs, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                if tok == eos:
                    done[i] = True
                else:
                    out[i].append(tok)
        if bool(done.all()):
            break
        inputs = emb_layer(nxt).unsqueeze(1)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]


def load_text_decoder(folder: str | Path) -> tuple[Any, Any]:
    """A causal LM + tokenizer from a local folder (``local_files_only``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semsr.core.loading import ensure_offline, load_transformers_model, quiet_hf_logging, require

    ensure_offline()
    quiet_hf_logging()
    folder = require(Path(folder).expanduser(), "text decoder folder")
    lm = load_transformers_model(AutoModelForCausalLM, folder, what="text decoder").eval()
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UnavailableError(f"cannot load the text decoder's tokenizer: {err}", folder) from err
    return lm, tok


def _save_module(module: nn.Module, folder: str | Path) -> Path:
    from safetensors.torch import save

    from semsr.eval.atomic import write_bytes, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes(folder / "model.safetensors", save({k: v.contiguous() for k, v in module.state_dict().items()}))
    write_text(folder / "config.json", json.dumps(asdict(module.config), indent=2))  # type: ignore[arg-type]
    return folder


def load_enhancer(folder: str | Path) -> EmbeddingEnhancer:
    """Load an enhancer folder (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UnavailableError("no enhancer checkpoint (config.json + model.safetensors)", folder)
    model = EmbeddingEnhancer(EnhancerConfig(**json.loads((folder / "config.json").read_text())))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
