"""IRPAD training (task ``irpad`` of the shared trainer) and its synthetic data (see :mod:`semsr.priors.irpad`).

Synthetic degradation
---------------------
A sharp image ``x`` (a square crop) is degraded by one controlled
single-stage pipeline built from :mod:`semsr.data.degradations`, whose
parameters are drawn *per type independently*: first a level uniformly among
the type's levels, then the parameter uniformly inside that level's interval
(:data:`~semsr.priors.irpad.LEVELS`, :func:`sample_params`)::

    blur            (Gaussian kernel, sigma_x = s * a, sigma_y = s / a, a in [1, 1.3], random angle)
    downscale by d  (MATLAB bicubic with antialiasing | area | bilinear, picked at random)
    noise           (Gaussian, colour or (40 %) grey), 8-bit rounding
    upscale by d    (bicubic | bilinear) back to the input size, 8-bit rounding
    JPEG            (quality q; the codec of semsr.data.degradations.jpeg), last

(:func:`degrade`). Labels:

- *blur*: the level of the *total* blur the image shows, the Gaussian's std
  combined with the resampling's own softness, ``sqrt(s^2 + resampling_blur(d)^2)``
  (:data:`RESAMPLING_BLUR`, fitted per resampling mode by
  :func:`fit_resampling_blur`); with ``d > 1`` the blur level is drawn among the
  levels the resampling leaves reachable, so an image enlarged from 2x smaller
  is at least "slightly" blurred and one from 4x smaller at least "moderately";
- *noise*: the level of the std *left visible after the JPEG*
  (:func:`degrade_visible`); :func:`render_visible` renders a sample again with a
  larger added std (up to three times, capped at twice the interval's top) when
  the codec keeps too little of the drawn one, the label is then the nearest
  level of what stays visible;
- *jpeg*, *downscale*: the level of the drawn parameter.

The degradation is applied to a region larger than the analysed window (a
real LR image was degraded whole), and the window is cut out afterwards.
Sharp sources: each photograph (or training crop) is first downscaled by
``f`` in ``U(1.5, 2.5)`` (MATLAB bicubic, antialiased) so camera softness,
sensor noise and the source's own JPEG shrink below the "none" levels. Why the
pipeline has this order and these labels: docs/irpad.md.

Training (task ``irpad``)
-------------------------
``semsr train --config configs/irpad.yaml`` runs :class:`IRPADTask` in the
shared trainer: every HR crop ``batch["hr"] (B, 3, S, S)`` (``data.crop_size = S``)
is prescaled, degraded with draws from its per-sample generator
(``batch["seed"]``) and cut to a random ``crop``-px window under a random
flip/transposition; the loss term ``irpad_ce`` is the summed cross-entropy of the
type heads. The task exports an :class:`~semsr.priors.irpad.IRPADNet` component
folder (``final/``), loadable by :func:`~semsr.priors.irpad.load_irpad`.

Held-out split
--------------
:func:`is_held_out` puts ~15 % of the photographs (by a hash of the file name,
so the same photo is held out in ``data_root()/train/bsds500`` and in a corpus
copy) aside for ``semsr bench irpad`` (:func:`make_in_memory`, :func:`accuracy`);
:meth:`IRPADTask.train_items` drops them from the training images. The classic
SR benchmarks are refused as training data (:func:`list_photos`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import SemsrError
from semsr.core.io import IMAGE_EXTENSIONS
from semsr.core.paths import data_root
from semsr.data.corpus.crops import load_rgb_uint8, sample_crop_boxes
from semsr.data.corpus.manifest import Manifest
from semsr.data.degradations import add_gaussian_noise, filter2d, gaussian_kernel, jpeg_compress
from semsr.ops.imresize import imresize
from semsr.priors.irpad import (
    DEGRADATION_TYPES,
    LEVELS,
    PARAMETERS,
    IRPADEstimator,
    IRPADNet,
    Level,
    dihedral,
    level_of,
    levels_to_json,
    load_irpad,
)
from semsr.train.config import ExperimentConfig
from semsr.train.data import ImageItem
from semsr.train.losses import _require, register_loss
from semsr.train.tasks import Task, per_sample_generators, register_task

log = logging.getLogger(__name__)

HELD_OUT_PERCENT = 15
#: Bumped whenever :func:`degrade` or the sampling changes (recorded with generated sets and trained weights).
PIPELINE_REVISION = 6
DOWN_MODES = ("imresize", "area", "bilinear")
UP_MODES = ("bicubic", "bilinear")
#: Softness of "down by d, then up by d" as the std of the Gaussian that best matches it, per unit of d
#: (final-grid px), for each (down, up) mode pair; least-squares fits on sharp photographs, d = 1.8 .. 4.2
#: (:func:`fit_resampling_blur`). Without antialiasing, "bilinear" down aliases rather than blurs.
RESAMPLING_BLUR: dict[tuple[str, str], float] = {
    ("imresize", "bicubic"): 0.414,
    ("imresize", "bilinear"): 0.502,
    ("area", "bicubic"): 0.452,
    ("area", "bilinear"): 0.55,
    ("bilinear", "bicubic"): 0.36,
    ("bilinear", "bilinear"): 0.45,
}


# --------------------------------------------------------------------------- split and sources


def is_held_out(path: str | Path, percent: int = HELD_OUT_PERCENT) -> bool:
    """Whether a photograph belongs to the IRPAD evaluation split (stable hash of its file name)."""
    digest = hashlib.blake2b(Path(path).name.lower().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < percent


def _benchmark_dirs() -> list[Path]:
    root = data_root()
    return [] if root is None else [(root / "benchmarks").resolve()]


def list_photos(sources: Sequence[str | Path], held_out: bool) -> list[Path]:
    """Photographs of one split from folders and/or corpus manifests (``manifest.sqlite``).

    Files are de-duplicated by file name (a corpus copy of a BSDS500 image counts
    once). Raises :class:`SemsrError` for a missing source or a classic SR
    benchmark folder (those are never training data).
    """
    found: dict[str, Path] = {}
    for src in sources:
        src = Path(src).expanduser()
        if not src.exists():
            raise SemsrError("image source not found", src)
        if not held_out and any(src.resolve().is_relative_to(b) for b in _benchmark_dirs()):
            raise SemsrError("the SR benchmarks (Set5/Set14/B100/Urban100) are not training data", src)
        if src.is_file() and src.suffix == ".sqlite":
            with Manifest(src, readonly=True) as m:
                files = [src.parent / rec.path for rec in m.images()]
        elif src.is_dir():
            files = [p for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            files = [src]
        for f in files:
            if is_held_out(f) == held_out:
                found.setdefault(f.name.lower(), f)
    return sorted(found.values())


def default_sources() -> list[Path]:
    """``data_root()/train/bsds500`` (raises when the shared data folder is missing)."""
    root = data_root()
    if root is None or not (root / "train" / "bsds500").is_dir():
        raise SemsrError("no training photographs: set SEMSR_DATA (needs train/bsds500) or pass --hr")
    return [root / "train" / "bsds500"]


# --------------------------------------------------------------------------- degradation


@dataclass(frozen=True)
class IRPADParams:
    """The parameters of one synthetic degradation and its labels.

    ``blur``: geometric-mean std of the Gaussian applied (px of the image), ``aniso``
    the axis ratio ``a`` and ``theta`` the angle — the blur *label* is of
    :meth:`total_blur`, which adds the resampling's own softness; ``noise``: std in 0-255 (added);
    ``noise_visible``: the part of it the JPEG left (set by the generator);
    ``jpeg``: quality (100 = no JPEG); ``downscale``: factor ``d``; ``labels``:
    level index per type (noise: of the visible std).
    """

    blur: float
    aniso: float
    theta: float
    noise: float
    grey: bool
    jpeg: float
    downscale: float
    down_mode: str
    up_mode: str
    noise_seed: int
    labels: tuple[int, ...]
    noise_visible: float | None = None

    def with_visible_noise(self, visible: float, table: Mapping[str, Sequence[Level]] | None = None) -> IRPADParams:
        """These parameters with the noise label taken from the visible noise std (see :func:`degrade_visible`)."""
        labels = list(self.labels)
        labels[DEGRADATION_TYPES.index("noise")] = level_of("noise", visible, table) if visible > 0 else 0
        return replace(self, noise_visible=float(visible), labels=tuple(labels))

    def total_blur(self) -> float:
        """Gaussian-equivalent std of all the blur the image shows: ``sqrt(blur^2 + resampling_blur^2)``."""
        return math.hypot(self.blur, resampling_blur(self.downscale, self.down_mode, self.up_mode))

    def values(self) -> tuple[float, ...]:
        """Labelled parameter per type, in :data:`DEGRADATION_TYPES` order (blur: :meth:`total_blur`)."""
        return (self.total_blur(), self.noise, self.jpeg, self.downscale)


def resampling_blur(d: float, down_mode: str, up_mode: str) -> float:
    """Gaussian-equivalent std (px) of downscaling by ``d`` and enlarging back (:data:`RESAMPLING_BLUR`); 0 at d <= 1."""
    return RESAMPLING_BLUR[(down_mode, up_mode)] * d if d > 1.0 else 0.0


@torch.no_grad()
def fit_resampling_blur(
    images: Sequence[torch.Tensor],
    d: float,
    down_mode: str,
    up_mode: str,
    sigmas: Sequence[float] = tuple(np.arange(0.3, 4.01, 0.05)),
) -> float:
    """The Gaussian std whose blur best matches (least squares) "down by ``d``, up by ``d``" on ``images``.

    ``images``: sharp ``(1, 3, S, S)`` tensors in [0, 1], ``S`` the same for all; a 16-px border is ignored.
    How :data:`RESAMPLING_BLUR` was measured (its entries are the fitted std divided by ``d``).
    """
    size = images[0].shape[-1]
    small = max(8, round(size / d))
    inner = slice(16, -16)
    err = np.zeros(len(sigmas))
    for x in images:
        y = _resize(_resize(x, small, down_mode).clamp(0, 1), size, up_mode).clamp(0, 1)
        for j, s in enumerate(sigmas):
            g = filter2d(x, torch.from_numpy(gaussian_kernel(2 * math.ceil(3 * s) + 1, s, s, 0.0)))
            err[j] += float((y[..., inner, inner] - g[..., inner, inner]).pow(2).mean())
    return float(sigmas[int(err.argmin())])


def _span(lv: Level) -> tuple[float, float]:
    """``(lowest, highest)`` parameter value of a level (JPEG intervals are listed high to low)."""
    return min(lv.low, lv.high), max(lv.low, lv.high)


def _sampling_span(levels: Sequence[Level], i: int, contiguous: bool) -> tuple[float, float]:
    """Where level ``i``'s parameter is drawn: its interval, or with ``contiguous`` :func:`_extended`."""
    return _extended(levels, i) if contiguous else _span(levels[i])


