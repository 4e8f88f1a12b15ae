"""SeeSR with its released weights (public repository ``cswry/SeeSR``), and the ``seesr`` method.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, 4h, 4w)`` in [0, 1]), as the released ``test_seesr.py``::

    LR --DAPE (RAM + LoRA fine-tune; semsr.models.ram)--> tags, image embeddings (B, 1 + T, 512)
    prompt = f"{tags}, {user prompt}," + "clean, high-resolution, 8k"   negative "dotted, noise, blur, lowres, smooth"
    LR with short side < process_size / 4 -> bicubic resize to that short side (back to 4h x 4w at the end)
    hint = bicubic x4; z_LR = VAE posterior sample of the hint, noised to t = 999 (start point "lr")
    DDPM 50 steps (the schedule's first step is 981), CFG 5.5 (both branches see the image embeddings):
        eps = UNet(z_t, t, text, image, + ControlNet(z_t, t, text, image, hint))   on latent tiles 96, overlap 4
        (the released layout and weights: ``tile_style = "script"``, :mod:`semsr.pipeline.latent_tiling`)
    VAE decode (1024 px tiles above that size) -> AdaIN colour fix against the hint

``--base`` is a Stable Diffusion 2 base folder (VAE, text encoder, tokenizer, scheduler; its UNet is not read),
``--checkpoint`` the released SeeSR folder (``unet/`` + ``controlnet/``, :mod:`semsr.models.seesr`), ``--tagger``
the DAPE folder (RAM's ``ram_swin_large_14m`` weights + ``DAPE``, the tag list and thresholds).
``SROutput.priors["weights"]`` names the file each part came from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from semsr.core.dtypes import apply_threads
from semsr.core.errors import SemsrError
from semsr.core.loading import load_sd
from semsr.core.method import MethodSpec, ProgressFn
from semsr.core.options import option
from semsr.core.outputs import SROutput, compact
from semsr.methods import register
from semsr.models.ram import RAMBundle, load_ram_tagger, ram_preprocess, tags_from_logits
from semsr.models.seesr import load_released_seesr
from semsr.ops.imresize import imresize
from semsr.pipeline.guidance import cfg
from semsr.pipeline.latent_sr import SRLayout
from semsr.pipeline.latent_tiling import vae_tiling
from semsr.pipeline.options import (
    LatentSROptions,
    guidance_option,
    latent_tile,
    require_paths,
    resolve_placement,
    steps_option,
)
from semsr.pipeline.sd_controlnet import SDControlNetSR
from semsr.pipeline.text import load_text_conditioner

#: Appended to every prompt (``--added_prompt`` of the released test script).
SEESR_ADDED_PROMPT = "clean, high-resolution, 8k"
SEESR_NEGATIVE = "dotted, noise, blur, lowres, smooth"
SEESR_STEPS = 50
SEESR_GUIDANCE = 5.5
#: The timestep the LR latent is noised to (``--start_steps``).
SEESR_START_TIMESTEP = 999
#: Inputs whose short side is below ``process_size // scale`` are first resized to it (``--process_size``).
SEESR_PROCESS_SIZE = 512
SEESR_LATENT_TILE = 96
SEESR_LATENT_OVERLAP = 4
#: VAE tile side in pixels for images larger than it (the released script's encoder tile; untiled below).
SEESR_VAE_TILE = 1024


@dataclass(kw_only=True, frozen=True)
class SeeSROptions(LatentSROptions):
    """Options of ``seesr``: the released test script's defaults."""

    checkpoint: Path | None = option(
        None, stage="build", metavar="DIR", help="released SeeSR folder (unet/ + controlnet/ diffusers folders)"
    )
    tagger: Path | None = option(
        None, stage="build", metavar="DIR", help="DAPE tagger folder (RAM weights + DAPE fine-tune, tag list)"
    )
    negative_prompt: str = option(SEESR_NEGATIVE, help="negative prompt")
    steps: int = steps_option(SEESR_STEPS)
    guidance_scale: float = guidance_option(SEESR_GUIDANCE)
    added_prompt: str = option(SEESR_ADDED_PROMPT, metavar="TEXT", help="appended to the prompt")
    conditioning_scale: float = option(1.0, min=0.0, max=10.0, help="ControlNet residual scale", hidden=True)
    start_timestep: int = option(
        SEESR_START_TIMESTEP,
        min=0,
        max=999,
        metavar="T",
        help="timestep the LR latent is noised to at the start (with --start-from-lr)",
    )
    process_size: int = option(
        SEESR_PROCESS_SIZE,
        min=0,
        max=1 << 16,
        metavar="PX",
        help="inputs whose short side is below PX/scale are first resized (bicubic) up to it; 0: never",
    )
    latent_tile: int | None = option(
        None,
        min=0,
        max=1 << 16,
        units="latent px",
        metavar="N",
        help=f"latent tile side, overrides --tile (0: untiled; default without --tile: {SEESR_LATENT_TILE}, "
        "the released script's)",
    )
    tile_overlap: int | None = option(
        SEESR_LATENT_OVERLAP, min=0, max=1 << 16, units="latent px", metavar="N", help="overlap of latent tiles"
    )


