"""The :class:`Metric` base class and the input conventions every metric shares.

A metric is called per image: ``metric(pred, gt=None, crop_border=0) -> float``
with ``pred``/``gt`` of shape ``(1, C, H, W)``, float in [0, 1], ``C = 3`` for
colour and ``C = 1`` for grey images. The base class validates shapes, gives
the prediction the ground truth's channel count (a colour prediction of a grey
ground truth is reduced to its BT.601 luma; a grey prediction of a colour
ground truth is replicated), crops ``crop_border`` pixels from every edge and
then calls :meth:`Metric.compute`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from semsr.core.errors import InputError
from semsr.core.weights import find_weight_file, load_state_dict
from semsr.ops.color import luma

KINDS = ("pixel", "deep", "distribution")


@dataclass(frozen=True)
class MetricInfo:
    """What callers need to know about a metric without building it.

    Attributes:
        name: registry name (``psnry``, ``lpips-vgg``...).
        higher_better: True when larger values mean better quality.
        needs_gt: True for full-reference metrics (need a ground truth).
        kind: ``"pixel"`` (hand-crafted statistics), ``"deep"`` (needs network
            weights) or ``"distribution"`` (compares two image sets, e.g. FID).
        summary: one line for ``--help`` and reports.
    """

    name: str
    higher_better: bool
    needs_gt: bool
    kind: str
    summary: str = ""


def as_image_batch(x: torch.Tensor, what: str = "pred") -> torch.Tensor:
    """Check ``x`` is ``(1, C, H, W)`` (or ``(C, H, W)``) with C in {1, 3}; return the 4-D tensor."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3):
        raise InputError(f"{what} must have shape (1, 1|3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{what} must be a float tensor in [0, 1], got {x.dtype}")
    return x


def align_channels(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Give ``pred`` ``(1, C, H, W)`` the channel count of ``gt``: luma for grey, replication for colour."""
    if pred.shape[1] == gt.shape[1]:
        return pred
    return luma(pred) if gt.shape[1] == 1 else pred.expand(-1, 3, -1, -1)


def crop(x: torch.Tensor, border: int) -> torch.Tensor:
    """Remove ``border`` pixels from each edge of ``(..., H, W)``."""
    if border <= 0:
        return x
    h, w = x.shape[-2:]
    if 2 * border >= min(h, w):
        raise InputError(f"crop_border {border} leaves nothing of a {h}x{w} image")
    return x[..., border : h - border, border : w - border]


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1|3, H, W)`` -> ``(B, 3, H, W)`` (grey replicated); networks take RGB."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class Metric:
    """Base class of per-image metrics; subclasses implement :meth:`compute`.

    Class attributes ``name``, ``higher_better``, ``needs_gt`` and ``kind``
    mirror :class:`MetricInfo` (an instance may override ``name``, e.g.
    ``lpips-vgg``).
    """

    name: str = ""
    higher_better: bool = True
    needs_gt: bool = True
    kind: str = "pixel"
    summary: str = ""

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(self.name, self.higher_better, self.needs_gt, self.kind, self.summary)

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None = None, crop_border: int = 0) -> float:
        """Score one image.

        Args:
            pred: ``(1, C, H, W)`` float in [0, 1], C = 3 (RGB) or 1 (grey).
            gt: ground truth of the same size; required when ``needs_gt``,
                ignored otherwise.
            crop_border: pixels removed from every edge before measuring
                (SR convention: the scale factor).

        Returns:
            The metric value as a Python float.
        """
        pred = as_image_batch(pred, "pred")
        if self.needs_gt:
            if gt is None:
                raise InputError(f"{self.name} is a full-reference metric: a ground truth image is required")
            gt = as_image_batch(gt, "gt")
            if pred.shape[-2:] != gt.shape[-2:]:
                raise InputError(
                    f"{self.name}: prediction is {pred.shape[-1]}x{pred.shape[-2]} but ground truth is "
                    f"{gt.shape[-1]}x{gt.shape[-2]} (width x height)"
                )
            pred = align_channels(pred, gt)
            gt = crop(gt, crop_border)
        else:
            gt = None
        pred = crop(pred, crop_border)
        with torch.inference_mode():
            return float(self.compute(pred, gt))

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        """Score validated, cropped ``(1, C, H, W)`` tensors (``gt`` None for no-reference metrics)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<metric {self.name} ({'higher' if self.higher_better else 'lower'} is better)>"


class BackboneDistance(Metric):
    """Full-reference distance of a network on an ImageNet backbone (LPIPS, DISTS); lower is better.

    The network is ``model(x, y) -> (B,)`` on RGB ``(B, 3, H, W)`` in [0, 1]
    (grey images are replicated to RGB) with a ``backbone`` that loads a
    torchvision state dict (:mod:`semsr.eval.metrics.backbones`).
    """

    higher_better = False
    needs_gt = True
    kind = "deep"
    model: nn.Module
    device: torch.device

    @staticmethod
    def backbone_file(path: str | Path | None, files: Sequence[str], what: str, weights_dir: str | Path | None) -> Path:
        """``path``, else the first of ``files`` found in the weights folders (``what`` names it if none is)."""
        return Path(path) if path else find_weight_file(files, what, weights_dir)

    def use_model(self, model: nn.Module, backbone: Path, device: str | torch.device) -> None:
        """Load the torchvision file ``backbone`` into ``model.backbone``; run ``model`` frozen on ``device``."""
        model.backbone.load_torchvision(load_state_dict(backbone), backbone)
        self.model = model
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        assert gt is not None
        x = as_rgb(pred).to(self.device, torch.float32)
        y = as_rgb(gt).to(self.device, torch.float32)
        return self.model(x, y).item()