def _extended(levels: Sequence[Level], i: int) -> tuple[float, float]:
    """Interval of level ``i`` grown to the middle of the gaps beside it (``contiguous`` sampling)."""
    lo, hi = _span(levels[i])
    descending = levels[-1].low < levels[0].low
    prev = _span(levels[i - 1]) if i > 0 else None
    nxt = _span(levels[i + 1]) if i + 1 < len(levels) else None
    if descending:  # severity grows as the value falls (JPEG quality)
        prev, nxt = nxt, prev
    if prev is not None:
        lo = (prev[1] + lo) / 2.0
    if nxt is not None:
        hi = (hi + nxt[0]) / 2.0
    return lo, hi


def sample_params(
    rng: np.random.Generator, table: Mapping[str, Sequence[Level]] | None = None, contiguous: bool = False
) -> IRPADParams:
    """Draw one degradation: a uniform level per type, then a value inside its interval.

    The blur level is of the *total* blur (:meth:`IRPADParams.total_blur`):
    resampling by ``d > 1`` is itself a blur of ``resampling_blur(d)`` px, so
    the blur is drawn again among the levels it leaves reachable (interval top
    above it; never "none"), its total std uniformly in the rest of the
    interval, and the Gaussian applied is ``sqrt(total^2 - resampling^2)``.
    With ``contiguous`` the non-"none" levels are sampled over their interval
    grown to the middle of the neighbouring gaps, so every value of the
    parameter range occurs; labels then come from :func:`level_of`.
    """
    table = LEVELS if table is None else table
    values: dict[str, float] = {}
    for t in DEGRADATION_TYPES:
        levels = table[t]
        i = int(rng.integers(len(levels)))
        lv = levels[i]
        if i == 0:
            values[t] = lv.low
        else:
            lo, hi = _sampling_span(levels, i, contiguous)
            values[t] = float(rng.uniform(lo, hi))
    labels = tuple(level_of(t, values[t], table) for t in DEGRADATION_TYPES)
    p = IRPADParams(
        blur=values["blur"],
        aniso=float(rng.uniform(1.0, 1.3)),
        theta=float(rng.uniform(0, math.pi)),
        noise=values["noise"],
        grey=bool(rng.uniform() < 0.4),
        jpeg=values["jpeg"],
        downscale=values["downscale"],
        down_mode=DOWN_MODES[int(rng.integers(len(DOWN_MODES)))],
        up_mode=UP_MODES[int(rng.integers(len(UP_MODES)))],
        noise_seed=int(rng.integers(0, 2**62)),
        labels=labels,
    )
    rs = resampling_blur(p.downscale, p.down_mode, p.up_mode)
    if rs == 0.0:
        return p
    levels = table["blur"]
    spans = [_sampling_span(levels, i, contiguous) for i in range(len(levels))]
    reachable = [i for i in range(1, len(levels)) if spans[i][1] > rs]
    i = reachable[int(rng.integers(len(reachable)))]
    total = float(rng.uniform(max(spans[i][0], rs), spans[i][1]))
    blur_j = DEGRADATION_TYPES.index("blur")
    labels = tuple(level_of("blur", total, table) if j == blur_j else v for j, v in enumerate(p.labels))
    return replace(p, blur=math.sqrt(max(total * total - rs * rs, 0.0)), labels=labels)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if mode == "imresize":
        return imresize(x, size=(size, size))
    if mode == "area":
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round().clamp(0, 255) / 255.0


