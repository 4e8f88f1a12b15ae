"""LPIPS v0.1 (Zhang et al. 2018) on the project's AlexNet/VGG16 definitions.

``d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )`` with
``f_l`` the five ReLU stages of the ImageNet backbone applied to
``(2x - 1 - shift) / scale`` and ``w_l`` the learned 1x1 linear heads.

Files (see :mod:`semsr.core.weights`):

- backbone: ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth`` (torchvision
  ImageNet weights) from the user's weights folder;
- heads: ``lpips/v0.1/{alex,vgg}.pth`` in the ``lpips`` package format
  (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``), fetched from the
  ``lpips==0.1.4`` wheel on first use or read from the weights folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from semsr.core.errors import UnavailableError
from semsr.core.weights import ALEXNET_FILES, VGG16_FILES, load_state_dict, registry_file
from semsr.eval.metrics.backbones import AlexNetFeatures, VGG16Features
from semsr.eval.metrics.base import BackboneDistance

_BACKBONES = {"alex": (AlexNetFeatures, ALEXNET_FILES, "AlexNet"), "vgg": (VGG16Features, VGG16_FILES, "VGG16")}


class LPIPSNet(nn.Module):
    """Backbone + linear heads. ``forward(x, y)``: two ``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` distances."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in _BACKBONES:
            raise ValueError(f"net must be one of {sorted(_BACKBONES)}, got {net!r}")
        self.net = net
        self.backbone = _BACKBONES[net][0]()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.backbone.CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def load_heads(self, state: dict[str, torch.Tensor], path: Path | str) -> None:
        """Load heads saved by the ``lpips`` package (``lin{k}.model.1.weight``, shape ``(1, C_k, 1, 1)``)."""
        for k, head in enumerate(self.heads):
            key = f"lin{k}.model.1.weight"
            if key not in state or tuple(state[key].shape) != tuple(head.weight.shape):
                got = tuple(state[key].shape) if key in state else "absent"
                raise UnavailableError(
                    f"not an LPIPS {self.net} head file: {key} is {got}, expected {tuple(head.weight.shape)}", path
                )
            head.weight.data.copy_(state[key])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale
        feats = self.backbone(both, self.backbone.RELU_TAPS)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for f, head in zip(feats, self.heads):
            f = f / (torch.sqrt((f * f).sum(dim=1, keepdim=True)) + 1e-10)
            fx, fy = f.chunk(2)
            total = total + head((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total


class LPIPS(BackboneDistance):
    """LPIPS distance (lower is better); grey images are replicated to RGB.

    Args:
        net: ``"alex"`` (registry name ``lpips``) or ``"vgg"`` (``lpips-vgg``).
        weights_dir: folder with the backbone file (and optionally ``lpips/v0.1/<net>.pth``).
        fetch: fetch the heads with pip when not found.
        backbone_path, heads_path: explicit files (override the search).
        device: torch device to run on.
    """

    def __init__(
        self,
        net: str = "alex",
        weights_dir: str | Path | None = None,
        fetch: bool = True,
        backbone_path: str | Path | None = None,
        heads_path: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if net not in _BACKBONES:
            raise ValueError(f"net must be one of {sorted(_BACKBONES)}, got {net!r}")
        self.name = "lpips" if net == "alex" else f"lpips-{net}"
        self.summary = f"LPIPS v0.1, {_BACKBONES[net][2]}"
        files, label = _BACKBONES[net][1], _BACKBONES[net][2]
        bpath = self.backbone_file(
            backbone_path, files, f"{self.name}: {label} ImageNet backbone (torchvision)", weights_dir
        )
        hpath = Path(heads_path) if heads_path else registry_file(f"lpips/v0.1/{net}.pth", weights_dir, fetch=fetch)
        model = LPIPSNet(net)
        model.load_heads(load_state_dict(hpath), hpath)
        self.use_model(model, bpath, device)
