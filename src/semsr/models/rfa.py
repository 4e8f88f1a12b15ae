"""Stage-1 models of the RFA recipe: Reference-Finding Aligner and I2T Embedding Enhancer.

The aligner maps the embedder tokens of a *low-resolution* image (32x32 in
the paper, upsampled to the embedder's input size) to the global embedding the
*high-resolution* image would have, so the reference database (built from HR
images) can be searched with an LR query.

Architecture: tokens ``(B, N, T)`` are projected to width ``W`` and given a
learned position embedding; a learnable CLS query attends to them through
``depth`` cross-attention decoder layers (``nn.TransformerDecoderLayer``,
pre-norm); a LayerNorm + linear head gives the predicted HR embedding
``(B, D)``. Trained with ``L_align = ||C_hat_LR - C_HR||_2^2`` (the paper's L2).

``residual=True`` (default) adds the raw LR embedding to the head output and
initialises the head to zero, so the untrained aligner *is* the raw LR
embedding and training learns the LR -> HR correction. With a few hundred
training pairs (our offline corpus, not the paper's 100k ImageNet images) this
keeps the aligner from being worse than no alignment; the paper maps tokens to
the CLS directly (``residual=False``).

Both models are :class:`~semsr.core.components.Component` s: a folder with
``config.json`` + ``diffusion_pytorch_model.safetensors`` (``save_pretrained``,
:func:`~semsr.core.components.load_component`). The RFA checkpoint is one
:func:`~semsr.core.components.save_checkpoint` folder of recipe ``rfa`` with the
components ``aligner``, ``enhancer``, ``adain`` and ``controlnet_adain``
(:class:`~semsr.fusion.adain.AdaINAdapters` of the UNet and of the ControlNet),
plus a transformers causal LM folder (the text decoder) named in the index meta
(:func:`save_rfa_checkpoint`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import Component, register_component, register_to_config, save_checkpoint
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import ensure_offline, load_transformers_model, quiet_hf_logging, require
from semsr.core.paths import assets_dir

#: Recipe name of RFA checkpoints (``model_index.json``'s ``_class_name``).
RFA_RECIPE = "rfa"
#: Index meta key naming the text decoder folder inside an RFA checkpoint.
TEXT_DECODER_KEY = "text_decoder"
#: Folder name of the text decoder inside an RFA checkpoint.
TEXT_DECODER_DIR = "text-decoder"


def check_embedder(model: Component, embedder: Any, where: str | Path | None = None) -> None:
    """Raise :class:`SemsrError` unless the stage-1 ``model`` (aligner or enhancer) fits ``embedder``.

    The model must take the embedder's ``num_tokens`` tokens of ``token_dim`` and give embeddings of its
    ``dim`` (an aligner or enhancer made for CLIP's 768-d projection does not fit the 1024-d CLS), and, when
    it records the embedder it was trained for (``config.embedder``), that must be ``embedder.spec``.
    """
    c = model.config
    name = type(model).__name__
    if c.embedder not in (None, embedder.spec):
        raise SemsrError(
            f"the {name} was trained for embedder {c.embedder!r}, the database uses {embedder.spec!r}", where
        )
    if (c.token_dim, c.num_tokens) != (embedder.token_dim, embedder.num_tokens):
        raise SemsrError(
            f"the {name} takes {c.num_tokens} tokens of {c.token_dim}, the embedder {embedder.spec} "
            f"gives {embedder.num_tokens} of {embedder.token_dim} (build the database with the "
            "embedder the checkpoint was trained for)",
            where,
        )
    dim = getattr(embedder, "dim", None)
    if dim is not None and int(c.out_dim) != int(dim):
        raise SemsrError(
            f"the {name} gives {c.out_dim}-d embeddings, the embedder {embedder.spec} {int(dim)}-d ones "
            "(made for another embedding, e.g. CLIP's projection instead of its CLS token? retrain it)",
            where,
        )


@register_component
class ReferenceFindingAligner(Component):
    """LR tokens (+ learnable CLS) -> predicted HR embedding.

    ``forward(tokens (B, N, T), lr_embed (B, D) | None) -> (B, D)`` (not normalised).

    Args:
        token_dim, num_tokens: the embedder's tokens ``T`` and ``N``.
        out_dim: the embedding size ``D``.
        width, depth, heads: decoder width, layers and attention heads.
        residual: predict a correction of the raw LR embedding (head initialised to zero).
        embedder: spec of the embedder the aligner is trained for (checked on loading).
    """

    @register_to_config
    def __init__(
        self,
        token_dim: int,
        out_dim: int,
        num_tokens: int,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        residual: bool = True,
        embedder: str | None = None,
    ) -> None:
        super().__init__()
        w = width
        self.proj = nn.Linear(token_dim, w)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, w))
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(w, heads, dim_feedforward=2 * w, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, out_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        if residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, lr_embed: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if tokens.shape[1] != c.num_tokens or tokens.shape[2] != c.token_dim:
            raise SemsrError(
                f"aligner expects {c.num_tokens} tokens of {c.token_dim}, "
                f"got {tuple(tokens.shape[1:])} (is it for another embedder?)"
            )
        mem = self.proj(tokens) + self.pos
        q = self.cls.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, mem)
        out = self.head(self.norm(q[:, 0]))
        if c.residual:
            if lr_embed is None:
                raise SemsrError("a residual aligner needs the raw LR embedding")
            out = out + lr_embed
        return out

    @torch.no_grad()
    def query(self, embedder: Any, lr: torch.Tensor) -> torch.Tensor:
        """Search vector for LR images ``(B, 3, h, w)`` in [0, 1]: ``(B, D)`` unit vectors."""
        vec, tok = encode(embedder, lr)
        return F.normalize(self(tok, vec), dim=-1)


def align_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's ``L_align = ||pred - target||^2`` averaged over the batch; both ``(B, D)``."""
    return (pred - target).pow(2).sum(-1).mean()


def encode(embedder: Any, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embedding (B, D), tokens (B, N, T))`` of ``img`` — one pass when the embedder supports it."""
    if hasattr(embedder, "encode"):
        return embedder.encode(img)
    return embedder.embed(img), embedder.tokens(img)


def default_aligner_dir(embedder_spec: str) -> Path:
    """The shipped aligner for an embedder (``assets/weights/rfa/aligner-<embedder>``)."""
    safe = embedder_spec.replace(":", "-").replace("/", "_")
    return assets_dir() / "weights" / "rfa" / f"aligner-{safe}"


def aligner_dir(folder: str | Path, embedder_spec: str) -> Path:
    """An aligner folder as given, or ``'default'``: the shipped one for ``embedder_spec``."""
    return default_aligner_dir(embedder_spec) if str(folder) == "default" else Path(folder).expanduser()


# ============================================================================ I2T embedding enhancer


@register_component
class EmbeddingEnhancer(Component):
    """I2T Embedding Enhancer (stage 1b).

    LR tokens are the queries; keys/values are the LR tokens plus the tokens of
    the K retrieved references (each slot with a learned type embedding), in
    ``depth`` pre-norm decoder layers (self-attention over LR tokens +
    cross-attention over LR+references + FFN).

    ``forward(lr_tokens (B, N, T), ref_tokens (B, K, N, T))`` returns
    ``(image_embed (B, D), prefix (B, P, lm_dim))``: the enhanced image
    embedding (trained by cosine alignment to the GT HR embedding, see
    :func:`enhancer_loss`) and the token-pooled summary projected to ``P``
    prefix embeddings that condition the text decoder.

    Args:
        token_dim, num_tokens, out_dim: the embedder's token width ``T``, tokens ``N`` and embedding ``D``.
        lm_dim: input embedding width of the text decoder.
        num_refs: most references ``K`` taken.
        width, depth, heads: decoder width, layers and attention heads.
        prefix_len: prefix embeddings ``P`` given to the text decoder.
        embedder: spec of the embedder the enhancer is trained for.
    """

    @register_to_config
    def __init__(
        self,
        token_dim: int,
        out_dim: int,
        num_tokens: int,
        lm_dim: int,
        num_refs: int = 4,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        prefix_len: int = 4,
        embedder: str | None = None,
    ) -> None:
        super().__init__()
        w = width
        self.proj = nn.Linear(token_dim, w)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, w))
        self.slot = nn.Parameter(torch.zeros(1 + num_refs, 1, w))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(w, heads, dim_feedforward=2 * w, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(w)
        self.image_head = nn.Linear(w, out_dim)
        self.prefix_head = nn.Linear(w, prefix_len * lm_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.slot, std=0.02)

    def forward(self, lr_tokens: torch.Tensor, ref_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        b, n, _ = lr_tokens.shape
        k = ref_tokens.shape[1]
        if n != c.num_tokens or k > c.num_refs:
            raise SemsrError(f"enhancer expects {c.num_tokens} tokens and <= {c.num_refs} references, got {n} and {k}")
        q = self.proj(lr_tokens) + self.pos + self.slot[0]
        refs = self.proj(ref_tokens) + self.pos.unsqueeze(1) + self.slot[1 : 1 + k].unsqueeze(0)
        mem = torch.cat([q, refs.reshape(b, k * n, refs.shape[-1])], dim=1)
        for layer in self.layers:
            q = layer(q, mem)
        pooled = self.norm(q).mean(dim=1)
        prefix = self.prefix_head(pooled).view(b, c.prefix_len, c.lm_dim)
        return self.image_head(pooled), prefix


def enhancer_loss(image_embed: torch.Tensor, hr_embed: torch.Tensor) -> torch.Tensor:
    """Cosine alignment ``1 - cos(enhanced, GT HR embedding)`` averaged; both ``(B, D)``."""
    return (1 - F.cosine_similarity(image_embed, hr_embed, dim=-1)).mean()


def caption_loss(
    lm: Any, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher-forced LM loss of caption tokens ``(B, L)`` after the prefix ``(B, P, lm_dim)``.

    An auxiliary term (``rfa_caption_nll``); the paper's supervision — the CLIP
    text embedding of the generated text aligned to the caption's — is
    :mod:`semsr.models.rfa_text` (loss ``rfa_text_clip``).
    """
    emb = lm.get_input_embeddings()(input_ids)
    inputs = torch.cat([prefix.to(emb.dtype), emb], dim=1)
    labels = torch.cat([input_ids.new_full(prefix.shape[:2], -100), input_ids], dim=1)
    if attention_mask is not None:
        labels[:, prefix.shape[1] :][attention_mask == 0] = -100
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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional heavy dependency

    ensure_offline()
    quiet_hf_logging()
    folder = require(Path(folder).expanduser(), "text decoder folder")
    lm = load_transformers_model(AutoModelForCausalLM, folder, what="text decoder").eval()
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UnavailableError(f"cannot load the text decoder's tokenizer: {err}", folder) from err
    return lm, tok


# ============================================================================ the RFA checkpoint


def save_rfa_checkpoint(
    folder: str | Path, components: Mapping[str, Component | None], text_decoder: str | Path | None = None
) -> Path:
    """Write an RFA checkpoint: ``components`` (``aligner``, ``enhancer``, ``adain``, ``controlnet_adain``) with
    :func:`~semsr.core.components.save_checkpoint`, plus a copy of the ``text_decoder`` folder (a
    transformers causal LM + tokenizer) as ``text-decoder/``, named in the index meta."""
    meta = {TEXT_DECODER_KEY: TEXT_DECODER_DIR} if text_decoder is not None else {}
    folder = save_checkpoint(folder, RFA_RECIPE, components, meta=meta)
    if text_decoder is not None:
        shutil.copytree(require(Path(text_decoder).expanduser(), "text decoder folder"), folder / TEXT_DECODER_DIR)
    return folder


def text_decoder_dir(folder: str | Path, meta: Mapping[str, Any]) -> Path | None:
    """The text decoder folder an RFA checkpoint's index ``meta`` names (None: it has none)."""
    name = meta.get(TEXT_DECODER_KEY)
    return Path(folder).expanduser() / str(name) if name else None
