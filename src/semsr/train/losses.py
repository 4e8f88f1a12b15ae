"""Pluggable loss terms.

A *task* (:mod:`semsr.train.tasks`) turns a batch into a dict of named tensors
(``outputs``): at least ``"pred"`` and ``"target"`` — the model's noise (or v)
prediction and what it should be, both ``(B, C, h, w)`` — plus whatever extra
heads the task has (e.g. DFC predictions). A loss term is a function
``(outputs) -> scalar tensor``; the experiment's ``losses:`` section maps term
names to weights and the trainer minimises the weighted sum.

Recipes add terms by registering them::

    @register_loss("dfc")
    def dfc(outputs):
        return F.l1_loss(outputs["dfc_latent"], outputs["hr_latent"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from semsr.core.errors import SemsrError

LossFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]

_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator registering a loss term under ``name`` (re-registering replaces it)."""

    def deco(fn: LossFn) -> LossFn:
        _LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    """Return the registered loss term ``name``; :class:`SemsrError` if unknown."""
    try:
        return _LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(_LOSSES)) or "none"
        raise SemsrError(f"unknown loss term '{name}' (known: {known})") from None


def available_losses() -> list[str]:
    """Names of all registered loss terms."""
    return sorted(_LOSSES)


def _require(outputs: Mapping[str, torch.Tensor], term: str, *keys: str) -> None:
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise SemsrError(
            f"loss term '{term}' needs task output(s) {', '.join(missing)}; "
            f"this task produces {', '.join(sorted(outputs))}"
        )


def combine_losses(
    weights: Mapping[str, float], outputs: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the configured loss terms.

    Args:
        weights: term name -> weight (terms with weight 0 are skipped).
        outputs: the task's named outputs for one micro-batch.

    Returns:
        ``(total, parts)``: the scalar loss to back-propagate (fp32) and the
        unweighted value of every term as a Python float, for logging.
    """
    total: torch.Tensor | None = None
    parts: dict[str, float] = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        value = get_loss(name)(outputs).float()
        parts[name] = float(value.detach())
        total = value * weight if total is None else total + value * weight
    if total is None:
        raise SemsrError("all loss weights are zero")
    return total, parts


@register_loss("eps_mse")
def eps_mse(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error between the prediction and the diffusion target.

    ``outputs["pred"]`` and ``outputs["target"]``: ``(B, C, h, w)``; the target
    is the noise (epsilon) or the velocity, as the task's noise scheduler says.
    """
    _require(outputs, "eps_mse", "pred", "target")
    return F.mse_loss(outputs["pred"].float(), outputs["target"].float())
