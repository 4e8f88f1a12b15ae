"""JPEG quantisation-lattice scores: a fixed forensic feature for IRPAD.

A decoded baseline JPEG keeps a fingerprint of its quantisation: re-computing
the 8x8 block DCT of its luma *on the encoder's block grid* gives coefficients
``c[u, v]`` that sit (up to the 8-bit rounding of the decoder, std ~0.3) on the
lattice ``k * base[u, v] * s``, where ``base`` is the Annex K luma table and
``s`` the IJG quality scale (``5000 / Q / 100`` below quality 50,
``(200 - 2 Q) / 100`` above). A learned CNN sees this only indirectly (block
edges), and noise added before compression hides the edges but not the
lattice; so IRPAD gets the lattice directly:

1. the luma (JFIF weights, 0-255, level-shifted by 128) goes through all 64
   8x8 DCT basis filters at every position (stride 1);
2. the block-grid phase (one of 8 x 8) is the one where most AC coefficients
   are (near) zero — quantisation makes exact zeros, an unaligned grid does not;
3. at that phase, for every candidate scale ``s`` on a log-spaced grid, the
   score ``S(s) = mean cos(2 pi c / (base * s))`` over the low-frequency AC
   coefficients whose magnitude exceeds the rounding noise. ``S`` is ~1 at the
   true scale (and at its integer fractions) and ~0 elsewhere or without JPEG.
   Scores with the transposed table are computed too and the larger kept, so
   the feature is invariant to the flips/transpositions IRPAD averages over.

The output is ``(B, bins + 1)``: ``S`` per candidate scale and the zero
fraction at the chosen phase. Unaligned or resampled JPEGs (the lattice is
gone) give ~0 scores, and the network falls back to its learned features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from semsr.data.degradations.jpeg import LUMA_TABLE, RGB2YCC, dct_matrix

#: zig-zag positions (row, column) of the first AC coefficients used for the score
_ZIGZAG_AC = (
    (0, 1),
    (1, 0),
    (2, 0),
    (1, 1),
    (0, 2),
    (0, 3),
    (1, 2),
    (2, 1),
    (3, 0),
    (4, 0),
    (3, 1),
    (2, 2),
    (1, 3),
    (0, 4),
)


class JPEGLattice(nn.Module):
    """Quantisation-lattice scores of ``(B, 3, H, W)`` images in [0, 1] (``H, W >= 15``).

    Args:
        bins: number of candidate quality scales, log-spaced over ``[s_min, s_max]``.
        s_min, s_max: the candidate range (IJG quality ~85 .. ~6 for the defaults).
        min_abs: coefficients with ``|c|`` below this are left out of the score
            (they are zeros of the lattice or rounding noise).
    """

    def __init__(self, bins: int = 128, s_min: float = 0.3, s_max: float = 8.0, min_abs: float = 2.0) -> None:
        super().__init__()
        d = dct_matrix(torch.float64)
        basis = torch.einsum("ux,vy->uvxy", d, d).reshape(64, 1, 8, 8)  # filter (u, v) over pixels (x, y)
        self.register_buffer("basis", basis.float(), persistent=False)
        table = torch.tensor(LUMA_TABLE, dtype=torch.float32).view(8, 8)
        idx = torch.tensor([u * 8 + v for u, v in _ZIGZAG_AC])
        self.register_buffer("idx", idx, persistent=False)
        bases = torch.stack([table.flatten()[idx], table.t().flatten()[idx]])  # (2, n_ac)
        self.register_buffer("bases", bases, persistent=False)
        scales = torch.exp(torch.linspace(math.log(s_min), math.log(s_max), bins))
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("luma", torch.tensor(RGB2YCC[0]).view(1, 3, 1, 1), persistent=False)  # the codec's Y
        self.bins = int(bins)
        self.min_abs = float(min_abs)

    @property
    def out_features(self) -> int:
        return self.bins + 1

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, bins + 1)`` float32 scores."""
        b = x.shape[0]
        y = (x.float() * self.luma).sum(1, keepdim=True) * 255.0 - 128.0
        coef = nn.functional.conv2d(y, self.basis)  # (B, 64, H-7, W-7)
        nh, nw = (coef.shape[-2]) // 8, (coef.shape[-1]) // 8
        if nh == 0 or nw == 0:
            raise ValueError(f"JPEG lattice needs images of at least 15x15 px, got {tuple(x.shape[-2:])}")
        coef = coef[..., : nh * 8, : nw * 8].reshape(b, 64, nh, 8, nw, 8)  # (B, 64, bi, py, bj, px)
        zeros = (coef[:, 1:].abs() < 0.75).float().mean(dim=(1, 2, 4))  # (B, 8, 8) per phase
        best = zeros.flatten(1).argmax(1)  # (B,)
        py, px = best // 8, best % 8
        ar = torch.arange(b, device=x.device)
        picked = coef.permute(0, 3, 5, 1, 2, 4)[ar, py, px]  # (B, 64, bi, bj)
        ac = picked[:, self.idx].flatten(2)  # (B, n_ac, n_blocks)
        weight = (ac.abs() >= self.min_abs).float()
        score = None
        for base in self.bases:  # table as is, and transposed
            ratio = ac / base.view(1, -1, 1)  # (B, n_ac, n_blocks): multiples of s on a JPEG grid
            phase = torch.cos(2.0 * math.pi * ratio.unsqueeze(-1) / self.scales)  # (B, n_ac, n_blocks, bins)
            s = (phase * weight.unsqueeze(-1)).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp(min=1.0).unsqueeze(-1)
            score = s if score is None else torch.maximum(score, s)
        zero_frac = zeros.flatten(1).gather(1, best[:, None])
        return torch.cat([score, zero_frac], dim=1)
