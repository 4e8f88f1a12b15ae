"""IRPAD evaluated on the degradation DaLPSR trains on: Real-ESRGAN's second-order pipeline.

``semsr bench irpad --degradation realesrgan``. Each sample is an HR square
(``hr_size`` px, cut from a held-out photograph) degraded by
:class:`~semsr.data.degradations.RealESRGANDegradation` (the published
defaults, x4, one seeded draw per sample) — the LR images of the SR stage's
training — and labelled in IRPAD's label space (:data:`~semsr.priors.irpad.LEVELS`)
*as the LR image shows it*, on the LR image's own pixel grid:

- **blur**: the std of the Gaussian that best matches (least squares over a
  grid, 16 % border ignored) the pipeline rendered without noise and without
  JPEG (both qualities set to 100, the unit quantisation table) against the
  sharp reference, the sharpened HR input resized to the LR size by MATLAB
  bicubic — the *total* blur (kernels, resampling, final sinc), as IRPAD
  labels its own data;
- **noise**: the *white-equivalent* std (0-255) of the noise left in the LR
  image: the difference between the image and the same draw rendered with both
  noise levels set to 0 (same JPEGs), through a 3x3 Laplacian, divided by the
  Laplacian's norm (:func:`white_noise_std`) — the std of the pixel-level grain
  IRPAD's noise type describes (white Gaussian noise on the image's grid).
  Real-ESRGAN's noise is partly blurred and resized after it is added; its
  plain std (``noise_std`` in the bench JSON's ``label_values``) counts those
  smooth blotches too;
- **jpeg**: the quality of the final JPEG. Real-ESRGAN applies it last only in
  half the draws (``final_order`` ``resize_sinc_then_jpeg``); otherwise the LR is
  resized after it, and the block lattice IRPAD reads is gone, so these labels
  are reported apart (``by_final_order``);
- **downscale**: the factor the LR image was enlarged by after its smallest
  grid, ``max(1, 1 / min(4 f1, f2))`` (``f1``: first-stage resize of the HR,
  ``f2``: second-stage resize relative to the LR size); 1 when the image never
  went below the LR grid.

Values between IRPAD's intervals take the nearest level
(:func:`~semsr.priors.irpad.level_of`), as ``bench irpad --contiguous`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semsr.core.errors import SemsrError
from semsr.data.corpus.crops import load_rgb_uint8
from semsr.data.degradations import RealESRGANDegradation, filter2d, gaussian_kernel
from semsr.data.degradations.pipeline import DegradationParams, sample_params
from semsr.ops.imresize import imresize
from semsr.priors.irpad import DEGRADATION_TYPES, level_of
from semsr.train.irpad import IRPADData, torch_threads

#: 3x3 Laplacian of :func:`white_noise_std` (its L2 norm is sqrt(20)).
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])

#: Gaussian stds (LR px) the blur label is fitted over; 0 = no blur.
BLUR_GRID = tuple(float(s) for s in np.round(np.arange(0.0, 6.01, 0.05), 2))


def downscale_factor(params: DegradationParams, scale: int) -> float:
    """How much the LR image was enlarged after its smallest grid: ``max(1, 1 / min(scale * f1, f2))``."""
    smallest = min(scale * params.stage1.resize_factor, params.stage2.resize_factor)
    return max(1.0, 1.0 / smallest)


def white_noise_std(noise: torch.Tensor) -> float:
    """White-Gaussian-equivalent std of a noise image ``(1, 3, h, w)`` (same units): the std of its 3x3
    Laplacian (valid part) over the Laplacian's L2 norm — exact for white noise, lower for smooth noise."""
    k = _LAPLACIAN.to(noise.dtype).view(1, 1, 3, 3).repeat(noise.shape[1], 1, 1, 1)
    hp = torch.nn.functional.conv2d(noise, k, groups=noise.shape[1])
    return float(hp.std()) / float(_LAPLACIAN.norm())


def _no_noise(params: DegradationParams) -> DegradationParams:
    quiet = {"noise_type": "gaussian", "noise_level": 0.0}
    return replace(params, stage1=replace(params.stage1, **quiet), stage2=replace(params.stage2, **quiet))


def _no_jpeg(params: DegradationParams) -> DegradationParams:
    return replace(
        params, stage1=replace(params.stage1, jpeg_quality=100.0), stage2=replace(params.stage2, jpeg_quality=100.0)
    )


