"""Paired training data: K deterministic degraded LR images per HR image, written once and read as aligned crops.

``semsr data make-pairs`` (:func:`make_pairs`) degrades every HR image of a folder (or corpus manifest)
``K`` times with the recipe's degradation (Real-ESRGAN second order or bicubic) and writes::

    OUT/lr/<stem>-<key8>_k<k>.png     # LR of HR image <stem> (content key <key8>), variant k, 8-bit PNG
    OUT/pairs.jsonl                   # one record per LR file (see PairRecord), sorted

Each LR image is a pure function of ``(seed, HR content, k)``: re-running writes byte-identical
files, and a killed run is resumed by running it again (finished LR files are kept; each file is
written atomically, the manifest last). The HR image is cut to a multiple of the scale (top-left
kept) before it is degraded, so LR pixel ``(i, j)`` covers HR pixels ``(s*i .. s*i+s-1, s*j .. s*j+s-1)``.

Training reads the pairs instead of degrading on the fly when a config sets ``data.pairs: OUT``
(:class:`PairedCropDataset`): a position picks an HR image (the same seeded permutation as
:class:`~semsr.train.data.CropDataset`), one of its K LR variants and an aligned crop.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from semsr.core.errors import SemsrError
from semsr.core.io import atomic_write, atomic_write_bytes
from semsr.core.paths import data_root
from semsr.data.corpus.crops import sample_crop_boxes
from semsr.train.config import DataConfig
from semsr.train.data import CropDataset, Degrader, ImageItem, derive_seed, expand_path, load_image, to_tensor

MANIFEST = "pairs.jsonl"


@dataclass(frozen=True)
class PairRecord:
    """One LR file of a pairs folder.

    Attributes:
        hr: the HR image (``{data}/...`` when it lies under the data root, else as given).
        lr: the LR file, relative to the pairs folder.
        k: variant index (0 .. K-1).
        seed: the degradation seed of this variant.
        key: content hash (SHA-1 hex) of the HR file.
        scale: downscale factor; the LR is ``(H // s, W // s)`` of the HR.
        degradation: the degradation type (``realesrgan`` or ``bicubic``).
    """

    hr: str
    lr: str
    k: int
    seed: int
    key: str
    scale: int
    degradation: str


def _portable(path: Path) -> str:
    """``path`` as ``{data}/...`` when it lies under the data root (manifests stay valid on other machines)."""
    root = data_root()
    if root is not None:
        try:
            return "{data}/" + path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def _png_bytes(lr: torch.Tensor) -> bytes:
    """``(3, h, w)`` float in [0, 1] -> 8-bit RGB PNG bytes."""
    arr = lr.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_pairs(
    hr_files: Iterable[Path],
    out: Path,
    *,
    degrade: Degrader,
    degradation: str,
    scale: int,
    per_image: int,
    seed: int = 0,
    log: Callable[[str], Any] = print,
) -> dict[str, int]:
    """Write ``per_image`` degraded LR images per HR file into ``out`` and the manifest (see module docstring).

    Returns:
        counts: ``written``, ``kept`` (already there from an earlier run), ``images``, ``failed``.
    """
    if per_image < 1:
        raise SemsrError(f"--per-image must be >= 1, got {per_image}")
    (out / "lr").mkdir(parents=True, exist_ok=True)
    records: list[PairRecord] = []
    counts = {"written": 0, "kept": 0, "images": 0, "failed": 0}
    for path in sorted(hr_files):
        try:
            key = hashlib.sha1(path.read_bytes()).hexdigest()
            img = None
            for k in range(per_image):
                name = f"lr/{path.stem}-{key[:8]}_k{k}.png"
                variant_seed = derive_seed(seed, "pair", key, k)
                target = out / name
                if target.is_file():
                    counts["kept"] += 1
                else:
                    if img is None:
                        img = load_image(path)
                        h, w = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
                        if h == 0 or w == 0:
                            raise SemsrError(f"smaller than the scale {scale}", path)
                        hr = to_tensor(img[:h, :w])
                    lr = degrade(hr[None], variant_seed)[0].float()
                    atomic_write_bytes(target, _png_bytes(lr))
                    counts["written"] += 1
                records.append(PairRecord(_portable(path), name, k, variant_seed, key, scale, degradation))
            counts["images"] += 1
        except SemsrError as err:
            counts["failed"] += 1
            log(f"skipped: {err}")
        except OSError as err:
            counts["failed"] += 1
            log(f"skipped: {path}: {err.strerror or err}")
    text = "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records)
    with atomic_write(out / MANIFEST) as tmp:
        tmp.write_text(text)
    return counts


def read_pairs(folder: str | Path) -> dict[Path, list[Path]]:
    """``{HR file: [LR files]}`` of a pairs folder (its ``pairs.jsonl``), HR files sorted by path.

    Raises:
        SemsrError: no manifest, a bad line, or a listed file that is missing (one line naming it).
    """
    folder = expand_path(str(folder))
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise SemsrError("no pairs manifest (make it with: semsr data make-pairs)", manifest)
    pairs: dict[Path, list[Path]] = {}
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = PairRecord(**json.loads(line))
        except (ValueError, TypeError) as err:
            raise SemsrError(f"line {n}: not a pair record ({err})", manifest) from None
        hr, lr = expand_path(rec.hr), folder / rec.lr
        for f in (hr, lr):
            if not f.is_file():
                raise SemsrError(f"line {n}: file listed in {MANIFEST} is missing", f)
        pairs.setdefault(hr, []).append(lr)
    if not pairs:
        raise SemsrError("the pairs manifest lists no images", manifest)
    return dict(sorted(pairs.items(), key=lambda kv: str(kv[0])))


def split_pairs(pairs: dict[Path, list[Path]], cfg: DataConfig) -> tuple[list[ImageItem], list[ImageItem]]:
    """``(train, validation)`` HR items of a pairs folder: the last ``cfg.val_count`` are held out, ``cfg.limit`` caps training."""
    items = [ImageItem(p) for p in pairs]
    if len(items) <= cfg.val_count:
        raise SemsrError(f"only {len(items)} paired HR images; need more than data.val_count={cfg.val_count}")
    train, val = items[: len(items) - cfg.val_count], items[len(items) - cfg.val_count :]
    return (train[: cfg.limit] if cfg.limit else train), val


class PairedCropDataset(CropDataset):
    """:class:`~semsr.train.data.CropDataset` over precomputed pairs: ``dataset[p]`` is an aligned crop of one pair.

    Position ``p`` picks the HR image (seeded permutation per epoch), the LR variant
    (``derive_seed(seed, "variant", p) % K``) and an LR window of ``crop_size // scale`` (flat windows
    redrawn as in training on the fly); the HR crop is the same window times ``scale``. Items are
    the dicts of :class:`~semsr.train.data.CropDataset` (``hr (3, crop, crop)``, ``lr (3, crop/s, crop/s)``,
    ``prompt``, ``seed``, ``position``) plus ``lr_path`` (the LR file) and ``box`` (``(3,)``: the HR crop's
    top and left and whether it is mirrored), by which training reads cached priors of the crop.
    """

    def __init__(self, items: list[ImageItem], pairs: dict[Path, list[Path]], cfg: DataConfig, seed: int) -> None:
        super().__init__(items, cfg, lambda hr, s: hr, seed)
        self.pairs = pairs

    def pair_at(self, position: int) -> tuple[ImageItem, Path]:
        """The HR item and LR file of a position."""
        item = self.items[self.index_at(position)]
        variants = self.pairs[item.path]
        return item, variants[derive_seed(self.seed, "variant", position) % len(variants)]

    def __getitem__(self, position: int) -> dict[str, Any]:
        item, lr_path = self.pair_at(position)
        hr_img, lr_img = self._image(item.path), self._image(lr_path)
        s, size = self.cfg.scale, self.cfg.crop_size
        if size % s:
            raise SemsrError(f"data.crop_size {size} is not a multiple of data.scale {s}")
        if (lr_img.shape[0], lr_img.shape[1]) != (hr_img.shape[0] // s, hr_img.shape[1] // s):
            raise SemsrError(
                f"LR is {lr_img.shape[1]}x{lr_img.shape[0]}, expected 1/{s} of its HR "
                f"({hr_img.shape[1]}x{hr_img.shape[0]}); was it made with another --scale?",
                lr_path,
            )
        c = size // s
        rng = np.random.default_rng(derive_seed(self.seed, "crop", position))
        ((top, left),) = sample_crop_boxes(lr_img, c, 1, rng, self.cfg.min_texture, self.cfg.max_crop_tries)
        lr = lr_img[top : top + c, left : left + c]
        hr = hr_img[top * s : top * s + size, left * s : left * s + size]
        flip = self.cfg.hflip and rng.uniform() < 0.5
        if flip:
            lr, hr = lr[:, ::-1], hr[:, ::-1]
        return {
            "hr": to_tensor(hr),
            "lr": to_tensor(lr),
            "prompt": item.caption if item.caption is not None else self.cfg.prompt,
            "seed": torch.tensor(derive_seed(self.seed, "task", position), dtype=torch.int64),
            "position": torch.tensor(position, dtype=torch.int64),
            "path": str(item.path),
            "lr_path": str(lr_path),
            "box": torch.tensor([top * s, left * s, int(flip)], dtype=torch.int64),  # HR crop top, left, mirrored
        }


def paired_validation(
    items: list[ImageItem], pairs: dict[Path, list[Path]], size: int, scale: int, multiple: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed ``(hr (3, S, S), lr (3, S/s, S/s))`` centre crops of the first LR variant of each held-out image.

    ``S = min(size, H, W)`` rounded down to a multiple of ``multiple`` (a multiple of ``scale``).
    """
    out = []
    for item in items:
        hr_img, lr_img = load_image(item.path), load_image(pairs[item.path][0])
        h, w = lr_img.shape[:2]
        side = (min(size, h * scale, w * scale) // multiple) * multiple
        c = side // scale
        if c == 0:
            continue
        top, left = (h - c) // 2, (w - c) // 2
        lr = to_tensor(lr_img[top : top + c, left : left + c])
        hr = to_tensor(hr_img[top * scale : top * scale + side, left * scale : left * scale + side])
        out.append((hr, lr))
    return out
