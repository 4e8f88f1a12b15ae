"""Tokenizer training of MMSR's spatial modalities: ``task: edge-vq`` (:class:`~semsr.models.vq.EdgeVQ`),
``depth-vq`` (:class:`~semsr.models.vq.DepthVQ`) and ``seg-vq`` (:class:`~semsr.models.vq.SegVQ`).

``depth-vq`` / ``seg-vq`` are the edge task below with the maps of one local transformers model
(``model.options.model``: a depth or segmentation folder; ``tiny://depth`` / ``tiny://seg``) instead of
``model.options.modalities``; segmentation maps keep their 3 palette channels (classes of equal grey
stay apart). Configs: ``configs/depth-vq.yaml``, ``configs/depth-vq-tiny.yaml``, ``configs/seg-vq.yaml``,
``configs/seg-vq-tiny.yaml``. The edge task:

Run by the one trainer: ``semsr train --config configs/edge-vq.yaml`` (or
``configs/edge-vq-tiny.yaml``, seconds on the tiny data). Per micro-batch
(HR crops from the trainer's loader, one seed per sample)::

    per sample, with its generator:  modality = random choice of model.options.modalities
        HR crop --MATLAB bicubic x lr_scale--> LR-like image --canny|hed provider--> map (1, 1, h, w)
        random square crop (side in [crop_min, min(h, w)]), random rot90 / flip --> resized to 128x128
    EdgeVQ(maps) -> recon logits, ids, commitment loss       (the codebook follows its EMA, see CodebookEMA)
    losses: vq_bce (BCE of the logits against the soft map) + vq_commit (commitment), weights in ``losses:``

The maps are taken from the downscaled image because the priors of an SR
model come from its low-resolution input. The LR of the batch (its
degradation) is not used: set ``degradation: {type: bicubic}``.

``model.options``:
    ``modalities``: edge providers (default ``[canny, hed]``);
    ``lr_scale``: downscale factor before the maps are extracted (0.5);
    ``crop_min``: smallest random crop side of a map (64; the map's short side when smaller);
    ``vq``: :class:`~semsr.models.vq.EdgeVQ` arguments (``channels``, ``codebook_size``...);
    ``init``: an EdgeVQ folder to continue from (its codebook EMA restarts from the codebook).

Trainable: the whole tokenizer; its codebook is a buffer updated by the EMA
(the EMA statistics are training state in the trainer's checkpoints, not part
of the exported tokenizer). Export: an EdgeVQ component folder (``config.json``
+ weights, loadable with ``--vq``) and ``report.json``: held-out scores
(:func:`evaluate`) on the validation images (``data.val_count``, whole images,
maps resized to the tokenizer's input size). There is no SR validation: keep ``validation.every: 0``.

The shipped tokenizer (``assets/weights/vq-edges``) was trained before this
task existed, by a stand-alone loop over a bank of whole-image maps (its
settings and scores are in ``vq-edges/report.json``): 975 steps of batch 16,
Adam with warm-up and cosine decay, BSDS500 training images at half size,
Canny + HED maps. ``configs/edge-vq.yaml`` is the same recipe on this trainer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import load_component
from semsr.core.errors import SemsrError
from semsr.core.io import atomic_write_bytes
from semsr.models.vq import CodebookEMA, DepthVQ, EdgeVQ, SegVQ, prepare_maps
from semsr.ops.imresize import imresize
from semsr.priors.base import PriorProvider, cached, get_provider
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.data import list_images, load_image, to_tensor
from semsr.train.losses import register_loss
from semsr.train.tasks import Task, per_sample_generators, register_task

EDGE_MODALITIES = ("canny", "hed")


class EdgeVQTraining(nn.Module):
    """The trainable module of ``edge-vq``: the tokenizer plus its codebook's EMA state.

    ``forward(maps, seed)`` is the training call of :meth:`EdgeVQ.forward` with
    the EMA update (``seed`` drives codebook initialisation and dead-code restarts).
    """

    def __init__(self, vq: EdgeVQ, *, fresh: bool) -> None:
        super().__init__()
        self.vq = vq
        self.ema: CodebookEMA = vq.new_ema(fresh=fresh)

    def forward(self, maps: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepared maps ``(B, 1, S, S)`` -> ``(logits (B, 1, S, S), ids (B, 16, 16), commitment)``."""
        generator = torch.Generator().manual_seed(int(seed))
        return self.vq(maps, self.ema if self.training else None, generator)


