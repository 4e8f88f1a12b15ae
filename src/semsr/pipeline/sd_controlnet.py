"""Stable Diffusion + SR ControlNet super-resolution pipeline, and the ``sd-controlnet`` method.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --bicubic--> hint (B,3,H,W) --VAE.encode--> z_LR (optional start, noised to t=T)
    prompts --text encoder--> context (B,77,D)       noise (seeded)
    for t in schedule:  eps = UNet(z_t, t, context, + ControlNet(z_t, t, context, hint))   [CFG, latent tiles]
    z_0 --VAE.decode (tiled)--> image --colour fix (adain|wavelet|none) vs hint--> HR

Building blocks live in sibling modules (loading, text, sampler,
latent_tiling, colorfix); this module only composes them. Recipe modules
reuse :func:`controlnet_unet_forward` (the per-step model call, also the
training forward for the eps-MSE loss), :func:`make_hint` and
:class:`SDControlNetSR` (subclass it or wrap :meth:`SDControlNetSR.spatial_denoiser`
to add priors/fusion).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from semsr.errors import SemsrError, UnavailableError
from semsr.methods import MethodSpec, register
from semsr.ops.imresize import imresize
from semsr.pipeline.colorfix import COLOUR_FIXES, colour_fix
from semsr.pipeline.latent_tiling import Window, crop_window, tiled, untiled, vae_tiling
from semsr.pipeline.loading import SDComponents, atomic_write_bytes, load_controlnet, load_sd
from semsr.pipeline.precision import check_dtype, prepare_module
from semsr.pipeline.sampler import SCHEDULER_NAMES, make_scheduler, sample
from semsr.pipeline.text import CLIPTextConditioner, MiniLMTextEncoder, load_text_conditioner
from semsr.priors.report import PriorReporter, first

log = logging.getLogger("semsr.pipeline")

#: XPSR's inference negative prompt (used as the default negative prompt).
DEFAULT_NEGATIVE = "blurry, dotted, noise, unclear, low-res, over-smoothed"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5
#: Latent side above which the latent is tiled automatically (96 latent = 768 px).
AUTO_TILE_ABOVE = 96
#: Default latent tile (SD's native 64 latent = 512 px).
DEFAULT_LATENT_TILE = 64


def new_controlnet(unet: Any, **kwargs: Any) -> Any:
    """A fresh SR ControlNet initialised from ``unet`` (``ControlNetModel.from_unet``; zero convs are 0)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, **kwargs)


