"""Caches for what does not change across the sampling steps of one image or tile.

The SR ControlNet embeds its pixel-space hint (``controlnet_cond_embedding``,
a stack of full-resolution convolutions) at every step although the hint of a
tile is the same at every step. :func:`set_hint_cache` memoises that
embedding on the module instance: a call whose hint equals a stored one (same
shape, dtype and values, checked with :func:`torch.equal`; one entry per tile) returns the
stored embedding, so outputs are bit-identical with and without the cache.
The module's parameters and state-dict keys are untouched (``forward`` is
replaced on the instance only), so saving and loading are unaffected.
"""

from __future__ import annotations

from typing import Any

import torch


class _HintCache:
    """The last few ``(hint, embedding)`` pairs of one embedding module (hint ``(N, 3, H, W)``,
    embedding ``(N, C, H/f, W/f)``), one per tile of a tiled call, at most ``size`` of them."""

    def __init__(self, forward: Any, size: int = 64) -> None:
        self.forward = forward
        self.size = size
        self.enabled = True
        self.entries: list[tuple[tuple, torch.Tensor, torch.Tensor]] = []
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.entries.clear()

    def __call__(self, hint: torch.Tensor) -> torch.Tensor:
        if not self.enabled or torch.is_grad_enabled():  # training: never reuse a graph-carrying output
            return self.forward(hint)
        flat = hint.reshape(-1)
        key = (tuple(hint.shape), hint.dtype, hint.device, float(flat.sum()), float(flat[::97].sum()))
        for i, (k, h, emb) in enumerate(self.entries):
            if k == key and torch.equal(h, hint):
                self.hits += 1
                self.entries.append(self.entries.pop(i))  # most recently used last
                return emb
        self.misses += 1
        emb = self.forward(hint)
        self.entries.append((key, hint.detach().clone(), emb.detach()))
        del self.entries[: -self.size]
        return emb


def set_hint_cache(controlnet: Any, enabled: bool = True) -> Any:
    """Memoise (or stop memoising, dropping the stored embeddings) ``controlnet.controlnet_cond_embedding``
    across steps; returns ``controlnet``. Without ``controlnet_cond_embedding`` nothing is done."""
    emb = getattr(controlnet, "controlnet_cond_embedding", None)
    if emb is None:
        return controlnet
    fwd = emb.__dict__.get("forward")
    if not isinstance(fwd, _HintCache):
        if not enabled:
            return controlnet
        fwd = emb.forward = _HintCache(emb.forward)
    fwd.clear()
    fwd.enabled = enabled
    return controlnet


def hint_cache_stats(controlnet: Any) -> dict[str, int] | None:
    """``{"hits", "misses"}`` of a cached ControlNet's hint embedding, ``None`` when not cached."""
    fwd = controlnet.controlnet_cond_embedding.__dict__.get("forward")
    return {"hits": fwd.hits, "misses": fwd.misses} if isinstance(fwd, _HintCache) else None
