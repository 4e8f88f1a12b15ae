"""Training and evaluation data for IRPAD (see :mod:`semsr.priors.irpad`).

Synthetic degradation
---------------------
Every sample is a ``size x size`` (96 px) crop of a sharp photograph degraded
by one controlled single-stage pipeline built from
:mod:`semsr.data.degradations`, whose parameters are drawn *per type
independently*: first a level uniformly among the type's levels, then the
parameter uniformly inside that level's interval (:data:`~semsr.priors.irpad.LEVELS`)::

    blur            (Gaussian kernel, sigma_x = s * a, sigma_y = s / a, a in [1, 1.3], random angle)
    downscale by d  (MATLAB bicubic with antialiasing | area | bilinear, picked at random)
    noise           (Gaussian, colour or (40 %) grey), 8-bit rounding
    upscale by d    (bicubic | bilinear) back to size x size, 8-bit rounding
    JPEG            (quality q; the codec of semsr.data.degradations.jpeg), last

The order is a camera's and the web's: sensor noise is compressed with the
image, and the file a user has was JPEG-encoded at its final size. (Revision 2
added noise after the JPEG and resampled after it; both erase what identifies
the JPEG quality — the block grid and the quantisation lattice — so its levels
were not observable: 0.49-0.63 held-out accuracy.) The price of that order
is that a heavy JPEG removes a slight noise; so the *noise* label is the level
of the noise std the JPEG left visible (:func:`degrade_visible`), not of the
std that was added.

Sharp source crops: every photograph is first downscaled (MATLAB bicubic, with
antialiasing) by ``f = max(U(1.5, 2.5), short_side / U(384, 768))`` so camera
softness, sensor noise and the source's own JPEG artefacts shrink below the
"none" levels, then ``size x size`` windows whose texture score
(:func:`semsr.data.corpus.crops.texture_score`) is at least ``min_texture`` are
chosen (blur is unobservable on a flat patch).

Context (revision 5): the degradation is applied to a ``context x context``
region (default 192 px, at most the photo's short side) around the window and
the window is cut out afterwards, as in a real LR image, which was degraded
whole. Degrading the 96-px window itself made a 4x-downscaled sample a 24-px
image under a Gaussian up to 41 px wide, dominated by the border padding.

Visible-noise levels (revision 5): the noise level and its value are drawn
like the other types, as the std *left visible after the JPEG*. When the
codec keeps only part of the noise, the sample is rendered again with the
added std divided by the measured gain, so the visible std lands in the drawn
interval (up to three times; the added std is capped at twice the interval's
upper bound, beyond which a strong JPEG turns noise into blotches, and ~91 %
of the noisy samples land inside; the rest take the nearest level). Labels
then respect the gaps between levels as for the other types
(before, a slight noise under a strong JPEG could leave 1-2 units visible,
labelled by the nearest level though hardly distinguishable from none).

Total blur (revision 6): the blur is applied before the downscale, on the
grid of the image one ends up with (the classical ``(x * k) downscaled + n``
order), and its label is the level of the *total* blur the image shows: the
Gaussian's std combined with the resampling's own softness,
``sqrt(s^2 + resampling_blur(d)^2)`` (:data:`RESAMPLING_BLUR`, fitted per
resampling mode). Without noise, "downscaled by d and slightly blurred" and
"moderately blurred" are the same image; with the blur measured on the small
image (revisions up to 5) such pairs had different blur labels, and blur
stopped at 0.88 held-out accuracy. Now they share the blur label and differ
only in the downscale label. So an image enlarged from 2x smaller is at least
"slightly" blurred, and one from 4x smaller at least "moderately".

Held-out split
--------------
:func:`is_held_out` puts ~15 % of the photographs (by a hash of the file name,
so the same photo is held out in ``data_root()/train/bsds500`` and in a corpus
copy) aside. ``semsr train-irpad`` never sees them; ``semsr bench-irpad``
evaluates on them only. The classic SR benchmarks are refused as training data.

Datasets are written to disk first (``images.npy`` uint8 ``(N, S, S, 3)``,
``labels.npy`` int64 ``(N, 4)``, ``params.npy`` float32 ``(N, 4)``,
``meta.json``) and then trained on with random ``crop x crop`` windows and the
eight flips/transpositions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from semsr.data.corpus.crops import load_rgb_uint8, sample_crop_boxes
from semsr.core.errors import SemsrError
from semsr.priors.irpad import (
    DEGRADATION_TYPES,
    LEVELS,
    PARAMETERS,
    IRPADConfig,
    IRPADEstimator,
    IRPADNet,
    Level,
    dihedral,
    level_of,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
HELD_OUT_PERCENT = 15
#: Bumped whenever :func:`degrade` or the sampling changes (stored datasets are then rebuilt).
PIPELINE_REVISION = 6
DOWN_MODES = ("imresize", "area", "bilinear")
UP_MODES = ("bicubic", "bilinear")
#: Softness of "down by d, then up by d" as the std of the Gaussian that best matches it, per unit of d
#: (final-grid px), for each (down, up) mode pair; least-squares fits on sharp photographs, d = 1.8 .. 4.2
#: (:func:`fit_resampling_blur`). Without antialiasing, "bilinear" down aliases rather than blurs.
RESAMPLING_BLUR: dict[tuple[str, str], float] = {
    ("imresize", "bicubic"): 0.414, ("imresize", "bilinear"): 0.502,
    ("area", "bicubic"): 0.452, ("area", "bilinear"): 0.55,
    ("bilinear", "bicubic"): 0.36, ("bilinear", "bilinear"): 0.45,
}


# --------------------------------------------------------------------------- split and sources


def is_held_out(path: str | Path, percent: int = HELD_OUT_PERCENT) -> bool:
    """Whether a photograph belongs to the IRPAD evaluation split (stable hash of its file name)."""
    digest = hashlib.blake2b(Path(path).name.lower().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < percent


def _benchmark_dirs() -> list[Path]:
    from semsr.core.paths import data_root

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
            from semsr.data.corpus.manifest import Manifest

            with Manifest(src, readonly=True) as m:
                files = [src.parent / rec.path for rec in m.images()]
        elif src.is_dir():
            files = [p for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        else:
            files = [src]
        for f in files:
            if is_held_out(f) == held_out:
                found.setdefault(f.name.lower(), f)
    return sorted(found.values())


def default_sources() -> list[Path]:
    """``data_root()/train/bsds500`` (raises when the shared data folder is missing)."""
    from semsr.core.paths import data_root

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
def fit_resampling_blur(images: Sequence[torch.Tensor], d: float, down_mode: str, up_mode: str,
                        sigmas: Sequence[float] = tuple(np.arange(0.3, 4.01, 0.05))) -> float:
    """The Gaussian std whose blur best matches (least squares) "down by ``d``, up by ``d``" on ``images``.

    ``images``: sharp ``(1, 3, S, S)`` tensors in [0, 1], ``S`` the same for all; a 16-px border is ignored.
    How :data:`RESAMPLING_BLUR` was measured (its entries are the fitted std divided by ``d``).
    """
    from semsr.data.degradations import filter2d, gaussian_kernel

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


def sample_params(rng: np.random.Generator, table: Mapping[str, Sequence[Level]] | None = None,
                  contiguous: bool = False) -> IRPADParams:
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
        blur=values["blur"], aniso=float(rng.uniform(1.0, 1.3)), theta=float(rng.uniform(0, math.pi)),
        noise=values["noise"], grey=bool(rng.uniform() < 0.4), jpeg=values["jpeg"],
        downscale=values["downscale"], down_mode=DOWN_MODES[int(rng.integers(len(DOWN_MODES)))],
        up_mode=UP_MODES[int(rng.integers(len(UP_MODES)))], noise_seed=int(rng.integers(0, 2**62)),
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
    from semsr.ops.imresize import imresize

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
    from semsr.data.degradations import add_gaussian_noise, filter2d, gaussian_kernel, jpeg_compress

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


def render_visible(hr: torch.Tensor, p: IRPADParams, contiguous: bool = False,
                   table: Mapping[str, Sequence[Level]] | None = None,
                   retries: int = 3) -> tuple[torch.Tensor, IRPADParams]:
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
    from semsr.ops.imresize import imresize

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
        return _generate(photos, n, size, seed, crops_per_visit, min_texture, contiguous, sink, progress,
                         context)


def _generate(
    photos: Sequence[Path], n: int, size: int, seed: int, crops_per_visit: int, min_texture: float,
    contiguous: bool, sink: Callable[[int, np.ndarray, IRPADParams], None] | None,
    progress: Callable[[int], None] | None, context: int,
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


def _meta(photos: Sequence[Path], n: int, size: int, seed: int, min_texture: float, contiguous: bool,
          held_out: bool, context: int) -> dict[str, Any]:
    from semsr.priors.irpad import levels_to_json

    return {"pipeline": PIPELINE_REVISION, "types": list(DEGRADATION_TYPES), "levels": levels_to_json(LEVELS),
            "n": n, "size": size, "context": context,
            "seed": seed, "min_texture": min_texture, "contiguous": contiguous, "held_out": held_out,
            "photos": [str(p) for p in photos]}


def make_in_memory(photos: Sequence[Path], n: int, size: int = 96, seed: int = 0, min_texture: float = 3.0,
                   contiguous: bool = False, held_out: bool = True, context: int = 192) -> IRPADData:
    """Generate a synthetic set in memory (used by ``semsr bench-irpad``)."""
    images = np.zeros((n, size, size, 3), np.uint8)

    def sink(i: int, arr: np.ndarray, p: IRPADParams) -> None:
        images[i] = arr

    params = generate(photos, n, size, seed, min_texture=min_texture, contiguous=contiguous, sink=sink,
                      context=context)
    return IRPADData(images, np.array([p.labels for p in params], np.int64),
                     np.array([p.values() for p in params], np.float32),
                     _meta(photos, n, size, seed, min_texture, contiguous, held_out, context))


def build_dataset(folder: str | Path, photos: Sequence[Path], n: int, size: int = 96, seed: int = 0,
                  min_texture: float = 3.0, held_out: bool = False, log_every: int = 1000,
                  context: int = 192) -> Path:
    """Write a synthetic set to ``folder`` (memory-mapped ``images.npy`` etc.; see module docstring).

    An existing complete set with the same recipe (``meta.json``) is reused.
    """
    folder = Path(folder)
    meta = _meta(photos, n, size, seed, min_texture, False, held_out, context)
    meta_path = folder / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        log.info("reusing IRPAD dataset %s", folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    images = np.lib.format.open_memmap(folder / "images.npy.tmp", mode="w+", dtype=np.uint8,
                                       shape=(n, size, size, 3))
    t0 = time.time()

    def sink(i: int, arr: np.ndarray, p: IRPADParams) -> None:
        images[i] = arr

    def progress(i: int) -> None:
        if i % log_every == 0:
            log.info("IRPAD dataset: %d/%d samples (%.0f s)", i, n, time.time() - t0)

    params = generate(photos, n, size, seed, min_texture=min_texture, sink=sink, progress=progress,
                      context=context)
    images.flush()  # renaming a file that is still mapped is fine on POSIX
    (folder / "images.npy.tmp").replace(folder / "images.npy")
    np.save(folder / "labels.npy", np.array([p.labels for p in params], np.int64))
    np.save(folder / "params.npy", np.array([p.values() for p in params], np.float32))
    with open(folder / "params.jsonl", "w", encoding="utf-8") as fh:
        for p in params:
            fh.write(json.dumps(asdict(p)) + "\n")
    meta_path.write_text(json.dumps(meta, indent=1))
    return folder


def load_dataset(folder: str | Path) -> IRPADData:
    """Open a set written by :func:`build_dataset` (images memory-mapped)."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise SemsrError("not a complete IRPAD dataset (meta.json missing)", folder)
    return IRPADData(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
                     np.load(folder / "params.npy"), json.loads((folder / "meta.json").read_text()))


