"""Train the shipped edge tokenizer (:class:`semsr.models.vq.EdgeVQ`) on CPU.

Data: the BSDS500 training images (``data_root()/train/bsds500``; never the
benchmark sets), sorted by name; the last ``holdout`` images are held out
for evaluation. Each image is downscaled with MATLAB bicubic by ``lr_scale``
(the priors of an SR model are taken from the low-resolution input), then
its Canny and HED maps are computed through the cached prior providers (a
second run reuses them). Training samples are random square crops (side
between ``crop_min`` and the short side) with random flips/rotations, resized
to 128x128. Loss: binary cross-entropy of the decoded logits against the soft
map + ``commitment`` x commitment loss; Adam with cosine learning-rate decay.

Evaluation (:func:`evaluate`) on the whole held-out maps resized to 128x128:
PSNR (maps in [0, 1]) and edge IoU (maps thresholded at 0.3, exact and with
1-px tolerance), for the tokenizer and for two baselines that send no tokens: the mean training
map (constant) and a 16x16 average-pooled map upsampled bilinearly (a
continuous 16x16 code, a strong baseline for PSNR).

Command (the shipped weights were made with it; its full report is
``assets/weights/vq_edges.report.json`` beside the config ``vq_edges.json``)::

    semsr train-vq --out src/semsr/assets/weights/vq_edges --steps 1000 --threads 1 --time-limit 2400

Shipped model (1.1 M parameters + codebook 1024 x 256, 5.5 MB fp32): 975 steps
of batch 16 (the time limit cut the last 25; 726 s of CPU time, 40 min wall on
a busy 2-core machine). Held-out scores (40 BSDS500 images, Canny + HED maps
of the half-size images, whole maps resized to 128x128; IoU at 0.3):

============  =========  =====  ==========  ========================
maps          tokenizer  PSNR   IoU (1 px)  baselines PSNR / IoU (1 px)
============  =========  =====  ==========  ========================
Canny + HED   VQ 16x16   20.90  0.920       mean map 12.31 / 0.00;
                                            16x16 avg-pool 16.88 / 0.48
Canny         VQ 16x16   18.33  0.849       16x16 avg-pool 16.52 / 0.02
HED           VQ 16x16   23.46  0.991       16x16 avg-pool 17.24 / 0.94
============  =========  =====  ==========  ========================

1008 of the 1024 codes are used on the held-out maps. Reconstructions keep
the layout of the contours; thin Canny lines come back as soft, slightly
wobbly strokes (about 1 px off), HED maps come back blurrier than the input.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from semsr.core.errors import InputError
from semsr.core.io import atomic_write
from semsr.models.vq import EdgeVQ, EdgeVQConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class VQTrainConfig:
    """Options of :func:`train_edge_vq` (defaults = the shipped model's run)."""

    data: Path | None = None
    out: Path = Path("vq_edges")
    modalities: tuple[str, ...] = ("canny", "hed")
    lr_scale: float = 0.5
    holdout: int = 40
    steps: int = 1000
    batch: int = 16
    lr: float = 2e-3
    crop_min: int = 64
    seed: int = 0
    threads: int = 1
    time_limit: float | None = None
    log_every: int = 50
    model: EdgeVQConfig = field(default_factory=EdgeVQConfig)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        raise InputError("training image folder not found", folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError("no images in the training folder", folder)
    return files


def build_map_bank(
    files: list[Path], modalities: tuple[str, ...], lr_scale: float,
    log: Callable[[str], None] = print,
) -> list[torch.Tensor]:
    """Modality maps of every image: a list of ``(1, 1, h, w)`` float maps in [0, 1].

    Maps come from the cached providers (``semsr.core.paths.cache_dir()/priors``).
    """
    from semsr.core.io import read_image
    from semsr.ops.imresize import imresize
    from semsr.priors.base import cached, get_provider, picture_tensor

    providers = [cached(get_provider(m)) for m in modalities]
    bank: list[torch.Tensor] = []
    t0 = time.time()
    for i, path in enumerate(files):
        image = picture_tensor(read_image(path))
        if lr_scale != 1.0:
            image = imresize(image, scale=lr_scale).clamp(0, 1)
        for prov in providers:
            value = prov(image).value
            assert isinstance(value, torch.Tensor)
            bank.append(value.float().mean(1, keepdim=True))
        if (i + 1) % 50 == 0 or i + 1 == len(files):
            log(f"maps: {i + 1}/{len(files)} images ({time.time() - t0:.0f} s)")
    return bank


def random_batch(bank: list[torch.Tensor], batch: int, size: int, crop_min: int, gen: torch.Generator) -> torch.Tensor:
    """Random square crops of random maps, flipped/rotated, resized: ``(batch, 1, size, size)``."""
    from semsr.models.vq import prepare_maps

    out = []
    for _ in range(batch):
        m = bank[int(torch.randint(len(bank), (1,), generator=gen))]
        h, w = m.shape[-2:]
        short = min(h, w)
        side = int(torch.randint(min(crop_min, short), short + 1, (1,), generator=gen))
        y = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = m[..., y:y + side, x:x + side]
        k = int(torch.randint(4, (1,), generator=gen))
        crop = torch.rot90(crop, k, dims=(-2, -1))
        if bool(torch.randint(2, (1,), generator=gen)):
            crop = crop.flip(-1)
        out.append(prepare_maps(crop, size, 1))
    return torch.cat(out)


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
def evaluate(model: EdgeVQ, maps: torch.Tensor, mean_map: torch.Tensor) -> dict[str, dict[str, float]]:
    """Scores of the tokenizer and of the two token-free baselines on ``maps`` ``(N, 1, S, S)``.

    IoU thresholds the maps at 0.3 (held-out Canny maps are binary at full
    resolution but soft after resizing to 128; HED maps are soft).
    """
    model.eval()
    recon = torch.cat([model.decode(model.encode(maps[i:i + 32])) for i in range(0, len(maps), 32)])
    g = model.config.grid
    pooled = F.interpolate(F.adaptive_avg_pool2d(maps, g), size=maps.shape[-2:], mode="bilinear",
                           align_corners=False)
    used = torch.cat([model.encode(maps[i:i + 32]).flatten() for i in range(0, len(maps), 32)]).unique().numel()
    return {
        "vq": {**map_scores(recon, maps), "codes_used": used},
        "baseline_mean_map": map_scores(mean_map.expand_as(maps), maps),
        "baseline_pool16_bilinear": map_scores(pooled, maps),
    }


def train_edge_vq(cfg: VQTrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate on the held-out maps, save ``cfg.out`` (.safetensors + .json) and a report.

    Returns the report (also written to ``<out>.report.json``).
    """
    from semsr.core.paths import data_root

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    folder = Path(cfg.data) if cfg.data is not None else (data_root() or Path("data")) / "train" / "bsds500"
    files = list_images(folder)
    if len(files) <= cfg.holdout:
        raise InputError(f"need more than {cfg.holdout} images (holdout) to train", folder)
    train_files, held_files = files[:-cfg.holdout], files[-cfg.holdout:]
    log(f"{len(train_files)} training images, {len(held_files)} held out, modalities {cfg.modalities}")
    train_bank = build_map_bank(train_files, cfg.modalities, cfg.lr_scale, log)
    held_bank = build_map_bank(held_files, cfg.modalities, cfg.lr_scale, log)

    size = cfg.model.image_size
    from semsr.models.vq import prepare_maps

    held = torch.cat([prepare_maps(m, size, 1) for m in held_bank])
    mean_map = torch.cat([prepare_maps(m, size, 1) for m in train_bank]).mean(0, keepdim=True)

    model = EdgeVQ(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, cpu0 = time.time(), time.process_time()
    step = 0
    running = 0.0
    for step in range(1, cfg.steps + 1):
        # Warm-up, then cosine decay over the run; with a time limit the decay follows whichever
        # of steps and time runs out first, so a run cut short still ends at a low learning rate.
        progress = step / cfg.steps
        if cfg.time_limit is not None:
            progress = max(progress, (time.time() - t0) / cfg.time_limit)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        model.train()
        x = random_batch(train_bank, cfg.batch, size, cfg.crop_min, gen)
        logits, _, commit = model(x)
        rec = F.binary_cross_entropy_with_logits(logits, x)
        loss = rec + cfg.model.commitment * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = 0.9 * running + 0.1 * rec.item() if step > 1 else rec.item()
        if step % cfg.log_every == 0:
            log(f"step {step}/{cfg.steps}  bce {running:.4f}  commit {commit.item():.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f} s")
        if progress >= 1.0 and step < cfg.steps:
            log(f"time limit reached after {step} steps")
            break
    train_seconds = time.time() - t0
    scores = evaluate(model, held, mean_map)
    out = model.save(cfg.out)
    cfg_dict = asdict(cfg)
    cfg_dict.update(data=str(folder), out=str(cfg.out), modalities=list(cfg.modalities))
    report = {
        "steps_done": step,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "train_images": len(train_files),
        "heldout_images": [p.name for p in held_files],
        "heldout_maps": len(held),
        "scores_heldout_128px": scores,
        "config": cfg_dict,
    }
    report_path = out.with_suffix(".report.json")
    with atomic_write(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(json.dumps(scores, indent=2))
    return report