def edge_map(image: torch.Tensor, provider: PriorProvider, lr_scale: float, channels: int = 1) -> torch.Tensor:
    """The map ``(1, channels, h, w)`` of ``image`` ``(1, 3, H, W)`` in [0, 1] downscaled by ``lr_scale``
    (``channels`` 1: grey; 3: the provider's RGB map as it is, e.g. a segmentation palette)."""
    image = image.float().cpu().clamp(0, 1)
    if lr_scale != 1.0:
        image = imresize(image, scale=lr_scale).clamp(0, 1)
    value = provider(image).value
    assert isinstance(value, torch.Tensor)
    value = value.float()
    if channels == 1:
        return value.mean(1, keepdim=True)
    return value if value.shape[1] == channels else value.expand(-1, channels, -1, -1)


def random_view(edges: torch.Tensor, size: int, crop_min: int, gen: torch.Generator) -> torch.Tensor:
    """A random square crop of ``edges`` ``(1, C, h, w)``, rotated/flipped, resized: ``(1, C, size, size)``.

    Draws from ``gen``: crop side, top, left, quarter turns, flip.
    """
    h, w = edges.shape[-2:]
    short = min(h, w)
    side = int(torch.randint(min(crop_min, short), short + 1, (1,), generator=gen))
    y = int(torch.randint(0, h - side + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - side + 1, (1,), generator=gen))
    crop = edges[..., y : y + side, x : x + side]
    crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=gen)), dims=(-2, -1))
    if bool(torch.randint(2, (1,), generator=gen)):
        crop = crop.flip(-1)
    return prepare_maps(crop, size, crop.shape[1])


@register_loss("vq_bce")
def vq_bce(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Binary cross-entropy of the decoded ``logits`` against the soft ``maps`` (both ``(B, 1, S, S)``)."""
    return F.binary_cross_entropy_with_logits(outputs["logits"].float(), outputs["maps"].float())


@register_loss("vq_commit")
def vq_commit(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The quantiser's commitment loss (pulls encoder outputs towards their codes)."""
    return outputs["commit"].float()


# ------------------------------------------------------------------ evaluation


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a, b, reduction="none").flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _iou(a: torch.Tensor, b: torch.Tensor, threshold: float) -> float:
    pa, pb = a >= threshold, b >= threshold
    inter = (pa & pb).flatten(1).sum(1).float()
    union = (pa | pb).flatten(1).sum(1).float()
    return float(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean())


def _tolerant_iou(a: torch.Tensor, b: torch.Tensor, threshold: float) -> float:
    """IoU where a pixel counts as matched if the other map has an edge within 1 px (3x3)."""
    pa, pb = (a >= threshold).float(), (b >= threshold).float()
    da, db = F.max_pool2d(pa, 3, 1, 1) > 0, F.max_pool2d(pb, 3, 1, 1) > 0
    pa, pb = pa > 0, pb > 0
    matched = (pa & db).flatten(1).sum(1).float() + (pb & da).flatten(1).sum(1).float()
    total = pa.flatten(1).sum(1).float() + pb.flatten(1).sum(1).float()
    return float(torch.where(total > 0, matched / total.clamp_min(1), torch.ones_like(total)).mean())


def map_scores(recon: torch.Tensor, target: torch.Tensor, threshold: float = 0.3) -> dict[str, float]:
    """PSNR, IoU and 1-px-tolerant IoU (F-measure-like) of maps ``(N, 1, S, S)`` in [0, 1]."""
    return {
        "psnr": _psnr(recon, target),
        "iou": _iou(recon, target, threshold),
        "iou_tol1": _tolerant_iou(recon, target, threshold),
    }


