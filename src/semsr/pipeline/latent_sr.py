"""The steps every Stable Diffusion latent SR pipeline shares (sd-controlnet, xpsr/dalpsr, coser, mmsr).

A recipe's ``__call__`` is its own conditioning between two shared steps::

    layout = self.layout(lr, scale, latent_tile)     # hint, replicate-padded hint, latent size, tiles
    ... recipe: contexts / priors, z_LR = self.vae_encode(layout.hint_padded, layout.vae_tile),
        spatial = the per-step model call over a latent window ...
    image = self.denoise_decode(spatial, layout, ...)  # (tiled) sampling, VAE decode, crop, colour fix

:class:`LatentSRPipeline` holds these steps plus the VAE / text helpers; a
pipeline class inherits it and sets the attributes it reads (``vae``,
``unet``, ``text``, ``device``, ``dtype``, ``factor``, ``latent_multiple``,
``scheduler_config``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from semsr.core.dtypes import resolve_device, resolve_dtype
from semsr.core.errors import SemsrError
from semsr.ops.imresize import imresize
from semsr.pipeline.colorfix import colour_fix
from semsr.pipeline.guidance import Denoiser
from semsr.pipeline.latent_tiling import SpatialDenoiser, Window, tiled, untiled, vae_tiling
from semsr.pipeline.memory import untiled_fits
from semsr.pipeline.options import LatentSROptions
from semsr.pipeline.precision import compile_mode, prepare_module, step_begin
from semsr.pipeline.sampler import make_scheduler, sample
from semsr.pipeline.tome import token_merging

#: Latent tile of the automatic choice when the untiled step does not fit (SD's native 64 latent = 512 px).
DEFAULT_LATENT_TILE = 64


def make_hint(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ControlNet hint: ``lr`` ``(B,3,h,w)`` in [0,1] bicubic-upsampled (MATLAB-style) to ``size``, clamped."""
    return imresize(lr.float(), size=size).clamp_(0, 1)


def progress_fn(progress: Any, desc: str = "denoise") -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """Turn a ``progress`` option (callable, bool or None) into ``(callback, close)``.

    A callable is used as is; False gives no callback; True (or None, then only
    on a terminal) a tqdm bar named ``desc``, closed by ``close()``.
    """
    if callable(progress):
        return progress, lambda: None
    if progress is False:
        return None, lambda: None
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=None if progress is None else False)
        bar.update(done - bar.n)

    return update, lambda: bar.close() if bar is not None else None


def marked_steps(spatial: SpatialDenoiser, mode: str | None) -> SpatialDenoiser:
    """``spatial`` with :func:`~semsr.pipeline.precision.step_begin` before every model call (CUDA graphs:
    each call may overwrite the previous call's output buffers, so the output is cloned)."""

    def marked(x: torch.Tensor, t: torch.Tensor, cond: Any, window: Window) -> torch.Tensor:
        step_begin(mode)
        return spatial(x, t, cond, window).clone()

    return marked


@dataclass(frozen=True)
class SRLayout:
    """Sizes and hint of one SR call.

    Attributes:
        batch: ``B``.
        out_hw: ``(s*h, s*w)`` output size.
        lat_hw: latent size of the padded output (a multiple of the UNet's granularity).
        hint: ``(B, 3, s*h, s*w)`` float32 bicubic LR in [0, 1] (the colour-fix reference).
        hint_padded: ``(B, 3, f*lat_h, f*lat_w)`` the hint replicate-padded to the latent size.
        tile: latent tile side (0 = untiled).
        vae_tile: VAE tile side in pixels (None = untiled).
    """

    batch: int
    out_hw: tuple[int, int]
    lat_hw: tuple[int, int]
    hint: torch.Tensor
    hint_padded: torch.Tensor
    tile: int
    vae_tile: int | None


