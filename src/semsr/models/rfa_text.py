"""Text path of the RFA I2T enhancer, supervised in CLIP text space (paper section 3.3).

The seed: the token-pooled summary of the enhanced tokens conditions a light
text decoder (a causal LM) that *generates* text; the frozen CLIP text
encoder's embedding of that text is aligned by cosine similarity with the
CLIP text embedding of the image's caption (BLIP-2 prompts in the paper, the
corpus captions here). Generated text is discrete, so the loss is made
differentiable in three pieces:

1. :func:`soft_decode` — greedy decoding from the prefix with a
   straight-through estimator: at step ``t`` the next-token distribution is
   ``p_t = softmax(logits_t / tau)``; the token used is ``argmax p_t`` (so the
   forward pass *is* greedy decoding, the text :func:`~semsr.models.rfa.generate_text`
   writes at inference), while gradients flow through ``p_t``
   (``weights_t = onehot_t + p_t - stopgrad(p_t)``). The next LM input is
   ``weights_t @ E_lm``. Positions from the first end token on are not text.
2. :class:`VocabBridge` — the LM and CLIP tokenizers differ. Every LM token
   ``v`` is mapped once to the CLIP token ids of its text
   (``clip_tokenizer(lm_tokenizer.decode([v]))``; none for special tokens
   and for byte pieces of a UTF-8 character), and to the mean of those CLIP
   input embeddings (a fixed ``(V_lm, D_clip)`` matrix ``M``).
3. :meth:`CLIPTextEmbedder.embed_decoded` — the CLIP token sequence
   ``[BOS, pieces(v_1), pieces(v_2), ..., EOS]`` goes through the frozen CLIP
   text encoder; each position belonging to step ``t`` gets
   ``E_clip[piece] + s_t - stopgrad(s_t)`` with ``s_t = weights_t @ M`` as input
   embedding (forward value: exactly the CLIP embedding of the pieces;
   gradient: through the soft step). A step whose token has no text (and the
   step that emitted the end token) routes its ``s_t`` term to the position
   where its text would have gone, so "a word here would be better" still
   reaches it. The result is the pooled (end-token) embedding, projected when
   the model has a text projection.

The forward value equals CLIP-encoding the decoded string whenever the LM's
token boundaries are word boundaries (GPT-2 tokens mostly carry their leading
space); a word split over several LM tokens is encoded piece by piece
(``"ca" + "t"`` -> ``ca</w> t</w>`` instead of ``cat</w>``) — the one
approximation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import ensure_offline, load_clip_tokenizer, load_transformers_model, quiet_hf_logging


@dataclass
class SoftDecoding:
    """Output of :func:`soft_decode`.

    Attributes:
        ids: ``(B, L)`` greedy token ids (int64).
        weights: ``(B, L, V)`` straight-through token weights (forward: one-hot).
        lengths: ``(B,)`` text tokens before the first end token.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    lengths: torch.Tensor


def soft_decode(
    lm: Any, prefix: torch.Tensor, max_new_tokens: int, eos_id: int | None, tau: float = 1.0
) -> SoftDecoding:
    """Differentiable greedy decoding from prefix embeddings ``(B, P, lm_dim)`` (see module docstring)."""
    emb = lm.get_input_embeddings()
    table = emb.weight
    inputs = prefix.to(table.dtype)
    past = None
    ids, weights = [], []
    for _ in range(max_new_tokens):
        res = lm(inputs_embeds=inputs, past_key_values=past, use_cache=True)
        past = res.past_key_values
        p = torch.softmax(res.logits[:, -1].float() / tau, dim=-1)
        nxt = p.argmax(-1)
        soft = p - p.detach()  # zero forward, gradient of p
        w = F.one_hot(nxt, p.shape[-1]).to(p.dtype) + soft
        ids.append(nxt)
        weights.append(w)
        inputs = (emb(nxt) + soft.to(table.dtype) @ table).unsqueeze(1)
    id_t = torch.stack(ids, 1)
    ended = (id_t == eos_id) if eos_id is not None else torch.zeros_like(id_t, dtype=torch.bool)
    first = torch.where(ended.any(1), ended.float().argmax(1), torch.full_like(id_t[:, 0], max_new_tokens))
    return SoftDecoding(id_t, torch.stack(weights, 1), first)


class VocabBridge:
    """LM token id -> CLIP token ids of its text, and the mean-CLIP-embedding matrix (see module docstring).

    Args:
        lm_tokenizer: the text decoder's tokenizer.
        clip_tokenizer: the CLIP text encoder's tokenizer.
        lm_vocab: rows of the LM's input embedding (may exceed the tokenizer's size).
    """

    def __init__(self, lm_tokenizer: Any, clip_tokenizer: Any, lm_vocab: int) -> None:
        special = {
            i
            for i in (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id)
            if i is not None
        }
        lm_special = set(getattr(lm_tokenizer, "all_special_ids", []) or [])
        n_tok = len(lm_tokenizer)
        texts = [lm_tokenizer.decode([v]) if v < n_tok and v not in lm_special else "" for v in range(lm_vocab)]
        self.pieces: list[list[int]] = []
        for text in texts:
            # tokens that are only part of a UTF-8 character decode to U+FFFD: no text of their own
            usable = text.strip() and "\ufffd" not in text
            ids = clip_tokenizer(text, add_special_tokens=False).input_ids if usable else []
            self.pieces.append([i for i in ids if i not in special])
        self._rows = torch.tensor([v for v, ids in enumerate(self.pieces) for _ in ids], dtype=torch.long)
        self._cols = torch.tensor([i for ids in self.pieces for i in ids], dtype=torch.long)
        self._vals = torch.tensor([1.0 / len(ids) for ids in self.pieces for _ in ids], dtype=torch.float32)
        self.lm_vocab = lm_vocab
        self._mean: torch.Tensor | None = None

    def mean_embeddings(self, clip_table: torch.Tensor) -> torch.Tensor:
        """``(V_lm, D)``: per LM token, the mean CLIP input embedding ``clip_table (V_clip, D)`` of its pieces.

        Zeros for tokens without pieces. Computed once per dtype/device (the table is frozen).
        """
        m = self._mean
        if m is None or m.device != clip_table.device or m.dtype != clip_table.dtype:
            with torch.no_grad():
                table = clip_table.detach().float().cpu()
                dense = torch.zeros(self.lm_vocab, table.shape[1])
                dense.index_add_(0, self._rows, table[self._cols] * self._vals.unsqueeze(1))
            m = self._mean = dense.to(clip_table.device, clip_table.dtype)
        return m


