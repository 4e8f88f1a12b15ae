"""``semsr degrade``: make Real-ESRGAN-degraded LR images from HR images, reproducibly.

Examples::

    semsr degrade -i $SEMSR_DATA/benchmarks/Set5 -o out --seed 0
    semsr degrade -i photo.png -o out --seed 3 --config my_degradation.yaml
    semsr degrade -i hr/ -o out --seed 0 --grid grid.png --grid-seeds 6

Each image gets its own seed ``image_seed(seed, file name)``, so its LR does
not depend on which other files are in the folder; the same ``--seed`` gives
byte-identical PNG files. ``--grid`` writes a PNG sheet showing, for several
seeds, the input and the image after each stage, for looking at what the
model makes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from semsr.core.errors import InputError, SemsrError
from semsr.core.io import IMAGE_EXTENSIONS, atomic_write, read_image
from semsr.data.degradations import DegradationConfig, DegradationParams, RealESRGANDegradation, image_seed
from semsr.data.degradations.pipeline import sample_params


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "degrade",
        help="degrade HR images with the Real-ESRGAN second-order model (seeded)",
        description="Write Real-ESRGAN-degraded LR images; the same --seed gives byte-identical files.",
    )
    p.add_argument("-i", "--input", required=True, help="HR image file or folder")
    p.add_argument("-o", "--output", required=True, help="output folder for the LR PNG files")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("-s", "--scale", type=int, default=None, help="downscale factor (default: config's, 4)")
    p.add_argument("--config", help="degradation YAML (nested, Real-ESRGAN flat names, or a Real-ESRGAN options file)")
    p.add_argument(
        "--no-sharpen",
        action="store_true",
        help="skip the unsharp masking Real-ESRGAN applies to its training GT before degrading",
    )
    p.add_argument("--params", metavar="JSON", help="also write every image's seed and sampled parameters here")
    p.add_argument("--grid", metavar="PNG", help="write a sample grid (seeds x stages) of the first/selected image")
    p.add_argument("--grid-seeds", type=int, default=4, help="rows of the sample grid (default 4)")
    p.add_argument("--grid-image", help="file name of the image to show in the grid (default: the first)")
    p.add_argument("--grid-tile", type=int, default=256, help="tile size of the grid in pixels (default 256)")
    p.set_defaults(func=run)


def list_images(path: Path) -> list[Path]:
    """The input file, or the image files of a folder (sorted, not recursive)."""
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_file():
        return [path]
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError("no images in folder", path)
    return files


def load_rgb(path: Path) -> torch.Tensor:
    """Read an image (EXIF orientation applied, alpha dropped) as ``(1, 3, H, W)`` float in [0, 1]."""
    pic = read_image(path)
    peak = 65535.0 if pic.rgb.dtype == np.uint16 else 255.0
    arr = torch.from_numpy(np.ascontiguousarray(pic.rgb).astype(np.float32) / peak)
    return arr.permute(2, 0, 1)[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8."""
    return (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_png(path: Path, arr: np.ndarray) -> None:
    """Write a uint8 image as PNG atomically (no metadata, so bytes depend only on pixels)."""
    with atomic_write(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def load_config(args: argparse.Namespace) -> DegradationConfig:
    cfg = DegradationConfig.from_yaml(args.config) if args.config else DegradationConfig()
    if args.scale is not None and args.scale < 1:
        raise SemsrError(f"--scale must be >= 1, got {args.scale}")
    changes = {}
    if args.scale is not None:
        changes["scale"] = args.scale
    if args.no_sharpen:
        changes["sharpen_input"] = False
    return DegradationConfig.from_dict({**cfg.to_dict(), **changes}) if changes else cfg


def _describe(p: DegradationParams) -> str:
    def stage(s) -> str:
        k = s.kernel.kind if s.kernel else "none"
        n = f"{s.noise_type[0]}{'g' if s.grey_noise else 'c'}{s.noise_level:.1f}"
        return f"{k},{s.resize_direction}{s.resize_factor:.2f},{n},q{s.jpeg_quality:.0f}"

    sinc = f"sinc{p.final_sinc.omega_c:.2f}" if p.final_sinc else "nosinc"
    return f"1:{stage(p.stage1)}  2:{stage(p.stage2)}  {sinc}"


def _tile(x: torch.Tensor, size: int) -> Image.Image:
    """Fit an image into a ``size x size`` tile (nearest when enlarging, to show pixels)."""
    im = Image.fromarray(to_uint8(x))
    f = size / max(im.size)
    new = (max(1, round(im.width * f)), max(1, round(im.height * f)))
    return im.resize(new, Image.NEAREST if f > 1 else Image.LANCZOS)


def sample_grid(deg: RealESRGANDegradation, hr: torch.Tensor, seeds: list[int], tile: int) -> Image.Image:
    """Rows = seeds, columns = input, after stage 1, after stage 2, LR."""
    cols = ("input", "stage1", "stage2", "lr")
    label_h = 14
    sheet = Image.new("RGB", (tile * len(cols), (tile + label_h) * len(seeds) + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(cols):
        draw.text((c * tile + 4, 1), name, fill="black")
    for r, seed in enumerate(seeds):
        params = sample_params(deg.config, seed)
        trace: dict[str, torch.Tensor] = {}
        deg.apply(hr, params, trace=trace)
        y = label_h + r * (tile + label_h)
        for c, name in enumerate(cols):
            sheet.paste(_tile(trace[name], tile), (c * tile, y))
        draw.text((4, y + tile), f"seed {seed}: {_describe(params)}", fill="black")
    return sheet


def run(args: argparse.Namespace) -> int:
    files = list_images(Path(args.input))
    stems = [f.stem for f in files]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise InputError(f"several inputs would write {clash[0]}.png; rename one", Path(args.input))
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SemsrError("output exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)
    deg = RealESRGANDegradation(load_config(args))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    records = {}
    for f in files:
        hr = load_rgb(f)
        if min(hr.shape[-2:]) < deg.scale:
            raise InputError(f"image smaller than the scale factor {deg.scale}", f)
        seed = image_seed(args.seed, f.name)
        lr, params = deg(hr, seed=[seed], return_params=True)
        write_png(out / f"{f.stem}.png", to_uint8(lr))
        records[f.name] = {"seed": seed, "params": params[0].to_dict()}
        print(f"{f.name} -> {out / (f.stem + '.png')}  {tuple(hr.shape[-2:])} -> {tuple(lr.shape[-2:])}")
    if args.params:
        payload = {"config": deg.config.to_dict(), "run_seed": args.seed, "images": records}
        with atomic_write(Path(args.params)) as tmp:
            tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    if args.grid:
        pick = files[0]
        if args.grid_image:
            matches = [f for f in files if f.name == args.grid_image]
            if not matches:
                raise InputError("--grid-image is not among the inputs", args.grid_image)
            pick = matches[0]
        if args.grid_seeds < 1:
            raise SemsrError(f"--grid-seeds must be >= 1, got {args.grid_seeds}")
        seeds = [image_seed(args.seed + j, pick.name) for j in range(args.grid_seeds)]
        sheet = sample_grid(deg, load_rgb(pick), seeds, args.grid_tile)
        write_png(Path(args.grid), np.asarray(sheet))
        print(f"grid of {pick.name} ({args.grid_seeds} seeds) -> {args.grid}")
    return 0
