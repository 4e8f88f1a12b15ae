"""XPSR (cross-modal priors) on SD + SR ControlNet with Semantic-Fusion Attention, and the ``xpsr`` method.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --TextPriors (VLM caption / quality; cached)--> high c_h, low c_l prompts   (semsr.priors.prompts)
    high += ", clean, high-resolution, 8k, high quality"                           (XPSR's added positive)
    ControlNet(z_t, c_h, hint) + SFA layers on c_l  -> residuals                   (semsr.fusion.sfa)
    UNet(z_t, c_h, residuals) + up-block conditional attention to the residuals    (DaLPSR: c_h and c_l)
    CFG: eps = eps(neg_h, neg_l) + s * [eps(c_h, c_l) - eps(neg_h, neg_l)]
         neg_h = "blurry, dotted, noise, unclear, low-res, over-smoothed" (--negative-prompt)
         neg_l = "high resolution, best quality, clear"                   (--low-negative-prompt)
    DDPM 20 steps, s = 4.5, start from the LR latent noised to t=T, AdaIN colour fix

Two presets (``--preset``): ``semsr`` (the flow above on semsr's shared latent SR steps: MATLAB
bicubic hint, replicate padding, LR latent = posterior mode, semsr's tiling) and ``released``, the
released inference script's behaviour (:mod:`semsr.methods.xpsr_released`: its negative and added
prompts, 8-bit PIL hint enlarged to 512 pixels, LR latent sampled from the posterior and noised to
t=T and then to 800, its latent tiles 320 / overlap 8, its 8-bit AdaIN, PIL resize back). A released
weight folder selects ``released`` unless ``--preset semsr`` is given.

A VLM is required: without ``--vlm`` (or ``weights_dir()/vlm``) the build fails with one
line naming ``--vlm`` and ``--no-vlm``. ``--no-vlm`` is the explicit opt-out: the high-level
prompt is the user prompt and the low-level one IRPAD's degradation description, and
``SROutput.priors["no_vlm"]`` records it.

The checkpoint folder (``--checkpoint``) is a component checkpoint
(:mod:`semsr.core.components`) of recipe ``xpsr`` or ``dalpsr`` with the
components ``controlnet`` (diffusers ControlNet), ``sfa``
(:class:`~semsr.fusion.sfa.SFAFusion`) and, from training, ``dfc``
(:class:`~semsr.fusion.dfc.DFCHeads`, unused at inference), or a folder of XPSR's released
weights (``unet/`` + ``controlnet/`` diffusers folders, :mod:`semsr.methods.xpsr_released`), whose
UNet then replaces the base's; ``SROutput.priors["weights"]`` names the released file of each part.

:class:`TwoPromptSR` is the pipeline and the method of both recipes; the
DaLPSR preset (:mod:`semsr.methods.dalpsr`) gives it other text priors
(:func:`build_two_prompt`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from semsr.core.components import load_checkpoint, read_index
from semsr.core.dtypes import apply_threads
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import load_sd
from semsr.core.method import MethodSpec, ProgressFn
from semsr.core.options import option
from semsr.core.outputs import SROutput, compact
from semsr.fusion.sfa import SFA_MODES, SFAFusion
from semsr.methods import register
from semsr.methods.xpsr_released import (
    RELEASED_ADDED_NOISE_LEVEL,
    RELEASED_ADDED_PROMPT,
    RELEASED_LATENT_TILE,
    RELEASED_NEGATIVE,
    RELEASED_PROCESS_SIZE,
    RELEASED_TILE_OVERLAP,
    RELEASED_VAE_DECODER_TILE,
    RELEASED_VAE_ENCODER_TILE,
    from_pil,
    is_released_layout,
    load_released_xpsr,
    script_adain,
    script_hint,
    to_pil,
)
from semsr.pipeline.colorfix import colour_fix
from semsr.pipeline.guidance import cfg
from semsr.pipeline.latent_sr import progress_fn
from semsr.pipeline.latent_tiling import tiled, vae_tiling
from semsr.pipeline.options import (
    LatentSROptions,
    guidance_option,
    latent_tile,
    require_paths,
    resolve_placement,
    steps_option,
)
from semsr.pipeline.sampler import make_scheduler, sample
from semsr.pipeline.sd_controlnet import SDControlNetSR
from semsr.pipeline.step_cache import set_hint_cache
from semsr.pipeline.text import load_text_conditioner
from semsr.priors.prompts import TextConditions, TextPriors
from semsr.priors.report import text_conditions_priors

XPSR_NEGATIVE = "blurry, dotted, noise, unclear, low-res, over-smoothed"
#: Appended to the high-level prompt (XPSR's official inference config).
XPSR_ADDED_POSITIVE = "clean, high-resolution, 8k, high quality"
#: Negative prompt of the low-level branch (XPSR's official inference config).
XPSR_LOW_NEGATIVE = "high resolution, best quality, clear"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5
#: Recipes whose checkpoints hold the two-prompt layout (``controlnet``, ``sfa``, ``dfc``).
TWO_PROMPT_RECIPES = ("xpsr", "dalpsr")
#: Which prompts form the UNet's cross-attention context: ``high`` (XPSR: ``c_h`` only) or
#: ``both`` (DaLPSR: ``cat([c_h, c_l], tokens)``, semantic and degradation prompt).
UNET_PROMPTS = ("high", "both")
#: ``--preset``: ``released`` (the released inference script's behaviour) or ``semsr`` (semsr's steps).
PRESETS = ("released", "semsr")


@dataclass(kw_only=True, frozen=True)
class XPSROptions(LatentSROptions):
    """Options of ``xpsr`` (and, with ``tagger``, of ``dalpsr``): XPSR's sampling defaults and two prompts."""

    checkpoint: Path | None = option(
        None, stage="build", metavar="DIR", help="XPSR/DaLPSR checkpoint folder (controlnet + sfa components)"
    )
    vlm: Path | None = option(
        None, stage="build", metavar="DIR", help="vision-language model folder (default: weights/vlm if present)"
    )
    no_vlm: bool = option(False, stage="build", help="no VLM: use my prompt (+ IRPAD)")
    irpad: Path | None = option(
        None, stage="build", metavar="DIR", help="IRPAD weights folder (default: the shipped weights)"
    )
    sfa_mode: str | None = option(
        None,
        stage="build",
        choices=SFA_MODES,
        help="semantic-fusion variant (default: the checkpoint's; XPSR Table 3 ablation)",
    )
    preset: str | None = option(
        None,
        choices=PRESETS,
        help="released: the released inference script's prompts, start latent, hint/output resizing, tiling and "
        "colour fix; semsr: semsr's (default: released for a released XPSR folder, else semsr)",
    )
    process_size: int = option(
        RELEASED_PROCESS_SIZE,
        min=8,
        max=1 << 16,
        units="px",
        metavar="N",
        help="released preset: the hint's shorter side is enlarged to at least this (the script's process_size)",
    )
    negative_prompt: str | None = option(
        None, help="negative prompt (high-level branch; default: the preset's)", metavar="TEXT"
    )
    steps: int = steps_option(DEFAULT_STEPS)
    guidance_scale: float = guidance_option(DEFAULT_GUIDANCE)
    low_prompt: str | None = option(
        None, metavar="TEXT", help="low-level (quality/degradation) prompt instead of the VLM/IRPAD one"
    )
    low_negative_prompt: str = option(XPSR_LOW_NEGATIVE, metavar="TEXT", help="negative prompt of the low-level branch")
    added_prompt: str | None = option(
        None, metavar="TEXT", help="appended to the high-level prompt (default: the preset's)"
    )
    conditioning_scale: float = option(1.0, min=0.0, max=10.0, help="ControlNet residual scale", hidden=True)
    priors_in_prompt: bool = option(
        False,
        hidden=True,
        help="the prompt already holds the semantic prior (an edited suggestion): use it as the high-level prompt",
    )

    def resolved_defaults(self) -> dict[str, Any]:
        """``preset`` (``released`` when ``checkpoint`` is a released XPSR folder, else ``semsr``) and the
        negative / added prompts of that preset, for those left unset."""
        released = self.checkpoint is not None and is_released_layout(Path(self.checkpoint).expanduser())
        return preset_defaults(self, released)