def make_hint(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ControlNet hint: ``lr`` ``(B,3,h,w)`` in [0,1] bicubic-upsampled (MATLAB-style) to ``size``, clamped."""
    return imresize(lr.float(), size=size).clamp_(0, 1)


def controlnet_unet_forward(unet: Any, controlnet: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                            hint: torch.Tensor, conditioning_scale: float = 1.0) -> torch.Tensor:
    """UNet noise prediction with ControlNet residuals.

    Args:
        x: ``(B, 4, h, w)`` noisy latent (model dtype).
        t: scalar or ``(B,)`` timesteps.
        context: ``(B, L, D)`` cross-attention context.
        hint: ``(B, 3, f*h, f*w)`` pixel-space hint in [0, 1] (``f`` = VAE factor).
    Returns:
        ``(B, 4, h, w)`` model output (epsilon or v).
    """
    down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=hint,
                           conditioning_scale=conditioning_scale, return_dict=False)
    return unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


def _progress_fn(progress: Any, desc: str = "denoise") -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """Turn a ``progress`` option (callable, bool or None) into ``(callback, close)``."""
    if callable(progress):
        return progress, lambda: None
    if progress is False:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=None if progress is None else False)
        bar.update(done - bar.n)

    return update, lambda: bar.close() if bar is not None else None


class SDControlNetSR:
    """The SD + SR ControlNet pipeline (see the module docstring for the flow).

    Attributes:
        vae, unet, controlnet: diffusers models (eval, no grad, ``dtype``).
        text: conditioning encoder with ``encode(prompts) -> (B, 77, D)``.
        scheduler_config: the checkpoint's scheduler config dict.
        factor: VAE downsampling factor (8 for SD).
        last_timings: seconds of the last call: ``encode``, ``denoise``, ``decode``, ``steps``.
    """

    def __init__(self, *, vae: Any, unet: Any, controlnet: Any, text: Any, scheduler_config: dict[str, Any],
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                 channels_last: bool = False, compile: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = check_dtype(dtype, self.device)
        prep = dict(device=self.device, dtype=self.dtype, channels_last=channels_last)
        self.vae = prepare_module(vae, **prep)
        self.unet = prepare_module(unet, **prep, compile=compile)
        self.controlnet = prepare_module(controlnet, **prep, compile=compile)
        self.text = text.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        hint_factor = 2 ** (len(self.controlnet.config.conditioning_embedding_out_channels) - 1)
        if hint_factor != self.factor:
            raise SemsrError(f"ControlNet hint encoder downsamples by {hint_factor} but the VAE by {self.factor}")
        if int(self.text.width) != int(self.unet.config.cross_attention_dim):
            raise SemsrError(f"text encoder width {self.text.width} != UNet cross-attention width "
                             f"{self.unet.config.cross_attention_dim}")
        # latent sizes must survive the UNet's downsamplings
        self.latent_multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        self.last_timings: dict[str, float] = {}

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_components(cls, components: SDComponents, controlnet: Any | None = None, **kwargs: Any) -> SDControlNetSR:
        """Build from loaded SD components; ``controlnet=None`` creates a new one with ``from_unet``."""
        if controlnet is None:
            log.warning("no ControlNet given: using a new, untrained one made from the UNet "
                        "(its zero convolutions ignore the LR hint)")
            controlnet = new_controlnet(components.unet)
        text = load_text_conditioner(components, dtype=kwargs.get("dtype", "fp32"), device=kwargs.get("device", "cpu"))
        return cls(vae=components.vae, unet=components.unet, controlnet=controlnet, text=text,
                   scheduler_config=components.scheduler_config, **kwargs)

    @classmethod
    def from_pretrained(cls, base: str | Path, controlnet: str | Path | None = None, *,
                        base_config: str | Path | None = None, **kwargs: Any) -> SDControlNetSR:
        """Load from local paths only.

        Args:
            base: SD folder or single-file checkpoint.
            controlnet: ControlNet folder; when omitted, ``<base>/controlnet`` is used
                if it exists (folders written by :meth:`save_pretrained`), else a new
                ControlNet is created from the UNet (untrained: the hint has no effect).
            base_config: config folder for single-file ``base`` (see :func:`load_sd`).
            **kwargs: ``device``, ``dtype``, ``channels_last``, ``compile``.
        """
        device = torch.device(kwargs.get("device", "cpu"))
        dtype = check_dtype(kwargs.get("dtype", "fp32"), device)
        comps = load_sd(base, dtype=dtype, config=base_config)
        if controlnet is None and Path(base).is_dir() and (Path(base) / "controlnet").is_dir():
            controlnet = Path(base) / "controlnet"
        net = load_controlnet(controlnet, dtype=dtype) if controlnet is not None else None
        return cls.from_components(comps, net, **{**kwargs, "dtype": dtype, "device": device})

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers SD folder (``vae/ unet/ scheduler/`` + text) plus ``controlnet/``.

        :meth:`from_pretrained` on the folder restores an identical pipeline.
        """
        from diffusers import __version__ as diffusers_version

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
                                 "feature_extractor": [None, None], "safety_checker": [None, None],
                                 "requires_safety_checker": False}
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
        sched = make_scheduler("ddpm", self.scheduler_config)
        sched.save_pretrained(folder / "scheduler")
        index.update(vae=["diffusers", "AutoencoderKL"], unet=["diffusers", "UNet2DConditionModel"],
                     scheduler=["diffusers", type(sched).__name__])
        if isinstance(self.text, CLIPTextConditioner):
            self.text.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
            self.text.tokenizer.save_pretrained(folder / "tokenizer")
            index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
        elif isinstance(self.text, MiniLMTextEncoder):
            self.text.save_projection(folder / "text_projection")
            index.update(text_encoder=[None, None], tokenizer=[None, None])
        else:
            raise SemsrError(f"cannot save text encoder of type {type(self.text).__name__}")
        atomic_write_bytes(folder / "model_index.json", (json.dumps(index, indent=2) + "\n").encode())
        return folder

    # ------------------------------------------------------------------ pieces

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
        return ((z.float() - shift) * cfg.scaling_factor)

    def vae_decode(self, z: torch.Tensor, tile_px: int | None = None) -> torch.Tensor:
        """Scaled latent ``(B, 4, h, w)`` -> image ``(B, 3, f*h, f*w)`` float32 in [0, 1]."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        with torch.no_grad(), vae_tiling(self.vae, tile_px):
            x = self.vae.decode((z / cfg.scaling_factor + shift).to(self.device, self.dtype)).sample
        return ((x.float() + 1) / 2).clamp_(0, 1)

    def conditions(self, prompts: list[str], negative_prompt: str | list[str] | None,
                   guidance_scale: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The sampler's ``(cond, uncond)`` for ``B`` prompts: ``{"context": (B, L, D)}``; ``uncond``
        is None without CFG. Subclasses with more conditions (e.g. XPSR's two prompts) override this."""
        cond = {"context": self.encode_prompts(prompts)}
        if negative_prompt is None or guidance_scale == 1.0:
            return cond, None
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        return cond, {"context": self.encode_prompts(negs)}

    def spatial_denoiser(self, hint: torch.Tensor, conditioning_scale: float = 1.0):
        """The per-step model call over a latent window (see :mod:`.latent_tiling`).

        ``cond`` is ``{"context": (B, L, D)}``; the hint ``(B, 3, H, W)`` is
        shared by both CFG branches and cropped to the window here.
        """
        hint = hint.to(self.device, self.dtype)

        def spatial(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], window: Window) -> torch.Tensor:
            h = crop_window(hint, window, self.factor)
            if x.shape[0] != h.shape[0]:
                h = h.repeat(x.shape[0] // h.shape[0], 1, 1, 1)
            with torch.no_grad():
                out = controlnet_unet_forward(self.unet, self.controlnet, x.to(self.dtype), t, cond["context"], h,
                                              conditioning_scale)
            return out.float()

        return spatial

    # ------------------------------------------------------------------ run

    def resolve_latent_tile(self, latent_hw: tuple[int, int], latent_tile: int | None) -> int:
        """Latent tile side to use (0 = untiled): ``None`` = automatic (64 when a side exceeds 96)."""
        if latent_tile is None:
            latent_tile = DEFAULT_LATENT_TILE if max(latent_hw) > AUTO_TILE_ABOVE else 0
        if latent_tile <= 0 or latent_tile >= max(latent_hw):
            return 0
        m = self.latent_multiple
        return max(m, (int(latent_tile) // m) * m)

    def __call__(self, lr: torch.Tensor, *, scale: int = 4, prompt: str | list[str] = "",
                 negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE, steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, scheduler: str = "ddpm",
                 colour_fix_method: str = "adain", latent_tile: int | None = None, tile_overlap: int | None = None,
                 start_from_lr: bool = True, strength: float = 1.0, conditioning_scale: float = 1.0,
                 progress: Any = False) -> torch.Tensor:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        Args:
            prompt / negative_prompt: one string or one per image; ``negative_prompt``
                None (or guidance_scale 1) disables CFG.
            steps, guidance_scale, seed, scheduler: sampling (``ddpm`` | ``ddim`` | ``dpm++``).
            colour_fix_method: ``adain`` | ``wavelet`` | ``none``.
            latent_tile: latent tile side (None: automatic, 0: untiled); the VAE
                is tiled with the same tile in pixels.
            tile_overlap: latent overlap between tiles (default tile // 4).
            start_from_lr: start from the LR latent noised to the first timestep
                (XPSR) instead of pure noise; ``strength`` < 1 skips the noisiest steps.
            conditioning_scale: ControlNet residual scale.
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
        """
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise SemsrError(f"expected a (B, 3, H, W) image tensor, got shape {tuple(lr.shape)}")
        bsz, _, h, w = lr.shape
        out_h, out_w = h * scale, w * scale
        mult = self.factor * self.latent_multiple
        pad_h, pad_w = math.ceil(out_h / mult) * mult, math.ceil(out_w / mult) * mult
        hint = make_hint(lr, (out_h, out_w))
        hint_padded = F.pad(hint, (0, pad_w - out_w, 0, pad_h - out_h), mode="replicate")
        lat_hw = (pad_h // self.factor, pad_w // self.factor)
        tile = self.resolve_latent_tile(lat_hw, latent_tile)
        vae_tile = tile * self.factor if tile else None
        timings: dict[str, float] = {}

        prompts = [prompt] * bsz if isinstance(prompt, str) else list(prompt)
        t0 = time.perf_counter()
        cond, uncond = self.conditions(prompts, negative_prompt, guidance_scale)
        init = self.vae_encode(hint_padded, vae_tile) if start_from_lr else None
        timings["encode"] = time.perf_counter() - t0

        spatial = self.spatial_denoiser(hint_padded, conditioning_scale)
        overlap = tile // 4 if tile_overlap is None else int(tile_overlap)
        denoiser = tiled(spatial, tile, overlap) if tile else untiled(spatial)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        callback, close = _progress_fn(progress)
        t0 = time.perf_counter()
        try:
            z = sample(denoiser, make_scheduler(scheduler, self.scheduler_config),
                       shape=(bsz, int(self.unet.config.in_channels), *lat_hw), cond=cond, uncond=uncond,
                       guidance_scale=guidance_scale, steps=int(steps), generator=generator, init_latents=init,
                       strength=strength, device=self.device, progress=callback)
        finally:
            close()
        timings["denoise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        image = self.vae_decode(z, vae_tile)[:, :, :out_h, :out_w]
        timings["decode"] = time.perf_counter() - t0
        timings["steps"] = float(steps)
        self.last_timings = timings
        return colour_fix(image.cpu(), hint, colour_fix_method)


# ---------------------------------------------------------------------- method

_RUN_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": DEFAULT_NEGATIVE, "steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
    "seed": 0, "scheduler": "ddpm", "colour_fix": "adain", "tile": 0, "latent_tile": None, "tile_overlap": None,
    "start_from_lr": True, "strength": 1.0, "conditioning_scale": 1.0, "progress": False,
}


class SDControlNetMethod(PriorReporter):
    """``sd-controlnet`` as a registry :class:`~semsr.methods.Method` (tiles in latent space).

    Run options (``None`` = default): prompt, negative_prompt, steps (20),
    guidance_scale (4.5), seed (0), scheduler (ddpm|ddim|dpm++), colour_fix
    (adain|wavelet|none), tile (tile side in *input* pixels as the CLI's
    ``--tile``; 0 = automatic), latent_tile (tile side in latent pixels,
    overrides ``tile``), tile_overlap (latent), start_from_lr, strength,
    conditioning_scale, progress. Other options (e.g. ``tile_pad``) are ignored.
    ``last_priors``: the prompt and negative prompt of the last call (no
    priors are extracted; :meth:`suggest_priors` offers the default negative prompt).
    """

    name = "sd-controlnet"
    tiles_itself = True

    def __init__(self, pipeline: SDControlNetSR, scale: int = 4, name: str = "sd-controlnet") -> None:
        self.pipeline = pipeline
        self.scale = int(scale)
        self.name = name
        self.device = pipeline.device

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        opts = dict(_RUN_DEFAULTS)
        opts.update({k: v for k, v in run_opts.items() if k in _RUN_DEFAULTS and v is not None})
        latent_tile = opts["latent_tile"]
        if latent_tile is None and opts["tile"]:
            latent_tile = max(1, round(int(opts["tile"]) * self.scale / self.pipeline.factor))
        out = self.pipeline(
            x, scale=self.scale, prompt=opts["prompt"], negative_prompt=opts["negative_prompt"], steps=opts["steps"],
            guidance_scale=opts["guidance_scale"], seed=opts["seed"], scheduler=opts["scheduler"],
            colour_fix_method=opts["colour_fix"], latent_tile=latent_tile, tile_overlap=opts["tile_overlap"],
            start_from_lr=opts["start_from_lr"], strength=opts["strength"],
            conditioning_scale=opts["conditioning_scale"], progress=opts["progress"])
        self.report_priors(prompt=first(opts["prompt"]), negative_prompt=first(opts["negative_prompt"]))
        return out

    def prior_suggestion(self, x: torch.Tensor) -> dict[str, Any]:
        """Nothing is extracted from the image: the default negative prompt, to edit."""
        return {"negative_prompt": _RUN_DEFAULTS["negative_prompt"]}


def build(base: str | None = None, controlnet: str | None = None, *, device: str = "cpu",
          dtype: str | torch.dtype | None = None, scale: int = 4, base_config: str | None = None,
          channels_last: bool = False, compile: bool = False, threads: int | None = None) -> SDControlNetMethod:
    """Factory of ``sd-controlnet``: ``base`` = SD folder or single file, ``controlnet`` = ControlNet folder."""
    if base is None:
        raise UnavailableError("sd-controlnet needs a Stable Diffusion checkpoint: pass --base PATH "
                               "(a diffusers SD folder or a .safetensors/.ckpt file)")
    if threads:
        torch.set_num_threads(int(threads))
    pipe = SDControlNetSR.from_pretrained(base, controlnet, base_config=base_config, device=device,
                                          dtype=dtype or "fp32", channels_last=channels_last, compile=compile)
    return SDControlNetMethod(pipe, scale=scale)


def sd_cli_options() -> list[dict[str, Any]]:
    """``semsr upscale`` options of every SD-based method (sampler, latent tiles, strength, base config).

    Returns fresh dicts on every call, so recipes may extend the list they get.
    """
    return [
        {"flags": ["--base-config"], "target": "build", "metavar": "DIR",
         "help": "local diffusers config folder for a single-file --base"},
        {"flags": ["--scheduler"], "target": "run", "choices": list(SCHEDULER_NAMES),
         "help": "sampler (default: ddpm)"},
        {"flags": ["--latent-tile"], "target": "run", "type": int, "metavar": "N",
         "help": "latent tile side (overrides --tile; default: 64 when the latent exceeds 96)"},
        {"flags": ["--tile-overlap"], "target": "run", "type": int, "metavar": "N",
         "help": "latent tile overlap (default: tile/4)"},
        {"flags": ["--strength"], "target": "run", "type": float,
         "help": "fraction of the schedule run from the noised LR latent (default: 1.0)"},
    ]


register(MethodSpec(
    name="sd-controlnet",
    factory=build,
    scale=4,
    summary="Stable Diffusion + SR ControlNet (bring your own SD and ControlNet; local paths only)",
    extra={"cli_options": sd_cli_options(), "colour_fixes": list(COLOUR_FIXES)},
))