@torch.no_grad()
def degrade(hr: torch.Tensor, p: IRPADParams) -> torch.Tensor:
    """Apply the IRPAD degradation ``p`` to ``hr`` ``(1, 3, S, S)`` float in [0, 1].

    Returns ``(1, 3, S, S)`` float32 in [0, 1], multiples of 1/255.
    """
    return degrade_visible(hr, p)[0]


@torch.no_grad()
def degrade_visible(hr: torch.Tensor, p: IRPADParams) -> tuple[torch.Tensor, float]:
    """:func:`degrade`, plus the *visible* noise std: ``p.noise`` times the share of the noise the JPEG keeps.

    Compression quantises noise away together with detail (a heavy JPEG leaves
    little of a slight noise), so the noise label is taken from what survives:
    the image is also made without noise, and the least-squares gain of the
    noise through the JPEG — (with - without) after the JPEG regressed on the
    same difference before it; changed quantisation decisions elsewhere are
    not correlated with the noise and do not count — scales ``p.noise``.
    Without JPEG or noise the visible std is ``p.noise``.

    Returns ``((1, 3, S, S) float32 in [0, 1], visible std in 0-255)``.
    """
    x = hr.float()
    s = x.shape[-1]
    if p.blur > 0:
        sx, sy = p.blur * p.aniso, p.blur / p.aniso
        k = 2 * math.ceil(3.0 * max(sx, sy)) + 1
        x = filter2d(x, torch.from_numpy(gaussian_kernel(k, sx, sy, p.theta)))
    small = max(8, round(s / p.downscale)) if p.downscale > 1.0 else s
    if small != s:
        x = _resize(x, small, p.down_mode).clamp(0, 1)
    track = p.noise > 0 and p.jpeg < 100  # render a noise-free copy to measure what the JPEG leaves
    if p.noise > 0:
        gen = torch.Generator().manual_seed(p.noise_seed)
        noisy = add_gaussian_noise(x, p.noise, p.grey, gen)
        x = torch.cat([noisy, x]) if track else noisy  # (2 or 1, 3, h, w): with (, without) noise
    x = _quantise(x.clamp(0, 1))
    if small != s:
        x = _quantise(_resize(x, s, p.up_mode).clamp(0, 1))
    visible = p.noise
    if p.jpeg < 100:
        before = x
        x = jpeg_compress(x, p.jpeg)
        if track:
            n_before, n_after = (before[0] - before[1]).double(), (x[0] - x[1]).double()
            gain = float((n_after * n_before).sum() / n_before.pow(2).sum().clamp(min=1e-12))
            visible = p.noise * min(max(gain, 0.0), 1.0)
    return x[:1], visible


