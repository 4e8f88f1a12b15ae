"""Tags prior: a RAM-style multi-label image tagger from a local ``transformers`` folder.

DaLPSR (like SeeSR/PASD) uses object tags from RAM to steer the semantic
prompt. Here a tagger is any ``AutoModelForImageClassification`` folder
(ViT, Swin, ConvNeXt... with its image processor) whose head is multi-label:
``config.problem_type == "multi_label_classification"`` and ``id2label`` the
tag vocabulary. Scores are ``sigmoid(logits)``; tags with score >=
``threshold`` are kept, highest first, at most ``top_k``. A single-label
classifier (softmax head) is accepted too when ``problem_type`` says so or is
unset — its softmax probabilities are thresholded the same way.

``"tags"`` results carry ``meta["scores"]`` (tag -> score, rounded).

A RAM folder (``ram_swin_large_14m.safetensors`` or ``.pth``, ``ram_tag_list.txt``, optionally
``ram_tag_list_threshold.txt`` and SeeSR's ``DAPE`` fine-tune) is accepted too and runs through
:mod:`semsr.models.ram`: RAM's per-tag thresholds apply unless ``threshold`` is given. RAM++ is not
supported (docs/dalpsr.md). DaLPSR's LR-robust fine-tuning of a tagger's image encoder is
the ``dalpsr-encoder`` training task (:mod:`semsr.train.dalpsr_encoder`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semsr.core.errors import UnavailableError
from semsr.core.fingerprint import fingerprint
from semsr.core.loading import strict_from_pretrained
from semsr.models.ram import RAM_BASE, load_ram_tagger, ram_preprocess
from semsr.priors.base import (
    DEVICE_OPTION,
    PriorResult,
    ProviderOption,
    ProviderSpec,
    check_image,
    model_folder,
    register_provider,
)

DEFAULT_THRESHOLD = 0.5
DEFAULT_TOP_K = 10
_REVISION = "1"

TAGGER_OPTION = ProviderOption("tagger", "--tagger", "local multi-label tagger folder (RAM-style)")
THRESHOLD_OPTION = ProviderOption(
    "tag_threshold", "--tag-threshold", f"tag score threshold (default {DEFAULT_THRESHOLD})", float
)
TOP_K_OPTION = ProviderOption("tag_top_k", "--tag-top-k", f"keep at most this many tags (default {DEFAULT_TOP_K})", int)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` float in [0, 1] -> RGB ``PIL.Image`` (the input of image processors)."""
    arr = (image[0].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def tagger_folder(path: str | Path | None) -> Path:
    """The tagger folder: ``path`` or ``weights_dir()/"tagger"``; raises if ``config.json`` is missing
    (naming recognize-anything ``.pth`` checkpoints, which are not a supported format, when given one)."""
    given = Path(path).expanduser() if path is not None else None
    if given is not None and is_ram_folder(given):
        return given
    if given is not None and not (given / "config.json").is_file():
        pth = sorted(given.glob("*.pth")) if given.is_dir() else ([given] if given.suffix == ".pth" else [])
        if pth:
            raise UnavailableError(
                f"{pth[0].name}: not a supported tagger format; pass a RAM folder (holding ram_swin_large_14m.pth "
                "or .safetensors and ram_tag_list.txt; RAM++ is not supported) or a transformers "
                "image-classification folder (docs/dalpsr.md, Tagger)",
                given,
            )
    return model_folder(
        path,
        "tagger",
        "no tagger folder (config.json missing); pass --tagger PATH to a "
        "multi-label image-classification model written by save_pretrained",
    )


def is_ram_folder(path: Path) -> bool:
    """Whether ``path`` is a RAM tagger folder (RAM's released weights as ``.safetensors`` or ``.pth``)."""
    return path.is_dir() and any((path / f"{RAM_BASE}{suffix}").is_file() for suffix in (".safetensors", ".pth"))


class TagsProvider:
    """Tags prior ``"tags"``: labels of a multi-label classifier above a threshold.

    Args:
        tagger: local model folder (default ``weights_dir()/"tagger"``).
        threshold: minimum score (default 0.5).
        top_k: keep at most this many tags (default 10; 0 = no limit).
        device: torch device.
    """

    name = "tags"
    kind = "tags"

    def __init__(
        self,
        tagger: str | Path | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        device: str = "cpu",
    ) -> None:
        from transformers import (  # heavy dependency: imported when a tagger is built
            AutoConfig,
            AutoImageProcessor,
            AutoModelForImageClassification,
        )

        self.path = tagger_folder(tagger)
        self.device = torch.device(device)
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        self.top_k = DEFAULT_TOP_K if top_k is None else int(top_k)
        self.ram = None
        if is_ram_folder(self.path):
            self.ram = load_ram_tagger(self.path)
            self.ram.model.to(self.device)
            self.labels = dict(enumerate(self.ram.tags))
            self.multi_label = True
            self.ram_thresholds = (
                self.ram.thresholds if threshold is None else torch.full_like(self.ram.thresholds, self.threshold)
            )
            self.version = f"{_REVISION};ram;{fingerprint([self.path])};th={threshold};k={self.top_k}"
            return
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        if type(config) not in AutoModelForImageClassification._model_mapping:
            raise UnavailableError(f"model type {config.model_type!r} is not an image-classification model", self.path)
        self.model = strict_from_pretrained(AutoModelForImageClassification, self.path, what="tagger").eval()
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True, backend="pil")
        except OSError as err:
            raise UnavailableError(f"no image processor config (preprocessor_config.json): {err}", self.path) from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.multi_label = config.problem_type != "single_label_classification"
        self.labels = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        self.top_k = DEFAULT_TOP_K if top_k is None else int(top_k)
        self.version = (
            f"{_REVISION};{fingerprint([self.path])};th={self.threshold:g};k={self.top_k};ml={int(self.multi_label)}"
        )

    @torch.no_grad()
    def scores(self, image: torch.Tensor) -> torch.Tensor:
        """Per-label scores ``(num_labels,)`` in [0, 1] for ``image`` ``(1, 3, H, W)`` in [0, 1]."""
        check_image(image)
        if self.ram is not None:
            x = ram_preprocess(image.to(self.device), self.ram.model.config.image_size)
            return torch.sigmoid(self.ram.model(x)[1][0].float().cpu())
        inputs = self.processor(images=to_pil(image), return_tensors="pt").to(self.device)
        logits = self.model(**inputs).logits[0].float().cpu()
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, 0)

    def __call__(self, image: torch.Tensor) -> PriorResult:
        scores = self.scores(image)
        order = torch.argsort(scores, descending=True).tolist()
        if self.ram is not None:  # RAM's rule: score above the tag's own threshold
            keep = [i for i in order if float(scores[i]) > float(self.ram_thresholds[i])]
        else:
            keep = [i for i in order if float(scores[i]) >= self.threshold]
        if self.top_k > 0:
            keep = keep[: self.top_k]
        tags = tuple(self.labels.get(i, str(i)) for i in keep)
        return PriorResult(
            "tags",
            tags,
            {"scores": {t: round(float(scores[i]), 4) for t, i in zip(tags, keep)}, "threshold": self.threshold},
        )


def _make(
    tagger: str | Path | None = None,
    tag_threshold: float | None = None,
    tag_top_k: int | None = None,
    device: str = "cpu",
) -> TagsProvider:
    return TagsProvider(tagger, threshold=tag_threshold, top_k=tag_top_k, device=device)


register_provider(
    ProviderSpec(
        name="tags",
        factory=_make,
        kind="tags",
        summary="object tags from a local multi-label classifier (RAM-style), threshold + top-k",
        options=(TAGGER_OPTION, THRESHOLD_OPTION, TOP_K_OPTION, DEVICE_OPTION),
    )
)
