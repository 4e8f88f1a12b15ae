"""CoSeR (cognitive super-resolution) on Stable Diffusion, and the ``coser`` method.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --cognitive encoder--> cog (B, Te, D)                      (semsr.models.cognitive)
    context   = [text(prompt) ; cog]                 (B, 77 + Te, D)   prompt "" by default
    negative  = [text(neg)    ; align(text(neg), Te)]                  the negative prompt fills the cognition slot
    1. reference: SD UNet *without* AiA, conditioned on the context, CFG against the negative,
       started from the LR latent noised to t=T  -> reference image (cached per input), or --reference IMAGE
    2. SR: UNet with All-in-Attention (semsr.fusion.aia): LR latent and reference latent through the
       ControlNet-style encoders into every transformer block, cross-attention to the context,
       guidance below, latent tiles; VAE decode (tiled); colour fix against the bicubic LR

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

**Ablations**: ``no_reference`` (no reference is generated or used; AiA keeps
only the LR attention), ``no_cognition`` (the cognitive encoder is not run;
the context is the prompt's text embedding alone and the negative the
negative prompt's; a generated reference is then text-to-image from the prompt).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.aia import AiAFusion, install_aia
from semsr.methods import MethodSpec, register
from semsr.models.cognitive import CognitiveEncoder, load_cognitive_encoder, text_token_targets
from semsr.ops.imresize import imresize
from semsr.pipeline.colorfix import COLOUR_FIXES
from semsr.pipeline.latent_sr import LatentSRPipeline, make_hint, progress_fn
from semsr.pipeline.latent_tiling import Window, crop_window
from semsr.core.loading import load_sd
from semsr.pipeline.precision import check_dtype, prepare_module
from semsr.pipeline.sampler import make_scheduler, sample
from semsr.pipeline.sd_controlnet import require_build_paths, sd_cli_options, sd_run_options
from semsr.pipeline.text import load_text_conditioner
from semsr.priors.report import PriorReporter, first

#: Negative prompt of CoSeR's inference script.
COSER_NEGATIVE = ("worst quality, normal quality, low quality, low res, blurry, text, watermark, logo, banner, "
                  "extra digits, cropped, jpeg artifacts, signature, username, error, sketch, duplicate, ugly, "
                  "monochrome, horror, geometry, mutation, disgusting")
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.0
DEFAULT_REFERENCE_GEN_GUIDANCE = 7.0
#: Long side of generated references (SD's native 512 px; never above the output size).
DEFAULT_REFERENCE_SIZE = 512


# ----------------------------------------------------------------------------- guidance


@dataclass
class Branch:
    """One model evaluation of the guidance combination.

    Attributes:
        context: ``(B, L, D)`` cross-attention context.
        reference: ``(B, 4, hr, wr)`` reference latent, or None (no reference attention).
    """

    context: torch.Tensor
    reference: torch.Tensor | None


def guidance_branches(positive: torch.Tensor, negative: torch.Tensor, reference: torch.Tensor | None,
                      zero_reference: torch.Tensor | None, guidance_scale: float,
                      reference_guidance: float | None = None) -> list[tuple[float, Branch]]:
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
        terms = [(1.0 - s_r, Branch(negative, zero_reference)), (s_r - s_c, Branch(negative, reference)),
                 (s_c, Branch(positive, reference))]
    return [(w, b) for w, b in terms if w != 0.0]


def combine(outputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum(w * out)`` in float32."""
    total = None
    for w, out in zip(weights, outputs, strict=True):
        term = out.float() * w
        total = term if total is None else total + term
    assert total is not None
    return total


