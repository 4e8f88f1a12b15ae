"""XPSR (cross-modal priors) on SD + SR ControlNet with Semantic-Fusion Attention, and the ``xpsr`` method.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --TextPriors (VLM caption / quality; cached)--> high c_h, low c_l prompts   (semsr.priors.prompts)
    high += ", clean, high-resolution, 8k, high quality"                           (XPSR's added positive)
    ControlNet(z_t, [c_h; c_l], hint) with SFA  -> residuals                       (semsr.fusion.sfa)
    UNet(z_t, c_h, residuals) + conditional attention to the ControlNet features
    CFG: eps = eps(neg_h, neg_l) + s * [eps(c_h, c_l) - eps(neg_h, neg_l)]
         neg_h = "blurry, dotted, noise, unclear, low-res, over-smoothed" (--negative-prompt)
         neg_l = "high resolution, best quality, clear"                   (--low-negative-prompt)
    DDPM 20 steps, s = 4.5, start from the LR latent noised to t=T, AdaIN colour fix

Without a VLM on disk the high-level prompt is the user prompt and the
low-level one IRPAD's degradation description (one note on stderr says so).
The checkpoint folder (``--checkpoint``) holds ``controlnet/`` (diffusers
ControlNet), ``sfa/`` (:class:`~semsr.fusion.sfa.SFAFusion`) and, from
training, ``dfc/`` (heads, unused at inference).

The DaLPSR preset (:mod:`semsr.methods.dalpsr`) is the same pipeline with
other text priors; :func:`build_two_prompt_method` is shared.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.sfa import SFA_MODES, SFAFusion
from semsr.methods import MethodSpec, register
from semsr.pipeline.colorfix import COLOUR_FIXES
from semsr.core.loading import load_controlnet, load_sd
from semsr.pipeline.precision import check_dtype, prepare_module
from semsr.pipeline.sd_controlnet import SDControlNetSR, require_build_paths, sd_cli_options, sd_run_options
from semsr.pipeline.text import load_text_conditioner
from semsr.priors.report import PRIORS_IN_PROMPT, PriorReporter, first, text_conditions_priors

XPSR_NEGATIVE = "blurry, dotted, noise, unclear, low-res, over-smoothed"
#: Appended to the high-level prompt (XPSR's official inference config).
XPSR_ADDED_POSITIVE = "clean, high-resolution, 8k, high quality"
#: Negative prompt of the low-level branch (XPSR's official inference config).
XPSR_LOW_NEGATIVE = "high resolution, best quality, clear"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5


def join_prompt(*parts: str | None) -> str:
    """Comma-join the non-empty parts."""
    return ", ".join(p.strip().rstrip(",") for p in parts if p and p.strip())


def _per_image(value: str | list[str], batch: int, what: str) -> list[str]:
    values = [value] * batch if isinstance(value, str) else list(value)
    if len(values) != batch:
        raise SemsrError(f"{len(values)} {what} for {batch} images")
    return values


class TwoPromptSR(SDControlNetSR):
    """SD + SR ControlNet with SFA: two prompts (high ``c_h``, low ``c_l``) per image.

    ``__call__`` takes the :class:`SDControlNetSR` options plus ``low_prompt`` and
    ``low_negative_prompt`` (one string or one per image); ``prompt`` /
    ``negative_prompt`` are the high-level ones.
    """

    def __init__(self, *, sfa: SFAFusion, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sfa = prepare_module(sfa, device=self.device, dtype=self.dtype)
        self.sfa.install(self.controlnet, self.unet)
        self._low: tuple[list[str], list[str]] | None = None

    @classmethod
    def from_checkpoint(cls, base: str | Path, checkpoint: str | Path, *, base_config: str | Path | None = None,
                        sfa_mode: str | None = None, **kwargs: Any) -> TwoPromptSR:
        """``base`` SD folder/file + ``checkpoint`` folder with ``controlnet/`` and ``sfa/``."""
        device = torch.device(kwargs.get("device", "cpu"))
        dtype = check_dtype(kwargs.get("dtype", "fp32"), device)
        checkpoint = Path(checkpoint).expanduser()
        for part in ("controlnet", "sfa"):
            if not (checkpoint / part / "config.json").is_file():
                raise UnavailableError(f"not an XPSR/DaLPSR checkpoint folder (needs controlnet/ and sfa/ with "
                                       f"config.json + safetensors)", checkpoint / part)
        comps = load_sd(base, dtype=dtype, config=base_config)
        controlnet = load_controlnet(checkpoint / "controlnet", dtype=dtype)
        sfa = SFAFusion.load(checkpoint / "sfa", controlnet, comps.unet, mode=sfa_mode)
        text = load_text_conditioner(comps, dtype=dtype, device=device)
        return cls(vae=comps.vae, unet=comps.unet, controlnet=controlnet, text=text, sfa=sfa,
                   scheduler_config=comps.scheduler_config, **{**kwargs, "device": device, "dtype": dtype})

    def conditions(self, prompts: list[str], negative_prompt: str | list[str] | None,
                   guidance_scale: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``cond = {"context": c_h, "low": c_l}``; ``uncond`` the two negatives (each ``(B, L, D)``)."""
        if self._low is None:
            raise SemsrError("TwoPromptSR.conditions called outside __call__ (no low-level prompts)")
        lows, low_negs = self._low
        cond = {"context": self.encode_prompts(prompts), "low": self.encode_prompts(lows)}
        if negative_prompt is None or guidance_scale == 1.0:
            return cond, None
        negs = _per_image(negative_prompt, len(prompts), "negative prompts")
        return cond, {"context": self.encode_prompts(negs), "low": self.encode_prompts(low_negs)}

    def model_forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], hint: torch.Tensor,
                      conditioning_scale: float) -> torch.Tensor:
        """The SFA ControlNet + UNet call; ``cond`` is ``{"context": c_h, "low": c_l}`` (each ``(N, L, D)``)."""
        return self.sfa.controlnet_unet_forward(self.unet, self.controlnet, x, t, cond["context"], cond["low"], hint,
                                                conditioning_scale)

    def __call__(self, lr: torch.Tensor, *, low_prompt: str | list[str] = "",
                 low_negative_prompt: str | list[str] = XPSR_LOW_NEGATIVE, **kwargs: Any) -> torch.Tensor:
        bsz = lr.shape[0]
        self._low = (_per_image(low_prompt, bsz, "low-level prompts"),
                     _per_image(low_negative_prompt, bsz, "low-level negative prompts"))
        try:
            return super().__call__(lr, **kwargs)
        finally:
            self._low = None


