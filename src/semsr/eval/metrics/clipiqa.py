"""CLIP-IQA (Wang, Chan & Loy 2023), zero-shot, on a transformers CLIP from a local folder.

The score is the softmax probability of the antonym prompt pair
``("Good photo.", "Bad photo.")``:

    p(good) = softmax(s * [cos(f_img, f_good), cos(f_img, f_bad)])[0]

with ``s = exp(logit_scale)`` of the model. Following CLIP-IQA, the image is
not resized: it is normalised with the model's mean/std and embedded at its
own resolution (the ViT position embedding is interpolated). The original
CLIP-IQA uses an OpenAI ResNet-50 CLIP with the position embedding removed,
and pyiqa's ``clipiqa`` that network; scores from a ViT CLIP here are the same
recipe but not numerically comparable with them.

The model folder is a ``CLIPModel.save_pretrained`` folder with its tokenizer
(and optionally ``preprocessor_config.json``): ``clip_path=``, or the first
folder named ``clip*`` in the weights folder. Loaded with ``local_files_only``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from semsr.core.errors import UnavailableError
from semsr.core.loading import strict_from_pretrained
from semsr.core.weights import resolve_weights_dir
from semsr.eval.metrics.base import Metric, as_rgb

PROMPTS = ("Good photo.", "Bad photo.")
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def find_clip_folder(weights_dir: str | Path | None = None) -> Path:
    """First sub-folder ``clip*`` of the weights folder holding a CLIP ``config.json``."""
    root = resolve_weights_dir(weights_dir)
    candidates = sorted(p for p in root.glob("clip*") if (p / "config.json").is_file()) if root.is_dir() else []
    for folder in candidates:
        try:
            if json.loads((folder / "config.json").read_text()).get("model_type") == "clip":
                return folder
        except (OSError, ValueError):
            continue
    raise UnavailableError(
        "clipiqa: no CLIP model folder found: save a transformers CLIPModel (with its tokenizer) as "
        "<weights>/clip or pass clip_path=",
        root,
    )


def _image_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = folder / "preprocessor_config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
            return tuple(data["image_mean"]), tuple(data["image_std"])
        except (OSError, ValueError, KeyError):
            pass
    return _OPENAI_MEAN, _OPENAI_STD


def _embedding(out: object) -> torch.Tensor:
    """transformers 4.x returns a tensor from ``get_*_features``, 5.x an output with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


class CLIPIQA(Metric):
    """CLIP-IQA probability of "Good photo." (higher is better); no reference needed.

    Args:
        clip_path: local CLIP folder (default: :func:`find_clip_folder`).
        weights_dir: weights folder searched when ``clip_path`` is not given.
        prompts: the (positive, negative) prompt pair.
        device: torch device.
    """

    name = "clipiqa"
    higher_better = True
    needs_gt = False
    kind = "deep"
    summary = "CLIP-IQA prompt pair on a local CLIP"

    def __init__(
        self,
        clip_path: str | Path | None = None,
        weights_dir: str | Path | None = None,
        prompts: tuple[str, str] = PROMPTS,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel  # optional heavy dependency, loaded on first use

        folder = Path(clip_path) if clip_path else find_clip_folder(weights_dir)
        try:
            self.model = strict_from_pretrained(CLIPModel, folder, what="CLIP model")
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise UnavailableError(f"cannot load a CLIP model and tokenizer ({err})", folder) from None
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        mean, std = _image_stats(folder)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.patch = int(self.model.config.vision_config.patch_size)
        with torch.inference_mode():
            tokens = tokenizer(list(prompts), padding=True, return_tensors="pt").to(self.device)
            text = _embedding(self.model.get_text_features(**tokens))
        self.text = F.normalize(text.float(), dim=-1)

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        x = as_rgb(pred).to(self.device, torch.float32)
        if min(x.shape[-2:]) < self.patch:
            x = F.interpolate(x, size=(max(self.patch, x.shape[-2]), max(self.patch, x.shape[-1])), mode="bicubic")
        x = (x - self.mean) / self.std
        img = _embedding(self.model.get_image_features(pixel_values=x, interpolate_pos_encoding=True))
        img = F.normalize(img.float(), dim=-1)
        logits = self.model.logit_scale.exp().float() * img @ self.text.T
        return logits.softmax(dim=-1)[0, 0].item()
