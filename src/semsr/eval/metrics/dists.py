"""DISTS (Ding et al. 2020): structure and texture similarity on VGG16 features.

For the input image and the five VGG16 stages (max pooling replaced by L2
pooling, ImageNet mean/std normalisation), per channel ``k``:

    S1 = (2 mu_x mu_y + c) / (mu_x^2 + mu_y^2 + c)          (texture)
    S2 = (2 cov_xy + c) / (var_x + var_y + c)               (structure)

``DISTS = 1 - sum_k (alpha_k S1_k + beta_k S2_k) / (sum alpha + sum beta)``,
``c = 1e-6``. ``alpha, beta (1, 1475, 1, 1)`` come from ``dists/weights.pt``
(the ``dists-pytorch==0.1`` format: keys ``alpha`` and ``beta``; fetched on
first use), the backbone from ``vgg16-397923af.pth`` in the weights folder.
Images are used at their own size (no resizing).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from semsr.core.errors import UnavailableError
from semsr.core.weights import VGG16_FILES, load_state_dict, registry_file
from semsr.eval.metrics.backbones import VGG16Features
from semsr.eval.metrics.base import BackboneDistance

CHANNELS = (3, 64, 128, 256, 512, 512)


class DISTSNet(nn.Module):
    """``forward(x, y)``: two ``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` DISTS values."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = VGG16Features(pool="l2")
        n = sum(CHANNELS)
        self.alpha = nn.Parameter(torch.full((1, n, 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, n, 1, 1), 0.1))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def load_alpha_beta(self, state: dict[str, torch.Tensor], path: Path | str) -> None:
        """Load ``{"alpha", "beta"}`` tensors of shape ``(1, 1475, 1, 1)``."""
        for key in ("alpha", "beta"):
            param = getattr(self, key)
            if key not in state or tuple(state[key].shape) != tuple(param.shape):
                got = tuple(state[key].shape) if key in state else "absent"
                raise UnavailableError(f"not a DISTS weight file: {key} is {got}, expected {tuple(param.shape)}", path)
            param.data.copy_(state[key])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x, y])
        feats = [both] + self.backbone((both - self.mean) / self.std, self.backbone.RELU_TAPS)
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, CHANNELS, dim=1)
        betas = torch.split(self.beta / w_sum, CHANNELS, dim=1)
        c = 1e-6
        score = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for f, a, b in zip(feats, alphas, betas):
            fx, fy = f.chunk(2)
            mx, my = fx.mean(dim=(2, 3), keepdim=True), fy.mean(dim=(2, 3), keepdim=True)
            vx = ((fx - mx) ** 2).mean(dim=(2, 3), keepdim=True)
            vy = ((fy - my) ** 2).mean(dim=(2, 3), keepdim=True)
            cov = (fx * fy).mean(dim=(2, 3), keepdim=True) - mx * my
            s1 = (2 * mx * my + c) / (mx * mx + my * my + c)
            s2 = (2 * cov + c) / (vx + vy + c)
            score = score + (a * s1 + b * s2).sum(dim=(1, 2, 3))
        return 1 - score


class DISTS(BackboneDistance):
    """DISTS (lower is better); grey images are replicated to RGB.

    Args:
        weights_dir: folder with ``vgg16-397923af.pth`` (and optionally ``dists/weights.pt``).
        fetch: fetch ``dists/weights.pt`` with pip when not found.
        backbone_path, weights_path: explicit files (override the search).
        device: torch device to run on.
    """

    name = "dists"
    summary = "DISTS (VGG16, L2 pooling)"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        fetch: bool = True,
        backbone_path: str | Path | None = None,
        weights_path: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        bpath = self.backbone_file(
            backbone_path, VGG16_FILES, "dists: VGG16 ImageNet backbone (torchvision)", weights_dir
        )
        wpath = Path(weights_path) if weights_path else registry_file("dists/weights.pt", weights_dir, fetch=fetch)
        model = DISTSNet()
        model.load_alpha_beta(load_state_dict(wpath), wpath)
        self.use_model(model, bpath, device)