@torch.no_grad()
def fit_blur(reference: torch.Tensor, blurred: torch.Tensor, sigmas: Sequence[float] = BLUR_GRID) -> float:
    """The Gaussian std (px) whose blur of ``reference`` best matches ``blurred`` (both ``(1, 3, h, w)``)."""
    h, w = reference.shape[-2:]
    bh, bw = max(1, h * 16 // 100), max(1, w * 16 // 100)
    inner = (..., slice(bh, h - bh), slice(bw, w - bw))
    best, best_err = 0.0, math.inf
    for s in sigmas:
        g = reference if s == 0 else filter2d(reference, torch.from_numpy(gaussian_kernel(2 * math.ceil(3 * s) + 1, s)))
        err = float((g[inner] - blurred[inner]).pow(2).mean())
        if err < best_err:
            best, best_err = float(s), err
    return best


def label_sample(deg: RealESRGANDegradation, hr: torch.Tensor, params: DegradationParams) -> tuple[torch.Tensor, dict]:
    """``(LR (1, 3, h, w), {"values": (blur, noise, jpeg, downscale), "final_order", "noise_std"})`` for
    ``hr (1, 3, H, W)`` (``noise_std``: the plain std of the noise, 0-255)."""
    trace: dict[str, torch.Tensor] = {}
    lr = deg.apply(hr, params, trace=trace)
    quiet = deg.apply(hr, _no_noise(params))
    clean = deg.apply(hr, _no_noise(_no_jpeg(params)))
    reference = imresize(trace["input"], size=tuple(lr.shape[-2:])).clamp(0, 1)
    blur = fit_blur(reference, clean)
    noise = white_noise_std((lr - quiet).double()) * 255.0
    values = (blur, noise, float(params.stage2.jpeg_quality), downscale_factor(params, deg.scale))
    return lr, {"values": values, "final_order": params.final_order, "noise_std": float((lr - quiet).std()) * 255.0}


def make_realesrgan_set(photos: Sequence[Path], n: int, hr_size: int = 320, seed: int = 0) -> IRPADData:
    """``n`` Real-ESRGAN LR samples (``hr_size // 4`` px) of random ``hr_size`` squares of ``photos``, labelled
    in IRPAD's label space (module docstring); ``meta["final_order"]`` lists each sample's final order."""
    if not photos:
        raise SemsrError("no photographs to degrade")
    deg = RealESRGANDegradation()
    size = hr_size // deg.scale
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    values = np.zeros((n, len(DEGRADATION_TYPES)), np.float32)
    orders: list[str] = []
    noise_std: list[float] = []
    used: set[str] = set()
    with torch_threads(1):
        while len(orders) < n:
            path = photos[int(rng.integers(len(photos)))]
            photo = load_rgb_uint8(path)
            h, w = photo.shape[:2]
            if min(h, w) < hr_size:
                continue
            top, left = int(rng.integers(h - hr_size + 1)), int(rng.integers(w - hr_size + 1))
            crop = photo[top : top + hr_size, left : left + hr_size]
            hr = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
            params = sample_params(deg.config, int(rng.integers(2**62)))
            lr, label = label_sample(deg, hr, params)
            i = len(orders)
            images[i] = (lr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            values[i] = label["values"]
            orders.append(label["final_order"])
            noise_std.append(round(label["noise_std"], 3))
            used.add(str(path))
    labels = np.array([[level_of(t, float(v)) for t, v in zip(DEGRADATION_TYPES, row)] for row in values], np.int64)
    meta: dict[str, Any] = {
        "types": list(DEGRADATION_TYPES),
        "degradation": "realesrgan",
        "n": n,
        "hr_size": hr_size,
        "seed": seed,
        "photos": len(used),
        "final_order": orders,
        "noise_std": noise_std,
    }
    return IRPADData(images, labels, values, meta)


def accuracy_by_final_order(data: IRPADData, preds: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per final order: ``{"n", "per_type"}`` accuracies of ``preds`` ``(N, 4)`` against ``data.labels``."""
    orders = np.asarray(data.meta["final_order"])
    out: dict[str, dict[str, Any]] = {}
    for order in sorted(set(orders.tolist())):
        m = orders == order
        correct = preds[m] == data.labels[m]
        out[order] = {
            "n": int(m.sum()),
            "per_type": {t: float(correct[:, j].mean()) for j, t in enumerate(data.meta["types"])},
        }
    return out
