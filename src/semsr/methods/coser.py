"""``coser``: CoSeR (cognitive super-resolution) on Stable Diffusion — options, pipeline, registration.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --cognitive encoder--> cog (B, Te, D)                      (semsr.models.cognitive)
    context   = cog                                  (B, Te, D)   the cognitive embedding alone
    negative  = align(text(neg), Te)                 (B, Te, D)   the negative prompt's token embeddings
    1. reference: SD UNet *without* AiA, conditioned on the context, CFG against the negative,
       started from the LR latent noised to t=T  -> reference image (cached per input), or --reference IMAGE
    2. SR: UNet with All-in-Attention (semsr.fusion.aia): the noisy latent with the LR latent as hint, and
       the reference latent, through ControlNet branches (attention, cross-attention to the branch's
       context) into every transformer block, cross-attention to the context, guidance below, latent
       tiles; VAE decode (tiled); colour fix against the bicubic LR

The prompt takes no part with the cognitive embedding (CoSeR conditions on
the embedding alone): a non-empty ``prompt`` is an error unless
``no_cognition`` is set.

**Guidance** (``s_c`` = ``guidance_scale``, cognitive; ``s_r`` =
``reference_guidance``, defaults to ``s_c``). With ``eps(ctx, ref)`` the
AiA UNet's prediction, ``neg`` the negative context and ``0`` = VAE(zeros)
(the latent of an all-zero image in the VAE's [-1, 1] input range)::

    eps = eps(neg, 0) + s_r * [eps(neg, ref) - eps(neg, 0)] + s_c * [eps(ctx, ref) - eps(neg, ref)]

With ``s_r == s_c == s`` this is CoSeR's two-branch CFG ``eps(neg, 0) + s *
[eps(ctx, ref) - eps(neg, 0)]`` (the middle branch cancels and is not run);
with ``s_r == s_c == 1`` only ``eps(ctx, ref)`` is run. Without reference
(``no_reference``) it is plain CFG ``eps(neg) + s_c * [eps(ctx) - eps(neg)]``.
Reference generation uses plain CFG with ``reference_gen_guidance`` (7).
The combination is :func:`semsr.pipeline.guidance.weighted` around the
per-window model call (:func:`guidance_branches` gives the weights and the
branch conditions), one batched forward per step and latent tile.

**References** come from ``reference`` (an image file), else from the
reference cache (:mod:`semsr.methods.coser_references`, per input image,
model files and generation options), else they are generated. Every call
returns the reference it used in ``SROutput.side_images["reference"]``
(``save_reference`` asks the front ends to write it) and in its priors.

**Ablations** (explicit opt-outs, recorded in ``SROutput.priors``):
``no_reference`` (no reference is generated or used; AiA keeps only the LR
attention; ``reference_source: none``), ``no_cognition`` (the cognitive
encoder is not run; the context is the prompt's text embedding ``(B, 77, D)``
and the negative the negative prompt's; a generated reference is then
text-to-image from the prompt; ``cognition: false``). ``reference`` together
with ``no_reference`` is an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import torch

from semsr.core.components import INDEX_FILE, load_checkpoint, load_component, read_index
from semsr.core.dtypes import apply_threads
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.fingerprint import fingerprint
from semsr.core.loading import load_sd
from semsr.core.method import MethodSpec, ProgressFn
from semsr.core.options import option
from semsr.core.outputs import SROutput, compact
from semsr.fusion.aia import AiAFusion, install_aia
from semsr.methods import register
from semsr.methods.coser_references import ReferenceCache, read_reference
from semsr.models.cognitive import RECIPE, CognitiveEncoder, load_cognitive_encoder, text_token_targets
from semsr.ops.imresize import imresize
from semsr.pipeline.guidance import Denoiser, weighted
from semsr.pipeline.latent_sr import LatentSRPipeline, make_hint, progress_fn
from semsr.pipeline.latent_tiling import SpatialDenoiser, Window, crop_window
from semsr.pipeline.options import (
    LatentSROptions,
    Placement,
    latent_tile,
    require_paths,
    resolve_placement,
    steps_option,
)
from semsr.pipeline.sampler import make_scheduler, sample
from semsr.pipeline.text import load_text_conditioner

#: Negative prompt of CoSeR's inference script.
COSER_NEGATIVE = (
    "worst quality, normal quality, low quality, low res, blurry, text, watermark, logo, banner, "
    "extra digits, cropped, jpeg artifacts, signature, username, error, sketch, duplicate, ugly, "
    "monochrome, horror, geometry, mutation, disgusting"
)
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.0
DEFAULT_REFERENCE_GEN_GUIDANCE = 7.0
#: Version of the reference generation in the reference cache keys (raise it when generation changes:
#: 2 = the cognitive embedding alone as context).
REFERENCE_VERSION = 2
#: Long side of generated references (SD's native 512 px; never above the output size).
DEFAULT_REFERENCE_SIZE = 512


# ----------------------------------------------------------------------------- options


@dataclass(kw_only=True, frozen=True)
class CoSeROptions(LatentSROptions):
    """Options of ``coser``."""

    checkpoint: Path | None = option(
        None, stage="build", metavar="DIR", help="CoSeR checkpoint folder (cognitive/ + aia/, as semsr train writes it)"
    )
    clip: Path | None = option(None, stage="build", metavar="DIR", help="local CLIP vision model folder")
    prompt: str = option(
        "", help="prompt, only with --no-cognition (CoSeR conditions on the cognitive embedding alone)"
    )
    negative_prompt: str = option(COSER_NEGATIVE, help="negative prompt")
    steps: int = steps_option(DEFAULT_STEPS)
    guidance_scale: float = option(
        DEFAULT_GUIDANCE, min=0.0, max=100.0, metavar="S", help="cognitive (classifier-free) guidance scale"
    )
    reference: Path | None = option(
        None, widget="image", metavar="IMAGE", help="use this reference image instead of generating one"
    )
    save_reference: bool = option(
        False, help="write the reference used beside the output (<output stem>_reference.png)"
    )
    reference_guidance: float | None = option(
        None, min=0.0, max=100.0, metavar="S", help="reference guidance scale (default: --guidance-scale)"
    )
    reference_gen_guidance: float = option(
        DEFAULT_REFERENCE_GEN_GUIDANCE,
        min=0.0,
        max=100.0,
        metavar="S",
        help="guidance scale of the reference generation",
    )
    reference_steps: int | None = option(
        None, min=1, max=1000, metavar="N", help="sampling steps of the reference generation (default: --steps)"
    )
    reference_size: int = option(
        DEFAULT_REFERENCE_SIZE,
        min=1,
        max=1 << 16,
        units="output px",
        metavar="PX",
        help="long side of the generated reference (at most the output size)",
    )
    no_reference: bool = option(
        False, advanced=True, help="ablation: no reference image (AiA keeps only the LR attention)"
    )
    no_cognition: bool = option(
        False, advanced=True, help="ablation: no cognitive embedding (the prompt's text embedding instead)"
    )


# ----------------------------------------------------------------------------- checkpoints


def load_part(path: str | Path, name: str, cls: type) -> Any:
    """Component ``name`` of the CoSeR checkpoint folder ``path``, or ``path`` itself when it is a component
    folder (``config.json`` + weights, e.g. ``<checkpoint>/aia``) of class ``cls``; in eval mode."""
    path = Path(path).expanduser()
    if (path / INDEX_FILE).is_file():
        return load_checkpoint(path, RECIPE, names=[name])[0][name]
    return load_component(cls, path)


# ----------------------------------------------------------------------------- guidance


@dataclass
class Branch:
    """One model evaluation of the guidance combination (a branch condition of :func:`weighted`).

    Attributes:
        context: ``(B, L, D)`` cross-attention context.
        reference: ``(B, 4, hr, wr)`` reference latent, or None (no reference attention).
    """

    context: torch.Tensor
    reference: torch.Tensor | None


def guidance_branches(
    positive: torch.Tensor,
    negative: torch.Tensor,
    reference: torch.Tensor | None,
    zero_reference: torch.Tensor | None,
    guidance_scale: float,
    reference_guidance: float | None = None,
) -> list[tuple[float, Branch]]:
    """The branches of CoSeR guidance and their weights (see the module docstring).

    Returns ``[(weight, Branch), ...]`` with ``eps = sum(weight * eps(branch))``;
    branches of weight 0 are left out.
    """
    s_c = float(guidance_scale)
    s_r = s_c if reference_guidance is None else float(reference_guidance)
    if reference is None:
        terms = [(1.0 - s_c, Branch(negative, None)), (s_c, Branch(positive, None))]
    else:
        if zero_reference is None:
            raise SemsrError("reference guidance needs the VAE(zeros) reference latent")
        terms = [
            (1.0 - s_r, Branch(negative, zero_reference)),
            (s_r - s_c, Branch(negative, reference)),
            (s_c, Branch(positive, reference)),
        ]
    return [(w, b) for w, b in terms if w != 0.0]


def quantise(image: torch.Tensor) -> torch.Tensor:
    """Round ``image`` in [0, 1] to 8-bit levels (so a reference read back from a PNG is identical)."""
    return (image.float().clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------- pipeline


class CoSeRSR(LatentSRPipeline):
    """The ``coser`` method: the CoSeR pipeline (see the module docstring).

    Attributes:
        vae, unet, text: the frozen SD components (the UNet carries the AiA hooks).
        cognitive: :class:`~semsr.models.cognitive.CognitiveEncoder` (CLIP tower attached).
        fusion: :class:`~semsr.fusion.aia.AiAFusion` (AiA blocks + LR/reference control branches).
        scale: SR factor of a call (a build option).
        references: the cache of generated references, or None (generate on every call).
        model_id: identity of the model files in the reference cache keys.
    """

    name = "coser"
    tiles_itself = True
    options_class: type[CoSeROptions] = CoSeROptions

    def __init__(
        self,
        *,
        vae: Any,
        unet: Any,
        text: Any,
        cognitive: CognitiveEncoder,
        fusion: AiAFusion,
        scheduler_config: dict[str, Any],
        references: ReferenceCache | None = None,
        model_id: str = "",
        **placement: Unpack[Placement],
    ) -> None:
        fusion.check_unet(unet)
        self.setup_sd(vae=vae, unet=unet, text=text, scheduler_config=scheduler_config, **placement)
        self.unet = install_aia(self.unet)
        self.fusion = self.prepare(fusion, channels_last=True)
        self.cognitive = self.prepare(cognitive)
        self.references = references
        self.model_id = model_id
        width = int(self.unet.config.cross_attention_dim)
        if int(self.text.width) != width:
            raise SemsrError(f"text encoder width {self.text.width} != UNet cross-attention width {width}")
        if self.cognitive.text_width != width:
            raise SemsrError(
                f"cognitive embedding width {self.cognitive.text_width} != UNet cross-attention width {width}"
            )

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        checkpoint: str | Path,
        clip: str | Path,
        *,
        base_config: str | Path | None = None,
        **kwargs: Any,
    ) -> CoSeRSR:
        """Load from local paths: ``base`` SD folder/file, ``checkpoint`` CoSeR checkpoint folder
        (``cognitive`` + ``aia`` components), ``clip`` CLIP vision folder. ``kwargs``: device, dtype,
        channels_last, compile, scale, references, model_id."""
        device, dtype = resolve_placement(kwargs)
        checkpoint = Path(checkpoint).expanduser()
        if not (checkpoint / INDEX_FILE).is_file():
            raise UnavailableError(
                f"not a CoSeR checkpoint folder (no {INDEX_FILE}; semsr train writes one in final/)", checkpoint
            )
        index = read_index(checkpoint, RECIPE)
        missing = [n for n in ("cognitive", "aia") if n not in index.components]
        if missing:
            raise UnavailableError(
                f"the CoSeR checkpoint has no {missing[0]!r} component (a stage-1 export has "
                "only 'cognitive': train coser-sr on it)",
                checkpoint,
            )
        comps = load_sd(base, dtype=dtype, config=base_config)
        text = load_text_conditioner(comps, dtype=dtype, device=device)
        cognitive = load_cognitive_encoder(checkpoint, clip)
        fusion = load_part(checkpoint, "aia", AiAFusion)
        return cls(
            vae=comps.vae,
            unet=comps.unet,
            text=text,
            cognitive=cognitive,
            fusion=fusion,
            scheduler_config=comps.scheduler_config,
            **{**kwargs, "device": device, "dtype": dtype},
        )

    # ------------------------------------------------------------------ conditions

    def contexts(
        self, lr: torch.Tensor, prompts: list[str], negatives: list[str], use_cognition: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positive, negative)`` contexts: with cognition the cognitive embedding ``(B, Te, D)`` and the
        negative prompts' token embeddings aligned to ``Te`` tokens; without, the prompts' and negative
        prompts' text embeddings ``(B, 77, D)``. Prompts must be empty with cognition (see the module
        docstring)."""
        if not use_cognition:
            return self.encode_prompts(prompts), self.encode_prompts(negatives)
        if any(p.strip() for p in prompts):
            raise SemsrError(
                "coser conditions on the cognitive embedding alone: --prompt is not used "
                "(pass --no-cognition to condition on the prompt instead)"
            )
        with torch.no_grad():
            cog = self.cognitive.embed(lr.to(self.device, self.dtype)).to(self.dtype)
            neg = text_token_targets(self.text, negatives, self.cognitive.num_queries).to(self.device, self.dtype)
        return cog, neg

    def reference_size(self, height: int, width: int, max_side: int = DEFAULT_REFERENCE_SIZE) -> tuple[int, int]:
        """Size of a reference for an ``height x width`` image: long side <= ``max_side``,
        aspect kept, sides multiples of the UNet's latent granularity and at least two of them
        (the encoders' GroupNorms need more than one value per channel at the coarsest level)."""
        mult = self.factor * self.latent_multiple
        scale = min(1.0, float(max_side) / max(height, width))
        return (max(2 * mult, round(height * scale / mult) * mult), max(2 * mult, round(width * scale / mult) * mult))

    def generate_reference(
        self,
        lr: torch.Tensor,
        positive: torch.Tensor,
        negative: torch.Tensor,
        size: tuple[int, int],
        *,
        steps: int,
        guidance_scale: float,
        seed: int = 0,
        scheduler: str = "ddpm",
        progress: ProgressFn | bool | None = False,
    ) -> torch.Tensor:
        """The reference image ``(B, 3, *size)`` in [0, 1] (8-bit levels): the plain SD UNet on
        ``positive`` (CFG against ``negative``, :func:`~semsr.pipeline.guidance.weighted`), started
        from the LR latent at ``size`` noised to t=T."""
        init = self.vae_encode(make_hint(lr, size))
        branches = [(w, c) for w, c in ((1.0 - guidance_scale, negative), (guidance_scale, positive)) if w != 0.0]

        def plain(x: torch.Tensor, t: torch.Tensor, cond: list[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return self.unet(x.to(self.dtype), t, encoder_hidden_states=torch.cat(cond, dim=0), return_dict=False)[
                    0
                ]

        callback, close = progress_fn(progress, "reference")
        try:
            z = sample(
                weighted(plain, [w for w, _ in branches]),
                make_scheduler(scheduler, self.scheduler_config),
                shape=tuple(init.shape),
                cond=[c for _, c in branches],
                steps=int(steps),
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                init_latents=init,
                device=self.device,
                progress=callback,
            )
        finally:
            close()
        return quantise(self.vae_decode(z).cpu())

    def reference_for(
        self,
        lr: torch.Tensor,
        prompts: list[str],
        negatives: list[str],
        *,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_REFERENCE_GEN_GUIDANCE,
        size: int = DEFAULT_REFERENCE_SIZE,
        use_cognition: bool = True,
        seed: int = 0,
        scheduler: str = "ddpm",
        progress: ProgressFn | bool | None = False,
    ) -> torch.Tensor:
        """Generate the reference for ``lr (B, 3, h, w)`` -> ``(B, 3, H, W)`` (long side ``<= size``)."""
        pos, neg = self.contexts(lr, prompts, negatives, use_cognition)
        ref_hw = self.reference_size(lr.shape[-2] * self.scale, lr.shape[-1] * self.scale, size)
        return self.generate_reference(
            lr,
            pos,
            neg,
            ref_hw,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            scheduler=scheduler,
            progress=progress,
        )

    def generated_references(
        self,
        lr: torch.Tensor,
        options: CoSeROptions,
        prompts: list[str],
        negatives: list[str],
        progress: ProgressFn | bool | None = False,
    ) -> tuple[torch.Tensor, str]:
        """``(references (B, 3, H, W), source)``: from :attr:`references` (source ``"cache"``) or generated
        with the ``reference_*`` options (source ``"generated"``; stored in the cache when there is one)."""

        def generate(rows: list[int]) -> torch.Tensor:
            return self.reference_for(
                lr[rows],
                [prompts[i] for i in rows],
                [negatives[i] for i in rows],
                steps=int(options.reference_steps or options.steps),
                guidance_scale=options.reference_gen_guidance,
                size=options.reference_size,
                use_cognition=not options.no_cognition,
                seed=options.seed,
                scheduler=options.scheduler,
                progress=progress,
            )

        if self.references is None:
            return generate(list(range(lr.shape[0]))), "generated"
        settings = {
            "version": REFERENCE_VERSION,
            "model": self.model_id,
            "scale": self.scale,
            "dtype": str(self.dtype),
            "device": str(self.device),
            **{
                k: getattr(options, k)
                for k in (
                    "steps",
                    "reference_steps",
                    "reference_gen_guidance",
                    "reference_size",
                    "seed",
                    "scheduler",
                    "no_cognition",
                )
            },
        }
        keys = [
            self.references.key(img, {**settings, "prompt": p, "negative_prompt": n})
            for img, p, n in zip(lr, prompts, negatives, strict=True)
        ]
        refs: list[torch.Tensor | None] = [self.references.get(k) for k in keys]
        missing = [i for i, r in enumerate(refs) if r is None]
        if missing:
            for i, img in zip(missing, generate(missing), strict=True):
                self.references.put(keys[i], img)
                refs[i] = img
        if len({tuple(r.shape) for r in refs if r is not None}) != 1:
            raise SemsrError("cached references of one batch differ in size; run the images one by one")
        return torch.stack(refs), "generated" if missing else "cache"  # type: ignore[arg-type]

    def reference_latent(
        self, reference: torch.Tensor, batch: int, max_side: int = DEFAULT_REFERENCE_SIZE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_ref, z_zero)``: latents of ``reference (1 or B, 3, H, W)`` resized to an allowed size
        (long side <= ``max_side``) and of VAE(zeros) of the same size, both ``(B, 4, H/f, W/f)``."""
        if reference.ndim != 4 or reference.shape[1] != 3:
            raise SemsrError(f"reference must be (B, 3, H, W), got {tuple(reference.shape)}")
        if reference.shape[0] not in (1, batch):
            raise SemsrError(f"{reference.shape[0]} reference images for {batch} inputs")
        size = self.reference_size(reference.shape[-2], reference.shape[-1], max(max_side, 1))
        if tuple(reference.shape[-2:]) != size:
            reference = imresize(reference.float(), size=size).clamp(0, 1)
        z_ref = self.vae_encode(reference).expand(batch, -1, -1, -1)
        # VAE(zeros): an all-zero image in the VAE's [-1, 1] input range is 0.5 in [0, 1]
        z_zero = self.vae_encode(torch.full((1, 3, *size), 0.5)).expand(batch, -1, -1, -1)
        return z_ref, z_zero

    def spatial_denoiser(self, z_lr: torch.Tensor, weights: list[float]) -> SpatialDenoiser:
        """The guided per-step AiA model call over a latent window: ``cond`` is the list of
        :class:`Branch` es, combined with ``weights`` by :func:`~semsr.pipeline.guidance.weighted`
        (one batched forward; the branches are combined per window, before tile blending).

        LR features come from the LR branch on the window: with ControlNet branches
        once per step and window for all guidance branches in one batch (they read
        the noisy latent and each branch's context); with the encoder option also
        once per step and window, but on the LR latent alone and shared by the
        branches. Reference features are computed once
        per step per (reference, context) pair (references are global, never
        cropped to the window).
        """
        ref_cache: dict[tuple[int, int, float], list[torch.Tensor]] = {}
        by_context = self.fusion.context_dependent

        def ref_feats(ref: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
            key = (id(ref), id(context) if by_context else 0, float(t.flatten()[0]))
            if key not in ref_cache:
                if any(k[2] != key[2] for k in ref_cache):
                    ref_cache.clear()
                ctx = context.to(self.dtype) if by_context else None
                ref_cache[key] = self.fusion.ref_features(ref.to(self.dtype), t.flatten()[:1], context=ctx)
            return ref_cache[key]

        def branches(window: Window) -> Denoiser:
            def forward(x: torch.Tensor, t: torch.Tensor, cond: list[Branch]) -> torch.Tensor:
                k = len(cond)
                with torch.no_grad():
                    ctx = torch.cat([b.context for b in cond], dim=0).to(self.dtype)
                    z_win = crop_window(z_lr, window).to(self.dtype)
                    if by_context:
                        lr_feats = self.fusion.lr_features(
                            z_win.repeat(k, 1, 1, 1), t, sample=x.to(self.dtype), context=ctx
                        )
                    else:
                        lr_feats = [f.repeat(k, 1, 1, 1) for f in self.fusion.lr_features(z_win, t)]
                    refs = [b.reference for b in cond]
                    if all(r is None for r in refs):
                        ref_all = None
                    else:
                        per_branch = [ref_feats(b.reference, b.context, t) for b in cond]
                        ref_all = [torch.cat(level, dim=0) for level in zip(*per_branch, strict=True)]
                    return self.fusion.unet_forward(self.unet, x.to(self.dtype), t, ctx, lr_feats, ref_all)

            return forward

        def spatial(x: torch.Tensor, t: torch.Tensor, cond: list[Branch], window: Window) -> torch.Tensor:
            return weighted(branches(window), weights)(x, t, cond)

        return spatial

    # ------------------------------------------------------------------ run

    def __call__(
        self,
        lr: torch.Tensor,
        options: CoSeROptions | None = None,
        *,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        progress: ProgressFn | bool | None = False,
    ) -> SROutput:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        Args:
            options: the run options (``None``: :class:`CoSeROptions` defaults).
            prompts / negative_prompts: one per image, overriding ``options.prompt`` /
                ``options.negative_prompt`` (e.g. validation captions).
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
        Returns:
            ``images``; ``priors`` of the first image: ``prompt``, ``negative_prompt``, ``cognition``
            (the cognitive embedding was used), ``reference_source`` (``generated``, ``cache``,
            ``file`` or ``none``), ``reference_path`` (a file reference) and ``reference``
            ``(1, 3, H, W)``; ``side_images["reference"]`` ``(B, 3, H, W)`` when a reference was used;
            ``timings`` (``reference``, ``encode``, ``denoise``, ``decode`` seconds and ``steps``).
        """
        opts = options if options is not None else self.options_class()
        layout = self.layout(lr, self.scale, latent_tile(opts, self.scale, self.factor))
        bsz = layout.batch
        prompts = list(prompts) if prompts is not None else [opts.prompt] * bsz
        negatives = list(negative_prompts) if negative_prompts is not None else [opts.negative_prompt] * bsz
        if len(prompts) != bsz or len(negatives) != bsz:
            raise SemsrError(f"{len(prompts)} prompts / {len(negatives)} negative prompts for {bsz} images")
        use_cognition = not opts.no_cognition
        if opts.no_reference and opts.reference is not None:
            raise SemsrError("coser: --reference and --no-reference contradict each other; pass one of them")
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        reference, source = None, "none"
        if not opts.no_reference:
            if opts.reference is not None:
                reference, source = read_reference(opts.reference), "file"
            else:
                reference, source = self.generated_references(lr, opts, prompts, negatives, progress)
        pos, neg = self.contexts(lr, prompts, negatives, use_cognition)
        z_ref = z_zero = None
        if reference is not None:
            z_ref, z_zero = self.reference_latent(reference, bsz, max(opts.reference_size, 1))
        timings["reference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        z_lr = self.vae_encode(layout.hint_padded, layout.vae_tile)
        timings["encode"] = time.perf_counter() - t0
        branches = guidance_branches(pos, neg, z_ref, z_zero, opts.guidance_scale, opts.reference_guidance)
        image = self.denoise_decode(
            self.spatial_denoiser(z_lr, [w for w, _ in branches]),
            layout,
            opts,
            channels=self.unet.config.in_channels,
            cond=[b for _, b in branches],
            init_latents=z_lr,
            progress=progress,
            timings=timings,
        )

        used = None if reference is None else reference.expand(bsz, -1, -1, -1).float().cpu()
        priors = compact(
            {
                "prompt": prompts[0],
                "negative_prompt": negatives[0],
                "cognition": use_cognition,
                "reference_source": source,
                "reference_path": str(opts.reference) if source == "file" else None,
                "reference": None if used is None else used[:1],
            }
        )
        side = {} if used is None else {"reference": used}
        return SROutput(image, priors=priors, timings=timings, side_images=side)


# ----------------------------------------------------------------------------- method


def build(options: CoSeROptions) -> CoSeRSR:
    """Factory of ``coser``: ``base`` SD, ``checkpoint`` CoSeR folder, ``clip`` CLIP vision folder."""
    require_paths(
        "coser",
        options,
        ("base", "a Stable Diffusion folder or single file"),
        ("checkpoint", "a CoSeR checkpoint folder (cognitive/ + aia/)"),
        ("clip", "a local CLIP vision model folder"),
    )
    apply_threads(options.threads)
    return CoSeRSR.from_pretrained(
        options.base,
        options.checkpoint,
        options.clip,
        base_config=options.base_config,
        **options.placement(),
        references=ReferenceCache(),
        model_id=fingerprint([options.base, options.base_config, options.checkpoint, options.clip]),
    )


register(
    MethodSpec(
        name="coser",
        factory=build,
        options=CoSeROptions,
        scale=4,
        summary="CoSeR: cognitive embedding + generated reference + All-in-Attention "
        "(--base SD, --checkpoint CoSeR folder, --clip CLIP vision folder)",
        diffusion=True,
        weight_paths=("base", "checkpoint", "clip"),
    )
)