@torch.no_grad()
def evaluate(model: EdgeVQ, maps: torch.Tensor) -> dict[str, dict[str, float]]:
    """Scores of the tokenizer and of two token-free baselines on ``maps`` ``(N, 1, S, S)``.

    Baselines: each map's own mean (the best constant map) and a ``grid x grid``
    average-pooled map upsampled bilinearly (a continuous code, strong for
    PSNR). IoU thresholds the maps at 0.3 (Canny maps are binary at full
    resolution but soft after resizing; HED maps are soft). ``encode`` and
    ``decode`` do not depend on the module's training mode.
    """
    recon = torch.cat([model.decode(model.encode(maps[i : i + 32])) for i in range(0, len(maps), 32)])
    g = model.grid
    pooled = F.interpolate(F.adaptive_avg_pool2d(maps, g), size=maps.shape[-2:], mode="bilinear", align_corners=False)
    own_mean = maps.mean(dim=(1, 2, 3), keepdim=True).expand_as(maps)
    used = torch.cat([model.encode(maps[i : i + 32]).flatten() for i in range(0, len(maps), 32)]).unique().numel()
    return {
        "vq": {**map_scores(recon, maps), "codes_used": used},
        "baseline_own_mean": map_scores(own_mean, maps),
        "baseline_pool16_bilinear": map_scores(pooled, maps),
    }


# ------------------------------------------------------------------ task


