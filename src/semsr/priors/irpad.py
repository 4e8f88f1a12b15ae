"""IRPAD (DaLPSR): degradation type-and-degree estimator and its text descriptions.

DaLPSR's *Image-Restoration Prompt Alignment Decoder* turns "how is this image
degraded" into a classification problem: for every degradation type the degree
is discretised into a few intervals, a network predicts one interval per type,
and each predicted interval is mapped to a fixed text phrase; the phrases,
joined, are the low-level (degradation) prompt, e.g.::

    "slight blur, heavy noise, moderate jpeg compression artifacts, full resolution"

Degradation model the intervals refer to
----------------------------------------
The labels are defined by one controlled single-stage degradation (see
:mod:`semsr.train.irpad`), applied to a sharp image ``x`` whose pixel grid is
the grid IRPAD looks at::

    x -> blur (sigma) -> downscale by d -> noise (sigma_n) -> 8-bit -> upscale by d -> 8-bit -> JPEG (q)

i.e. the noise happens on the *small* image, which is then enlarged back
("the image was captured small, then upscaled"), and the file was compressed
last, at its final size, as cameras and the web do. The blur label is of the
*total* blur on that grid: the Gaussian's std combined with the softness of
the resampling itself (about 0.36-0.55 d px, by resampling mode; see
:func:`semsr.train.irpad.resampling_blur`), so a 4x-downscaled image is at
least "moderately" blurred and the blur phrase describes how soft the image
looks. With ``d = 1`` (level
"none") the image is observed at its own resolution, the usual case of an LR
input. The JPEG quantises part of the noise away (a heavy JPEG leaves little of
a slight noise), so the noise label is the level of the std the JPEG left
visible (:func:`semsr.train.irpad.degrade_visible`), not of the std added
(why this order: docs/irpad.md). Parameters and their intervals (:data:`LEVELS`):

============  =====================================  =======  ============  ============  ============
type          parameter                              none     slight        moderate      heavy
============  =====================================  =======  ============  ============  ============
blur          total Gaussian-equivalent std, px      0        0.9 - 1.3     2.0 - 2.7     3.6 - 5.0
noise         Gaussian std left visible, 0-255       0        3 - 5         8 - 12        16 - 24
jpeg          IJG quality (lower = stronger)         no JPEG  90 - 75       65 - 50       40 - 30
downscale     resize factor d (down, then back up)   1        1.8 - 2.2     2.8 - 3.2     3.8 - 4.2
============  =====================================  =======  ============  ============  ============

The intervals leave gaps between levels on purpose (the brief of DaLPSR's
follow-up: choose *distinguishable* degrees): a parameter inside a gap is
outside the training distribution and is labelled with the nearest interval
(:func:`level_of`; ``semsr bench irpad --contiguous`` measures that case).

Model
-----
:class:`IRPADNet` is a small fully convolutional CNN (one full-resolution conv,
four stride-2 stages, global mean+std pooling) with one linear classification
head per type; next to the RGB input it sees fixed forensic filters (a
high-pass residual, 8-px line gradients) and, before the heads, the JPEG
quantisation-lattice scores of :mod:`semsr.priors.jpeg_lattice`. :class:`IRPADEstimator` runs it on an image of any size by
averaging log-probabilities over a grid of ``crop x crop`` windows. The network
is a :class:`~semsr.core.components.Component`: a weights folder is
``config.json`` + ``diffusion_pytorch_model.safetensors`` (``save_pretrained`` /
:func:`load_irpad`); trained weights ship in ``semsr/assets/weights/irpad/``.
The config also carries the levels and their phrases (so a retrained model
with other intervals describes itself) and the record of how the weights were
trained.

The text prior ``"irpad"`` (:class:`IRPADProvider`) returns the description and,
in ``meta``, the predicted level and probabilities per type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from semsr.core.components import Component, load_component, register_component, register_to_config
from semsr.core.errors import UnavailableError
from semsr.core.fingerprint import fingerprint
from semsr.core.paths import assets_dir
from semsr.data.degradations.jpeg import RGB2YCC
from semsr.priors.base import DEVICE_OPTION, PriorResult, ProviderOption, ProviderSpec, check_image, register_provider
from semsr.priors.jpeg_lattice import JPEGLattice

DEGRADATION_TYPES: tuple[str, ...] = ("blur", "noise", "jpeg", "downscale")
_REVISION = "2"


@dataclass(frozen=True)
class Level:
    """One degree interval of one degradation type.

    Attributes:
        name: ``"none"``, ``"slight"``, ``"moderate"``, ``"heavy"``.
        low, high: the parameter interval the degree is sampled from
            (``low == high`` for a point, e.g. "none"); for JPEG ``low`` is
            the *higher* quality (intervals are ordered by severity).
        text: the phrase this level contributes to the description.
    """

    name: str
    low: float
    high: float
    text: str


#: Degree intervals per type, ordered from "none" to the most severe (see module docstring).
LEVELS: dict[str, tuple[Level, ...]] = {
    "blur": (
        Level("none", 0.0, 0.0, "no blur"),
        Level("slight", 0.9, 1.3, "slight blur"),
        Level("moderate", 2.0, 2.7, "moderate blur"),
        Level("heavy", 3.6, 5.0, "heavy blur"),
    ),
    "noise": (
        Level("none", 0.0, 0.0, "no noise"),
        Level("slight", 3.0, 5.0, "slight noise"),
        Level("moderate", 8.0, 12.0, "moderate noise"),
        Level("heavy", 16.0, 24.0, "heavy noise"),
    ),
    "jpeg": (
        Level("none", 100.0, 100.0, "no compression artifacts"),
        Level("slight", 90.0, 75.0, "slight jpeg compression artifacts"),
        Level("moderate", 65.0, 50.0, "moderate jpeg compression artifacts"),
        Level("heavy", 40.0, 30.0, "heavy jpeg compression artifacts"),
    ),
    "downscale": (
        Level("none", 1.0, 1.0, "full resolution"),
        Level("slight", 1.8, 2.2, "slightly low resolution"),
        Level("moderate", 2.8, 3.2, "low resolution"),
        Level("heavy", 3.8, 4.2, "very low resolution"),
    ),
}

#: What the parameter of each type means (documentation, also stored in the config).
PARAMETERS: dict[str, str] = {
    "blur": "total blur: Gaussian-equivalent std in pixels of the image, the Gaussian applied combined with the "
    "softness of the downscale and enlargement",
    "noise": "std in 0-255 units of the Gaussian noise added to the small image that the JPEG left visible",
    "jpeg": "IJG JPEG quality, applied last at the image's final size (100 = not compressed)",
    "downscale": "factor d the image was downscaled by before being enlarged back (1 = not)",
}


def levels_to_json(levels: Mapping[str, Sequence[Level]]) -> dict[str, list[dict[str, Any]]]:
    """``LEVELS``-like mapping -> JSON-serialisable dict."""
    return {t: [asdict(lv) for lv in lvs] for t, lvs in levels.items()}


def levels_from_json(data: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, tuple[Level, ...]]:
    """Inverse of :func:`levels_to_json`."""
    return {
        t: tuple(Level(str(d["name"]), float(d["low"]), float(d["high"]), str(d["text"])) for d in lvs)
        for t, lvs in data.items()
    }


def describe(
    levels: Mapping[str, int], table: Mapping[str, Sequence[Level]] | None = None, omit_none: bool = False
) -> str:
    """Degradation prompt for predicted level indices, e.g. ``{"blur": 1, ...}``.

    Phrases are joined with ``", "`` in the order of ``table`` (default
    :data:`LEVELS`). With ``omit_none`` the "none" phrases are dropped (and an
    image with no degradation at all is described as ``"clean image"``).
    """
    table = LEVELS if table is None else table
    parts = []
    for t, lvs in table.items():
        if t not in levels:
            continue
        idx = int(levels[t])
        if omit_none and idx == 0:
            continue
        parts.append(lvs[idx].text)
    return ", ".join(parts) if parts else "clean image"


def level_of(kind: str, value: float, table: Mapping[str, Sequence[Level]] | None = None) -> int:
    """Index of the interval of ``kind`` that contains ``value`` (nearest interval when in a gap).

    Distances are measured on the parameter axis (for JPEG the quality, whose
    intervals are listed from high to low quality).
    """
    table = LEVELS if table is None else table
    best, best_d = 0, math.inf
    for i, lv in enumerate(table[kind]):
        lo, hi = min(lv.low, lv.high), max(lv.low, lv.high)
        d = 0.0 if lo <= value <= hi else min(abs(value - lo), abs(value - hi))
        if d < best_d:
            best, best_d = i, d
    return best


# --------------------------------------------------------------------------- network

#: Config keys of an :class:`IRPADNet` (the architecture and label space; ``training`` is a free-form record).
CONFIG_KEYS = (
    "channels",
    "hidden",
    "crop",
    "highpass",
    "lines",
    "lattice",
    "lattice_bins",
    "levels",
    "types",
    "parameters",
    "training",
)


def _conv_bn(ci: int, co: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]


@register_component
class IRPADNet(Component):
    """Multi-head degradation-degree classifier.

    ``forward(x)`` takes ``(B, 3, H, W)`` float in [0, 1] (any ``H, W >= 16``) and
    returns ``{type: logits (B, n_levels(type))}``. The input (and, with
    ``highpass`` / ``lines``, fixed forensic filters of it: a high-pass residual,
    8-px line averages of the luma gradient) goes through one full-resolution
    conv and ``len(channels) - 1`` stages of (stride-2 conv, conv), all 3x3 +
    BatchNorm + ReLU; mean and std over space (and, with ``lattice``, the JPEG
    lattice scores through a linear layer) feed a shared layer and one linear
    head per type.

    Args (the component config, ``model.config.<name>``):
        channels: widths of the full-resolution conv and the stride-2 stages.
        hidden: width of the shared layer before the heads.
        crop: window size (px) the network was trained on and is run on.
        highpass: also feed a fixed second-order high-pass residual of the
            input (the "KV" kernel of image forensics), which exposes noise and
            JPEG block edges from the first layer on.
        lines: also feed the luma's horizontal (vertical) difference averaged
            over 8 rows (columns): a block edge of a JPEG grid is a straight
            step, so it keeps its height while independent noise drops by
            sqrt(8).
        lattice: also score the image's JPEG quantisation lattice
            (:class:`semsr.priors.jpeg_lattice.JPEGLattice`, ``lattice_bins``
            candidate quality scales) and feed the scores, through a small
            learned layer, next to the pooled CNN features.
        levels: the label space (``LEVELS`` as JSON, :func:`levels_to_json`) including
            the phrases; default :data:`LEVELS`.
        types: the order of the types (heads, phrases of a description); default: the
            order of ``levels`` (recorded because JSON configs are written with sorted keys).
        parameters: what each type's parameter means; default :data:`PARAMETERS`.
        training: free-form record of how the weights were trained.
    """

    @register_to_config
    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 48, 64, 96),
        hidden: int = 128,
        crop: int = 64,
        highpass: bool = True,
        lines: bool = True,
        lattice: bool = True,
        lattice_bins: int = 128,
        levels: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        types: Sequence[str] | None = None,
        parameters: Mapping[str, str] | None = None,
        training: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        levels = levels_to_json(LEVELS) if levels is None else {t: list(lv) for t, lv in levels.items()}
        types = list(levels) if types is None else list(types)
        if sorted(types) != sorted(levels):
            raise ValueError(f"IRPAD types {types} do not match the level table's {sorted(levels)}")
        self.register_to_config(
            levels=levels,
            types=types,  # the defaults too: the file describes the model
            parameters=dict(PARAMETERS) if parameters is None else dict(parameters),
            training={} if training is None else dict(training),
        )
        ch = tuple(int(c) for c in channels)
        if highpass:
            kv = torch.tensor([[-1.0, 2.0, -1.0], [2.0, -4.0, 2.0], [-1.0, 2.0, -1.0]]) / 4.0
            self.register_buffer("kv", kv.expand(3, 1, 3, 3).clone(), persistent=False)
        self.register_buffer("luma", torch.tensor(RGB2YCC[0]).view(1, 3, 1, 1), persistent=False)
        if lines:
            line = torch.cat([-torch.ones(8, 1), torch.ones(8, 1)], dim=1) / 8.0  # (8, 2): d/dx, mean over 8 rows
            self.register_buffer("line_x", line.view(1, 1, 8, 2).clone(), persistent=False)
            self.register_buffer("line_y", line.t().contiguous().view(1, 1, 2, 8).clone(), persistent=False)
        n_in = 3 + 3 * int(highpass) + 2 * int(lines)
        layers = _conv_bn(n_in, ch[0], 1)
        for ci, co in zip(ch, ch[1:]):
            layers += _conv_bn(ci, co, 2) + _conv_bn(co, co, 1)
        self.features = nn.Sequential(*layers)
        n_pooled = 2 * ch[-1]
        if lattice:
            # named jpeg_lattice: ``lattice`` is the config flag (it has no weights, so no state-dict key)
            self.jpeg_lattice = JPEGLattice(bins=lattice_bins)
            self.lattice_proj = nn.Sequential(nn.Linear(self.jpeg_lattice.out_features, 64), nn.ReLU(inplace=True))
            n_pooled += 64
        self.shared = nn.Sequential(nn.Linear(n_pooled, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, len(levels[t])) for t in types})

    @property
    def types(self) -> tuple[str, ...]:
        """The degradation types of the heads, in order."""
        return tuple(self.config.types)

    def level_table(self) -> dict[str, tuple[Level, ...]]:
        """The label space as :class:`Level` tuples per type, in :attr:`types` order."""
        table = levels_from_json(self.config.levels)
        return {t: table[t] for t in self.types}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        inp = x * 2.0 - 1.0
        if cfg.highpass:  # residual x 16: noise of std 2/255 becomes ~0.1
            hp = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kv, groups=3) * 16.0
            inp = torch.cat([inp, hp], dim=1)
        if cfg.lines:  # pad (left, right, top, bottom) so the output keeps the input size
            y = (x * self.luma).sum(1, keepdim=True)
            lx = F.conv2d(F.pad(y, (0, 1, 3, 4), mode="replicate"), self.line_x) * 16.0
            ly = F.conv2d(F.pad(y, (3, 4, 0, 1), mode="replicate"), self.line_y) * 16.0
            inp = torch.cat([inp, lx, ly], dim=1)
        f = self.features(inp)
        flat = f.flatten(2)
        parts = [flat.mean(-1), flat.std(-1, unbiased=False)]
        if cfg.lattice:
            parts.append(self.lattice_proj(self.jpeg_lattice(x)))
        h = self.shared(torch.cat(parts, dim=1))
        return {t: head(h) for t, head in self.heads.items()}


def default_weights_dir() -> Path:
    """Folder of the shipped IRPAD weights (``semsr/assets/weights/irpad``)."""
    return assets_dir() / "weights" / "irpad"


def load_irpad(folder: str | Path | None = None, device: str | torch.device = "cpu") -> IRPADNet:
    """Load an :class:`IRPADNet` (eval mode) from a component folder (default: the shipped weights)."""
    folder = Path(folder).expanduser() if folder is not None else default_weights_dir()
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UnavailableError(
            "no IRPAD weights (need config.json and .safetensors weights; "
            "train them with `semsr train --config configs/irpad.yaml`)",
            folder,
        )
    model = load_component(IRPADNet, folder)
    with torch.no_grad():  # own, aligned storage: SIMD kernels give other roundings on the file's offsets
        for t in (*model.parameters(), *model.buffers()):
            t.data = t.data.clone()
    return model.to(device).eval()


# --------------------------------------------------------------------------- inference


def crop_grid(h: int, w: int, crop: int, max_crops: int = 16) -> list[tuple[int, int]]:
    """Top-left corners of ``crop x crop`` windows covering an ``h x w`` image.

    ``ceil(side / crop)`` windows per side, evenly spread (overlapping when the
    side is not a multiple of ``crop``); a side smaller than ``crop`` gets one
    window at 0 (the window is then the whole side). At most ``max_crops``
    windows, keeping an evenly spaced subset.
    """

    def starts(side: int) -> list[int]:
        if side <= crop:
            return [0]
        n = math.ceil(side / crop)
        return sorted({round(i * (side - crop) / (n - 1)) for i in range(n)})

    grid = [(t, left) for t in starts(h) for left in starts(w)]
    if len(grid) > max_crops:
        idx = torch.linspace(0, len(grid) - 1, max_crops).round().long().tolist()
        grid = [grid[i] for i in dict.fromkeys(idx)]
    return grid


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th (0..7) flip/transposition of square images ``(B, C, H, W)``; 0 is the identity.

    Every degradation of the IRPAD model is invariant to these, so they serve as
    training augmentation and test-time averaging.
    """
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 2:
        x = x.flip(-1)
    if k & 1:
        x = x.flip(-2)
    return x


