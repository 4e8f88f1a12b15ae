"""DaLPSR's LR-robust image-encoder fine-tuning stage: task ``dalpsr-encoder`` of the shared trainer.

DaLPSR feeds the LR image to a *fine-tuned image encoder* before the tags
that steer the MLLM are read (the paper: "LR image -> fine-tuned image encoder
-> MLLM (via RAM tags)"); a tagger trained on clean photographs mislabels
degraded inputs. This stage fine-tunes the image encoder of a tagger folder
(:mod:`semsr.priors.tagger`: a ``transformers`` image-classification model)
so that on the degraded LR crop it sees what the frozen original sees on the
HR crop — teacher/student distillation on the trainer's (HR, LR) pairs, the LR
made by the config's degradation (``realesrgan``: the second-order pipeline of
the SR stage)::

    teacher = frozen copy of the tagger            student = the tagger, head frozen
    f_T, z_T = teacher(HR)                         f_S, z_S = student(LR)
    encoder_feature_mse = mean((f_S - f_T)^2)      (image-encoder output: the last hidden state)
    tag_distill_bce     = BCE(z_S, sigmoid(z_T))   (tag logits; multi-label heads)

Both images are resized to the processor's input size with its resampling
filter (antialiased) and normalised with its mean/std, as the processor does
at inference. The
paper does not spell out the objective of its encoder fine-tuning; the
feature + logit distillation follows the degradation-aware tagger of SeeSR
(DAPE), which the DaLPSR recipe's RAM-tag step mirrors (docs/dalpsr.md).

Trainable: the base model (``model.base_model``: the image encoder); the
classification head stays as loaded, so the tag vocabulary and its
calibration are kept. Export: ``final/tagger/`` written by ``save_pretrained``
(safetensors) with the image processor — a folder ``--tagger`` loads.
``model.options``: ``tagger`` (required; ``tiny://tagger`` is the tiny one),
``train_head`` (false). The task renders no images: ``validation.every: 0``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import SemsrError
from semsr.priors.tagger import tagger_folder
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.losses import _require, register_loss
from semsr.train.tasks import Task, register_task

#: The folder the task exports into ``final/`` (``--tagger RUN/final/tagger``).
EXPORT_NAME = "tagger"
#: PIL resampling filter ids of image processors -> ``F.interpolate`` modes (antialiased).
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


@register_loss("encoder_feature_mse")
def encoder_feature_mse(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """MSE between the student's encoder output on LR and the teacher's on HR (``feat_lr``, ``feat_hr``)."""
    _require(outputs, "encoder_feature_mse", "feat_lr", "feat_hr")
    return F.mse_loss(outputs["feat_lr"].float(), outputs["feat_hr"].float())


@register_loss("tag_distill_bce")
def tag_distill_bce(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """BCE of the student's tag logits on LR against the teacher's sigmoid scores on HR (``logits_lr``, ``logits_hr``)."""
    _require(outputs, "tag_distill_bce", "logits_lr", "logits_hr")
    return F.binary_cross_entropy_with_logits(outputs["logits_lr"].float(), torch.sigmoid(outputs["logits_hr"].float()))


class ProcessorInput(nn.Module):
    """Differentiable stand-in for the image processor: ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, H, W)``
    pixel values (antialiased resize to the processor's size with ``mode``, then ``(x - mean) / std``)."""

    def __init__(self, size: tuple[int, int], mean: list[float], std: list[float], mode: str = "bicubic") -> None:
        super().__init__()
        self.size = size
        self.mode = mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_processor(cls, processor: Any, folder: Path) -> ProcessorInput:
        """The input transform of a ``transformers`` image processor (``size`` as height/width or shortest edge)."""
        size = getattr(processor, "size", None) or {}
        if "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            hw = (int(size["shortest_edge"]), int(size["shortest_edge"]))
        else:
            raise SemsrError(f"{folder}: image processor size {size!r} is neither height/width nor shortest_edge")
        mean = list(getattr(processor, "image_mean", None) or [0.0, 0.0, 0.0])
        std = list(getattr(processor, "image_std", None) or [1.0, 1.0, 1.0])
        do_norm = bool(getattr(processor, "do_normalize", True))
        mode = _RESAMPLE_MODES.get(int(getattr(processor, "resample", 3) or 3), "bicubic")
        return cls(hw, mean if do_norm else [0.0] * 3, std if do_norm else [1.0] * 3, mode)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std


def encoder_and_logits(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder output, logits (B, num_labels))`` of an image-classification model on ``pixels``.

    The encoder output is the base model's first output (ViT/Swin: ``(B, N, D)`` tokens;
    ConvNeXt: ``(B, C, h, w)``); the logits come from the full model on the same pixels.
    """
    out = model(pixel_values=pixels, output_hidden_states=True)
    hidden = out.hidden_states
    if not hidden:
        raise SemsrError(f"{type(model).__name__} returns no hidden states")
    return hidden[-1], out.logits


class EncoderStudent(nn.Module):
    """The trainable tagger and its input transform; ``forward(lr)`` -> ``(features, logits)``."""

    def __init__(self, tagger: nn.Module, inputs: ProcessorInput) -> None:
        super().__init__()
        self.tagger = tagger
        self.inputs = inputs

    def forward(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``lr (B, 3, h, w)`` in [0, 1] -> (encoder output, logits ``(B, num_labels)``)."""
        return encoder_and_logits(self.tagger, self.inputs(lr))