def preset_defaults(options: XPSROptions, released_weights: bool) -> dict[str, Any]:
    """The unset (None) ``preset``, ``negative_prompt`` and ``added_prompt`` of ``options``: the preset is
    ``released`` for released weights, else ``semsr``; the prompts are the preset's."""
    preset = options.preset or ("released" if released_weights else "semsr")
    released = preset == "released"
    values = {
        "preset": preset,
        "negative_prompt": RELEASED_NEGATIVE if released else XPSR_NEGATIVE,
        "added_prompt": RELEASED_ADDED_PROMPT if released else XPSR_ADDED_POSITIVE,
    }
    return {k: v for k, v in values.items() if getattr(options, k) is None}


def join_prompt(*parts: str | None) -> str:
    """Comma-join the non-empty parts."""
    return ", ".join(p.strip().rstrip(",") for p in parts if p and p.strip())


def join_released(*parts: str | None) -> str:
    """Space-join the non-empty parts (the released script's ``prompt + " " + added_prompt``)."""
    return " ".join(p.strip() for p in parts if p and p.strip())


def unet_context(high: torch.Tensor, low: torch.Tensor, prompts: str) -> torch.Tensor:
    """The UNet's cross-attention context from ``c_h`` and ``c_l`` (each ``(B, L, D)``): ``c_h``
    for ``prompts="high"``, ``cat([c_h, c_l], 1)`` ``(B, 2L, D)`` for ``"both"`` (see :data:`UNET_PROMPTS`)."""
    if prompts == "high":
        return high
    if prompts == "both":
        return torch.cat([high, low], dim=1)
    raise SemsrError(f"unet_prompts must be one of {', '.join(UNET_PROMPTS)}, got {prompts!r}")


