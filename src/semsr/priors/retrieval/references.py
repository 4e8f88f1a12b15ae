"""Reference retrieval of the RFA recipe (stage 1a), shared by inference and training.

LR embedder outputs ``(vec (B, D), tokens (B, N, T))`` -> query (the
Reference-Finding Aligner's prediction, normalised, or the raw LR embedding
under the explicit ``no_aligner`` opt-out) -> cosine top-K database hits
(hits whose content hash is excluded, i.e. the training image itself, are
skipped) -> the hits' embedder tokens ``(B, K', N, T)``, the input of the I2T
Embedding Enhancer. ``--method rfa`` (:class:`semsr.methods.rfa.ReferenceRetriever`)
and the ``rfa-enhancer`` / ``rfa-sr`` training tasks use this one class, so
training sees the references inference sees.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semsr.models.rfa import encode
from semsr.priors.retrieval.embedders import Embedder
from semsr.priors.retrieval.index import Entry, Hit, ReferenceDB, load_rgb


class ReferenceTokens:
    """Top-K references and their tokens for LR queries.

    Args:
        db: the reference database (None: no references, the ``no_database`` opt-out).
        embedder: the database's embedder (it also embeds the references).
        aligner: the Reference-Finding Aligner (None: the raw LR embedding is the query).
        k: references per query (a call may ask for another number).
        cache_size: reference token sets kept in memory (most recently used database rows).
    """

    def __init__(
        self,
        db: ReferenceDB | None,
        embedder: Embedder,
        aligner: nn.Module | None,
        k: int,
        cache_size: int = 1024,
    ) -> None:
        self.db, self.embedder, self.aligner, self.k = db, embedder, aligner, int(k)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def query(self, lr_tok: torch.Tensor, lr_vec: torch.Tensor) -> torch.Tensor:
        """Search vectors ``(B, D)`` for LR tokens ``(B, N, T)`` and raw LR embeddings ``(B, D)`` (CPU, fp32)."""
        tok, vec = lr_tok.float().cpu(), lr_vec.float().cpu()
        return F.normalize(self.aligner(tok, vec), dim=-1) if self.aligner is not None else vec

    def search(
        self,
        lr_tok: torch.Tensor,
        lr_vec: torch.Tensor,
        exclude: Sequence[str | None] | None = None,
        k: int | None = None,
    ) -> list[list[Hit]]:
        """The top ``k' <= k`` hits per query, best first (``k'``: the fewest usable hits of the batch, so every
        row has the same length); hits with a content hash in ``exclude`` (one per query) are skipped."""
        k = self.k if k is None else int(k)
        exclude = list(exclude) if exclude is not None else [None] * len(lr_vec)
        if self.db is None or k <= 0:
            return [[] for _ in exclude]
        extra = 1 if any(e is not None for e in exclude) else 0
        hits = self.db.search(self.query(lr_tok, lr_vec).numpy(), k + extra)
        rows = [[h for h in row if h.entry.sha256 != sha][:k] for row, sha in zip(hits, exclude, strict=True)]
        n = min(len(r) for r in rows)
        return [row[:n] for row in rows]

    def entry_tokens(self, entry: Entry) -> torch.Tensor:
        """Embedder tokens ``(N, T)`` (CPU, fp32) of one database image, cached."""
        tok = self._cache.get(entry.vid)
        if tok is None:
            tok = encode(self.embedder, load_rgb(Path(entry.path)))[1][0].float()
            self._cache[entry.vid] = tok
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(entry.vid)
        return tok

    def tokens(self, rows: Sequence[Sequence[Hit]], like: torch.Tensor) -> torch.Tensor:
        """``(B, K', N, T)`` tokens of :meth:`search`'s rows; ``like`` (the LR tokens ``(B, N, T)``) gives the
        shape when there are no references."""
        if not rows or not rows[0]:
            return like.float().cpu().new_zeros(len(like), 0, *like.shape[1:])
        return torch.stack([torch.stack([self.entry_tokens(h.entry) for h in row]) for row in rows])

    @torch.no_grad()
    def __call__(
        self, lr_tok: torch.Tensor, lr_vec: torch.Tensor, exclude: Sequence[str | None] | None = None
    ) -> torch.Tensor:
        """``(B, K', N, T)`` tokens (CPU, fp32) of the top ``K' <= k`` references of each LR query."""
        return self.tokens(self.search(lr_tok, lr_vec, exclude), lr_tok)