def render_visible(
    hr: torch.Tensor,
    p: IRPADParams,
    contiguous: bool = False,
    table: Mapping[str, Sequence[Level]] | None = None,
    retries: int = 3,
) -> tuple[torch.Tensor, IRPADParams]:
    """Degrade ``hr`` ``(1, 3, S, S)`` so that ``p.noise`` is the std *visible* after the JPEG.

    :func:`degrade_visible` measures the share of the noise the codec keeps;
    while the visible std falls outside the drawn level's interval (unless
    ``contiguous``) the sample is rendered again (at most ``retries`` times)
    with the drawn std divided by the last measured gain (the gain grows with
    the std, as the codec keeps more of a stronger noise). The added std is
    capped at twice the interval's upper bound — a stronger noise under a
    strong JPEG turns into blotches rather than grain — and the label is then
    the nearest level of what stays visible. Returns the image and ``p`` with the added std (``noise``),
    the visible std (``noise_visible``) and its level label.
    """
    table = LEVELS if table is None else table
    y, visible = degrade_visible(hr, p)
    j = DEGRADATION_TYPES.index("noise")
    lv = table["noise"][p.labels[j]]
    lo, hi = _span(lv)
    target = p.noise
    for _ in range(0 if contiguous or p.noise <= 0 else retries):
        if lo <= visible <= hi:
            break
        gain = max(visible / p.noise, 1.0 / 64.0)
        p = replace(p, noise=min(target / gain, 2.0 * hi))
        y, visible = degrade_visible(hr, p)
    return y, p.with_visible_noise(visible, table)