@register_task("dalpsr-encoder")
class DaLPSREncoderTask(Task):
    """LR-robust tagger image encoder: student on LR distilled from the frozen tagger on HR (module docstring)."""

    name = "dalpsr-encoder"
    OPTIONS = frozenset({"tagger", "train_head"})

    def __init__(self, cfg: ExperimentConfig) -> None:
        from transformers import (  # heavy dependency: imported when the task is built
            AutoImageProcessor,
            AutoModelForImageClassification,
        )

        super().__init__(cfg)
        if cfg.validation.every:
            raise SemsrError(f"{cfg.task} renders no images: set validation.every: 0")
        opts = dict(cfg.model.options)
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for {cfg.task}: {sorted(unknown)} (known: {sorted(self.OPTIONS)})")
        if not opts.get("tagger"):
            raise SemsrError(f"{cfg.task} needs model.options.tagger (a tagger folder, see semsr.priors.tagger)")
        folder = tagger_folder(resolve_model_path(str(opts["tagger"])))
        self.folder = folder
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
        student = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        student.train().requires_grad_(False)
        student.base_model.requires_grad_(True)
        if opts.get("train_head", False):
            student.requires_grad_(True)
        self.trainable = EncoderStudent(student, ProcessorInput.from_processor(self.processor, folder)).float()
        self.teacher_inputs = ProcessorInput.from_processor(self.processor, folder)
        self.device = torch.device("cpu")

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device = device
        self.teacher.to(device)  # fp32: the targets of the distillation
        self.teacher_inputs.to(device)

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``feat_lr``/``feat_hr`` and ``logits_lr``/``logits_hr`` from ``batch["lr"]`` and ``batch["hr"]``."""
        with torch.no_grad():
            feat_hr, logits_hr = encoder_and_logits(self.teacher, self.teacher_inputs(batch["hr"].to(self.device)))
        feat_lr, logits_lr = model(batch["lr"].to(self.device))
        return {"feat_lr": feat_lr, "feat_hr": feat_hr, "logits_lr": logits_lr, "logits_hr": logits_hr}

    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        raise SemsrError(f"{self.cfg.task} renders no images (set validation.every: 0)")

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write ``folder/tagger/``: the fine-tuned tagger (safetensors) and its image processor."""
        out = Path(folder) / EXPORT_NAME
        model.tagger.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