@dataclass(frozen=True)
class IRPADPrediction:
    """IRPAD output for one image.

    Attributes:
        levels: predicted level index per type.
        probs: per type, the probability of each level.
        text: the description (:func:`describe`).
    """

    levels: dict[str, int]
    probs: dict[str, list[float]]
    text: str

    def level_names(self, table: Mapping[str, Sequence[Level]]) -> dict[str, str]:
        return {t: table[t][i].name for t, i in self.levels.items()}


#: Flips/transpositions averaged per analysis window by default (their effect and cost: docs/irpad.md).
DEFAULT_FLIPS = 8


class IRPADEstimator:
    """Run an :class:`IRPADNet` on whole images.

    Args:
        model: the network, or ``None`` to load ``weights`` (default: shipped).
        weights: an :class:`IRPADNet` component folder (:func:`load_irpad`).
        max_crops: windows averaged per image (see :func:`crop_grid`).
        flips: also average over this many flips/transpositions of each window
            (1 = none, up to 8; see :func:`dihedral`; default :data:`DEFAULT_FLIPS`).
        device: torch device.
    """

    def __init__(
        self,
        model: IRPADNet | None = None,
        weights: str | Path | None = None,
        max_crops: int = 16,
        flips: int = DEFAULT_FLIPS,
        device: str = "cpu",
    ) -> None:
        if not 1 <= int(flips) <= 8:
            raise ValueError(f"flips must be in 1..8, got {flips}")
        self.flips = int(flips)
        self.device = torch.device(device)
        self.model = (model if model is not None else load_irpad(weights, self.device)).eval()
        self.config = self.model.config
        self.table = self.model.level_table()
        self.max_crops = int(max_crops)

    def windows(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B * n, 3, c, c)`` analysis windows (``n`` per image, image-major)."""
        c = self.config.crop
        h, w = image.shape[-2:]
        grid = crop_grid(h, w, c, self.max_crops)
        crops = [image[..., t : t + c, left : left + c] for t, left in grid]
        return torch.stack(crops, dim=1).flatten(0, 1)

    @torch.no_grad()
    def log_probs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean per-window log-probabilities ``{type: (B, n_levels)}`` for ``(B, 3, H, W)`` in [0, 1]."""
        b = image.shape[0]
        win = self.windows(image.float().clamp(0, 1)).to(self.device)
        total: dict[str, torch.Tensor] = {}
        for k in range(self.flips):
            out = self.model(dihedral(win, k) if win.shape[-1] == win.shape[-2] else win)
            for t, v in out.items():
                lp = F.log_softmax(v.float(), dim=1).view(b, -1, v.shape[1]).mean(1).cpu()
                total[t] = total[t] + lp if t in total else lp
        return {t: v / self.flips for t, v in total.items()}

    def predict_batch(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted level indices ``{type: (B,) int64}`` for ``(B, 3, H, W)`` in [0, 1]."""
        return {t: lp.argmax(1) for t, lp in self.log_probs(image).items()}

    def __call__(self, image: torch.Tensor) -> IRPADPrediction:
        """Predict one image ``(1, 3, H, W)`` in [0, 1]."""
        check_image(image)
        lps = self.log_probs(image)
        levels = {t: int(lp[0].argmax()) for t, lp in lps.items()}
        probs = {t: [round(float(p), 4) for p in F.softmax(lp[0], 0)] for t, lp in lps.items()}
        return IRPADPrediction(levels, probs, describe(levels, self.table))


class IRPADProvider:
    """Text prior ``"irpad"``: the DaLPSR degradation description of an image.

    ``meta`` holds per type the level name and the level probabilities.

    Args:
        weights: IRPAD folder (default: the weights shipped with semsr).
        omit_none: leave out the phrases of undegraded types.
        max_crops: analysis windows averaged per image.
        flips: flips/transpositions averaged per window (1..8).
        device: torch device.
    """

    name = "irpad"
    kind = "text"

    def __init__(
        self,
        weights: str | Path | None = None,
        omit_none: bool = False,
        max_crops: int = 16,
        flips: int = DEFAULT_FLIPS,
        device: str = "cpu",
    ) -> None:
        folder = Path(weights).expanduser() if weights is not None else default_weights_dir()
        self.estimator = IRPADEstimator(weights=folder, max_crops=max_crops, flips=flips, device=device)
        self.omit_none = bool(omit_none)
        self.version = (
            f"{_REVISION};{fingerprint([folder])};none={int(not self.omit_none)};"
            f"crops={self.estimator.max_crops};flips={self.estimator.flips}"
        )

    def __call__(self, image: torch.Tensor) -> PriorResult:
        pred = self.estimator(image)
        text = describe(pred.levels, self.estimator.table, omit_none=self.omit_none)
        meta = {"levels": pred.level_names(self.estimator.table), "probs": pred.probs}
        return PriorResult("text", text, meta)


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _make_provider(
    weights: str | Path | None = None,
    omit_none: str | bool = False,
    max_crops: int = 16,
    flips: int = DEFAULT_FLIPS,
    device: str = "cpu",
) -> IRPADProvider:
    return IRPADProvider(
        weights=weights, omit_none=_bool(omit_none), max_crops=int(max_crops), flips=int(flips), device=device
    )


register_provider(
    ProviderSpec(
        name="irpad",
        factory=_make_provider,
        kind="text",
        summary="DaLPSR degradation description (blur/noise/JPEG/downscale degree; shipped IRPAD weights)",
        options=(
            ProviderOption("weights", "--irpad-weights", "IRPAD weights folder (default: shipped weights)"),
            ProviderOption("omit_none", "--irpad-omit-none", "drop the phrases of undegraded types (true/false)"),
            DEVICE_OPTION,
        ),
    )
)