# ----------------------------------------------------------------------------- method

_RUN_DEFAULTS: dict[str, Any] = {
    "prompt": None, "negative_prompt": XPSR_NEGATIVE, "low_negative_prompt": XPSR_LOW_NEGATIVE,
    "added_prompt": XPSR_ADDED_POSITIVE, "low_prompt": None, "steps": DEFAULT_STEPS,
    "guidance_scale": DEFAULT_GUIDANCE, "seed": 0, "scheduler": "ddpm", "colour_fix": "adain", "tile": 0,
    "latent_tile": None, "tile_overlap": None, "start_from_lr": True, "strength": 1.0, "conditioning_scale": 1.0,
    "progress": False, PRIORS_IN_PROMPT: False,
}


class TwoPromptMethod(PriorReporter):
    """``xpsr`` / ``dalpsr`` as a registry Method (tiles in latent space).

    Run options (``None`` = default): prompt (user prompt; with a VLM it is put
    in front of the caption), low_prompt (replaces the low-level prior),
    negative_prompt, low_negative_prompt, added_prompt (appended to the
    high-level prompt), steps, guidance_scale, seed, scheduler, colour_fix,
    tile, latent_tile, tile_overlap, start_from_lr, strength,
    conditioning_scale, progress, priors_in_prompt (the prompt already holds
    the semantic prior, e.g. an edited :meth:`suggest_priors` caption: it is
    used as the high-level prompt instead of being put in front of it).

    ``last_priors`` reports the prompts and priors of the last call's first
    image (:mod:`semsr.priors.report`); ``last_conditions`` holds the :class:`~semsr.priors.prompts.TextConditions`
    of the last call (one per image).
    """

    tiles_itself = True

    def __init__(self, name: str, pipeline: TwoPromptSR, priors: Any, scale: int = 4,
                 defaults: dict[str, Any] | None = None) -> None:
        self.name = name
        self.pipeline = pipeline
        self.priors = priors
        self.scale = int(scale)
        self.device = pipeline.device
        self.defaults = {**_RUN_DEFAULTS, **(defaults or {})}
        self.last_conditions: list[Any] = []

    def prompts(self, x: torch.Tensor, opts: dict[str, Any]) -> tuple[list[str], list[str]]:
        """``(high, low)`` prompts for each image of ``x (B, 3, h, w)`` (priors are cached per image)."""
        from semsr.priors.prompts import UserPrompts

        given = bool(opts[PRIORS_IN_PROMPT])
        self.priors.user = UserPrompts.load(None if given else opts["prompt"])
        self.last_conditions = [self.priors(img[None]) for img in x]
        highs = [join_prompt(opts["prompt"] if given else c.high, opts["added_prompt"]) for c in self.last_conditions]
        lows = [opts["low_prompt"] if opts["low_prompt"] is not None else c.low for c in self.last_conditions]
        return highs, lows

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        opts = sd_run_options(self.defaults, run_opts, scale=self.scale, factor=self.pipeline.factor,
                              known=_RUN_DEFAULTS)
        highs, lows = self.prompts(x, opts)
        out = self.pipeline(
            x, scale=self.scale, prompt=highs, low_prompt=lows, negative_prompt=opts["negative_prompt"],
            low_negative_prompt=opts["low_negative_prompt"], steps=opts["steps"],
            guidance_scale=opts["guidance_scale"], seed=opts["seed"], scheduler=opts["scheduler"],
            colour_fix_method=opts["colour_fix"], latent_tile=opts["latent_tile"], tile_overlap=opts["tile_overlap"],
            start_from_lr=opts["start_from_lr"], strength=opts["strength"],
            conditioning_scale=opts["conditioning_scale"], progress=opts["progress"])
        given = bool(opts[PRIORS_IN_PROMPT])
        self.report_priors(
            prompt=highs[0], negative_prompt=first(opts["negative_prompt"]), low_prompt=lows[0],
            low_negative_prompt=first(opts["low_negative_prompt"]), user_prompt=None if given else opts["prompt"],
            **text_conditions_priors(self.last_conditions[0], high=not given, low=opts["low_prompt"] is None))
        return out

    def prior_suggestion(self, x: torch.Tensor) -> dict[str, Any]:
        """Semantic prompt (VLM caption / tags) and low-level prompt (VLM quality / IRPAD) of ``x``, no user prompt."""
        from semsr.priors.prompts import UserPrompts

        self.priors.user = UserPrompts()
        cond = self.priors(x)
        return {"prompt": cond.high, "low_prompt": cond.low, "negative_prompt": self.defaults["negative_prompt"],
                **text_conditions_priors(cond)}


