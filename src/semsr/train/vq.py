"""Edge tokenizer training (``task: edge-vq``): the :class:`~semsr.models.vq.EdgeVQ` of MMSR's spatial modalities.

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
from semsr.models.vq import CodebookEMA, EdgeVQ, prepare_maps
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


def edge_map(image: torch.Tensor, provider: PriorProvider, lr_scale: float) -> torch.Tensor:
    """The grey edge map ``(1, 1, h, w)`` of ``image`` ``(1, 3, H, W)`` in [0, 1] downscaled by ``lr_scale``."""
    image = image.float().cpu().clamp(0, 1)
    if lr_scale != 1.0:
        image = imresize(image, scale=lr_scale).clamp(0, 1)
    value = provider(image).value
    assert isinstance(value, torch.Tensor)
    return value.float().mean(1, keepdim=True)


def random_view(edges: torch.Tensor, size: int, crop_min: int, gen: torch.Generator) -> torch.Tensor:
    """A random square crop of ``edges`` ``(1, 1, h, w)``, rotated/flipped, resized: ``(1, 1, size, size)``.

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
    return prepare_maps(crop, size, 1)


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
    """See the module docstring."""

    OPTIONS = {"modalities", "lr_scale", "crop_min", "vq", "init"}

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        opts = dict(cfg.model.options)
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for edge-vq: {sorted(unknown)} (known: {sorted(self.OPTIONS)})")
        self.modalities = tuple(opts.get("modalities") or EDGE_MODALITIES)
        bad = [m for m in self.modalities if m not in EDGE_MODALITIES]
        if bad:
            raise SemsrError(f"model.options.modalities: unknown {bad}; known: {list(EDGE_MODALITIES)}")
        self.lr_scale = float(opts.get("lr_scale", 0.5))
        self.crop_min = int(opts.get("crop_min", 64))
        if not 0.0 < self.lr_scale <= 1.0 or self.crop_min < 1:
            raise SemsrError("model.options.lr_scale must be in (0, 1] and crop_min >= 1")
        self.providers = [get_provider(m) for m in self.modalities]  # uncached: every crop is new
        if opts.get("init"):
            if opts.get("vq"):
                raise SemsrError("model.options.vq and init exclude each other (init brings its architecture)")
            vq = load_component(EdgeVQ, resolve_model_path(str(opts["init"])))
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                try:
                    vq = EdgeVQ(**dict(opts.get("vq") or {}))
                except (TypeError, ValueError) as err:
                    raise SemsrError(f"model.options.vq: {err}") from None
        self.trainable = EdgeVQTraining(vq.float(), fresh=not opts.get("init")).train().requires_grad_(True)
        self.device = torch.device("cpu")

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Nothing is frozen; maps are computed on the CPU and moved to ``device``."""
        self.device = device

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``logits`` / ``maps`` ``(B, 1, S, S)`` and ``commit`` for the HR crops of ``batch``.

        Per-sample draws, in order: the modality, then :func:`random_view`'s; then one
        draw of the first sample seeds the codebook's random picks.
        """
        gens = per_sample_generators(batch["seed"])
        size = int(self.trainable.vq.image_size)
        views = []
        for image, gen in zip(batch["hr"], gens, strict=True):
            provider = self.providers[int(torch.randint(len(self.providers), (1,), generator=gen))]
            views.append(random_view(edge_map(image[None], provider, self.lr_scale), size, self.crop_min, gen))
        maps = torch.cat(views).to(self.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=gens[0]))
        logits, _, commit = model(maps, seed)
        return {"logits": logits, "maps": maps, "commit": commit}

    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        raise SemsrError(
            "task edge-vq has no SR validation: set validation.every: 0 (export writes held-out scores to report.json)"
        )

    def heldout_maps(self) -> tuple[list[str], torch.Tensor]:
        """Names and maps ``(N, 1, S, S)`` of the validation images (whole images, every modality)."""
        _, val_items = list_images(self.cfg.data, self.cfg.data.crop_size)
        size = int(self.trainable.vq.image_size)
        providers = [cached(p) for p in self.providers]  # the same images at every export
        maps = [
            prepare_maps(edge_map(to_tensor(load_image(item.path))[None], p, self.lr_scale), size, 1)
            for item in val_items
            for p in providers
        ]
        return [item.path.name for item in val_items], torch.cat(maps) if maps else torch.zeros(0, 1, size, size)

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the EdgeVQ component folder and ``report.json`` (held-out scores, when there are held-out images)."""
        vq = copy.deepcopy(model.vq).float().cpu().eval()
        folder = Path(folder)
        vq.save_pretrained(folder, safe_serialization=True)
        names, maps = self.heldout_maps() if self.cfg.data.val_count else ([], None)
        report: dict[str, Any] = {
            "task": "edge-vq",
            "modalities": list(self.modalities),
            "lr_scale": self.lr_scale,
            "heldout_images": names,
            "map_size": vq.image_size,
        }
        if maps is not None and len(maps):
            report["scores_heldout"] = evaluate(vq, maps)
        report["config"] = self.cfg.to_dict()
        atomic_write_bytes(folder / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
