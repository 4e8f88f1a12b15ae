"""What a method call returns: :class:`SROutput` (images plus what the method used and measured)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


def compact(priors: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``None`` and empty collections; lists of strings become tuples; tensors go to the CPU (detached)."""
    out: dict[str, Any] = {}
    for key, value in priors.items():
        if value is None or (isinstance(value, (tuple, list, dict)) and not value):
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        elif isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        out[key] = value
    return out


@dataclass
class SROutput:
    """The result of one method call on a batch.

    Attributes:
        images: ``(B, 3, s*H, s*W)`` float in [0, 1].
        priors: what the method used for the first image of the batch (prompts,
            tags, degradation text, modality maps as ``(1, C, H, W)`` tensors...;
            see :mod:`semsr.priors.report` for the shared key names). Restorers: ``{}``.
        timings: seconds per stage the method measured (``encode``, ``denoise``, ``decode``...).
        side_images: extra images of the call, ``{name: (B or 1, 3, H, W)}`` in [0, 1]
            (e.g. CoSeR's reference), written beside the output by the CLI when asked.
    """

    images: torch.Tensor
    priors: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    side_images: dict[str, torch.Tensor] = field(default_factory=dict)