def build_two_prompt_method(name: str, *, base: str | None, checkpoint: str | None, priors_opts: dict[str, Any],
                            device: str = "cpu", dtype: str | torch.dtype | None = None, scale: int = 4,
                            base_config: str | None = None, sfa_mode: str | None = None,
                            channels_last: bool = False, compile: bool = False, threads: int | None = None,
                            defaults: dict[str, Any] | None = None) -> TwoPromptMethod:
    """Shared factory of ``xpsr`` and ``dalpsr``; ``priors_opts`` go to :class:`~semsr.priors.prompts.TextPriors`."""
    from semsr.priors.prompts import TextPriors

    require_build_paths(name, (base, "--base", "a Stable Diffusion folder or single file"),
                        (checkpoint, "--checkpoint", f"a {name} checkpoint folder (controlnet/ + sfa/)"),
                        threads=threads)
    pipe = TwoPromptSR.from_checkpoint(base, checkpoint, base_config=base_config, sfa_mode=sfa_mode, device=device,
                                       dtype=dtype or "fp32", channels_last=channels_last, compile=compile)
    priors = TextPriors(device=str(device), **priors_opts)
    return TwoPromptMethod(name, pipe, priors, scale=scale, defaults=defaults)


def build(base: str | None = None, checkpoint: str | None = None, vlm: str | None = None, *,
          irpad: str | None = None, **kwargs: Any) -> TwoPromptMethod:
    """Factory of ``xpsr``: ``base`` SD, ``checkpoint`` XPSR folder, ``vlm`` VLM folder (optional)."""
    return build_two_prompt_method("xpsr", base=base, checkpoint=checkpoint,
                                   priors_opts={"vlm": vlm, "low_source": "vlm", "irpad_weights": irpad}, **kwargs)


def shared_cli_options() -> list[dict[str, Any]]:
    """Options of both two-prompt presets (plus ``sd-controlnet``'s sampling options)."""
    return sd_cli_options() + [
        {"flags": ["--low-prompt"], "target": "run", "metavar": "TEXT",
         "help": "xpsr/dalpsr: low-level (quality/degradation) prompt instead of the VLM/IRPAD one"},
        {"flags": ["--low-negative-prompt"], "target": "run", "metavar": "TEXT",
         "help": f"xpsr/dalpsr: negative prompt of the low-level branch (default: {XPSR_LOW_NEGATIVE!r})"},
        {"flags": ["--added-prompt"], "target": "run", "metavar": "TEXT",
         "help": f"xpsr/dalpsr: appended to the high-level prompt (default: {XPSR_ADDED_POSITIVE!r})"},
        {"flags": ["--sfa-mode"], "target": "build", "choices": list(SFA_MODES),
         "help": "xpsr/dalpsr: semantic-fusion variant (default: the checkpoint's; XPSR Table 3 ablation)"},
        {"flags": ["--irpad"], "target": "build", "metavar": "DIR",
         "help": "xpsr/dalpsr: IRPAD weights folder (default: the shipped weights)"},
    ]


register(MethodSpec(
    name="xpsr",
    factory=build,
    scale=4,
    summary="XPSR: VLM caption + quality prompts through Semantic-Fusion Attention "
            "(--base SD, --checkpoint XPSR folder, --vlm VLM folder; without --vlm: prompt + IRPAD)",
    extra={"cli_options": shared_cli_options(), "colour_fixes": list(COLOUR_FIXES), "suggests_priors": True},
))
