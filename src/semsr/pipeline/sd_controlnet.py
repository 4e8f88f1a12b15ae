"""Stable Diffusion + SR ControlNet super-resolution pipeline (preset as the ``sd-controlnet`` method
in :mod:`semsr.methods.sd_controlnet`).

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --bicubic--> hint (B,3,H,W) --VAE.encode--> z_LR (optional start, noised to t=T)
    prompts --text encoder--> context (B,77,D)       noise (seeded)
    for t in schedule:  eps = UNet(z_t, t, context, + ControlNet(z_t, t, context, hint))   [CFG, latent tiles]
    z_0 --VAE.decode (tiled)--> image --colour fix (adain|wavelet|none) vs hint--> HR

Building blocks live in :mod:`semsr.core.loading` and sibling modules (text, sampler,
guidance, latent_tiling, colorfix, latent_sr); this module only composes them. Recipe modules
reuse :func:`controlnet_unet_forward` (the per-step model call, also the
training forward for the eps-MSE loss), :func:`~semsr.pipeline.latent_sr.make_hint`,
:class:`~semsr.pipeline.latent_sr.LatentSRPipeline` (the shared layout /
sampling / decoding steps) and :class:`SDControlNetSR` (subclass it or wrap
:meth:`SDControlNetSR.spatial_denoiser` to add priors/fusion).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Unpack

import torch

from semsr.core.errors import SemsrError
from semsr.core.io import atomic_folder, atomic_write_bytes
from semsr.core.loading import SDComponents, load_controlnet, load_sd
from semsr.core.method import ProgressFn
from semsr.core.outputs import SROutput, compact
from semsr.pipeline.guidance import cfg
from semsr.pipeline.latent_sr import LatentSRPipeline, SRLayout
from semsr.pipeline.latent_tiling import Window, crop_window
from semsr.pipeline.options import ControlNetSROptions, Placement, latent_tile, resolve_placement
from semsr.pipeline.sampler import make_scheduler
from semsr.pipeline.step_cache import set_hint_cache
from semsr.pipeline.text import CLIPTextConditioner, MiniLMTextEncoder, load_text_conditioner

log = logging.getLogger("semsr.pipeline")

#: XPSR's inference negative prompt (used as the default negative prompt).
DEFAULT_NEGATIVE = "blurry, dotted, noise, unclear, low-res, over-smoothed"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.5


def new_controlnet(unet: Any, **kwargs: Any) -> Any:
    """A fresh SR ControlNet initialised from ``unet`` (``ControlNetModel.from_unet``; zero convs are 0)."""
    from diffusers import ControlNetModel  # heavy dependency, imported on use

    return ControlNetModel.from_unet(unet, **kwargs)


def controlnet_unet_forward(
    unet: Any,
    controlnet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    hint: torch.Tensor,
    conditioning_scale: float = 1.0,
) -> torch.Tensor:
    """UNet noise prediction with ControlNet residuals: the per-step model call of inference and training.

    The residuals are cast to the UNet's dtype before they are added (under
    mixed-precision training the ControlNet's outputs come back in fp32 while
    the frozen UNet runs in bf16/fp16; with one dtype the cast does nothing).

    Args:
        x: ``(B, 4, h, w)`` noisy latent (the UNet's dtype).
        t: scalar or ``(B,)`` timesteps.
        context: ``(B, L, D)`` cross-attention context.
        hint: ``(B, 3, f*h, f*w)`` pixel-space hint in [0, 1] (``f`` = VAE factor).
        conditioning_scale: ControlNet residual scale.
    Returns:
        ``(B, 4, h, w)`` model output (epsilon or v) in the UNet's dtype.
    """
    down, mid = controlnet(
        x,
        t,
        encoder_hidden_states=context,
        controlnet_cond=hint,
        conditioning_scale=conditioning_scale,
        return_dict=False,
    )
    dtype = unet.dtype
    return unet(
        x,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=[d.to(dtype) for d in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
    )[0]


class SDControlNetSR(LatentSRPipeline):
    """The SD + SR ControlNet pipeline (see the module docstring for the flow).

    Attributes:
        vae, unet, controlnet: diffusers models (eval, no grad, ``dtype``).
        text: conditioning encoder with ``encode(prompts) -> (B, 77, D)``.
        scheduler_config: the checkpoint's scheduler config dict.
        factor: VAE downsampling factor (8 for SD).
        scale: SR factor of a call (a build option of the method).
        options_class: the options dataclass whose defaults a call without options uses.
    """

    name = "sd-controlnet"
    tiles_itself = True
    options_class: type[ControlNetSROptions] = ControlNetSROptions

    def __init__(
        self,
        *,
        vae: Any,
        unet: Any,
        controlnet: Any,
        text: Any,
        scheduler_config: dict[str, Any],
        name: str | None = None,
        options_class: type[ControlNetSROptions] | None = None,
        **placement: Unpack[Placement],
    ) -> None:
        if name is not None:
            self.name = name
        if options_class is not None:
            self.options_class = options_class
        self.setup_sd(vae=vae, unet=unet, text=text, scheduler_config=scheduler_config, **placement)
        self.controlnet = self.prepare(controlnet, channels_last=True, compile=True)
        hint_factor = 2 ** (len(self.controlnet.config.conditioning_embedding_out_channels) - 1)
        if hint_factor != self.factor:
            raise SemsrError(f"ControlNet hint encoder downsamples by {hint_factor} but the VAE by {self.factor}")
        if int(self.text.width) != int(self.unet.config.cross_attention_dim):
            raise SemsrError(
                f"text encoder width {self.text.width} != UNet cross-attention width "
                f"{self.unet.config.cross_attention_dim}"
            )

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_components(cls, components: SDComponents, controlnet: Any | None = None, **kwargs: Any) -> SDControlNetSR:
        """Build from loaded SD components; ``controlnet=None`` creates a new one with ``from_unet``."""
        if controlnet is None:
            log.warning(
                "no ControlNet given: using a new, untrained one made from the UNet "
                "(its zero convolutions ignore the LR hint)"
            )
            controlnet = new_controlnet(components.unet)
        device, dtype = resolve_placement(kwargs)
        text = load_text_conditioner(components, dtype=dtype, device=device)
        return cls(
            vae=components.vae,
            unet=components.unet,
            controlnet=controlnet,
            text=text,
            scheduler_config=components.scheduler_config,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        controlnet: str | Path | None = None,
        *,
        base_config: str | Path | None = None,
        partial: bool | None = None,
        **kwargs: Any,
    ) -> SDControlNetSR:
        """Load from local paths only (strictly: see :func:`~semsr.core.loading.check_keys`).

        Args:
            base: SD folder or single-file checkpoint.
            controlnet: ControlNet folder; when omitted, ``<base>/controlnet`` is used
                if it exists (folders written by :meth:`save_pretrained`), else a new
                ControlNet is created from the UNet (untrained: the hint has no effect).
            base_config: config folder for single-file ``base`` (see :func:`load_sd`).
            partial: accept weights with missing or unexpected tensors (a warning lists them);
                None: the :func:`~semsr.core.loading.partial_loading` setting (strict by default).
            **kwargs: ``device``, ``dtype``, ``channels_last``, ``compile``, ``scale``, ``name``,
                ``options_class`` (see :class:`SDControlNetSR`).
        """
        device, dtype = resolve_placement(kwargs)
        comps = load_sd(base, dtype=dtype, config=base_config, partial=partial)
        if controlnet is None and Path(base).is_dir() and (Path(base) / "controlnet").is_dir():
            controlnet = Path(base) / "controlnet"
        net = load_controlnet(controlnet, dtype=dtype, partial=partial) if controlnet is not None else None
        return cls.from_components(comps, net, **{**kwargs, "dtype": dtype, "device": device})

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers SD folder (``vae/ unet/ scheduler/`` + text) plus ``controlnet/``.

        The folder is written whole (:func:`~semsr.core.io.atomic_folder`), replacing an
        existing one; :meth:`from_pretrained` on it restores an identical pipeline.
        """
        from diffusers import __version__ as diffusers_version  # heavy dependency, imported on use

        if not isinstance(self.text, (CLIPTextConditioner, MiniLMTextEncoder)):
            raise SemsrError(f"cannot save text encoder of type {type(self.text).__name__}")
        folder = Path(folder)
        index: dict[str, Any] = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers_version,
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
        }
        with atomic_folder(folder) as tmp:
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
            sched = make_scheduler("ddpm", self.scheduler_config)
            sched.save_pretrained(tmp / "scheduler")
            index.update(
                vae=["diffusers", "AutoencoderKL"],
                unet=["diffusers", "UNet2DConditionModel"],
                scheduler=["diffusers", type(sched).__name__],
            )
            if isinstance(self.text, CLIPTextConditioner):
                self.text.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                self.text.tokenizer.save_pretrained(tmp / "tokenizer")
                index.update(
                    text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"]
                )
            else:
                self.text.save_projection(tmp / "text_projection")
                index.update(text_encoder=[None, None], tokenizer=[None, None])
            atomic_write_bytes(tmp / "model_index.json", (json.dumps(index, indent=2) + "\n").encode())
        return folder

    # ------------------------------------------------------------------ pieces

    def conditions(
        self, prompts: list[str], negative_prompt: str | list[str] | None, guidance_scale: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The sampler's ``(cond, uncond)`` for ``B`` prompts: ``{"context": (B, L, D)}``; ``uncond``
        is None without CFG. Subclasses with more conditions (e.g. XPSR's two prompts) override this."""
        cond = {"context": self.encode_prompts(prompts)}
        if negative_prompt is None or guidance_scale == 1.0:
            return cond, None
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        return cond, {"context": self.encode_prompts(negs)}

    def model_forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        hint: torch.Tensor,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """One ControlNet + UNet evaluation: ``x (N, 4, h, w)`` (model dtype), ``cond["context"] (N, L, D)``,
        ``hint (N, 3, f*h, f*w)`` -> ``(N, 4, h, w)``. Subclasses with more conditions override this."""
        return controlnet_unet_forward(self.unet, self.controlnet, x, t, cond["context"], hint, conditioning_scale)

    def spatial_denoiser(self, hint: torch.Tensor, conditioning_scale: float = 1.0):
        """The per-step model call (:meth:`model_forward`) over a latent window (see :mod:`.latent_tiling`).

        ``cond`` is :meth:`conditions`' dict; the hint ``(B, 3, H, W)`` is
        shared by both CFG branches and cropped to the window here.
        """
        hint = hint.to(self.device, self.dtype)

        def spatial(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], window: Window) -> torch.Tensor:
            h = crop_window(hint, window, self.factor, batch=x.shape[0])
            with torch.no_grad():
                out = self.model_forward(x.to(self.dtype), t, cond, h, conditioning_scale)
            return out.float()

        return spatial

    # ------------------------------------------------------------------ run

    def __call__(
        self,
        lr: torch.Tensor,
        options: ControlNetSROptions | None = None,
        *,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        progress: ProgressFn | bool | None = False,
    ) -> SROutput:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        Args:
            options: the run options (``None``: :attr:`options_class` defaults). ``negative_prompt``
                with ``guidance_scale`` 1 runs without CFG.
            prompts / negative_prompts: one per image, overriding ``options.prompt`` /
                ``options.negative_prompt`` (e.g. validation captions).
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
        Returns:
            ``images`` and ``priors`` (the first image's prompt and negative prompt), ``timings``
            (``encode``, ``denoise``, ``decode`` seconds and ``steps``).
        """
        opts = options if options is not None else self.options_class()
        layout = self.layout(lr, self.scale, latent_tile(opts, self.scale, self.factor))
        timings: dict[str, float] = {}
        prompts = list(prompts) if prompts is not None else [opts.prompt] * layout.batch
        negatives = list(negative_prompts) if negative_prompts is not None else [opts.negative_prompt] * layout.batch
        t0 = time.perf_counter()
        cond, uncond = self.conditions(prompts, negatives, opts.guidance_scale)
        image = self.controlnet_sample(layout, opts, cond, uncond, progress=progress, timings=timings, t0=t0)
        priors = compact({"prompt": prompts[0], "negative_prompt": negatives[0]})
        return SROutput(image, priors=priors, timings=timings)

    def controlnet_sample(
        self,
        layout: SRLayout,
        opts: ControlNetSROptions,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor] | None,
        *,
        progress: ProgressFn | bool | None,
        timings: dict[str, float],
        t0: float,
    ) -> torch.Tensor:
        """From the conditions of a call to the image ``(B, 3, *layout.out_hw)``: the LR start latent
        (``encode`` seconds counted from ``t0``, when the conditions started), then CFG sampling with the
        ControlNet hint and decoding (:meth:`denoise_decode`). With ``opts.cache_hint`` the hint of each
        tile is embedded once (:func:`~semsr.pipeline.step_cache.set_hint_cache`; same output)."""
        init = self.vae_encode(layout.hint_padded, layout.vae_tile) if opts.start_from_lr else None
        timings["encode"] = time.perf_counter() - t0
        set_hint_cache(self.controlnet, getattr(opts, "cache_hint", False))
        try:
            return self.denoise_decode(
                self.spatial_denoiser(layout.hint_padded, opts.conditioning_scale),
                layout,
                opts,
                channels=self.unet.config.in_channels,
                cond=cond,
                guide=lambda d: cfg(d, uncond, opts.guidance_scale),
                init_latents=init,
                progress=progress,
                timings=timings,
            )
        finally:
            set_hint_cache(self.controlnet, False)  # drop the stored embeddings

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        """Nothing is extracted from the image: the default negative prompt, to edit."""
        return {"negative_prompt": self.options_class().negative_prompt}