# --------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """Hyper-parameters of :func:`train` (all recorded in the exported config)."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    val_fraction: float = 0.04
    seed: int = 0
    threads: int = 1
    channels: tuple[int, ...] = (16, 32, 48, 64, 96)
    crop: int = 64
    highpass: bool = True
    lines: bool = True


def _batch(data: IRPADData, idx: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``crop`` windows of samples ``idx``, each under a random flip/transposition."""
    s = data.images.shape[1]
    out = np.empty((len(idx), crop, crop, 3), np.uint8)
    for j, i in enumerate(idx):
        t, left = rng.integers(0, s - crop + 1, size=2)
        out[j] = data.images[i, t : t + crop, left : left + crop]
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
    x = dihedral(x, int(rng.integers(8)))
    return x.contiguous(), torch.from_numpy(data.labels[idx])


def accuracy(estimator: IRPADEstimator, data: IRPADData, batch_size: int = 128) -> dict[str, Any]:
    """Per-type interval accuracy and confusion matrices of ``estimator`` on ``data``.

    Returns ``{"per_type": {type: acc}, "confusion": {type: [[count]] (true x predicted)}, "n": N,
    "mean": mean accuracy, "by_downscale_noise": {type: [[acc or None]]}}``; the last splits each
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

    split = {t: [[cell(j, d, n) for n in range(len(table["noise"]))] for d in range(len(table["downscale"]))]
             for j, t in enumerate(types)}
    return {"per_type": per_type, "mean": float(np.mean(list(per_type.values()))), "n": len(data),
            "confusion": {t: c.tolist() for t, c in conf.items()}, "by_downscale_noise": split}


def train(data: IRPADData, settings: TrainSettings, log_fn: Callable[[str], None] = print,
          extra_record: Mapping[str, Any] | None = None,
          init: IRPADNet | None = None) -> tuple[IRPADNet, dict[str, Any]]:
    """Train an :class:`IRPADNet` on ``data`` (the last ``val_fraction`` is validation).

    AdamW with a one-cycle schedule, summed cross-entropy over the four heads.
    With ``init`` training continues from that model (its architecture wins over
    ``settings.channels`` etc., the training window ``settings.crop`` becomes its
    analysis window; its record is kept under ``"previous"``).
    Returns the model (eval mode) and a training record (settings, timings,
    validation accuracy per epoch) that is also stored in ``model.config.training``.
    """
    torch.set_num_threads(max(1, settings.threads))
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    n = len(data)
    n_val = max(1, int(round(n * settings.val_fraction)))
    train_idx = np.arange(n - n_val)
    val = IRPADData(data.images[n - n_val :], data.labels[n - n_val :], data.params[n - n_val :], data.meta)
    if init is not None:
        model, previous = init, dict(init.config.training)
        if init.config.levels != data.meta["levels"]:
            raise SemsrError("the initial IRPAD weights were trained on other levels than this data set")
        settings = replace(settings, channels=tuple(init.config.channels), highpass=init.config.highpass,
                           lines=init.config.lines)
        model.config.crop = settings.crop  # fully convolutional: the window may grow when fine-tuning
        model.config.parameters = dict(PARAMETERS)  # the meaning of the labels is this data set's
    else:
        config = IRPADConfig(channels=tuple(settings.channels), crop=settings.crop, highpass=settings.highpass,
                             lines=settings.lines)
        model, previous = IRPADNet(config), None
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = len(train_idx) // settings.batch_size
    total = steps_per_epoch * settings.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total, pct_start=0.15)
    types = list(DEGRADATION_TYPES)
    history: list[dict[str, Any]] = []
    t0, c0 = time.time(), time.process_time()
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        perm = rng.permutation(train_idx)
        running = 0.0
        for b in range(steps_per_epoch):
            x, y = _batch(data, perm[b * settings.batch_size : (b + 1) * settings.batch_size], settings.crop, rng)
            out = model(x)
            loss = sum(F.cross_entropy(out[t], y[:, j], label_smoothing=settings.label_smoothing)
                       for j, t in enumerate(types))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += float(loss.detach())
            if step % 50 == 0:
                log_fn(f"epoch {epoch + 1} step {step}/{total} loss {running / (b + 1):.3f} "
                       f"({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s cpu)")
        model.eval()
        acc = accuracy(IRPADEstimator(model, flips=1), val)  # no test-time flips: a quick per-epoch check
        history.append({"epoch": epoch + 1, "loss": running / max(1, steps_per_epoch), "val": acc["per_type"],
                        "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)})
        log_fn(f"epoch {epoch + 1}: val " + ", ".join(f"{t} {a:.3f}" for t, a in acc["per_type"].items()))
    record = {"settings": {**asdict(settings), "channels": list(settings.channels)},
              "dataset": {k: v for k, v in data.meta.items() if k != "photos"} | {"photos": len(data.meta["photos"])},
              "history": history, "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
              **(dict(extra_record) if extra_record else {})}
    if previous is not None:
        record["previous"] = previous
    model.config.training = record
    return model.eval(), record
