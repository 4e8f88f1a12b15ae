"""Guidance as denoiser wrappers (k-diffusion style): the sampler only ever sees a denoiser.

A *denoiser* is ``(x_t, t, cond) -> model output`` with ``x_t`` ``(B, C, h, w)``.
A wrapper takes a denoiser and returns one that combines several evaluations:

- :func:`cfg`: classifier-free guidance ``u + s * (c - u)``, one batched call on
  ``[uncond, cond]``. MMSR's m-CFG ``(1 + w) * eps(pos) - w * eps(neg)`` is
  :func:`cfg` with ``s = 1 + w`` and its own negative branch (modalities kept);
- :func:`weighted`: ``sum_i w_i * eps(cond_i)`` over explicit branches
  (CoSeR's three-branch guidance), one batched call.

Wrappers compose (``cfg(tiled(spatial), ...)``) and never live inside the sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cat_conditions(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch dimension (tensors, dicts, tuples/lists, None)."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: cat_conditions(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(cat_conditions(x, y) for x, y in zip(a, b, strict=True))
    if a == b:  # plain scalars/strings shared by both branches
        return a
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")


def cfg(denoiser: Denoiser, uncond: Any, scale: float) -> Denoiser:
    """Classifier-free guidance around ``denoiser``: ``u + scale * (c - u)``.

    ``uncond`` None or ``scale == 1`` returns ``denoiser`` itself (one forward).
    Otherwise each call evaluates ``[uncond, cond]`` in one batched forward.
    """
    if uncond is None or scale == 1.0:
        return denoiser

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        both = denoiser(torch.cat([x, x], dim=0), t, cat_conditions(uncond, cond))
        out_u, out_c = both.chunk(2, dim=0)
        return out_u + scale * (out_c - out_u)

    return guided


def weighted(denoiser: Denoiser, weights: Sequence[float]) -> Denoiser:
    """``sum_i weights[i] * denoiser(x, t, cond[i])`` in float32; ``cond`` is a list of branch conditions.

    The branches are batched into one call of ``denoiser`` with the list of
    branch conditions and an input repeated once per branch; the wrapped
    denoiser returns ``(k * B, C, h, w)``, branch-major.
    """
    weights = [float(w) for w in weights]

    def combined(x: torch.Tensor, t: torch.Tensor, cond: Sequence[Any]) -> torch.Tensor:
        k = len(weights)
        out = denoiser(x.repeat(k, 1, 1, 1), t, cond)
        total = None
        for w, part in zip(weights, out.chunk(k), strict=True):
            term = part.float() * w
            total = term if total is None else total + term
        assert total is not None
        return total

    return combined