class CLIPTextEmbedder(nn.Module):
    """Frozen CLIP text encoder -> one pooled embedding per text ``(B, D)``.

    ``D`` is the projection width for ``CLIPTextModelWithProjection`` (its
    ``text_embeds``), else the hidden width (``pooler_output``: the final-norm
    state at the end token).
    """

    def __init__(self, tokenizer: Any, model: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.requires_grad_(False).eval()
        cfg = model.config
        self.projected = hasattr(model, "text_projection")
        self.dim = int(cfg.projection_dim if self.projected else cfg.hidden_size)
        self.max_length = int(min(tokenizer.model_max_length, cfg.max_position_embeddings))
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)

    def _pooled(self, out: Any) -> torch.Tensor:
        return (out.text_embeds if self.projected else out.pooler_output).float()

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Pooled embeddings of ``prompts`` (B strings) -> ``(B, D)`` float32."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self._pooled(self.model(input_ids=ids))

    def embed_decoded(self, dec: SoftDecoding, bridge: VocabBridge) -> torch.Tensor:
        """Pooled embedding ``(B, D)`` of soft-decoded text, differentiable w.r.t. ``dec.weights``."""
        table = self.model.get_input_embeddings()
        device = table.weight.device
        n_steps = dec.ids.shape[1]
        seqs, links = [], []  # links: (position, step) pairs that route a step's gradient to a position
        for b in range(dec.ids.shape[0]):
            ids, link, waiting = [self.bos_id], [], []
            length = int(dec.lengths[b])
            for t in range(length):
                pieces = bridge.pieces[int(dec.ids[b, t])]
                if not pieces:
                    waiting.append(t)  # no text of its own: its gradient goes where its text would be
                    continue
                for j, piece in enumerate(pieces):
                    link += [(len(ids), t)] + [(len(ids), w) for w in waiting if j == 0]
                    ids.append(piece)
                waiting = []
            if length < n_steps:
                waiting.append(length)  # the end token: would a word here have been better?
            keep = self.max_length - 1
            ids = ids[:keep] + [self.eos_id]
            link = [(pos, t) for pos, t in link if pos < keep] + [(len(ids) - 1, w) for w in waiting]
            seqs.append(ids)
            links.append(link)
        width = max(len(s) for s in seqs)
        seq = torch.tensor([s + [self.eos_id] * (width - len(s)) for s in seqs], device=device)
        assign = torch.zeros(len(seqs), width, n_steps, device=device, dtype=table.weight.dtype)
        for b, link in enumerate(links):
            for pos, t in link:
                assign[b, pos, t] = 1.0
        soft = dec.weights.to(table.weight.dtype) @ bridge.mean_embeddings(table.weight)  # (B, L, D)
        routed = assign @ soft  # (B, S, D)
        delta = routed - routed.detach()  # zero forward, gradient into the soft steps

        def add_delta(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            return output + delta.to(output.dtype)

        handle = table.register_forward_hook(add_delta)
        try:
            out = self.model(input_ids=seq)
        finally:
            handle.remove()
        return self._pooled(out)


def load_clip_text(folder: str | Path) -> CLIPTextEmbedder:
    """A CLIP text encoder + tokenizer from a local folder.

    Accepts a Stable Diffusion folder (``text_encoder/`` + ``tokenizer/``, the
    CLIP text encoder SD conditions on) or a transformers folder holding a
    ``CLIPTextModel``/``CLIPTextModelWithProjection``/``CLIPModel`` and its tokenizer.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # optional heavy dependency

    ensure_offline()
    quiet_hf_logging()
    folder = Path(folder).expanduser()
    if (folder / "text_encoder").is_dir():
        model_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    else:
        model_dir = tok_dir = folder
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise UnavailableError("no CLIP text encoder here (need text_encoder/ + tokenizer/ or a CLIP folder)", folder)
    cfg = json.loads(cfg_file.read_text())
    arch = set(cfg.get("architectures") or [])
    if cfg.get("model_type") not in ("clip", "clip_text_model"):
        raise SemsrError(
            f"text encoder is {cfg.get('model_type')!r}, not CLIP (the RFA text loss needs CLIP)", model_dir
        )
    cls = CLIPTextModelWithProjection if arch & {"CLIPTextModelWithProjection", "CLIPModel"} else CLIPTextModel
    model = load_transformers_model(cls, model_dir, what="CLIP text encoder")
    return CLIPTextEmbedder(load_clip_tokenizer(tok_dir), model)