def _per_image(values: list[str], batch: int, what: str) -> list[str]:
    if len(values) != batch:
        raise SemsrError(f"{len(values)} {what} for {batch} images")
    return list(values)


def read_two_prompt_checkpoint(
    folder: str | Path, *, names: Iterable[str] | None = ("controlnet", "sfa"), dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """The ``names`` components (None: all) of an ``xpsr`` or ``dalpsr`` checkpoint folder (one layout)."""
    index = read_index(folder)
    if index.recipe not in TWO_PROMPT_RECIPES:
        raise UnavailableError(f"this is a {index.recipe} checkpoint, not an XPSR/DaLPSR one", folder)
    components, _ = load_checkpoint(folder, index.recipe, names=names, dtype=dtype)
    return components


class TwoPromptSR(SDControlNetSR):
    """SD + SR ControlNet with SFA and two prompts per image (high ``c_h``, low ``c_l``): the
    ``xpsr`` and ``dalpsr`` method.

    Args:
        sfa: the semantic-fusion weights (installed on ``controlnet`` and ``unet``).
        priors: the text priors of the recipe (VLM / tagger / IRPAD); ``None`` for a pipeline
            that is always given its prompts (e.g. validation during training).
        unet_prompts: which prompts the UNet cross-attends to (:data:`UNET_PROMPTS`): ``"high"``
            (XPSR) or ``"both"`` (DaLPSR).
        **kwargs: as :class:`~semsr.pipeline.sd_controlnet.SDControlNetSR` (``name``, ``scale``,
            ``options_class``: the recipe's options class, whose defaults a call without options uses).
    """

    name = "xpsr"
    options_class: type[XPSROptions] = XPSROptions  # type: ignore[assignment]

    def __init__(
        self, *, sfa: SFAFusion, priors: TextPriors | None = None, unet_prompts: str = "high", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if unet_prompts not in UNET_PROMPTS:
            raise SemsrError(f"unet_prompts must be one of {', '.join(UNET_PROMPTS)}, got {unet_prompts!r}")
        self.priors = priors
        self.unet_prompts = unet_prompts
        #: Released file each component came from (``unet``, ``controlnet``, ``sfa (... side)``); empty
        #: for a semsr checkpoint.
        self.weight_sources: dict[str, str] = {}
        self.sfa = self.prepare(sfa)
        self.sfa.install(self.controlnet, self.unet)

    @classmethod
    def from_checkpoint(
        cls,
        base: str | Path,
        checkpoint: str | Path,
        *,
        base_config: str | Path | None = None,
        sfa_mode: str | None = None,
        **kwargs: Any,
    ) -> TwoPromptSR:
        """``base`` SD folder/file + ``checkpoint`` (an ``xpsr``/``dalpsr`` checkpoint folder).

        ``sfa_mode`` overrides the checkpoint's; ``kwargs``: ``device``, ``dtype``, ``priors``,
        ``unet_prompts``, ``scale``, ``name``, ``options_class``, ``channels_last``, ``compile``.
        """
        device, dtype = resolve_placement(kwargs)
        sources: dict[str, str] = {}
        unet = None
        if is_released_layout(checkpoint):
            released = load_released_xpsr(checkpoint, dtype=dtype)
            parts: dict[str, Any] = {"controlnet": released.controlnet, "sfa": released.sfa}
            unet, sources = released.unet, released.sources
        else:
            parts = read_two_prompt_checkpoint(checkpoint, dtype=dtype)
        if sfa_mode is not None:
            parts["sfa"].mode = sfa_mode
        comps = load_sd(base, dtype=dtype, config=base_config)
        text = load_text_conditioner(comps, dtype=dtype, device=device)
        pipe = cls(
            vae=comps.vae,
            unet=unet if unet is not None else comps.unet,
            controlnet=parts["controlnet"],
            text=text,
            sfa=parts["sfa"],
            scheduler_config=comps.scheduler_config,
            **{**kwargs, "device": device, "dtype": dtype},
        )
        pipe.weight_sources = sources
        return pipe

    # ------------------------------------------------------------------ pieces

    def conditions(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        guidance_scale: float,
        *,
        low_prompts: list[str] | None = None,
        low_negative_prompts: list[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``cond = {"context": c_h, "low": c_l}`` for ``B`` high- and low-level prompts; ``uncond`` the
        two negatives (each ``(B, L, D)``), None without CFG. ``low_prompts`` is required."""
        if low_prompts is None:
            raise SemsrError("the two-prompt pipeline needs the low-level prompts (low_prompts=...)")
        bsz = len(prompts)
        lows = _per_image(low_prompts, bsz, "low-level prompts")
        cond = {"context": self.encode_prompts(prompts), "low": self.encode_prompts(lows)}
        if negative_prompt is None or guidance_scale == 1.0:
            return cond, None
        negs = [negative_prompt] * bsz if isinstance(negative_prompt, str) else list(negative_prompt)
        negs = _per_image(negs, bsz, "negative prompts")
        low_negs = _per_image(low_negative_prompts or [], bsz, "low-level negative prompts")
        return cond, {"context": self.encode_prompts(negs), "low": self.encode_prompts(low_negs)}

    def model_forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        hint: torch.Tensor,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """The SFA ControlNet + UNet call; ``cond`` is ``{"context": c_h, "low": c_l}`` (each ``(N, L, D)``);
        the UNet's context is :func:`unet_context` of them (:attr:`unet_prompts`)."""
        high, low = cond["context"], cond["low"]
        return self.sfa.controlnet_unet_forward(
            self.unet,
            self.controlnet,
            x,
            t,
            high,
            low,
            hint,
            conditioning_scale,
            unet_context=unet_context(high, low, self.unet_prompts),
        )

    def text_conditions(self, x: torch.Tensor, prompt: str | None = None) -> list[TextConditions]:
        """The text priors of each image of ``x`` ``(B, 3, h, w)`` with the user's ``prompt`` (cached per image)."""
        if self.priors is None:
            raise SemsrError(f"{self.name}: this pipeline has no text priors; pass its prompts")
        return [self.priors(img[None], prompt) for img in x]

    # ------------------------------------------------------------------ run

    def resolve_options(self, options: XPSROptions | None = None) -> XPSROptions:
        """``options`` (None: the defaults) with the preset chosen (``released`` for a pipeline loaded from a
        released XPSR folder, else ``semsr``) and the negative / added prompts left unset filled from it."""
        opts = options if options is not None else self.options_class()
        return replace(opts, **preset_defaults(opts, bool(self.weight_sources)))

    def __call__(  # type: ignore[override]  # extra keyword arguments: per-image prompts
        self,
        lr: torch.Tensor,
        options: XPSROptions | None = None,
        *,
        prompts: list[str] | None = None,
        low_prompts: list[str] | None = None,
        progress: ProgressFn | bool | None = False,
    ) -> SROutput:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        The high-level prompt of an image is its text prior (the VLM caption, or the tags)
        with ``options.prompt`` in front, or ``options.prompt`` alone with
        ``priors_in_prompt``; then ``added_prompt`` is appended. The low-level prompt is
        ``options.low_prompt`` or the text prior (VLM quality answer or IRPAD description).

        Args:
            options: the run options (``None``: :attr:`options_class` defaults).
            prompts / low_prompts: one per image, the high- / low-level prompts used as given
                instead of the above (no priors, nothing added; e.g. validation during training).
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
        Returns:
            ``images``; ``priors`` of the first image (prompts encoded, the user prompt, caption /
            tags / degradation or quality text and their ``sources``); ``timings`` (``priors``,
            ``encode``, ``denoise``, ``decode`` seconds and ``steps``).
        """
        opts = self.resolve_options(options)
        released = opts.preset == "released"
        join = join_released if released else join_prompt
        layout = None if released else self.layout(lr, self.scale, latent_tile(opts, self.scale, self.factor))
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise SemsrError(f"expected a (B, 3, H, W) image tensor, got shape {tuple(lr.shape)}")
        batch = lr.shape[0]
        timings: dict[str, float] = {}
        given = bool(opts.priors_in_prompt)
        use_high = prompts is None and not given
        use_low = low_prompts is None and opts.low_prompt is None
        t0 = time.perf_counter()
        conds: list[TextConditions] = []
        if prompts is None or low_prompts is None:
            conds = self.text_conditions(lr, None if given else (opts.prompt or "").strip() or None)
        if prompts is None:
            highs = [join(opts.prompt if given else c.high, opts.added_prompt) for c in conds]
        else:
            highs = _per_image(list(prompts), batch, "prompts")
        if low_prompts is None:
            lows = [opts.low_prompt if opts.low_prompt is not None else c.low for c in conds]
        else:
            lows = _per_image(list(low_prompts), batch, "low-level prompts")
        timings["priors"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        cond, uncond = self.conditions(
            highs,
            opts.negative_prompt,
            opts.guidance_scale,
            low_prompts=lows,
            low_negative_prompts=[opts.low_negative_prompt] * batch,
        )
        if layout is None:
            image = self.script_sample(lr, opts, cond, uncond, progress=progress, timings=timings, t0=t0)
        else:
            image = self.controlnet_sample(layout, opts, cond, uncond, progress=progress, timings=timings, t0=t0)
        used = text_conditions_priors(conds[0], high=use_high, low=use_low) if conds else {}
        priors = compact(
            {
                "prompt": highs[0],
                "negative_prompt": opts.negative_prompt,
                "preset": "released" if opts.preset == "released" else None,
                "low_prompt": lows[0],
                "low_negative_prompt": opts.low_negative_prompt,
                "user_prompt": (opts.prompt or None) if use_high else None,
                "no_vlm": True if self.priors is not None and self.priors.no_vlm else None,
                "weights": dict(self.weight_sources) or None,
                **used,
            }
        )
        return SROutput(image, priors=priors, timings=timings)

    def script_sample(
        self,
        lr: torch.Tensor,
        opts: XPSROptions,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor] | None,
        *,
        progress: ProgressFn | bool | None,
        timings: dict[str, float],
        t0: float,
    ) -> torch.Tensor:
        """The released inference script on each image of ``lr`` ``(B, 3, h, w)`` in [0, 1] ->
        ``(B, 3, scale*h, scale*w)`` (8-bit values): its hint (:func:`~semsr.methods.xpsr_released.script_hint`
        with ``opts.process_size``),
        a generator seeded ``opts.seed`` per image drawing, in the script's order, the LR latent from the VAE
        posterior, the noise to t=T and the noise to 800, then every DDPM step's noise; CFG steps on
        :func:`~semsr.pipeline.latent_tiling.tiled` (``style="script"``) tiles (``latent_tile`` or ``tile``, and ``tile_overlap``;
        default 320 / 8 latent pixels; 0: untiled); the decoded image rounded to 8 bits, colour-fixed
        (:func:`~semsr.methods.xpsr_released.script_adain` for ``adain``) and resized back with PIL bicubic."""
        chosen = latent_tile(opts, self.scale, self.factor, RELEASED_LATENT_TILE)  # --latent-tile, or --tile
        tile = int(chosen) if chosen else 1 << 30  # 0: untiled
        overlap = RELEASED_TILE_OVERLAP if opts.tile_overlap is None else int(opts.tile_overlap)
        callback, close = progress_fn(progress)
        images, denoise, decode = [], 0.0, 0.0
        timings["encode"] = time.perf_counter() - t0
        set_hint_cache(self.controlnet, getattr(opts, "cache_hint", False))
        try:
            for i, x in enumerate(lr):
                t1 = time.perf_counter()
                ref = script_hint(x, self.scale, process_size=int(opts.process_size), multiple=self.factor)
                hint = from_pil(ref)[None]
                generator = torch.Generator("cpu").manual_seed(int(opts.seed))
                big = max(hint.shape[-2:]) > RELEASED_VAE_ENCODER_TILE + 64  # the script's tiled-VAE threshold
                with torch.no_grad(), vae_tiling(self.vae, RELEASED_VAE_ENCODER_TILE if big else None):
                    post = self.vae.encode((hint * 2 - 1).to(self.device, self.dtype)).latent_dist
                    z0 = post.sample(generator).float() * self.vae.config.scaling_factor
                timings["encode"] += time.perf_counter() - t1
                t1 = time.perf_counter()
                spatial = self.spatial_denoiser(hint, opts.conditioning_scale)
                one = {k: v[i : i + 1] for k, v in cond.items()}
                none = None if uncond is None else {k: v[i : i + 1] for k, v in uncond.items()}
                z = sample(
                    cfg(tiled(spatial, tile, overlap, style="script"), none, opts.guidance_scale),
                    make_scheduler(opts.scheduler, self.scheduler_config),
                    shape=tuple(z0.shape),
                    cond=one,
                    steps=int(opts.steps),
                    generator=generator,
                    init_latents=z0,
                    added_noise_level=RELEASED_ADDED_NOISE_LEVEL,
                    device=self.device,
                    progress=None if callback is None else lambda d, n, i=i: callback(i * n + d, len(lr) * n),
                )
                denoise += time.perf_counter() - t1
                t1 = time.perf_counter()
                big = max(z.shape[-2:]) > RELEASED_VAE_DECODER_TILE + 22  # the script's tiled-VAE threshold
                out = to_pil(self.vae_decode(z, RELEASED_VAE_DECODER_TILE * self.factor if big else None)[0])
                method = (opts.colour_fix or "none").lower()
                if method == "adain":
                    out = script_adain(out, ref)
                elif method != "none":
                    out = to_pil(colour_fix(from_pil(out)[None], hint, method)[0])
                size = (x.shape[-1] * self.scale, x.shape[-2] * self.scale)
                images.append(from_pil(out.resize(size, Image.BICUBIC)))
                decode += time.perf_counter() - t1
        finally:
            set_hint_cache(self.controlnet, False)
            close()
        timings.update(denoise=denoise, decode=decode, steps=float(opts.steps))
        return torch.stack(images)

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        """Semantic prompt (VLM caption / tags) and low-level prompt (VLM quality / IRPAD) of ``x``
        ``(1, 3, H, W)`` in [0, 1], without a user prompt, plus the default negative prompt."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise SemsrError(f"expected a (1, 3, H, W) image tensor, got shape {tuple(x.shape)}")
        with torch.no_grad():
            cond = self.text_conditions(x[:1].float().clamp(0, 1))[0]
        return compact(
            {
                "prompt": cond.high,
                "low_prompt": cond.low,
                "negative_prompt": self.resolve_options().negative_prompt,
                **text_conditions_priors(cond),
            }
        )


# ----------------------------------------------------------------------------- method


def build_two_prompt(
    name: str, options: XPSROptions, make_priors: Callable[[], TextPriors], *, unet_prompts: str = "high"
) -> TwoPromptSR:
    """The shared factory of ``xpsr`` and ``dalpsr``: checks the paths, loads the checkpoint, then
    gives the pipeline the recipe's text priors (``make_priors()``); ``unet_prompts`` as :class:`TwoPromptSR`."""
    require_paths(
        name,
        options,
        ("base", "a Stable Diffusion folder or single file"),
        ("checkpoint", f"a {name} checkpoint folder (controlnet + sfa components)"),
    )
    apply_threads(options.threads)
    pipe = TwoPromptSR.from_checkpoint(
        options.base,
        options.checkpoint,
        base_config=options.base_config,
        sfa_mode=options.sfa_mode,
        **options.placement(),
        name=name,
        options_class=type(options),
        unet_prompts=unet_prompts,
    )
    pipe.priors = make_priors()
    return pipe


def build(options: XPSROptions) -> TwoPromptSR:
    """Factory of ``xpsr``: ``base`` SD, ``checkpoint`` XPSR folder, ``vlm`` VLM folder (or ``no_vlm``)."""
    return build_two_prompt(
        "xpsr",
        options,
        lambda: TextPriors(
            vlm=options.vlm,
            low_source="vlm",
            no_vlm=options.no_vlm,
            irpad_weights=options.irpad,
            device=str(options.device),
        ),
    )


register(
    MethodSpec(
        name="xpsr",
        factory=build,
        options=XPSROptions,
        scale=4,
        summary="XPSR: VLM caption + quality prompts through Semantic-Fusion Attention "
        "(--base SD, --checkpoint XPSR folder, --vlm VLM folder; or --no-vlm: your prompt + IRPAD)",
        suggests_priors=True,
        diffusion=True,
        weight_paths=("base", "checkpoint", "vlm", "irpad"),
        bundled_paths=("irpad",),
    )
)
