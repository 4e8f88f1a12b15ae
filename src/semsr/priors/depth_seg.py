"""Depth and semantic-segmentation priors from local ``transformers`` folders.

``"depth"``: any model ``AutoModelForDepthEstimation`` can load (DPT,
Depth-Anything, GLPN, ZoeDepth...), with its image processor, from a folder
written by ``save_pretrained``. Output ``(1, 1, H, W)`` in [0, 1]: the
prediction resized to the image and min-max normalised per image. DPT and
Depth-Anything predict relative *inverse* depth, so near is bright; pass
``invert=True`` for metric-depth models (far = large) to keep that convention.

``"seg"``: SegFormer-like models (``AutoModelForSemanticSegmentation``) or
Mask2Former/MaskFormer/OneFormer (``AutoModelForUniversalSegmentation``); the
processor's ``post_process_semantic_segmentation`` gives a label map at the
image size, rendered with a fixed palette (:func:`label_palette`) as
``(1, 3, H, W)`` in [0, 1]. ``result.meta["labels"]`` names the classes present.

Everything loads with ``local_files_only=True``; the model folder comes from
the ``model`` option (``--depth-model`` / ``--seg-model``) or, when absent,
``semsr.core.paths.weights_dir()/"depth"`` or ``/"seg"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from semsr.core.errors import UnavailableError
from semsr.core.fingerprint import fingerprint
from semsr.core.loading import quiet_hf_logging, strict_from_pretrained
from semsr.priors.base import (
    DEVICE_OPTION,
    PriorResult,
    ProviderOption,
    ProviderSpec,
    check_image,
    model_folder,
    register_provider,
)

_REVISION = "1"


def _load(path: Path, auto_classes: tuple[Any, ...], what: str) -> tuple[Any, Any]:
    """Load model + image processor from ``path`` with the first auto class that accepts its config."""
    from transformers import AutoConfig, AutoImageProcessor  # heavy dependency: loaded with a model

    quiet_hf_logging()  # also forces the hubs offline
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    for auto in auto_classes:
        if type(config) in auto._model_mapping:
            model = strict_from_pretrained(auto, path, what=f"{what} model").eval()
            break
    else:
        raise UnavailableError(f"model type {config.model_type!r} is not a {what} model", path)
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except OSError as err:
        raise UnavailableError(f"no image processor config (preprocessor_config.json): {err}", path) from err
    return model, processor


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` in [0, 1] -> ``uint8`` ``(H, W, 3)`` for transformers processors."""
    return (image[0].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class _DenseModelProvider:
    """Shared part of the depth and seg providers: a local transformers model + processor on one image."""

    kind = "spatial"

    def _load_model(
        self, model: str | Path | None, flag: str, auto_classes: tuple[Any, ...], what: str, device: str
    ) -> None:
        """Find (``model`` or the ``--<flag>`` default folder) and load the model to ``device``."""
        self.path = model_folder(
            model,
            self.name,
            f"no transformers model folder (config.json missing); pass "
            f"{flag} PATH to a folder written by save_pretrained",
        )
        self.model, self.processor = _load(self.path, auto_classes, what)
        self.device = torch.device(device)
        self.model.to(self.device)

    def _forward(self, image: torch.Tensor) -> tuple[Any, tuple[int, int]]:
        """Check ``image (1, 3, H, W)`` in [0, 1] and run the model: ``(raw output, (H, W))``."""
        check_image(image)
        h, w = image.shape[-2:]
        inputs = self.processor(images=_to_uint8_hwc(image), return_tensors="pt").to(self.device)
        return self.model(**inputs), (h, w)


class DepthProvider(_DenseModelProvider):
    """Spatial prior ``"depth"``: normalised depth ``(1, 1, H, W)`` in [0, 1] (near = bright).

    Args:
        model: local folder with a depth-estimation model and its processor.
        invert: flip the map (for models whose output grows with distance).
        device: torch device.
    """

    name = "depth"

    def __init__(self, model: str | Path | None = None, invert: bool = False, device: str = "cpu") -> None:
        from transformers import AutoModelForDepthEstimation  # heavy dependency: loaded with a model

        self._load_model(model, "--depth-model", (AutoModelForDepthEstimation,), "depth-estimation", device)
        self.invert = bool(invert)
        self.version = f"{_REVISION};{fingerprint([self.path])};inv={int(self.invert)}"

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> PriorResult:
        out, (h, w) = self._forward(image)
        if hasattr(self.processor, "post_process_depth_estimation"):
            depth = self.processor.post_process_depth_estimation(out, target_sizes=[(h, w)])[0]["predicted_depth"]
        else:
            depth = F.interpolate(out.predicted_depth[:, None], size=(h, w), mode="bicubic", align_corners=False)
        depth = depth.float().cpu().reshape(1, 1, h, w)
        lo, hi = float(depth.min()), float(depth.max())
        norm = (depth - lo) / (hi - lo) if hi > lo else torch.zeros_like(depth)
        if self.invert:
            norm = 1.0 - norm
        return PriorResult("spatial", norm.clamp(0, 1), {"raw_min": lo, "raw_max": hi})


def label_palette(num_labels: int) -> torch.Tensor:
    """Distinct, fixed colours for label ids: ``(num_labels, 3)`` float in [0, 1].

    The bits of each id are spread over the high bits of R, G and B (id 0 is
    black), so small ids differ strongly and the colours never depend on the
    image.
    """
    colours = np.zeros((num_labels, 3), dtype=np.uint8)
    for i in range(num_labels):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[i] = (r, g, b)
    return torch.from_numpy(colours).float() / 255.0


class SegProvider(_DenseModelProvider):
    """Spatial prior ``"seg"``: colourised semantic label map ``(1, 3, H, W)`` in [0, 1].

    Args:
        model: local folder with a semantic (SegFormer, BEiT, DPT...) or
            universal (Mask2Former, MaskFormer, OneFormer) segmentation model.
        device: torch device.
    """

    name = "seg"

    def __init__(self, model: str | Path | None = None, device: str = "cpu") -> None:
        from transformers import (  # heavy dependency: loaded with a model
            AutoModelForSemanticSegmentation,
            AutoModelForUniversalSegmentation,
        )

        self._load_model(
            model,
            "--seg-model",
            (AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation),
            "segmentation",
            device,
        )
        self.id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        self.palette = label_palette(max(len(self.id2label), 1) + 1)
        self.version = f"{_REVISION};{fingerprint([self.path])}"

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> PriorResult:
        out, (h, w) = self._forward(image)
        labels = self.processor.post_process_semantic_segmentation(out, target_sizes=[(h, w)])[0]
        labels = labels.long().cpu().clamp(min=0)
        if int(labels.max()) >= len(self.palette):
            self.palette = label_palette(int(labels.max()) + 1)
        colour = self.palette[labels].permute(2, 0, 1)[None]
        present = sorted(int(i) for i in labels.unique())
        return PriorResult("spatial", colour, {"labels": {str(i): self.id2label.get(i, str(i)) for i in present}})


register_provider(
    ProviderSpec(
        name="depth",
        factory=DepthProvider,
        kind="spatial",
        summary="monocular depth (DPT / Depth-Anything from a local transformers folder)",
        options=(ProviderOption("model", "--depth-model", "local transformers depth-estimation folder"), DEVICE_OPTION),
    )
)

register_provider(
    ProviderSpec(
        name="seg",
        factory=SegProvider,
        kind="spatial",
        summary="semantic segmentation (SegFormer / Mask2Former from a local transformers folder), colourised",
        options=(ProviderOption("model", "--seg-model", "local transformers segmentation folder"), DEVICE_OPTION),
    )
)
