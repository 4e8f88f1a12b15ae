"""Real-ESRGAN's second-order degradation model (HR -> realistic LR), seeded.

Per image (Real-ESRGAN, Wang et al. 2021, ``options/train_realesrgan_x4plus.yml``):

0. optional unsharp masking of the HR input (Real-ESRGAN degrades its USM-sharpened GT);
1. **first stage**: blur (random kernel), random resize (up / down / keep;
   area / bilinear / bicubic), Gaussian or Poisson noise (colour or grey),
   JPEG;
2. **second stage**: blur with probability ``second_blur_prob``, random resize
   relative to the target size, noise;
3. **final**: in random order, [resize to ``H/scale`` + sinc filter] and JPEG;
   the sinc filter is applied with probability ``final_sinc_prob``;
4. clip and round to 8 bits.

Everything random about one image is drawn from one seed, first into a
:class:`DegradationParams` record (kernels, factors, modes, noise levels,
qualities, a noise seed) that is JSON-serialisable — usable as a degradation
label — and then applied. The same (image, seed) always gives byte-identical
output, independently of the other images in the batch: with ``seed=s`` image
``i`` of a batch uses seed ``s + i``.

Usage::

    deg = RealESRGANDegradation()                     # published defaults, x4
    lr = deg(hr, seed=0)                              # hr (B, 3, H, W) in [0, 1]
    lr, params = deg(hr, seed=[3, 7], return_params=True)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from semsr.core.errors import SemsrError
from semsr.data.degradations.jpeg import jpeg_compress
from semsr.data.degradations.kernels import (
    KERNEL_TYPES,
    KernelSpec,
    filter2d,
    sample_kernel,
    sample_sinc,
    usm_sharpen,
)
from semsr.data.degradations.noise import add_gaussian_noise, add_poisson_noise
from semsr.data.degradations.resize import RESIZE_MODES, resize, scaled_size

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StageConfig:
    """Random ranges of one degradation stage (defaults: Real-ESRGAN's first stage)."""

    blur_prob: float = 1.0
    kernel_size: int = 21
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def validate(self, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` for inconsistent settings."""
        for name in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{where}.{name} must be in [0, 1], got {v}")
        if self.kernel_size < 7 or self.kernel_size % 2 != 1:
            raise ValueError(f"{where}.kernel_size must be odd and >= 7, got {self.kernel_size}")
        bad = [k for k in self.kernel_list if k not in KERNEL_TYPES]
        if bad:
            raise ValueError(f"{where}.kernel_list has unknown kernels {bad}; known: {list(KERNEL_TYPES)}")
        if len(self.kernel_prob) != len(self.kernel_list) or sum(self.kernel_prob) <= 0:
            raise ValueError(f"{where}.kernel_prob must give one positive weight per kernel_list entry")
        if len(self.resize_prob) != 3 or sum(self.resize_prob) <= 0 or min(self.resize_prob) < 0:
            raise ValueError(f"{where}.resize_prob must be 3 non-negative weights (up, down, keep)")
        for name in (
            "blur_sigma",
            "betag_range",
            "betap_range",
            "resize_range",
            "noise_range",
            "poisson_scale_range",
            "jpeg_range",
        ):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise ValueError(f"{where}.{name} must be 0 < lo <= hi, got {[lo, hi]}")
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"{where}.resize_range must contain 1, got {list(self.resize_range)}")
        if self.jpeg_range[1] > 100:
            raise ValueError(f"{where}.jpeg_range must be within [1, 100], got {list(self.jpeg_range)}")


STAGE2_DEFAULTS = StageConfig(
    blur_prob=0.8,
    blur_sigma=(0.2, 1.5),
    resize_prob=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0),
    poisson_scale_range=(0.05, 2.5),
)

# Real-ESRGAN option names (``X`` first stage, ``X2`` second stage) -> StageConfig fields
_FLAT_STAGE_KEYS = {
    "blur_kernel_size": "kernel_size",
    "kernel_list": "kernel_list",
    "kernel_prob": "kernel_prob",
    "sinc_prob": "sinc_prob",
    "blur_sigma": "blur_sigma",
    "betag_range": "betag_range",
    "betap_range": "betap_range",
    "resize_prob": "resize_prob",
    "resize_range": "resize_range",
    "gaussian_noise_prob": "gaussian_noise_prob",
    "noise_range": "noise_range",
    "poisson_scale_range": "poisson_scale_range",
    "gray_noise_prob": "gray_noise_prob",
    "jpeg_range": "jpeg_range",
}


def _stage_from(base: StageConfig, values: Mapping[str, Any], where: str) -> StageConfig:
    known = {f.name for f in fields(StageConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} option(s) {unknown}")
    conv = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}
    return replace(base, **conv)


@dataclass(frozen=True)
class DegradationConfig:
    """The whole degradation model; defaults equal Real-ESRGAN x4plus training.

    Load from a dict / YAML either in nested form (``stage1: {...}``,
    ``stage2: {...}``) or with Real-ESRGAN's own option names
    (``blur_sigma``, ``blur_sigma2``, ``second_blur_prob``, ``final_sinc_prob``...);
    :meth:`from_yaml` also reads a complete Real-ESRGAN training options file.
    """

    scale: int = 4
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = STAGE2_DEFAULTS
    final_sinc_prob: float = 0.8
    resize_modes: tuple[str, ...] = RESIZE_MODES
    sharpen_input: bool = True
    usm_weight: float = 0.5
    usm_radius: int = 50
    usm_threshold: float = 10.0

    def __post_init__(self) -> None:
        if int(self.scale) != self.scale or self.scale < 1:
            raise ValueError(f"scale must be a positive integer, got {self.scale}")
        if not 0.0 <= self.final_sinc_prob <= 1.0:
            raise ValueError(f"final_sinc_prob must be in [0, 1], got {self.final_sinc_prob}")
        bad = [m for m in self.resize_modes if m not in RESIZE_MODES]
        if bad or not self.resize_modes:
            raise ValueError(f"resize_modes must be a non-empty subset of {list(RESIZE_MODES)}, got {bad}")
        self.stage1.validate("stage1")
        self.stage2.validate("stage2")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], strict: bool = True) -> DegradationConfig:
        """Build from nested or Real-ESRGAN-style flat options (``ValueError`` on bad keys).

        With ``strict=False`` unknown keys are ignored (for whole training files).
        """
        top_fields = {f.name for f in fields(cls)} - {"stage1", "stage2"}
        top: dict[str, Any] = {}
        s1: dict[str, Any] = dict(values.get("stage1") or {})
        s2: dict[str, Any] = dict(values.get("stage2") or {})
        unknown = []
        for key, val in values.items():
            if key in ("stage1", "stage2"):
                continue
            if key in top_fields:
                top[key] = tuple(val) if isinstance(val, list) else val
            elif key == "second_blur_prob":
                s2["blur_prob"] = val
            elif key == "first_blur_prob":
                s1["blur_prob"] = val
            elif key in _FLAT_STAGE_KEYS:
                s1[_FLAT_STAGE_KEYS[key]] = val
            elif key.endswith("2") and key[:-1] in _FLAT_STAGE_KEYS:
                s2[_FLAT_STAGE_KEYS[key[:-1]]] = val
            else:
                unknown.append(key)
        if unknown and strict:
            raise ValueError(f"unknown degradation option(s) {sorted(unknown)}")
        return cls(
            stage1=_stage_from(StageConfig(), s1, "stage1"),
            stage2=_stage_from(STAGE2_DEFAULTS, s2, "stage2"),
            **top,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> DegradationConfig:
        """Load a YAML file (nested, flat, or a full Real-ESRGAN options file)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise SemsrError(f"cannot read degradation config ({err.strerror})", path) from None
        except yaml.YAMLError as err:
            raise SemsrError(f"invalid YAML ({err})", path) from None
        if not isinstance(data, dict):
            raise SemsrError("degradation config must be a mapping", path)
        strict = True
        if isinstance(data.get("degradation"), dict):
            data = data["degradation"]
        elif "datasets" in data:  # a Real-ESRGAN training options file
            merged = {k: v for k, v in data.items() if k != "datasets"}
            merged.update((data.get("datasets") or {}).get("train") or {})
            data, strict = merged, False
        try:
            return cls.from_dict(data, strict=strict)
        except (TypeError, ValueError) as err:
            raise SemsrError(f"bad degradation config: {err}", path) from None

    def to_dict(self) -> dict[str, Any]:
        """Nested, YAML/JSON-friendly form (tuples as lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(asdict(self))


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class StageParams:
    """The random choices of one stage for one image."""

    kernel: KernelSpec | None  # None: no blur in this stage
    resize_direction: str  # "up" | "down" | "keep"
    resize_factor: float
    resize_mode: str
    noise_type: str  # "gaussian" | "poisson"
    noise_level: float  # sigma (0-255 units) or Poisson scale
    grey_noise: bool
    jpeg_quality: float


@dataclass(frozen=True)
class DegradationParams:
    """Every random choice for one image; ``to_dict()`` is a JSON degradation label."""

    seed: int
    stage1: StageParams
    stage2: StageParams
    final_sinc: KernelSpec | None  # None: no final sinc
    final_order: str  # "resize_sinc_then_jpeg" | "jpeg_then_resize_sinc"
    final_resize_mode: str
    noise_seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_seed(seed: int, key: str) -> int:
    """A stable per-image seed from a run seed and an image key (e.g. its file name).

    Independent of Python's hash salt and of the other images in a folder.
    """
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _sample_stage(
    rng: np.random.Generator, cfg: StageConfig, kernel: KernelSpec, modes: tuple[str, ...]
) -> StageParams:
    use_blur = rng.uniform() < cfg.blur_prob
    rp = np.asarray(cfg.resize_prob, dtype=np.float64)
    direction = ("up", "down", "keep")[int(rng.choice(3, p=rp / rp.sum()))]
    if direction == "up":
        factor = float(rng.uniform(1.0, cfg.resize_range[1]))
    elif direction == "down":
        factor = float(rng.uniform(cfg.resize_range[0], 1.0))
    else:
        factor = 1.0
    mode = modes[int(rng.integers(len(modes)))]
    if rng.uniform() < cfg.gaussian_noise_prob:
        noise_type, level = "gaussian", float(rng.uniform(*cfg.noise_range))
    else:
        noise_type, level = "poisson", float(rng.uniform(*cfg.poisson_scale_range))
    grey = bool(rng.uniform() < cfg.gray_noise_prob)
    quality = float(rng.uniform(*cfg.jpeg_range))
    return StageParams(kernel if use_blur else None, direction, factor, mode, noise_type, level, grey, quality)


def sample_params(cfg: DegradationConfig, seed: int) -> DegradationParams:
    """Draw all random choices for one image from ``seed`` (pure function)."""
    rng = np.random.default_rng(int(seed))

    def kernel(st: StageConfig) -> KernelSpec:
        return sample_kernel(
            rng,
            st.kernel_size,
            st.kernel_list,
            st.kernel_prob,
            st.sinc_prob,
            st.blur_sigma,
            st.betag_range,
            st.betap_range,
        )

    k1, k2 = kernel(cfg.stage1), kernel(cfg.stage2)
    final = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(rng.choice(list(range(7, cfg.stage2.kernel_size + 1, 2))))
        final = sample_sinc(rng, size, cfg.stage2.kernel_size, (math.pi / 3, math.pi))
    s1 = _sample_stage(rng, cfg.stage1, k1, cfg.resize_modes)
    s2 = _sample_stage(rng, cfg.stage2, k2, cfg.resize_modes)
    order = "resize_sinc_then_jpeg" if rng.uniform() < 0.5 else "jpeg_then_resize_sinc"
    final_mode = cfg.resize_modes[int(rng.integers(len(cfg.resize_modes)))]
    noise_seed = int(rng.integers(0, 2**63 - 1))
    return DegradationParams(int(seed), s1, s2, final, order, final_mode, noise_seed)


# ----------------------------------------------------------------------------- application


def _kernel_tensor(spec: KernelSpec) -> torch.Tensor:
    return torch.from_numpy(spec.build()).float()


def _add_noise(x: torch.Tensor, p: StageParams, gen: torch.Generator) -> torch.Tensor:
    if p.noise_type == "gaussian":
        return add_gaussian_noise(x, p.noise_level, p.grey_noise, gen)
    return add_poisson_noise(x, p.noise_level, p.grey_noise, gen)


class RealESRGANDegradation:
    """Callable HR -> LR degradation (see module docstring).

    Args:
        config: a :class:`DegradationConfig`, a dict (see
            :meth:`DegradationConfig.from_dict`) or ``None`` for the defaults.
    """

    def __init__(self, config: DegradationConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = DegradationConfig()
        elif not isinstance(config, DegradationConfig):
            config = DegradationConfig.from_dict(config)
        self.config = config
        self.scale = config.scale

    def seeds_for(self, batch: int, seed: int | Sequence[int] | torch.Generator | None) -> list[int]:
        """Per-image seeds: ``s + i`` for an int, the list itself, or drawn from a generator."""
        if seed is None or isinstance(seed, torch.Generator):
            drawn = torch.randint(0, 2**62, (batch,), generator=seed)
            return [int(v) for v in drawn]
        if isinstance(seed, (int, np.integer)):
            return [int(seed) + i for i in range(batch)]
        seeds = [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
        return seeds

    def __call__(
        self,
        hr: torch.Tensor,
        seed: int | Sequence[int] | torch.Generator | None = None,
        return_params: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[DegradationParams]]:
        """Degrade a batch.

        Args:
            hr: ``(B, 3, H, W)`` float in [0, 1].
            seed: int (image ``i`` uses ``seed + i``), one seed per image, or a
                ``torch.Generator`` to draw seeds from (``None``: torch's default one).
            return_params: also return the sampled :class:`DegradationParams`.

        Returns:
            ``(B, 3, H // scale, W // scale)`` float32 in [0, 1], multiples of 1/255
            (and the parameter list when asked).
        """
        if hr.ndim != 4 or hr.shape[1] != 3:
            raise ValueError(f"expected hr of shape (B, 3, H, W), got {tuple(hr.shape)}")
        seeds = self.seeds_for(hr.shape[0], seed)
        params = [sample_params(self.config, s) for s in seeds]
        out = torch.cat([self.apply(hr[i : i + 1], p) for i, p in enumerate(params)], dim=0)
        return (out, params) if return_params else out

    @torch.no_grad()
    def apply(
        self, hr: torch.Tensor, params: DegradationParams, trace: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Degrade one image ``(1, 3, H, W)`` with fixed ``params``.

        If ``trace`` is a dict it receives the intermediate images ``"input"``
        (after sharpening), ``"stage1"``, ``"stage2"`` (before the final step)
        and ``"lr"``.
        """
        cfg = self.config
        gen = torch.Generator().manual_seed(params.noise_seed)
        x = hr.detach().to(dtype=torch.float32, device="cpu")
        h, w = x.shape[-2:]
        if cfg.sharpen_input:
            x = usm_sharpen(x, cfg.usm_weight, cfg.usm_radius, cfg.usm_threshold)
        if trace is not None:
            trace["input"] = x
        # first stage
        p1 = params.stage1
        if p1.kernel is not None:
            x = filter2d(x, _kernel_tensor(p1.kernel))
        x = resize(x, scaled_size((h, w), p1.resize_factor), p1.resize_mode)
        x = _add_noise(x, p1, gen)
        x = jpeg_compress(x, p1.jpeg_quality)
        if trace is not None:
            trace["stage1"] = x
        # second stage
        p2 = params.stage2
        if p2.kernel is not None:
            x = filter2d(x, _kernel_tensor(p2.kernel))
        target = (h // cfg.scale, w // cfg.scale)
        x = resize(x, (int(h / cfg.scale * p2.resize_factor), int(w / cfg.scale * p2.resize_factor)), p2.resize_mode)
        x = _add_noise(x, p2, gen)
        if trace is not None:
            trace["stage2"] = x

        # final: [resize back + sinc] and JPEG in random order
        def resize_sinc(t: torch.Tensor) -> torch.Tensor:
            t = resize(t, target, params.final_resize_mode)
            return filter2d(t, _kernel_tensor(params.final_sinc)) if params.final_sinc is not None else t

        if params.final_order == "resize_sinc_then_jpeg":
            x = jpeg_compress(resize_sinc(x), p2.jpeg_quality)
        else:
            x = resize_sinc(jpeg_compress(x, p2.jpeg_quality))
        x = (x * 255.0).round().clamp(0, 255) / 255.0
        if trace is not None:
            trace["lr"] = x
        return x