def quantise(image: torch.Tensor) -> torch.Tensor:
    """Round ``image`` in [0, 1] to 8-bit levels (so a reference read back from a PNG is identical)."""
    return (image.float().clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------- pipeline


class CoSeRSR(LatentSRPipeline):
    """The CoSeR pipeline (see the module docstring).

    Attributes:
        vae, unet, text: the frozen SD components (the UNet carries the AiA hooks).
        cognitive: :class:`~semsr.models.cognitive.CognitiveEncoder`.
        fusion: :class:`~semsr.fusion.aia.AiAFusion` (AiA blocks + LR/reference encoders).
        last_reference: the reference image ``(B, 3, H, W)`` used by the last call, or None.
        last_timings: seconds of the last call: ``reference``, ``encode``, ``denoise``, ``decode``.
    """

    def __init__(self, *, vae: Any, unet: Any, text: Any, cognitive: CognitiveEncoder, fusion: AiAFusion,
                 scheduler_config: dict[str, Any], device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "fp32", channels_last: bool = False, compile: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = check_dtype(dtype, self.device)
        prep = dict(device=self.device, dtype=self.dtype, channels_last=channels_last)
        self.vae = prepare_module(vae, **prep)
        self.unet = install_aia(prepare_module(unet, **prep, compile=compile))
        self.fusion = prepare_module(fusion, **prep)
        self.cognitive = prepare_module(cognitive, device=self.device, dtype=self.dtype)
        self.text = text.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        width = int(self.unet.config.cross_attention_dim)
        if int(self.text.width) != width:
            raise SemsrError(f"text encoder width {self.text.width} != UNet cross-attention width {width}")
        if self.cognitive.text_width != width:
            raise SemsrError(f"cognitive embedding width {self.cognitive.text_width} != UNet cross-attention "
                             f"width {width}")
        self.last_reference: torch.Tensor | None = None
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, base: str | Path, checkpoint: str | Path, clip: str | Path, *,
                        base_config: str | Path | None = None, **kwargs: Any) -> CoSeRSR:
        """Load from local paths: ``base`` SD folder/file, ``checkpoint`` CoSeR folder
        (``cognitive/`` + ``aia/``), ``clip`` CLIP vision folder. ``kwargs``: device, dtype,
        channels_last, compile."""
        device = torch.device(kwargs.get("device", "cpu"))
        dtype = check_dtype(kwargs.get("dtype", "fp32"), device)
        checkpoint = Path(checkpoint).expanduser()
        aia_dir = checkpoint / "aia"
        if not (aia_dir / "config.json").is_file():
            raise UnavailableError("not a CoSeR checkpoint folder (needs aia/ and cognitive/ with config.json + "
                                   "model.safetensors)", aia_dir / "config.json")
        comps = load_sd(base, dtype=dtype, config=base_config)
        text = load_text_conditioner(comps, dtype=dtype, device=device)
        cognitive = load_cognitive_encoder(checkpoint / "cognitive", clip)
        fusion = AiAFusion.load(aia_dir, comps.unet)
        return cls(vae=comps.vae, unet=comps.unet, text=text, cognitive=cognitive, fusion=fusion,
                   scheduler_config=comps.scheduler_config, **{**kwargs, "device": device, "dtype": dtype})

    # ------------------------------------------------------------------ conditions

    def contexts(self, lr: torch.Tensor, prompts: list[str], negatives: list[str],
                 use_cognition: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positive, negative)`` contexts ``(B, L, D)`` (see the module docstring)."""
        text = self.encode_prompts(prompts)
        neg = self.encode_prompts(negatives)
        if not use_cognition:
            return text, neg
        te = self.cognitive.num_queries
        with torch.no_grad():
            cog = self.cognitive.embed(lr.to(self.device, self.dtype)).to(self.dtype)
            neg_cog = text_token_targets(self.text, negatives, te).to(self.device, self.dtype)
        return torch.cat([text, cog], dim=1), torch.cat([neg, neg_cog], dim=1)

    def reference_size(self, height: int, width: int, max_side: int = DEFAULT_REFERENCE_SIZE) -> tuple[int, int]:
        """Size of a reference for an ``height x width`` image: long side <= ``max_side``,
        aspect kept, sides multiples of the UNet's latent granularity and at least two of them
        (the encoders' GroupNorms need more than one value per channel at the coarsest level)."""
        mult = self.factor * self.latent_multiple
        scale = min(1.0, float(max_side) / max(height, width))
        return (max(2 * mult, round(height * scale / mult) * mult), max(2 * mult, round(width * scale / mult) * mult))

    def generate_reference(self, lr: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                           size: tuple[int, int], *, steps: int, guidance_scale: float, seed: int = 0,
                           scheduler: str = "ddpm", progress: Any = False) -> torch.Tensor:
        """The reference image ``(B, 3, *size)`` in [0, 1] (8-bit levels): the plain SD UNet on
        ``positive`` (CFG against ``negative``), started from the LR latent at ``size`` noised to t=T."""
        init = self.vae_encode(make_hint(lr, size))
        branches = [(w, b) for w, b in ((1.0 - guidance_scale, negative), (guidance_scale, positive)) if w != 0.0]

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            k = len(branches)
            ctx = torch.cat([c for _, c in branches], dim=0)
            with torch.no_grad():
                out = self.unet(x.repeat(k, 1, 1, 1).to(self.dtype), t, encoder_hidden_states=ctx,
                                return_dict=False)[0]
            return combine(list(out.chunk(k)), [w for w, _ in branches])

        callback, close = progress_fn(progress, "reference")
        try:
            z = sample(denoise, make_scheduler(scheduler, self.scheduler_config), shape=tuple(init.shape), cond=None,
                       steps=int(steps), generator=torch.Generator("cpu").manual_seed(int(seed)), init_latents=init,
                       device=self.device, progress=callback)
        finally:
            close()
        return quantise(self.vae_decode(z).cpu())

    def reference_for(self, lr: torch.Tensor, *, prompt: str | list[str] = "", negative_prompt: str | list[str] | None
                      = COSER_NEGATIVE, scale: int = 4, steps: int = DEFAULT_STEPS,
                      guidance_scale: float = DEFAULT_REFERENCE_GEN_GUIDANCE, size: int = DEFAULT_REFERENCE_SIZE,
                      use_cognition: bool = True, seed: int = 0, scheduler: str = "ddpm",
                      progress: Any = False) -> torch.Tensor:
        """Generate the reference for ``lr (B, 3, h, w)`` -> ``(B, 3, H, W)`` (long side ``<= size``)."""
        prompts, negatives = _prompt_lists(prompt, negative_prompt, lr.shape[0])
        pos, neg = self.contexts(lr, prompts, negatives, use_cognition)
        ref_hw = self.reference_size(lr.shape[-2] * scale, lr.shape[-1] * scale, size)
        return self.generate_reference(lr, pos, neg, ref_hw, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                       scheduler=scheduler, progress=progress)

    def reference_latent(self, reference: torch.Tensor, batch: int,
                         max_side: int = DEFAULT_REFERENCE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
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

    def spatial_denoiser(self, z_lr: torch.Tensor) -> Callable:
        """The per-step AiA model call over a latent window; ``cond`` is the guidance branch list.

        LR features are computed once per window and shared by the branches;
        reference features once per step per reference (references are global,
        never cropped to the window).
        """
        ref_cache: dict[tuple[int, float], list[torch.Tensor]] = {}

        def ref_feats(ref: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
            key = (id(ref), float(t))
            if key not in ref_cache:
                if any(k[1] != float(t) for k in ref_cache):
                    ref_cache.clear()
                ref_cache[key] = self.fusion.ref_features(ref.to(self.dtype), t)
            return ref_cache[key]

        def spatial(x: torch.Tensor, t: torch.Tensor, cond: list[tuple[float, Branch]], window: Window) -> torch.Tensor:
            k = len(cond)
            with torch.no_grad():
                lr_feats = self.fusion.lr_features(crop_window(z_lr, window).to(self.dtype), t)
                refs = [b.reference for _, b in cond]
                if all(r is None for r in refs):
                    ref_all = None
                else:
                    per_branch = [ref_feats(r, t) for r in refs]
                    ref_all = [torch.cat(level, dim=0) for level in zip(*per_branch, strict=True)]
                ctx = torch.cat([b.context for _, b in cond], dim=0)
                out = self.fusion.unet_forward(self.unet, x.repeat(k, 1, 1, 1).to(self.dtype), t, ctx,
                                               [f.repeat(k, 1, 1, 1) for f in lr_feats], ref_all)
            return combine(list(out.chunk(k)), [w for w, _ in cond])

        return spatial

    # ------------------------------------------------------------------ run

    def __call__(self, lr: torch.Tensor, *, scale: int = 4, prompt: str | list[str] = "",
                 negative_prompt: str | list[str] | None = COSER_NEGATIVE, steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, reference_guidance: float | None = None,
                 reference: torch.Tensor | None = None, use_reference: bool = True, use_cognition: bool = True,
                 reference_steps: int | None = None, reference_gen_guidance: float = DEFAULT_REFERENCE_GEN_GUIDANCE,
                 reference_size: int = DEFAULT_REFERENCE_SIZE, seed: int = 0, scheduler: str = "ddpm",
                 colour_fix_method: str = "adain", latent_tile: int | None = None, tile_overlap: int | None = None,
                 start_from_lr: bool = True, strength: float = 1.0, progress: Any = False) -> torch.Tensor:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        Args:
            prompt / negative_prompt: one string or one per image (``None`` negative = the empty prompt).
            guidance_scale, reference_guidance: ``s_c`` and ``s_r`` of the guidance formula.
            reference: ``(1 or B, 3, H, W)`` reference image in [0, 1]; None generates one
                (``reference_steps``, ``reference_gen_guidance``, long side ``reference_size``).
            use_reference / use_cognition: the ablation switches.
            Others as :class:`~semsr.pipeline.sd_controlnet.SDControlNetSR`.
        """
        layout = self.layout(lr, scale, latent_tile)
        bsz, (out_h, out_w) = layout.batch, layout.out_hw
        timings: dict[str, float] = {}
        prompts, negatives = _prompt_lists(prompt, negative_prompt, bsz)

        t0 = time.perf_counter()
        pos, neg = self.contexts(lr, prompts, negatives, use_cognition)
        z_ref = z_zero = None
        self.last_reference = None
        if use_reference:
            if reference is None:
                ref_hw = self.reference_size(out_h, out_w, reference_size)
                reference = self.generate_reference(
                    lr, pos, neg, ref_hw, steps=int(reference_steps or steps), guidance_scale=reference_gen_guidance,
                    seed=seed, scheduler=scheduler, progress=progress)
            self.last_reference = reference.expand(bsz, -1, -1, -1).float().cpu()
            z_ref, z_zero = self.reference_latent(reference, bsz, max(reference_size, 1))
        timings["reference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        z_lr = self.vae_encode(layout.hint_padded, layout.vae_tile)
        timings["encode"] = time.perf_counter() - t0
        branches = guidance_branches(pos, neg, z_ref, z_zero, guidance_scale, reference_guidance)
        image = self.denoise_decode(
            self.spatial_denoiser(z_lr), layout, channels=self.unet.config.in_channels, cond=branches, steps=steps,
            seed=seed, scheduler=scheduler, init_latents=z_lr if start_from_lr else None, strength=strength,
            tile_overlap=tile_overlap, colour_fix_method=colour_fix_method, progress=progress, timings=timings)
        self.last_timings = timings
        return image


def _prompt_lists(prompt: str | list[str], negative: str | list[str] | None, batch: int) -> tuple[list[str], list[str]]:
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    negative = "" if negative is None else negative
    negatives = [negative] * batch if isinstance(negative, str) else list(negative)
    if len(prompts) != batch or len(negatives) != batch:
        raise SemsrError(f"{len(prompts)} prompts / {len(negatives)} negative prompts for {batch} images")
    return prompts, negatives


# ----------------------------------------------------------------------------- method

_RUN_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": COSER_NEGATIVE, "steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
    "reference_guidance": None, "reference": None, "save_reference": False, "no_reference": False,
    "no_cognition": False, "reference_steps": None, "reference_gen_guidance": DEFAULT_REFERENCE_GEN_GUIDANCE,
    "reference_size": DEFAULT_REFERENCE_SIZE, "seed": 0, "scheduler": "ddpm", "colour_fix": "adain", "tile": 0,
    "latent_tile": None, "tile_overlap": None, "start_from_lr": True, "strength": 1.0, "progress": False,
}


def read_reference(path: str | Path) -> torch.Tensor:
    """A reference image file -> ``(1, 3, H, W)`` float in [0, 1] (alpha dropped, grey -> RGB)."""
    from semsr.core.io import read_image

    pic = read_image(path)
    top = float(np.iinfo(pic.rgb.dtype).max)
    return torch.from_numpy(np.ascontiguousarray(pic.rgb)).permute(2, 0, 1)[None].float() / top


def files_fingerprint(paths: list[str | Path | None]) -> str:
    """A cheap identity of model files: names, sizes and modification times of the weights/configs."""
    parts = []
    for p in paths:
        if p is None:
            continue
        p = Path(p).expanduser().resolve()
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                                and f.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth",
                                                                 ".json", ".txt"))
        for f in files:
            st = f.stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class ReferenceCache:
    """Generated references on disk (``<cache>/coser-references/<key>.png``), keyed per input image."""

    def __init__(self, folder: Path | None = None) -> None:
        if folder is None:
            from semsr.core.paths import cache_dir

            folder = cache_dir() / "coser-references"
        self.folder = Path(folder)

    @staticmethod
    def key(image: torch.Tensor, settings: dict[str, Any]) -> str:
        """Key of one input ``(3, h, w)`` under ``settings`` (model identity and generation options)."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        data = image.detach().float().cpu().contiguous()
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        path = self.folder / f"{key}.png"
        if not path.is_file():
            return None
        try:
            return read_reference(path)[0]
        except SemsrError:
            return None  # unreadable entry: regenerate

    def put(self, key: str, image: torch.Tensor) -> None:
        from semsr.eval.atomic import write_png

        arr = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        write_png(self.folder / f"{key}.png", arr)


class CoSeRMethod(PriorReporter):
    """``coser`` as a registry :class:`~semsr.methods.Method` (tiles in latent space).

    Run options (``None`` = default): prompt (""), negative_prompt (CoSeR's),
    steps (50), guidance_scale (3, cognitive), reference_guidance (=
    guidance_scale), reference (image path), save_reference, no_reference,
    no_cognition, reference_steps (= steps), reference_gen_guidance (7),
    reference_size (512), seed, scheduler, colour_fix, tile, latent_tile,
    tile_overlap, start_from_lr, strength, progress.

    Generated references are cached per input content (and model files and
    generation options). After each call ``side_outputs`` holds
    ``{"reference": (B, 3, H, W)}`` when ``save_reference`` was set (the CLI
    writes it beside the output); ``last_reference_source`` says where the
    reference came from: ``generated``, ``cache``, ``file`` or ``none``;
    ``last_priors`` the first image's prompts, whether the cognitive embedding
    was used, and the reference (image, source, file).
    """

    name = "coser"
    tiles_itself = True

    def __init__(self, pipeline: CoSeRSR, scale: int = 4, fingerprint: str = "", cache: ReferenceCache | None = None) -> None:
        self.pipeline = pipeline
        self.scale = int(scale)
        self.device = pipeline.device
        self.fingerprint = fingerprint
        self.cache = cache
        self.side_outputs: dict[str, torch.Tensor] = {}
        self.last_reference_source = "none"

    def _cached_references(self, x: torch.Tensor, opts: dict[str, Any]) -> torch.Tensor:
        cache = self.cache or ReferenceCache()
        settings = {"model": self.fingerprint, "scale": self.scale, "dtype": str(self.pipeline.dtype),
                    "device": str(self.pipeline.device),
                    **{k: opts[k] for k in ("prompt", "negative_prompt", "steps", "reference_steps",
                                            "reference_gen_guidance", "reference_size", "seed", "scheduler",
                                            "no_cognition")}}
        keys = [cache.key(img, settings) for img in x]
        refs: list[torch.Tensor | None] = [cache.get(k) for k in keys]
        missing = [i for i, r in enumerate(refs) if r is None]
        self.last_reference_source = "generated" if missing else "cache"
        if missing:
            prompt = opts["prompt"] if isinstance(opts["prompt"], str) else [opts["prompt"][i] for i in missing]
            neg = opts["negative_prompt"]
            neg = neg if neg is None or isinstance(neg, str) else [neg[i] for i in missing]
            made = self.pipeline.reference_for(
                x[missing], prompt=prompt, negative_prompt=neg, scale=self.scale,
                steps=int(opts["reference_steps"] or opts["steps"]), guidance_scale=opts["reference_gen_guidance"],
                size=opts["reference_size"], use_cognition=not opts["no_cognition"], seed=opts["seed"],
                scheduler=opts["scheduler"], progress=opts["progress"])
            for i, img in zip(missing, made, strict=True):
                cache.put(keys[i], img)
                refs[i] = img
        shapes = {tuple(r.shape) for r in refs}
        if len(shapes) != 1:
            raise SemsrError("cached references of one batch differ in size; run the images one by one")
        return torch.stack(refs)  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        opts = sd_run_options(_RUN_DEFAULTS, run_opts, scale=self.scale, factor=self.pipeline.factor)
        use_reference = not opts["no_reference"]
        reference = None
        self.side_outputs = {}
        self.last_reference_source = "none"
        if use_reference and opts["reference"]:
            reference = read_reference(opts["reference"])
            self.last_reference_source = "file"
        elif use_reference:
            reference = self._cached_references(x, opts)
        out = self.pipeline(
            x, scale=self.scale, prompt=opts["prompt"], negative_prompt=opts["negative_prompt"], steps=opts["steps"],
            guidance_scale=opts["guidance_scale"], reference_guidance=opts["reference_guidance"], reference=reference,
            use_reference=use_reference, use_cognition=not opts["no_cognition"],
            reference_steps=opts["reference_steps"], reference_gen_guidance=opts["reference_gen_guidance"],
            reference_size=opts["reference_size"], seed=opts["seed"], scheduler=opts["scheduler"],
            colour_fix_method=opts["colour_fix"], latent_tile=opts["latent_tile"], tile_overlap=opts["tile_overlap"],
            start_from_lr=opts["start_from_lr"], strength=opts["strength"], progress=opts["progress"])
        if opts["save_reference"] and self.pipeline.last_reference is not None:
            self.side_outputs = {"reference": self.pipeline.last_reference}
        ref = self.pipeline.last_reference
        self.report_priors(prompt=first(opts["prompt"]), negative_prompt=first(opts["negative_prompt"]),
                           cognition=not opts["no_cognition"], reference_source=self.last_reference_source,
                           reference_path=str(opts["reference"]) if self.last_reference_source == "file" else None,
                           reference=None if ref is None else ref[:1])
        return out

    def prior_suggestion(self, x: torch.Tensor) -> dict[str, Any]:
        """CoSeR's cognitive prior is an embedding, not text: the default negative prompt, to edit."""
        return {"negative_prompt": _RUN_DEFAULTS["negative_prompt"]}


def build(base: str | None = None, checkpoint: str | None = None, clip: str | None = None, *, device: str = "cpu",
          dtype: str | torch.dtype | None = None, scale: int = 4, base_config: str | None = None,
          channels_last: bool = False, compile: bool = False, threads: int | None = None) -> CoSeRMethod:
    """Factory of ``coser``: ``base`` SD, ``checkpoint`` CoSeR folder, ``clip`` CLIP vision folder."""
    require_build_paths("coser", (base, "--base", "a Stable Diffusion folder or single file"),
                        (checkpoint, "--checkpoint", "a CoSeR checkpoint folder (cognitive/ + aia/)"),
                        (clip, "--clip", "a local CLIP vision model folder"), threads=threads)
    pipe = CoSeRSR.from_pretrained(base, checkpoint, clip, base_config=base_config, device=device,
                                   dtype=dtype or "fp32", channels_last=channels_last, compile=compile)
    return CoSeRMethod(pipe, scale=scale, fingerprint=files_fingerprint([base, base_config, checkpoint, clip]))


register(MethodSpec(
    name="coser",
    factory=build,
    scale=4,
    summary="CoSeR: cognitive embedding + generated reference + All-in-Attention "
            "(--base SD, --checkpoint CoSeR folder, --clip CLIP vision folder)",
    extra={"cli_options": sd_cli_options() + [
        {"flags": ["--reference"], "target": "run", "metavar": "IMAGE",
         "help": "coser: use this reference image instead of generating one"},
        {"flags": ["--save-reference"], "target": "run", "action": "store_true",
         "help": "coser: write the reference used beside the output (<output stem>_reference.png)"},
        {"flags": ["--reference-guidance"], "target": "run", "type": float, "metavar": "S",
         "help": "coser: reference guidance scale (default: --guidance-scale, 3)"},
        {"flags": ["--reference-gen-guidance"], "target": "run", "type": float, "metavar": "S",
         "help": f"coser: guidance scale of the reference generation (default {DEFAULT_REFERENCE_GEN_GUIDANCE:g})"},
        {"flags": ["--reference-steps"], "target": "run", "type": int, "metavar": "N",
         "help": "coser: sampling steps of the reference generation (default: --steps)"},
        {"flags": ["--reference-size"], "target": "run", "type": int, "metavar": "PX",
         "help": f"coser: long side of the generated reference (default {DEFAULT_REFERENCE_SIZE}, "
                 "at most the output size)"},
        {"flags": ["--no-reference"], "target": "run", "action": "store_true",
         "help": "coser ablation: no reference image (AiA keeps only the LR attention)"},
        {"flags": ["--no-cognition"], "target": "run", "action": "store_true",
         "help": "coser ablation: no cognitive embedding (the prompt's text embedding instead)"},
    ], "colour_fixes": list(COLOUR_FIXES)},
))