class LatentSRPipeline:
    """Shared pieces of the SD latent SR pipelines (see the module docstring).

    Subclass constructors take their recipe's parts and the :class:`~semsr.pipeline.options.Placement`
    keywords and call :meth:`setup_sd`, which sets ``vae``, ``unet``, ``text``
    (``encode(prompts) -> (B, L, D)``), ``device``, ``dtype``, ``channels_last``, ``compile_mode``,
    ``factor`` (VAE downsampling), ``latent_multiple`` (UNet granularity) and ``scheduler_config``;
    :meth:`prepare` places a recipe's other modules the same way.
    """

    vae: Any
    unet: Any
    text: Any
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    compile_mode: str | None
    factor: int
    latent_multiple: int
    scheduler_config: dict[str, Any]
    #: Latent tile layout of :meth:`denoise_decode` (:func:`~semsr.pipeline.latent_tiling.tiled`'s ``style``).
    tile_style: str = "even"

    def setup_sd(
        self,
        *,
        vae: Any,
        unet: Any,
        text: Any,
        scheduler_config: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        channels_last: bool = False,
        compile: bool | str | None = None,
        scale: int = 4,
    ) -> None:
        """Hold the frozen SD parts on ``device`` in ``dtype`` (eval, no grad) and derive ``factor``
        (VAE downsampling) and ``latent_multiple`` (UNet granularity); ``compile`` applies to the UNet."""
        self.scale = int(scale)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.channels_last = bool(channels_last)
        self.compile_mode = compile_mode(compile)
        self.vae = self.prepare(vae, channels_last=True)
        self.unet = self.prepare(unet, channels_last=True, compile=True)
        self.text = text.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)

    def prepare(self, module: Any, *, channels_last: bool = False, compile: bool = False) -> Any:
        """``module`` on the pipeline's device and dtype, eval, no grad; channels-last and compiled when the
        pipeline is (``channels_last`` / ``compile`` say whether this module takes part)."""
        return prepare_module(
            module,
            device=self.device,
            dtype=self.dtype,
            channels_last=channels_last and self.channels_last,
            compile=self.compile_mode if compile else None,
        )

    def tome_models(self) -> list[Any]:
        """The models token merging (``tome_ratio``) applies to: the UNet and, when the pipeline has one,
        the ControlNet."""
        return [m for m in (self.unet, getattr(self, "controlnet", None)) if m is not None]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``B`` prompts -> ``(B, 77, D)`` context in the pipeline dtype."""
        with torch.no_grad():
            return self.text.encode(prompts).to(self.device, self.dtype)

    def vae_encode(self, image: torch.Tensor, tile_px: int | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> scaled latent ``(B, 4, H/f, W/f)`` float32 (posterior mode)."""
        cfg = self.vae.config
        with torch.no_grad(), vae_tiling(self.vae, tile_px):
            z = self.vae.encode((image * 2 - 1).to(self.device, self.dtype)).latent_dist.mode()
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z.float() - shift) * cfg.scaling_factor

    def vae_decode(self, z: torch.Tensor, tile_px: int | None = None) -> torch.Tensor:
        """Scaled latent ``(B, 4, h, w)`` -> image ``(B, 3, f*h, f*w)`` float32 in [0, 1]."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        with torch.no_grad(), vae_tiling(self.vae, tile_px):
            x = self.vae.decode((z / cfg.scaling_factor + shift).to(self.device, self.dtype)).sample
        return ((x.float() + 1) / 2).clamp_(0, 1)

    def resolve_latent_tile(
        self, latent_hw: tuple[int, int], latent_tile: int | None, *, batch: int = 1, free: int | None = None
    ) -> int:
        """Latent tile side to use (0 = untiled). ``None`` = automatic: untiled when a CFG step on ``batch``
        images (and the VAE decode) fits in the device's free memory (``free`` bytes; None: measured now),
        else :data:`DEFAULT_LATENT_TILE` (rule: :mod:`semsr.pipeline.memory`)."""
        if latent_tile is None:
            fits = max(latent_hw) <= DEFAULT_LATENT_TILE or untiled_fits(
                self.unet.config,
                self.vae.config,
                latent_hw,
                batch=2 * batch,
                dtype=self.dtype,
                device=self.device,
                free=free,
            )
            latent_tile = 0 if fits else DEFAULT_LATENT_TILE
        if latent_tile <= 0 or latent_tile >= max(latent_hw):
            return 0
        m = self.latent_multiple
        return max(m, (int(latent_tile) // m) * m)

    def layout(self, lr: torch.Tensor, scale: int, latent_tile: int | None) -> SRLayout:
        """Check ``lr`` ``(B, 3, h, w)`` and lay out a ``scale`` x SR call: the hint, its padding to
        a size the VAE and UNet accept, the latent size and the latent / VAE tiles."""
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise SemsrError(f"expected a (B, 3, H, W) image tensor, got shape {tuple(lr.shape)}")
        bsz, _, h, w = lr.shape
        out_h, out_w = h * scale, w * scale
        mult = self.factor * self.latent_multiple
        pad_h, pad_w = math.ceil(out_h / mult) * mult, math.ceil(out_w / mult) * mult
        hint = make_hint(lr, (out_h, out_w))
        hint_padded = F.pad(hint, (0, pad_w - out_w, 0, pad_h - out_h), mode="replicate")
        lat_hw = (pad_h // self.factor, pad_w // self.factor)
        tile = self.resolve_latent_tile(lat_hw, latent_tile, batch=bsz)
        return SRLayout(
            batch=bsz,
            out_hw=(out_h, out_w),
            lat_hw=lat_hw,
            hint=hint,
            hint_padded=hint_padded,
            tile=tile,
            vae_tile=tile * self.factor if tile else None,
        )

    def denoise_decode(
        self,
        spatial: SpatialDenoiser,
        layout: SRLayout,
        options: LatentSROptions,
        *,
        channels: int,
        cond: Any,
        guide: Callable[[Denoiser], Denoiser] | None = None,
        init_latents: torch.Tensor | None = None,
        init_timestep: int | None = None,
        progress: Any,
        timings: dict[str, float],
    ) -> torch.Tensor:
        """Sample the latent with ``spatial`` (on ``layout.tile`` tiles), decode, crop and colour-fix.

        Args:
            spatial: ``(x, t, cond, window) -> model output`` over a latent window.
            channels: latent channels ``C`` of the sampled ``(B, C, *layout.lat_hw)``.
            cond: the condition of every step (:func:`~semsr.pipeline.sampler.sample`).
            guide: guidance wrapper around the (tiled) denoiser, e.g.
                ``lambda d: cfg(d, uncond, scale)`` (:mod:`semsr.pipeline.guidance`); None: no guidance.
            options: the sampling options: ``steps``, ``seed`` (noise from a CPU generator),
                ``scheduler``, ``strength``, ``start_from_lr`` (use ``init_latents``),
                ``tile_overlap`` (None: tile // 4), ``colour_fix``, ``tome_ratio`` and ``tome_targets`` (token merging in
                :meth:`tome_models` during sampling, :mod:`semsr.pipeline.tome`; 0 = off).
            init_latents: the latent to start from when ``options.start_from_lr`` (e.g. the LR latent).
            init_timestep: the timestep ``init_latents`` are noised to (None: the first one sampled).
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
            timings: gets ``denoise`` and ``decode`` seconds and ``steps``.
        Returns:
            ``(B, 3, *layout.out_hw)`` float32 in [0, 1] on the CPU, colour-fixed against ``layout.hint``.
        """
        tile = layout.tile
        overlap = tile // 4 if options.tile_overlap is None else int(options.tile_overlap)
        if self.compile_mode == "reduce-overhead":
            spatial = marked_steps(spatial, self.compile_mode)
        denoiser = tiled(spatial, tile, overlap, style=self.tile_style) if tile else untiled(spatial)
        if guide is not None:
            denoiser = guide(denoiser)
        callback, close = progress_fn(progress)
        t0 = time.perf_counter()
        merging = token_merging(
            self.tome_models(),
            float(getattr(options, "tome_ratio", 0.0)),
            seed=int(options.seed),
            targets=tuple(str(getattr(options, "tome_targets", "attn1")).split("+")),
        )
        try:
            with merging:
                z = sample(
                    denoiser,
                    make_scheduler(options.scheduler, self.scheduler_config),
                    shape=(layout.batch, int(channels), *layout.lat_hw),
                    cond=cond,
                    steps=int(options.steps),
                    generator=torch.Generator("cpu").manual_seed(int(options.seed)),
                    init_latents=init_latents if options.start_from_lr else None,
                    strength=options.strength,
                    init_timestep=init_timestep,
                    device=self.device,
                    progress=callback,
                )
        finally:
            close()
        timings["denoise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_h, out_w = layout.out_hw
        image = self.vae_decode(z, layout.vae_tile)[:, :, :out_h, :out_w]
        timings["decode"] = time.perf_counter() - t0
        timings["steps"] = float(options.steps)
        return colour_fix(image, layout.hint, options.colour_fix).cpu()