def seesr_prompt(tags: str, prompt: str, added: str) -> str:
    """The released script's prompt: ``f"{tags}, {prompt}," + added`` (its exact spacing)."""
    return f"{tags}, {prompt}," + added


class SeeSRPipeline(SDControlNetSR):
    """SD-2 + SeeSR's ControlNet and UNet with image cross-attention, prompted and conditioned by DAPE.

    Args:
        tagger: the loaded DAPE tagger (:func:`~semsr.models.ram.load_ram_tagger`); None for a pipeline that
            is always given its image embeddings and prompts.
        **kwargs: as :class:`~semsr.pipeline.sd_controlnet.SDControlNetSR` (``unet``/``controlnet``: the
            :mod:`semsr.models.seesr` models).
    """

    name = "seesr"
    options_class: type[SeeSROptions] = SeeSROptions  # type: ignore[assignment]
    tile_style = "script"  # the released pipeline's latent tile layout and weights

    def __init__(self, *, tagger: RAMBundle | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tagger = tagger
        if tagger is not None:
            tagger.model.to(self.device).eval().requires_grad_(False)
        #: Released file each part came from (``unet``, ``controlnet``, ``tagger``).
        self.weight_sources: dict[str, str] = {}

    @classmethod
    def from_released(
        cls,
        base: str | Path,
        checkpoint: str | Path,
        tagger: str | Path | None,
        *,
        base_config: str | Path | None = None,
        partial: bool | None = None,
        **kwargs: Any,
    ) -> SeeSRPipeline:
        """``base`` SD-2 folder/file (its UNet is not read) + released SeeSR ``checkpoint`` folder + DAPE
        ``tagger`` folder. ``kwargs``: ``device``, ``dtype``, ``scale``, ``name``, ``options_class``,
        ``channels_last``, ``compile``."""
        device, dtype = resolve_placement(kwargs)
        released = load_released_seesr(checkpoint, dtype=dtype, partial=partial)
        bundle = load_ram_tagger(tagger, partial=partial) if tagger is not None else None
        comps = load_sd(base, dtype=dtype, config=base_config, partial=partial, with_unet=False)
        text = load_text_conditioner(comps, dtype=dtype, device=device)
        pipe = cls(
            vae=comps.vae,
            unet=released.unet,
            controlnet=released.controlnet,
            text=text,
            tagger=bundle,
            scheduler_config=comps.scheduler_config,
            **{**kwargs, "device": device, "dtype": dtype},
        )
        pipe.weight_sources = dict(released.sources)
        if bundle is not None:
            pipe.weight_sources["tagger"] = ", ".join(str(p) for p in bundle.files)
        return pipe

    # ------------------------------------------------------------------ pieces

    def dape(self, lr: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """DAPE on ``lr`` ``(B, 3, h, w)`` in [0, 1]: per image its tags (``", "``-joined, tag-list order) and the
        image embeddings ``(B, 1 + T, 512)`` (float32)."""
        if self.tagger is None:
            raise SemsrError("seesr: this pipeline has no DAPE tagger; pass --tagger DIR")
        model = self.tagger.model
        x = ram_preprocess(lr.to(self.device), model.config.image_size).to(model.dtype)
        with torch.no_grad():
            embeds, logits = model(x)
        tags = [", ".join(t) for t in tags_from_logits(logits.float(), self.tagger.tags, self.tagger.thresholds)]
        return tags, embeds.float()

    def conditions(  # type: ignore[override]  # extra keyword argument: the image embeddings
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        guidance_scale: float,
        *,
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``cond = {"context": (B, 77, D), "image": (B, 1 + T, 512)}``; ``uncond`` the negative prompts with the
        same image embeddings (as the released pipeline), None without CFG (``guidance_scale <= 1``)."""
        if image_embeds is None:
            raise SemsrError("seesr needs DAPE's image embeddings (image_embeds=...)")
        if guidance_scale <= 1.0:  # the released pipeline guides only above 1
            negative_prompt = None
        text, uncond_text = super().conditions(prompts, negative_prompt, guidance_scale)
        image = image_embeds.to(self.device, self.dtype)
        cond = {**text, "image": image}
        return cond, None if uncond_text is None else {**uncond_text, "image": image}

    def model_forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, torch.Tensor],
        hint: torch.Tensor,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """ControlNet + UNet with image cross-attention: ``x (N, 4, h, w)``, ``cond["context"] (N, 77, D)``,
        ``cond["image"] (N, 1 + T, 512)``, ``hint (N, 3, f*h, f*w)`` -> ``(N, 4, h, w)``."""
        context, image = cond["context"], cond["image"]
        down, mid = self.controlnet(
            x,
            t,
            context,
            hint,
            image_encoder_hidden_states=image,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        dtype = self.unet.dtype
        return self.unet(
            x,
            t,
            context,
            image_encoder_hidden_states=image,
            down_block_additional_residuals=[d.to(dtype) for d in down],
            mid_block_additional_residual=mid.to(dtype),
            return_dict=False,
        )[0]

    def lr_latent(self, layout: SRLayout, seed: int) -> torch.Tensor:
        """The start latent ``(B, 4, *layout.lat_hw)`` float32: a sample of the VAE posterior of the padded hint
        (as the released pipeline; its noise from a CPU generator seeded ``seed``), scaled."""
        cfg_vae = self.vae.config
        with torch.no_grad(), vae_tiling(self.vae, layout.vae_tile):
            dist = self.vae.encode((layout.hint_padded * 2 - 1).to(self.device, self.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        eps = torch.randn(mean.shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
        shift = getattr(cfg_vae, "shift_factor", None) or 0.0
        return (mean + std * eps.to(mean.device) - shift) * cfg_vae.scaling_factor

    def process_input(self, lr: torch.Tensor, process_size: int) -> torch.Tensor:
        """``lr`` ``(B, 3, h, w)``, bicubic-resized so its short side is ``process_size // scale`` when it is
        shorter (the released script's small-input rule); unchanged otherwise."""
        short = int(process_size) // self.scale
        h, w = lr.shape[-2:]
        if not process_size or min(h, w) >= short:
            return lr
        ratio = short / min(h, w)
        return imresize(lr.float(), size=(int(ratio * h), int(ratio * w))).clamp_(0, 1)

    # ------------------------------------------------------------------ run

    def __call__(  # type: ignore[override]  # extra keyword arguments: prompts and image embeddings
        self,
        lr: torch.Tensor,
        options: SeeSROptions | None = None,
        *,
        prompts: list[str] | None = None,
        image_embeds: torch.Tensor | None = None,
        progress: ProgressFn | bool | None = False,
    ) -> SROutput:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        Args:
            options: the run options (``None``: :attr:`options_class` defaults).
            prompts: one per image, used as given instead of DAPE's tags + ``options.prompt`` + ``added_prompt``.
            image_embeds: ``(B, 1 + T, 512)`` instead of DAPE's image embeddings.
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
        Returns:
            ``images``; ``priors`` of the first image (``prompt``, ``negative_prompt``, ``tags``, ``user_prompt``,
            ``weights``); ``timings`` (``priors``, ``encode``, ``denoise``, ``decode`` seconds and ``steps``).
        """
        opts = options if options is not None else self.options_class()
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise SemsrError(f"expected a (B, 3, H, W) image tensor, got shape {tuple(lr.shape)}")
        bsz, _, h, w = lr.shape
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        tags: list[str] = []
        if prompts is None or image_embeds is None:
            tags, embeds = self.dape(lr)
            image_embeds = embeds if image_embeds is None else image_embeds
        if prompts is None:
            prompts = [seesr_prompt(t, opts.prompt or "", opts.added_prompt) for t in tags]
        elif len(prompts) != bsz:
            raise SemsrError(f"{len(prompts)} prompts for {bsz} images")
        timings["priors"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        x = self.process_input(lr, opts.process_size)
        layout = self.layout(x, self.scale, latent_tile(opts, self.scale, self.factor, SEESR_LATENT_TILE))
        big = max(layout.hint_padded.shape[-2:]) > SEESR_VAE_TILE
        layout = replace(layout, vae_tile=SEESR_VAE_TILE if big else None)
        cond, uncond = self.conditions(
            list(prompts), opts.negative_prompt, opts.guidance_scale, image_embeds=image_embeds
        )
        init = self.lr_latent(layout, int(opts.seed) + 1) if opts.start_from_lr else None
        timings["encode"] = time.perf_counter() - t0
        image = self.denoise_decode(
            self.spatial_denoiser(layout.hint_padded, opts.conditioning_scale),
            layout,
            opts,
            channels=self.unet.config.in_channels,
            cond=cond,
            guide=None if uncond is None else lambda d: cfg(d, uncond, opts.guidance_scale),
            init_latents=init,
            init_timestep=int(opts.start_timestep),
            progress=progress,
            timings=timings,
        )
        if image.shape[-2:] != (h * self.scale, w * self.scale):
            image = imresize(image, size=(h * self.scale, w * self.scale)).clamp_(0, 1)
        priors = compact(
            {
                "prompt": prompts[0],
                "negative_prompt": opts.negative_prompt,
                "tags": tags[0] if tags else None,
                "user_prompt": opts.prompt or None,
                "weights": dict(self.weight_sources) or None,
            }
        )
        return SROutput(image, priors=priors, timings=timings)


# ----------------------------------------------------------------------------- method


def build(options: SeeSROptions) -> SeeSRPipeline:
    """Factory of ``seesr``: ``base`` SD-2 folder, ``checkpoint`` released SeeSR folder, ``tagger`` DAPE folder."""
    require_paths(
        "seesr",
        options,
        ("base", "a Stable Diffusion 2 base folder (VAE, text encoder, tokenizer, scheduler)"),
        ("checkpoint", "the released SeeSR folder (unet/ + controlnet/)"),
        ("tagger", "the DAPE tagger folder (ram_swin_large_14m + DAPE weights, ram_tag_list.txt)"),
    )
    apply_threads(options.threads)
    return SeeSRPipeline.from_released(
        options.base,
        options.checkpoint,
        options.tagger,
        base_config=options.base_config,
        **options.placement(),
        name="seesr",
        options_class=type(options),
    )


register(
    MethodSpec(
        name="seesr",
        factory=build,
        options=SeeSROptions,
        scale=4,
        summary="SeeSR (released weights): DAPE tags + image embeddings through image cross-attention "
        "(--base SD-2 base, --checkpoint SeeSR folder, --tagger DAPE folder)",
        diffusion=True,
        weight_paths=("base", "checkpoint", "tagger"),
    )
)
