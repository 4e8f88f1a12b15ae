"""Training data: HR crops degraded on the fly, reproducible by *sample position*.

Every sample the run will ever see has a global position ``p = 0, 1, 2, ...``
(a micro-batch holds ``G`` consecutive positions, ``G`` = per-process batch x
processes; process ``r`` takes slice ``r*B .. r*B+B-1`` of it). Everything
random about a sample — which image (a seeded permutation per epoch), where it
is cropped, whether it is mirrored, how it is degraded, and the task's
noise/timestep/prompt-dropout draws (``sample["seed"]``) — is a pure function
of ``(experiment seed, p)``. Hence:

- resuming just restarts the stream at the number of samples consumed so far
  (saved in the checkpoint): same data order, crops and degradations, even
  when the number of processes changes;
- 2 processes x batch B see exactly the samples of 1 process x batch 2B.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from semsr.core.errors import SemsrError
from semsr.core.io import IMAGE_EXTENSIONS
from semsr.core.paths import data_root
from semsr.data.corpus.crops import load_rgb_uint8, sample_crop_boxes
from semsr.data.corpus.manifest import Manifest
from semsr.data.degradations import RealESRGANDegradation
from semsr.ops.imresize import imresize
from semsr.train.config import DataConfig

log = logging.getLogger(__name__)

Degrader = Callable[[torch.Tensor, int], torch.Tensor]
"""``(hr (B, 3, H, W) float [0, 1], seed) -> lr (B, 3, H/s, W/s) float [0, 1]``."""


def derive_seed(*keys: int | str) -> int:
    """A stable 63-bit seed from a tuple of keys (independent of Python's hash salt)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class ImageItem:
    """One HR training image: its file and caption (``None`` = use the default prompt)."""

    path: Path
    caption: str | None = None


def expand_path(text: str) -> Path:
    """Expand ``{data}`` (the shared data root) and ``~`` in a configured path."""
    if "{data}" in text:
        root = data_root()
        if root is None:
            raise SemsrError("config uses {data} but no data root is set (SEMSR_DATA)", text)
        text = text.replace("{data}", str(root))
    return Path(text).expanduser()


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            w, h = im.size
            if (im.getexif() or {}).get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except (OSError, ValueError):
        return None


def _folder_items(folder: Path) -> list[ImageItem]:
    """The images in ``folder`` and in its sub-folders one level down (ImageNet-style class folders,
    ``folder/<class>/<image>``; hidden sub-folders are skipped)."""
    if not folder.is_dir():
        raise SemsrError("HR folder not found", folder)
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file()]
    for sub in (p for p in entries if p.is_dir() and not p.name.startswith(".")):
        files += [p for p in sorted(sub.iterdir()) if p.is_file()]
    return [ImageItem(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]


def _caption_text(value: Any) -> str | None:
    """A caption prior's text: a string, or a mapping with ``text``/``caption``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("text", "caption"):
            if isinstance(value.get(key), str):
                return value[key]
    return None


def _manifest_items(manifest: Path, caption_prior: str) -> list[ImageItem]:
    """The ``train`` split of a corpus manifest, with cached captions when present.

    Paths in the manifest are relative to its folder. When several provider
    versions of prior ``caption_prior`` are cached, the last one in sort
    order is used.
    """
    if not manifest.is_file():
        raise SemsrError("manifest not found", manifest)
    try:
        with Manifest(manifest, readonly=True) as m:
            items = []
            for rec in m.images(split="train"):
                caption = None
                versions = [v for name, v in m.prior_names(rec.content_hash) if name == caption_prior]
                if caption_prior and versions:
                    caption = _caption_text(m.get_prior(rec.content_hash, caption_prior, versions[-1]))
                items.append(ImageItem(manifest.parent / rec.path, caption))
    except sqlite3.DatabaseError as err:
        raise SemsrError(f"not a readable corpus manifest ({err})", manifest) from None
    return items


def list_images(cfg: DataConfig, min_size: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Collect HR images and split them into ``(train, validation)``.

    Images whose short side is below ``min_size`` are skipped. The last
    ``cfg.val_count`` images (sorted by path) are held out for validation and
    never trained on; ``cfg.limit`` then caps the training list.
    """
    items: list[ImageItem] = []
    for folder in cfg.hr:
        items += _folder_items(expand_path(folder))
    if cfg.manifest:
        items += _manifest_items(expand_path(cfg.manifest), cfg.caption_prior)
    if not items:
        raise SemsrError("no HR images configured (data.hr / data.manifest)")
    seen: set[Path] = set()
    usable: list[ImageItem] = []
    for item in sorted(items, key=lambda it: str(it.path)):
        if item.path in seen:
            continue
        seen.add(item.path)
        size = _image_size(item.path)
        if size is None:
            log.warning("skipping unreadable image %s", item.path)
        elif min(size) < min_size:
            log.warning("skipping %s: smaller than %d px", item.path, min_size)
        else:
            usable.append(item)
    if len(usable) <= cfg.val_count:
        raise SemsrError(
            f"only {len(usable)} usable HR images (>= {min_size} px); need more than data.val_count={cfg.val_count}"
        )
    split = len(usable) - cfg.val_count
    train, val = usable[:split], usable[split:]
    if cfg.limit:
        train = train[: cfg.limit]
    return train, val


def load_image(path: Path) -> np.ndarray:
    """Decode an image (EXIF-oriented, RGB) to uint8 ``(H, W, 3)``."""
    try:
        return load_rgb_uint8(path)
    except (OSError, ValueError) as err:
        raise SemsrError(f"cannot read image ({err})", path) from None


def to_tensor(patch: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float().div_(255.0)


def make_degrader(degradation: dict[str, Any], scale: int) -> Degrader:
    """Build the HR -> LR function from the ``degradation:`` config section.

    ``type: bicubic`` is MATLAB-bicubic downscaling by ``scale`` (classic SR);
    ``type: realesrgan`` (the default) is the second-order Real-ESRGAN model of
    :mod:`semsr.data.degradations`, with the remaining keys as its config.
    """
    opts = dict(degradation)
    kind = opts.pop("type", "realesrgan")
    if kind == "bicubic":
        if opts:
            raise SemsrError(f"bicubic degradation takes no options, got {sorted(opts)}")

        def bicubic(hr: torch.Tensor, seed: int) -> torch.Tensor:
            return imresize(hr, scale=1.0 / scale).clamp_(0.0, 1.0)

        return bicubic
    if kind == "realesrgan":
        if int(opts.setdefault("scale", scale)) != scale:
            raise SemsrError(f"degradation.scale ({opts['scale']}) differs from data.scale ({scale})")
        try:
            model = RealESRGANDegradation(opts)
        except (TypeError, ValueError) as err:
            raise SemsrError(f"bad degradation config: {err}") from None

        def realesrgan(hr: torch.Tensor, seed: int) -> torch.Tensor:
            return model(hr, seed=seed)

        return realesrgan
    raise SemsrError(f"unknown degradation type '{kind}' (bicubic, realesrgan)")


class CropDataset(Dataset):
    """Map-style dataset indexed by *global sample position* (see module docstring).

    ``dataset[p]`` returns a dict:

    - ``hr``: ``(3, crop, crop)`` float32 in [0, 1]
    - ``lr``: ``(3, crop/scale, crop/scale)`` float32 in [0, 1]
    - ``prompt``: the caption (or the configured default prompt)
    - ``seed``: int64 seed for the task's per-sample random draws
    - ``position``: ``p``
    - ``path``: the HR image file (e.g. for prompts precomputed per image)
    """

    def __init__(
        self,
        items: list[ImageItem],
        cfg: DataConfig,
        degrade: Degrader,
        seed: int,
    ) -> None:
        if not items:
            raise SemsrError("training image list is empty")
        self.items = items
        self.cfg = cfg
        self.degrade = degrade
        self.seed = seed
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._perm_epoch = -1
        self._perm: list[int] = []

    def __len__(self) -> int:
        """Images per epoch (positions are unbounded; ``p`` wraps into epochs)."""
        return len(self.items)

    def index_at(self, position: int) -> int:
        """Image index for a global position: a seeded permutation per epoch."""
        epoch, offset = divmod(position, len(self.items))
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm = torch.randperm(len(self.items), generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def _image(self, path: Path) -> np.ndarray:
        if not self.cfg.cache_images:
            return load_image(path)
        img = self._cache.get(path)
        if img is None:
            img = load_image(path)
            self._cache[path] = img
            if len(self._cache) > 256:
                self._cache.popitem(last=False)
        return img

    def crop(self, img: np.ndarray, position: int) -> torch.Tensor:
        """Seeded random ``crop x crop`` window of uint8 ``img (H, W, 3)``, re-drawn while flat.

        Flat-patch filtering is :func:`semsr.data.corpus.crops.sample_crop_boxes`
        (``data.min_texture``, ``data.max_crop_tries``); with ``data.hflip`` the
        crop is mirrored with probability 0.5. Returns ``(3, crop, crop)`` in [0, 1].
        """
        size = self.cfg.crop_size
        rng = np.random.default_rng(derive_seed(self.seed, "crop", position))
        ((top, left),) = sample_crop_boxes(img, size, 1, rng, self.cfg.min_texture, self.cfg.max_crop_tries)
        patch = img[top : top + size, left : left + size]
        if self.cfg.hflip and rng.uniform() < 0.5:
            patch = patch[:, ::-1]
        return to_tensor(patch)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[self.index_at(position)]
        hr = self.crop(self._image(item.path), position)
        lr = self.degrade(hr[None], derive_seed(self.seed, "degrade", position))[0]
        return {
            "hr": hr,
            "lr": lr.float().clamp(0.0, 1.0),
            "prompt": item.caption if item.caption is not None else self.cfg.prompt,
            "seed": torch.tensor(derive_seed(self.seed, "task", position), dtype=torch.int64),
            "position": torch.tensor(position, dtype=torch.int64),
            "path": str(item.path),
        }


class PositionBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of global positions for one process.

    The ``m``-th micro-batch (from 0) covers global positions
    ``[start + m*G, start + (m+1)*G)`` with ``G = batch_size * world_size``;
    this process yields its slice of ``B = batch_size`` positions starting at
    ``start + m*G + rank*B``.
    """

    def __init__(self, batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size = batch_size
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.start + self.rank * self.batch_size
        global_batch = self.batch_size * self.world_size
        while True:
            yield list(range(first, first + self.batch_size))
            first += global_batch

    def __len__(self) -> int:  # pragma: no cover - endless; DataLoader does not need it
        raise TypeError("PositionBatchSampler is endless")


def make_loader(
    dataset: CropDataset,
    batch_size: int,
    start: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
) -> DataLoader:
    """Endless DataLoader over ``dataset`` whose first micro-batch starts at global position ``start``."""
    sampler = PositionBatchSampler(batch_size, start, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def validation_pairs(
    items: list[ImageItem], size: int, degrade: Degrader, seed: int, multiple: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed ``(hr (3, S, S), lr (3, S/s, S/s))`` pairs from held-out images.

    HR is the centre crop of side ``S = min(size, H, W)`` rounded down to a
    multiple of ``multiple`` (scale x VAE factor); LR comes from the training
    degradation with a fixed per-image seed, so every validation round sees
    the same inputs.
    """
    pairs = []
    for i, item in enumerate(items):
        img = load_image(item.path)
        h, w = img.shape[:2]
        s = (min(size, h, w) // multiple) * multiple
        if s == 0:
            continue
        top, left = (h - s) // 2, (w - s) // 2
        hr = to_tensor(img[top : top + s, left : left + s])
        lr = degrade(hr[None], derive_seed(seed, "val", i))[0].float().clamp(0.0, 1.0)
        pairs.append((hr, lr))
    return pairs
