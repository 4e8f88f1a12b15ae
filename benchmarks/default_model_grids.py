"""Side-by-side crops at 100 % for the default model's card: default | realesrgan-x4plus | ground truth.

Flat regions (sky, water, skin, walls) and textures (foliage, fabric, wood, text), each from a benchmark
image degraded exactly as ``semsr bench --degradation realesrgan`` does (same LR cache, seed 0), upscaled
by both methods on the whole LR image and cropped afterwards. Writes two PNGs (``flat.png``,
``textures.png``) with one row per crop, labelled with the image, the crop box and the crop's noise_sigma /
GMSD; lossless PNG (under 0.5 MB each).

    python benchmarks/default_model_grids.py --photos PHOTOS39 --out docs/img/default-model/grids

``--photos`` is the folder written by ``benchmarks/photo_testset.py``; B100, Urban100 and Set14 come from
the data root (``SEMSR_DATA`` or ``--data-root``). Crops whose box is ``None`` are chosen automatically on
the ground truth: the flattest (``flat``) or busiest (``texture``) window by mean gradient magnitude.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semsr.eval.datasets import resolve_dataset
from semsr.eval.images import crop_to_multiple
from semsr.eval.lrsets import load_lr, load_source, prepare
from semsr.eval.metrics import get_metric
from semsr.eval.report import make_grid
from semsr.methods import build as build_method

CROP = 160
# (figure, label, dataset, image file, kind, box (x, y) in HR pixels or None = automatic)
CROPS: list[tuple[str, str, str, str, str, tuple[int, int] | None]] = [
    ("flat", "sky", "photos39", "Storm_c.png", "flat", None),
    ("flat", "water", "photos39", "Aqua_c.png", "flat", None),
    ("flat", "skin", "B100", "157055.jpg", "flat", (90, 10)),
    ("flat", "walls", "Urban100", "img_009.png", "flat", None),
    ("textures", "foliage", "photos39", "GreenMeadow_c.png", "texture", None),
    ("textures", "fabric", "B100", "157055.jpg", "texture", (320, 160)),
    ("textures", "wood", "photos39", "Wood_c.png", "texture", None),
    ("textures", "text", "Set14", "ppt3.png", "texture", None),
]
METHODS = ("default", "realesrgan-x4plus")


def pick_box(gt: torch.Tensor, kind: str, size: int = CROP, stride: int = 16) -> tuple[int, int]:
    """Top-left ``(x, y)`` of the flattest / busiest ``size``-px window of ``gt (1, C, H, W)`` by mean luma
    gradient magnitude; flat windows must have a mean luma in [0.15, 0.85] (no clipped sky)."""
    y = gt[0].float().mean(0)
    g = (y[1:, :-1] - y[:-1, :-1]).abs() + (y[:-1, 1:] - y[:-1, :-1]).abs()
    best, box = None, (0, 0)
    for top in range(0, g.shape[0] - size, stride):
        for left in range(0, g.shape[1] - size, stride):
            e = float(g[top : top + size, left : left + size].mean())
            if kind == "flat":
                m = float(y[top : top + size, left : left + size].mean())
                if not 0.15 <= m <= 0.85:
                    continue
                e = -e
            if best is None or e > best:
                best, box = e, (left, top)
    return box


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=Path, required=True, help="folder of benchmarks/photo_testset.py")
    p.add_argument("--data-root", type=Path, default=None, help="data root (default: SEMSR_DATA)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    methods = {m: build_method(m, {"threads": args.threads}) for m in METHODS}
    noise, gmsd = get_metric("noise_sigma"), get_metric("gmsd")
    rows: dict[str, list[np.ndarray]] = {}
    for figure, label, name, image, kind, box in CROPS:
        spec = str(args.photos) if name == "photos39" else name
        dataset = resolve_dataset(spec, args.data_root)
        dataset = replace(dataset, files=tuple(f for f in dataset.files if f.name == image))
        item = prepare(dataset, "realesrgan", 4).images[0]
        lr = load_lr(item).float()
        gt = crop_to_multiple(load_source(item.gt_path), 4).float()
        x, y = box if box is not None else pick_box(gt, kind)
        tiles = []
        for m, pipe in methods.items():
            with torch.no_grad():
                sr = pipe(lr).images.float().clamp(0, 1)
            sr = (sr * 255).round() / 255
            c = sr[..., y : y + CROP, x : x + CROP]
            g = gt[..., y : y + CROP, x : x + CROP]
            tiles.append(([m, f"noise_sigma {noise(c, None):.2f}", f"GMSD {gmsd(c, g):.3f}"], c))
        tiles.append(
            (["ground truth", f"{label}: {Path(image).stem}", f"{name} @{x},{y}"], gt[..., y : y + CROP, x : x + CROP])
        )
        rows.setdefault(figure, []).append(make_grid(tiles, zoom=1))
        print(f"{figure}: {label} {name}/{image} box ({x}, {y})", flush=True)
    for figure, parts in rows.items():
        width = max(r.shape[1] for r in parts)
        pad = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in parts]
        img = Image.fromarray(np.concatenate(pad, 0))
        img.save(args.out / f"{figure}.png", optimize=True)  # lossless: quantising would hide or add grain
        print(args.out / f"{figure}.png", (args.out / f"{figure}.png").stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
