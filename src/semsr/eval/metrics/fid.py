"""FID (Heusel et al. 2017) between two image sets, pytorch-fid conventions.

Each image (grey replicated to RGB) is resized to 299x299 (bilinear,
``align_corners=False``), mapped to [-1, 1] and embedded by Inception-v3's
2048-d pool3 features; the two sets' Gaussians ``(mu, Sigma)`` are compared with

    FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

Weights (user-provided, see :mod:`semsr.core.weights`):
``pt_inception-2015-12-05-6726825d.pth`` (the TF FID Inception as ported by
pytorch-fid; values comparable with published FIDs) or, as a fallback,
torchvision's ``inception_v3_google-0cc3c7bd.pth`` (values NOT comparable
with published FIDs). Both use torchvision's key layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from semsr.core.errors import InputError, SemsrError, UnavailableError
from semsr.core.weights import FID_INCEPTION_FILES, TV_INCEPTION_FILES, find_weight_file, load_state_dict
from semsr.eval.metrics.backbones import InceptionV3Pool3
from semsr.eval.metrics.base import Metric, as_image_batch, as_rgb
from semsr.eval.metrics.image import list_images, load_eval_image

ImageLike = torch.Tensor | str | Path


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased) of ``feats (N, D)``, float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise InputError(f"FID needs at least 2 images per set, got {feats.shape[0] if feats.ndim else 0}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))``; a
    singular product is regularised with ``eps * I`` on both covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("the two Gaussians have different dimensions")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets ``(N_a, D)``, ``(N_b, D)`` (each ``N >= 2``).

    Equal to ``frechet_distance(*gaussian_stats(a), *gaussian_stats(b))``. When
    the sets are smaller than the feature dimension (the usual case for SR
    test sets: 5-100 images, D = 2048) the covariances are low rank and the
    ``D x D`` square root is both slow and ill-conditioned, so the trace term is
    computed exactly from the centred features instead: with
    ``S_a = A^T A``, ``S_b = B^T B`` (``A = (X_a - mu_a) / sqrt(N_a - 1)``) the
    non-zero eigenvalues of ``S_a S_b`` are the squared singular values of
    ``A B^T``, so ``tr sqrt(S_a S_b)`` is the nuclear norm of the small
    ``N_a x N_b`` matrix ``A B^T``.
    """
    mu_a, sigma_a = gaussian_stats(feats_a)
    mu_b, sigma_b = gaussian_stats(feats_b)
    n_a, n_b, dim = len(feats_a), len(feats_b), mu_a.shape[0]
    if max(n_a, n_b) > dim:
        return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    a = (np.asarray(feats_a, dtype=np.float64) - mu_a) / math.sqrt(n_a - 1)
    b = (np.asarray(feats_b, dtype=np.float64) - mu_b) / math.sqrt(n_b - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * nuclear)


class FID(Metric):
    """Frechet Inception Distance between two sets (lower is better).

    Use :meth:`compute_folders` or :meth:`compute_sets`; per-image calls raise.

    Args:
        weights_dir: folder searched for the Inception weights.
        weights_path: explicit weight file; ``variant`` then says its kind
            (default ``"fid"``).
        variant: force ``"fid"`` or ``"torchvision"`` (default: from the file found).
        batch_size: images per forward pass.
        image_size: side of the square network input (299 as pytorch-fid;
            other sizes give values not comparable with published FIDs --
            tests use a small one to save CPU time).
        device: torch device.
    """

    name = "fid"
    higher_better = False
    needs_gt = True
    kind = "distribution"
    summary = "Frechet Inception Distance between two sets"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        weights_path: str | Path | None = None,
        variant: str | None = None,
        batch_size: int = 8,
        image_size: int = 299,
        device: str | torch.device = "cpu",
    ) -> None:
        if image_size < 75:
            raise ValueError("Inception-v3 needs inputs of at least 75x75")
        self.image_size = int(image_size)
        if weights_path:
            path, found = Path(weights_path), variant or "fid"
        else:
            try:
                path, found = find_weight_file(FID_INCEPTION_FILES, "fid: Inception weights", weights_dir), "fid"
            except UnavailableError as first:
                try:
                    path = find_weight_file(TV_INCEPTION_FILES, "fid: Inception weights", weights_dir)
                    found = "torchvision"
                except UnavailableError:
                    raise first from None
        self.variant = variant or found
        self.weights_path = path
        self.model = InceptionV3Pool3(self.variant)
        self.model.load_published(load_state_dict(path), path)
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size = max(1, int(batch_size))

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None = None, crop_border: int = 0) -> float:
        raise SemsrError("fid compares two image sets: use compute_folders(dir_a, dir_b) or compute_sets(a, b)")

    def _prepare(self, img: ImageLike, crop_border: int) -> torch.Tensor:
        x = load_eval_image(img) if isinstance(img, (str, Path)) else as_image_batch(img, "image")
        if crop_border > 0:
            x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        x = as_rgb(x).to(self.device, torch.float32)
        x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return 2 * x - 1

    def features(self, images: Iterable[ImageLike], crop_border: int = 0) -> np.ndarray:
        """Pool3 features ``(N, 2048)`` of images (tensors ``(1, C, H, W)`` in [0, 1] or file paths)."""
        out, batch = [], []
        with torch.inference_mode():
            for img in images:
                batch.append(self._prepare(img, crop_border))
                if len(batch) == self.batch_size:
                    out.append(self.model(torch.cat(batch)).double().cpu().numpy())
                    batch = []
            if batch:
                out.append(self.model(torch.cat(batch)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))

    def compute_sets(self, set_a: Sequence[ImageLike], set_b: Sequence[ImageLike], crop_border: int = 0) -> float:
        """FID between two sets of images (tensors or paths), each of at least 2 images."""
        return fid_from_features(self.features(set_a, crop_border), self.features(set_b, crop_border))

    def compute_folders(self, dir_a: str | Path, dir_b: str | Path, crop_border: int = 0) -> float:
        """FID between the images directly inside two folders."""
        files_a, files_b = list_images(dir_a), list_images(dir_b)
        for folder, files in ((dir_a, files_a), (dir_b, files_b)):
            if len(files) < 2:
                raise InputError(f"FID needs at least 2 images, found {len(files)}", folder)
        return self.compute_sets(files_a, files_b, crop_border)
