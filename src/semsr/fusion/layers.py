"""Small layers the fusion modules share."""

from __future__ import annotations

from torch import nn


def zero_linear(dim: int) -> nn.Linear:
    """A zero-initialised ``Linear(dim, dim)`` on ``(..., dim)`` tokens (the 1x1 zero convolution over tokens):
    a residual branch through it starts as exactly nothing."""
    layer = nn.Linear(dim, dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