@register_task("edge-vq")
class EdgeVQTask(Task):
    """See the module docstring. :class:`DepthVQTask` and :class:`SegVQTask` are the same task on
    depth and segmentation maps (class attributes below)."""

    #: The tokenizer class trained and the map channels it reads.
    VQ_CLASS: type[EdgeVQ] = EdgeVQ
    CHANNELS = 1
    OPTIONS = {"modalities", "lr_scale", "crop_min", "vq", "init"}

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        opts = dict(cfg.model.options)
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for {cfg.task}: {sorted(unknown)} (known: {sorted(self.OPTIONS)})")
        self.modalities, self.providers = self.map_providers(opts)  # uncached: every crop is new
        self.lr_scale = float(opts.get("lr_scale", 0.5))
        self.crop_min = int(opts.get("crop_min", 64))
        if not 0.0 < self.lr_scale <= 1.0 or self.crop_min < 1:
            raise SemsrError("model.options.lr_scale must be in (0, 1] and crop_min >= 1")
        if opts.get("init"):
            if opts.get("vq"):
                raise SemsrError("model.options.vq and init exclude each other (init brings its architecture)")
            vq = load_component(self.VQ_CLASS, resolve_model_path(str(opts["init"])))
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                try:
                    vq = self.VQ_CLASS(**{"in_channels": self.CHANNELS, **dict(opts.get("vq") or {})})
                except (TypeError, ValueError) as err:
                    raise SemsrError(f"model.options.vq: {err}") from None
        if int(vq.in_channels) != self.CHANNELS:
            raise SemsrError(f"model.options.vq: {cfg.task} maps have {self.CHANNELS} channels, not {vq.in_channels}")
        self.trainable = EdgeVQTraining(vq.float(), fresh=not opts.get("init")).train().requires_grad_(True)
        self.device = torch.device("cpu")

    def map_providers(self, opts: Mapping[str, Any]) -> tuple[tuple[str, ...], list[PriorProvider]]:
        """``(names, providers)`` of the maps: ``model.options.modalities`` of :data:`EDGE_MODALITIES`."""
        names = tuple(opts.get("modalities") or EDGE_MODALITIES)
        bad = [m for m in names if m not in EDGE_MODALITIES]
        if bad:
            raise SemsrError(f"model.options.modalities: unknown {bad}; known: {list(EDGE_MODALITIES)}")
        return names, [get_provider(m) for m in names]

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Nothing is frozen; maps are computed on the CPU and moved to ``device``."""
        self.device = device

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``logits`` / ``maps`` ``(B, C, S, S)`` and ``commit`` for the HR crops of ``batch``.

        Per-sample draws, in order: the modality, then :func:`random_view`'s; then one
        draw of the first sample seeds the codebook's random picks.
        """
        gens = per_sample_generators(batch["seed"])
        size = int(self.trainable.vq.image_size)
        views = []
        for image, gen in zip(batch["hr"], gens, strict=True):
            provider = self.providers[int(torch.randint(len(self.providers), (1,), generator=gen))]
            value = edge_map(image[None], provider, self.lr_scale, self.CHANNELS)
            views.append(random_view(value, size, self.crop_min, gen))
        maps = torch.cat(views).to(self.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=gens[0]))
        logits, _, commit = model(maps, seed)
        return {"logits": logits, "maps": maps, "commit": commit}

    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        raise SemsrError(
            f"task {self.cfg.task} has no SR validation: set validation.every: 0 (export writes held-out scores to report.json)"
        )

    def heldout_maps(self) -> tuple[list[str], torch.Tensor]:
        """Names and maps ``(N, C, S, S)`` of the validation images (whole images, every modality)."""
        _, val_items = list_images(self.cfg.data, self.cfg.data.crop_size)
        size = int(self.trainable.vq.image_size)
        providers = [cached(p) for p in self.providers]  # the same images at every export
        maps = [
            prepare_maps(
                edge_map(to_tensor(load_image(item.path))[None], p, self.lr_scale, self.CHANNELS), size, self.CHANNELS
            )
            for item in val_items
            for p in providers
        ]
        empty = torch.zeros(0, self.CHANNELS, size, size)
        return [item.path.name for item in val_items], torch.cat(maps) if maps else empty

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the tokenizer component folder and ``report.json`` (held-out scores, when there are held-out images)."""
        vq = copy.deepcopy(model.vq).float().cpu().eval()
        folder = Path(folder)
        vq.save_pretrained(folder, safe_serialization=True)
        names, maps = self.heldout_maps() if self.cfg.data.val_count else ([], None)
        report: dict[str, Any] = {
            "task": self.cfg.task,
            "modalities": list(self.modalities),
            "lr_scale": self.lr_scale,
            "heldout_images": names,
            "map_size": vq.image_size,
        }
        if maps is not None and len(maps):
            report["scores_heldout"] = evaluate(vq, maps)
        report["config"] = self.cfg.to_dict()
        atomic_write_bytes(folder / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())


class _ModelMapVQTask(EdgeVQTask):
    """Tokenizer training on the maps of one local transformers model (``model.options.model``)."""

    PROVIDER = ""
    OPTIONS = {"model", "lr_scale", "crop_min", "vq", "init"}

    def map_providers(self, opts: Mapping[str, Any]) -> tuple[tuple[str, ...], list[PriorProvider]]:
        """``((name,), [provider])``: the :attr:`PROVIDER` prior on ``model.options.model``."""
        if not opts.get("model"):
            raise SemsrError(
                f"task {self.cfg.task} needs model.options.model: a local transformers {self.PROVIDER} folder"
            )
        return (self.PROVIDER,), [get_provider(self.PROVIDER, model=resolve_model_path(str(opts["model"])))]


@register_task("depth-vq")
class DepthVQTask(_ModelMapVQTask):
    """``task: depth-vq``: a :class:`~semsr.models.vq.DepthVQ` on the depth maps (1 channel, near = bright) of
    ``model.options.model`` (a Depth-Anything / DPT folder), taken from the downscaled HR crops as for edges."""

    VQ_CLASS = DepthVQ
    PROVIDER = "depth"


@register_task("seg-vq")
class SegVQTask(_ModelMapVQTask):
    """``task: seg-vq``: a :class:`~semsr.models.vq.SegVQ` on the colour-palette segmentation maps (3 channels)
    of ``model.options.model`` (a SegFormer / Mask2Former folder)."""

    VQ_CLASS = SegVQ
    CHANNELS = 3
    PROVIDER = "seg"