def _context_start(rng: np.random.Generator, start: int, size: int, context: int, side: int) -> int:
    """Start of a ``context``-long span inside ``[0, side)`` that contains ``[start, start + size)``."""
    lo, hi = max(0, start + size - context), min(start, side - context)
    return int(rng.integers(lo, hi + 1))


def prescale(photo: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Sharpen a photo by downscaling (see module docstring): uint8 ``(H, W, 3)`` -> ``(1, 3, h, w)``."""
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255.0
    f = max(float(rng.uniform(1.5, 2.5)), min(photo.shape[:2]) / float(rng.uniform(384, 768)))
    h, w = (max(1, round(d / f)) for d in photo.shape[:2])
    return imresize(x, size=(h, w)).clamp(0, 1)


# --------------------------------------------------------------------------- datasets


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch with ``n`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class IRPADData:
    """A synthetic set in memory: ``images`` uint8 ``(N, S, S, 3)``, ``labels`` int64 ``(N, 4)``,
    ``params`` float32 ``(N, 4)`` (type order :data:`DEGRADATION_TYPES`)."""

    images: np.ndarray
    labels: np.ndarray
    params: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def generate(
    photos: Sequence[Path],
    n: int,
    size: int = 96,
    seed: int = 0,
    crops_per_visit: int = 16,
    min_texture: float = 3.0,
    contiguous: bool = False,
    sink: Callable[[int, np.ndarray, IRPADParams], None] | None = None,
    progress: Callable[[int], None] | None = None,
    context: int = 192,
) -> list[IRPADParams]:
    """Produce ``n`` degraded crops from ``photos``; ``sink(i, uint8 (S, S, 3), params)`` receives each.

    Photos are visited in seeded random order (repeating as needed),
    ``crops_per_visit`` windows per visit, each with its own degradation applied
    to a ``context``-px region around it (see module docstring).
    Deterministic for a given ``(photos, n, size, seed, ...)``.
    """
    if not photos:
        raise SemsrError("no photographs to make IRPAD samples from")
    with torch_threads(1):  # tiny per-sample ops: more threads only add contention
        return _generate(photos, n, size, seed, crops_per_visit, min_texture, contiguous, sink, progress, context)


def _generate(
    photos: Sequence[Path],
    n: int,
    size: int,
    seed: int,
    crops_per_visit: int,
    min_texture: float,
    contiguous: bool,
    sink: Callable[[int, np.ndarray, IRPADParams], None] | None,
    progress: Callable[[int], None] | None,
    context: int,
) -> list[IRPADParams]:
    rng = np.random.default_rng(seed)
    out: list[IRPADParams] = []
    order: list[int] = []
    while len(out) < n:
        if not order:
            order = list(rng.permutation(len(photos)))
        path = photos[order.pop()]
        try:
            photo = load_rgb_uint8(path)
        except (OSError, ValueError) as err:
            log.warning("skipping unreadable %s (%s)", path, err)
            continue
        img = prescale(photo, rng)
        h, w = img.shape[-2:]
        if min(h, w) < size:
            continue
        ctx = max(size, min(context, h, w))
        u8 = (img[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        k = min(crops_per_visit, n - len(out))
        for top, left in sample_crop_boxes(u8, size, k, rng, min_texture):
            ct, cl = (_context_start(rng, a, size, ctx, side) for a, side in ((top, h), (left, w)))
            p = sample_params(rng, contiguous=contiguous)
            y, p = render_visible(img[..., ct : ct + ctx, cl : cl + ctx], p, contiguous)
            y = y[..., top - ct : top - ct + size, left - cl : left - cl + size]
            arr = (y[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            if sink is not None:
                sink(len(out), arr, p)
            out.append(p)
            if progress is not None:
                progress(len(out))
    return out


def _meta(
    photos: Sequence[Path],
    n: int,
    size: int,
    seed: int,
    min_texture: float,
    contiguous: bool,
    held_out: bool,
    context: int,
) -> dict[str, Any]:
    return {
        "pipeline": PIPELINE_REVISION,
        "types": list(DEGRADATION_TYPES),
        "levels": levels_to_json(LEVELS),
        "n": n,
        "size": size,
        "context": context,
        "seed": seed,
        "min_texture": min_texture,
        "contiguous": contiguous,
        "held_out": held_out,
        "photos": [str(p) for p in photos],
    }


def make_in_memory(
    photos: Sequence[Path],
    n: int,
    size: int = 96,
    seed: int = 0,
    min_texture: float = 3.0,
    contiguous: bool = False,
    held_out: bool = True,
    context: int = 192,
) -> IRPADData:
    """Generate a synthetic set in memory (the ``semsr bench irpad`` evaluation set)."""
    images = np.zeros((n, size, size, 3), np.uint8)

    def sink(i: int, arr: np.ndarray, p: IRPADParams) -> None:
        images[i] = arr

    params = generate(photos, n, size, seed, min_texture=min_texture, contiguous=contiguous, sink=sink, context=context)
    return IRPADData(
        images,
        np.array([p.labels for p in params], np.int64),
        np.array([p.values() for p in params], np.float32),
        _meta(photos, n, size, seed, min_texture, contiguous, held_out, context),
    )


def accuracy(estimator: IRPADEstimator, data: IRPADData, batch_size: int = 128) -> dict[str, Any]:
    """Per-type interval accuracy and confusion matrices of ``estimator`` on ``data``.

    Returns ``{"per_type": {type: acc}, "confusion": {type: [[count]] (true x predicted)}, "n": N,
    "mean": mean accuracy, "by_downscale_noise": {type: [[acc or None]]}, "predictions": int64 (N, 4)
    level indices}``; ``by_downscale_noise`` splits each
    type's accuracy by the true downscale level (rows) and true noise level (columns), where the
    confusable cases sit (no noise: resampling vs blur); ``None`` marks an empty cell.
    """
    types = list(data.meta.get("types", DEGRADATION_TYPES))
    table = estimator.table
    conf = {t: np.zeros((len(table[t]), len(table[t])), np.int64) for t in types}
    preds = np.zeros_like(data.labels)
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(np.array(data.images[start : start + batch_size]))
        x = x.permute(0, 3, 1, 2).float() / 255.0
        pred = estimator.predict_batch(x)
        for j, t in enumerate(types):
            preds[start : start + batch_size, j] = pred[t].numpy()
    for j, t in enumerate(types):
        np.add.at(conf[t], (data.labels[:, j], preds[:, j]), 1)
    per_type = {t: float(np.trace(c) / max(1, c.sum())) for t, c in conf.items()}
    d_j, n_j = types.index("downscale"), types.index("noise")
    correct = preds == data.labels

    def cell(j: int, d: int, n: int) -> float | None:
        m = (data.labels[:, d_j] == d) & (data.labels[:, n_j] == n)
        return float(correct[m, j].mean()) if m.any() else None

    split = {
        t: [[cell(j, d, n) for n in range(len(table["noise"]))] for d in range(len(table["downscale"]))]
        for j, t in enumerate(types)
    }
    return {
        "per_type": per_type,
        "mean": float(np.mean(list(per_type.values()))),
        "n": len(data),
        "confusion": {t: c.tolist() for t, c in conf.items()},
        "by_downscale_noise": split,
        "predictions": preds,
    }


# --------------------------------------------------------------------------- training task

#: ``model.options`` of the ``irpad`` task that are not :class:`IRPADNet` config fields.
_TASK_OPTIONS = {"init", "label_smoothing", "prescale", "contiguous"}
#: :class:`IRPADNet` config fields a training config may set.
_ARCH_OPTIONS = {"channels", "hidden", "crop", "highpass", "lines", "lattice", "lattice_bins"}


@register_loss("irpad_ce")
def irpad_ce(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of the IRPAD heads: ``logits.<type> (B, n_levels)`` against the columns of
    ``labels (B, T)`` (heads in output order), with ``label_smoothing`` (a scalar tensor)."""
    _require(outputs, "irpad_ce", "labels", "label_smoothing")
    heads = [k for k in outputs if k.startswith("logits.")]
    labels, smoothing = outputs["labels"], float(outputs["label_smoothing"])
    return sum(
        F.cross_entropy(outputs[k].float(), labels[:, j], label_smoothing=smoothing) for j, k in enumerate(heads)
    )


def degraded_window(
    hr: torch.Tensor, crop: int, rng: np.random.Generator, prescale_range: tuple[float, float], contiguous: bool = False
) -> tuple[torch.Tensor, IRPADParams]:
    """One training sample from a sharp square crop ``hr (1, 3, S, S)`` in [0, 1].

    Draws, in order, from ``rng``: the prescale factor ``f`` in ``prescale_range`` (the crop is
    downscaled to ``max(crop, round(S / f))`` px), the degradation (:func:`sample_params`, rendered
    with :func:`render_visible` on the whole prescaled crop), the position of the ``crop``-px window
    and its flip/transposition (:func:`~semsr.priors.irpad.dihedral`).
    Returns the window ``(1, 3, crop, crop)`` float32 in [0, 1] (multiples of 1/255) and its parameters.
    """
    side = hr.shape[-1]
    f = float(rng.uniform(*prescale_range))
    small = max(crop, round(side / f))
    x = imresize(hr.float(), size=(small, small)).clamp(0, 1)
    p = sample_params(rng, contiguous=contiguous)
    y, p = render_visible(x, p, contiguous)
    top, left = (int(v) for v in rng.integers(0, small - crop + 1, size=2))
    window = y[..., top : top + crop, left : left + crop]
    return dihedral(window, int(rng.integers(8))).contiguous(), p


@register_task("irpad")
class IRPADTask(Task):
    """Train an :class:`~semsr.priors.irpad.IRPADNet` on synthetic degradations of the HR crops.

    ``model.options`` (all optional): the :class:`IRPADNet` config fields ``channels``,
    ``hidden``, ``crop`` (the training and analysis window, px), ``highpass``, ``lines``,
    ``lattice``, ``lattice_bins``; ``init`` (an IRPAD folder to continue from: its architecture
    wins, ``crop`` becomes its analysis window; same level table required), ``label_smoothing``
    (default 0.05), ``prescale`` (``[low, high]`` sharpening factor range, default ``[1.5, 2.5]``),
    ``contiguous`` (draw parameters inside the gaps between levels too, default false).
    ``data.crop_size`` is the degraded region (before the prescale); ``data.scale`` and the
    ``degradation`` section only make the trainer's unused LR (use ``scale: 1``, ``type: bicubic``).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        opts = dict(cfg.model.options)
        unknown = set(opts) - _TASK_OPTIONS - _ARCH_OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for irpad: {sorted(unknown)}")
        if cfg.validation.every:
            raise SemsrError(
                "task irpad has no SR validation: set validation.every: 0 "
                "(evaluate the exported weights with `semsr bench irpad --weights RUN/final`)"
            )
        arch = {k: v for k, v in opts.items() if k in _ARCH_OPTIONS}
        self.label_smoothing = float(opts.get("label_smoothing", 0.05))
        low, high = (float(v) for v in opts.get("prescale", (1.5, 2.5)))
        if not 1.0 <= low <= high:
            raise SemsrError(f"model.options.prescale must be [low, high] with 1 <= low <= high, got {[low, high]}")
        self.prescale = (low, high)
        self.contiguous = bool(opts.get("contiguous", False))
        self.previous: dict[str, Any] | None = None
        if opts.get("init"):
            model = load_irpad(Path(str(opts["init"])).expanduser())
            if model.config.levels != levels_to_json(LEVELS):
                raise SemsrError("the initial IRPAD weights were trained on other levels than this task's")
            self.previous = dict(model.config.training)
            # fully convolutional: the window may grow when fine-tuning; the labels mean this task's parameters
            model.register_to_config(crop=int(arch.get("crop", model.config.crop)), parameters=dict(PARAMETERS))
        else:
            with torch.random.fork_rng():  # the init depends on the seed only
                torch.manual_seed(cfg.seed)
                model = IRPADNet(**arch)
        self.crop = int(model.config.crop)
        if cfg.data.crop_size / high < self.crop:
            raise SemsrError(
                f"data.crop_size ({cfg.data.crop_size}) / prescale {high:g} is below the window "
                f"model.options.crop ({self.crop})"
            )
        self.trainable = model.float().train().requires_grad_(True)
        self.types = model.types
        self.device = torch.device("cpu")

    def train_items(self, items: list[ImageItem]) -> list[ImageItem]:
        """The training images without IRPAD's held-out photographs (:func:`is_held_out`)."""
        return [it for it in items if not is_held_out(it.path)]

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device = device  # no frozen modules

    @torch.no_grad()
    def samples(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The degraded windows ``(B, 3, crop, crop)`` in [0, 1] and labels ``(B, T)`` int64 (head order)
        of a micro-batch, from ``batch["hr"]`` with one NumPy generator per sample seeded from its
        per-sample torch generator (:func:`degraded_window`)."""
        hr = batch["hr"].float().cpu()
        if hr.shape[-1] != hr.shape[-2]:
            raise SemsrError(f"task irpad needs square HR crops, got {tuple(hr.shape[-2:])}")
        windows, labels = [], []
        for img, gen in zip(hr, per_sample_generators(batch["seed"]), strict=True):
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=gen)))
            window, p = degraded_window(img[None], self.crop, rng, self.prescale, self.contiguous)
            windows.append(window)
            labels.append([p.labels[DEGRADATION_TYPES.index(t)] for t in self.types])
        return torch.cat(windows), torch.tensor(labels, dtype=torch.int64)

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Outputs ``logits.<type> (B, n_levels)``, ``labels (B, T)`` and ``label_smoothing`` (loss ``irpad_ce``)."""
        with torch_threads(1):  # tiny per-sample ops: more threads only add contention
            x, labels = self.samples(batch)
        logits = model(x.to(self.device))
        return {
            **{f"logits.{t}": logits[t] for t in self.types},
            "labels": labels.to(self.device),
            "label_smoothing": torch.tensor(self.label_smoothing),
        }

    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        raise SemsrError("task irpad has no SR validation (validation.every must be 0)")

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the :class:`IRPADNet` component folder (``config.json`` with the training record
        + ``diffusion_pytorch_model.safetensors``), loadable by :func:`~semsr.priors.irpad.load_irpad`."""
        record: dict[str, Any] = {"task": "irpad", "pipeline": PIPELINE_REVISION, "config": self.cfg.to_dict()}
        if self.previous is not None:
            record["previous"] = self.previous
        model.register_to_config(training=record)
        model.save_pretrained(Path(folder), safe_serialization=True)
