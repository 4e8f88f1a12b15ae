"""Random HR crops (512 by default) with flat-patch filtering.

Flat patches (clear sky, fog, walls, out-of-focus background) teach a
super-resolver nothing and dominate random crops of many photos, so crops
whose *texture score* — the mean absolute luma gradient in 0-255 units,
measured at a fixed analysis resolution (~128 px) so that grain does not count
— is below a threshold are rejected and redrawn.

- :func:`texture_score` scores a patch;
- :func:`sample_crop_boxes` draws ``count`` accepted ``(top, left)`` boxes;
- :class:`HRCropDataset` is a map-style torch dataset of crops over image files,
  reproducible from ``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

DEFAULT_CROP = 512
DEFAULT_MIN_TEXTURE = 1.0
ANALYSIS_SIZE = 128
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def texture_score(patch: np.ndarray, analysis_size: int = ANALYSIS_SIZE) -> float:
    """Mean absolute horizontal+vertical luma gradient (0-255 units) of a uint8 ``(H, W, 3)`` patch.

    The patch is first area-downscaled by the integer factor that brings its
    shorter side closest to ``analysis_size`` (no change for small patches), so
    the score measures structure at a fixed relative scale and sensor noise or
    JPEG grain of large photos does not count as texture. About 0.3-0.8 for
    fog, clear sky or out-of-focus background; 1.5-10 for content.
    """
    y = patch.astype(np.float32) @ _LUMA if patch.ndim == 3 else patch.astype(np.float32)
    f = max(1, min(y.shape) // analysis_size)
    if f > 1:
        h, w = (y.shape[0] // f) * f, (y.shape[1] // f) * f
        y = y[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    gx = np.abs(np.diff(y, axis=1)).mean() if y.shape[1] > 1 else 0.0
    gy = np.abs(np.diff(y, axis=0)).mean() if y.shape[0] > 1 else 0.0
    return float(0.5 * (gx + gy))


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad ``(H, W, C)`` at the bottom/right so both sides are >= ``size``."""
    h, w = image.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return image
    mode = "reflect" if ph < h and pw < w else "symmetric"
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)


def sample_crop_boxes(
    image: np.ndarray,
    size: int = DEFAULT_CROP,
    count: int = 1,
    rng: np.random.Generator | None = None,
    min_texture: float = DEFAULT_MIN_TEXTURE,
    max_tries: int = 20,
) -> list[tuple[int, int]]:
    """Draw ``count`` crop positions ``(top, left)`` of ``size x size`` from ``image``.

    Each position is redrawn up to ``max_tries`` times while its patch scores
    below ``min_texture``; if all tries fail the most textured candidate is
    kept, so the call always returns ``count`` boxes. ``image`` must be at least
    ``size`` on both sides (see :func:`pad_to`).
    """
    rng = rng or np.random.default_rng()
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop size {size}")
    boxes = []
    for _ in range(count):
        best, best_score = None, -1.0
        for _ in range(max(1, max_tries)):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            score = texture_score(image[top : top + size, left : left + size])
            if score > best_score:
                best, best_score = (top, left), score
            if score >= min_texture:
                break
        boxes.append(best)
    return boxes


def load_rgb_uint8(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 ``(H, W, 3)`` with EXIF orientation applied."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB")).copy()


class HRCropDataset(Dataset):
    """Random textured crops of HR image files.

    Item ``i`` is crop ``i % crops_per_image`` of image ``i // crops_per_image``,
    drawn with a generator seeded by ``(seed, epoch, i)``; call
    :meth:`set_epoch` to get new crops each epoch.

    Returns dicts ``{"hr": (3, size, size) float32 in [0, 1], "path": str,
    "box": (top, left)}``; a horizontal flip is applied with probability 0.5
    when ``hflip`` is set.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        size: int = DEFAULT_CROP,
        crops_per_image: int = 1,
        seed: int = 0,
        min_texture: float = DEFAULT_MIN_TEXTURE,
        hflip: bool = True,
    ) -> None:
        if not paths:
            raise ValueError("HRCropDataset needs at least one image")
        self.paths = [Path(p) for p in paths]
        self.size, self.crops_per_image, self.seed = size, crops_per_image, seed
        self.min_texture, self.hflip, self.epoch = min_texture, hflip, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths) * self.crops_per_image

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        path = self.paths[index // self.crops_per_image]
        img = pad_to(load_rgb_uint8(path), self.size)
        ((top, left),) = sample_crop_boxes(img, self.size, 1, rng, self.min_texture)
        patch = img[top : top + self.size, left : left + self.size]
        if self.hflip and rng.uniform() < 0.5:
            patch = patch[:, ::-1]
        hr = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float() / 255.0
        return {"hr": hr, "path": str(path), "box": (top, left)}
