"""``mmsr``: MMSR ("The Power of Context", CVPR 2025) on Stable Diffusion.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --bicubic--> hint (B, 3, H, W) --VAE.encode--> z_LR (B, 4, H/8, W/8)
    hint --canny/hed, depth, seg providers--> maps --VQ--> 16x16 tokens --codebook--> (B, 256, 256) each
    caption (--prompt, else a VLM caption with --vlm) --text encoder--> (B, 77, D)
    Multimodal Latent Connector (semsr.fusion.mmlc): 77 + 256 k tokens -> context (B, 128, D)
    for t:  eps = UNet([z_t ; z_LR], t, context)      conv_in widened 4 -> 8 channels (InstructPix2Pix)
    VAE.decode --colour fix vs hint--> HR

The trained parts are in :mod:`semsr.fusion.mmsr_conditioning`; modalities
left out (not in ``modalities``, or opted out with ``no_depth`` /
``no_segmentation``, which the output's priors record) get the connector's
learnable null tokens. A checkpoint modality whose model or tokenizer is missing
is an error naming the option to pass, never a silent null token.

**Guidance** (``w`` = ``guidance_scale``, the paper's ``w``; default 2).
Every mode evaluates ``eps = (1 + w) * eps(pos) - w * eps(neg)``, i.e.
:func:`semsr.pipeline.guidance.cfg` with scale ``1 + w``. The positive branch
is always the connector on (caption, modalities ``m``); the modes differ in
the negative::

    mcfg           neg = connector(text(negative prompt), m)      modalities in both branches (paper's m-CFG)
    null-modality  neg = connector(text(negative prompt), null)   the paper's m_null-CFG
    cfg            neg = connector(text(""), null)                 plain CFG: empty text, no modalities

``w = 0`` runs only the positive branch.

**Checkpoint** folder (``--checkpoint``; :func:`save_mmsr` / :func:`load_mmsr`,
the layout of :mod:`semsr.core.components`)::

    model_index.json   {"_class_name": "mmsr", "connector": [...], "conv_in": [...], ["unet_attention": [...]],
                        ["vq_depth": ["semsr", "DepthVQ"], "vq_seg": ["semsr", "SegVQ"], ...]
                        "meta": {"modalities": [...spatial...], "edge": "canny", "tokenizers": {m: PATH}}}
    connector/         MultimodalLatentConnector
    conv_in/           ConcatConvIn (the widened UNet conv_in)
    unet_attention/    CrossAttentionLayers (trained UNet cross-attentions; trained by default)
    vq_<m>/            semsr's own tokenizer of modality m (EdgeVQ / DepthVQ / SegVQ), when trained with one

Tokenizer of a spatial modality ``m``, first found: ``--depth-vq`` / ``--seg-vq``;
``--vq`` (one tokenizer for every map, e.g. a VQGAN as in the paper); the
checkpoint's ``vq_<m>/``; ``meta.tokenizers[m]`` (a path, relative ones against
the checkpoint folder; an earlier checkpoint's single ``meta.tokenizer`` path
counts for every modality); for ``edge`` only, the shipped edge VQ. Depth / seg models:
``--depth-model`` / ``--seg-model``, else a ``depth/`` or ``seg/``
transformers folder inside the checkpoint folder or beside it (so
``--checkpoint /tmp/tiny/mmsr`` finds ``/tmp/tiny/depth`` and ``/tmp/tiny/seg``
that ``semsr dev tiny-models`` writes); they run on ``--device``. Without
``--modalities`` every modality of the checkpoint is used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import torch

from semsr.core.components import INDEX_FILE, Component, load_checkpoint, load_component, read_index, save_checkpoint
from semsr.core.dtypes import apply_threads
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import load_sd
from semsr.core.method import MethodSpec, ProgressFn
from semsr.core.options import option
from semsr.core.outputs import SROutput, compact
from semsr.fusion.mmlc import ALL_MODALITIES, CAPTION, SPATIAL_MODALITIES, TEMPERATURE_MODES, TEMPERATURE_RANGE
from semsr.fusion.mmsr_conditioning import MMSRConditioning, concat_unet_forward
from semsr.methods import register
from semsr.models.vq import OWN_TOKENIZERS, SpatialTokenizer, load_tokenizer
from semsr.pipeline.guidance import cfg
from semsr.pipeline.latent_sr import LatentSRPipeline
from semsr.pipeline.latent_tiling import Window, crop_window
from semsr.pipeline.options import (
    LatentSROptions,
    Placement,
    latent_tile,
    require_paths,
    resolve_placement,
    steps_option,
)
from semsr.pipeline.precision import prepare_module
from semsr.pipeline.text import load_text_conditioner
from semsr.priors.base import cached, get_provider
from semsr.priors.mmsr import EDGE_PROVIDERS, ModalityTokens, find_model_folder

GUIDANCE_MODES = ("mcfg", "cfg", "null-modality")
DEFAULT_NEGATIVE = "blurry, dotted, noise, unclear, low-res, over-smoothed"
DEFAULT_STEPS = 50
#: The paper's w (sampler scale 1 + w).
DEFAULT_GUIDANCE = 2.0
#: The recipe name in a checkpoint's ``model_index.json``.
RECIPE = "mmsr"

_LO, _HI = TEMPERATURE_RANGE


def _temperature_option(modality: str) -> Any:
    return option(
        1.0,
        min=_LO,
        max=_HI,
        widget="slider",
        step=0.1,
        metavar="D",
        help=f"attention temperature of the {modality} modality in [{_LO:g}, {_HI:g}] (divides its attention "
        "logits: smaller = sharper; 1 = as trained; other values override --modality-temperature)",
    )


@dataclass(kw_only=True, frozen=True)
class MMSROptions(LatentSROptions):
    """Options of ``mmsr`` (the Stable Diffusion ones plus the MMSR checkpoint, modalities and m-CFG)."""

    checkpoint: Path | None = option(
        None, stage="build", metavar="DIR", help="MMSR checkpoint folder (model_index.json, connector/, conv_in/)"
    )
    depth_model: Path | None = option(
        None,
        stage="build",
        metavar="DIR",
        help="local transformers depth model (default: depth/ in or beside the checkpoint)",
    )
    seg_model: Path | None = option(
        None,
        stage="build",
        metavar="DIR",
        help="local transformers segmentation model (default: seg/ in or beside the checkpoint)",
    )
    vq: Path | None = option(
        None,
        stage="build",
        metavar="PATH",
        help="one VQ tokenizer for every spatial map (a VQGAN: diffusers VQModel folder or taming/latent-diffusion "
        ".safetensors; default: the checkpoint's per-modality tokenizers, the shipped edge VQ for edges)",
    )
    depth_vq: Path | None = option(
        None, stage="build", metavar="PATH", help="depth tokenizer (DepthVQ folder from task depth-vq, or a VQGAN)"
    )
    seg_vq: Path | None = option(
        None, stage="build", metavar="PATH", help="segmentation tokenizer (SegVQ folder from task seg-vq, or a VQGAN)"
    )
    edge_detector: str | None = option(
        None, stage="build", choices=EDGE_PROVIDERS, help="edge modality source (default: the checkpoint's, canny)"
    )
    vlm: Path | None = option(
        None, stage="build", metavar="DIR", help="local VLM folder captioning the image when the prompt is empty"
    )
    negative_prompt: str = option(DEFAULT_NEGATIVE, help="negative prompt")
    steps: int = steps_option(DEFAULT_STEPS)
    guidance_scale: float = option(
        DEFAULT_GUIDANCE,
        min=0.0,
        max=100.0,
        metavar="W",
        help="w of m-CFG: (1 + w) * eps(pos) - w * eps(neg); 0 = positive branch only",
    )
    modalities: tuple[str, ...] | None = option(
        None,
        choices=ALL_MODALITIES,
        metavar="LIST",
        help="modalities to use, from caption,edge,depth,seg (default: caption + every checkpoint modality); "
        "the others get the learned null token",
    )
    no_depth: bool = option(False, help="run without the depth modality (its learned null token; no depth model)")
    no_segmentation: bool = option(
        False, help="run without the segmentation modality (its learned null token; no segmentation model)"
    )
    modality_temperature: dict[str, float] | None = option(
        None,
        choices=ALL_MODALITIES,
        min=_LO,
        max=_HI,
        hidden=True,
        metavar="M=D,...",
        help=f"attention temperature per modality in [{_LO:g}, {_HI:g}], e.g. depth=0.5,edge=2 (divides that "
        "modality's attention logits; default 1)",
    )
    temperature_mode: str = option(
        "divide",
        choices=TEMPERATURE_MODES,
        help="how a temperature acts: divide the modality's attention logits (the paper) or bias them by -ln delta "
        "(its attention share then falls monotonically as delta grows)",
    )
    caption_temperature: float = _temperature_option("caption")
    edge_temperature: float = _temperature_option("edge")
    depth_temperature: float = _temperature_option("depth")
    seg_temperature: float = _temperature_option("seg")
    guidance_mode: str = option(
        "mcfg",
        choices=GUIDANCE_MODES,
        help="negative branch: mcfg (negative prompt + modalities), null-modality "
        "(negative prompt, null modalities) or cfg (empty text, null modalities)",
    )

    def temperatures(self) -> dict[str, float]:
        """``modality_temperature`` updated with the per-modality ``<m>_temperature`` options other than 1."""
        temps = dict(self.modality_temperature or {})
        for m in ALL_MODALITIES:
            value = float(getattr(self, f"{m}_temperature"))
            if value != 1.0:
                temps[m] = value
        return temps


def guidance_negative(mode: str) -> tuple[bool, bool]:
    """``(negative_uses_negative_prompt, negative_keeps_modalities)`` of a guidance mode."""
    if mode == "mcfg":
        return True, True
    if mode == "null-modality":
        return True, False
    if mode == "cfg":
        return False, False
    raise SemsrError(f"unknown guidance mode {mode!r}; use one of {', '.join(GUIDANCE_MODES)}")


# ----------------------------------------------------------------------------- checkpoint


#: Option naming the tokenizer / model / opt-out of each spatial modality (for error messages).
_VQ_FLAG = {"edge": "--vq", "depth": "--depth-vq", "seg": "--seg-vq"}
_OPT_OUT = {"depth": "--no-depth", "seg": "--no-segmentation"}


def save_mmsr(
    folder: str | Path,
    cond: MMSRConditioning,
    *,
    modalities: Sequence[str],
    edge: str = "canny",
    tokenizers: Mapping[str, SpatialTokenizer | str | Path | None] | None = None,
) -> Path:
    """Write an MMSR checkpoint folder (see the module docstring).

    ``tokenizers``: per spatial modality, a semsr tokenizer component (saved as ``vq_<m>/``), a path
    (recorded in ``meta.tokenizers``; e.g. a VQGAN) or None (edge: the shipped edge VQ).
    """
    spatial = [m for m in modalities if m != CAPTION]
    comps: dict[str, Any] = dict(cond.components())
    paths: dict[str, str] = {}
    for m, tok in (tokenizers or {}).items():
        if isinstance(tok, Component):
            comps[f"vq_{m}"] = tok
        elif tok is not None:
            paths[m] = str(getattr(tok, "path", tok))
    meta = {"modalities": spatial, "edge": edge, "tokenizers": paths}
    return save_checkpoint(folder, RECIPE, comps, meta=meta)


def load_mmsr(folder: str | Path) -> tuple[MMSRConditioning, dict[str, Any]]:
    """``(conditioning, meta)`` of an MMSR checkpoint folder (see the module docstring)."""
    folder = Path(folder).expanduser()
    if not (folder / INDEX_FILE).is_file():
        raise UnavailableError(
            f"not an MMSR checkpoint folder ({INDEX_FILE}, connector/, conv_in/)", folder / INDEX_FILE
        )
    index = read_index(folder, RECIPE)
    names = [n for n in ("connector", "conv_in", "unet_attention") if n in index.components]
    comps, index = load_checkpoint(folder, RECIPE, names=names)
    cond = MMSRConditioning(comps["connector"], comps["conv_in"], comps.get("unet_attention"))
    return cond.eval(), dict(index.meta)


def load_mmsr_tokenizers(
    folder: str | Path,
    meta: Mapping[str, Any],
    spatial: Sequence[str],
    *,
    vq: str | Path | None = None,
    per_modality: Mapping[str, str | Path | None] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, SpatialTokenizer]:
    """The tokenizer of each spatial modality of a checkpoint, in the order of the module docstring.

    Modalities without one are left out (using them is an error naming ``--depth-vq`` / ``--seg-vq``).
    """
    folder = Path(folder).expanduser()
    index = read_index(folder, RECIPE)
    recorded = dict(meta.get("tokenizers") or {})
    if meta.get("tokenizer"):  # the earlier layout: one tokenizer path for every map
        recorded = {m: meta["tokenizer"] for m in spatial} | recorded
    out: dict[str, SpatialTokenizer] = {}
    shared = load_tokenizer(vq, device=device) if vq is not None else None
    for m in spatial:
        given = (per_modality or {}).get(m)
        comp = index.components.get(f"vq_{m}")
        if given is not None:
            out[m] = load_tokenizer(given, device=device)
        elif shared is not None:
            out[m] = shared
        elif comp is not None:
            library, name = comp
            if library != "semsr" or name not in OWN_TOKENIZERS:
                raise UnavailableError(f"vq_{m} names {library}.{name}, not a semsr tokenizer", folder / INDEX_FILE)
            out[m] = load_component(OWN_TOKENIZERS[name], folder / f"vq_{m}").to(device)
        elif recorded.get(m):
            path = Path(recorded[m]).expanduser()
            out[m] = load_tokenizer(path if path.is_absolute() else folder / path, device=device)
        elif m == "edge":
            out[m] = load_tokenizer(None, device=device)
    return out


# ----------------------------------------------------------------------------- pipeline


class MMSR(LatentSRPipeline):
    """The MMSR pipeline and the ``mmsr`` method (see the module docstring).

    Attributes:
        vae, unet, text: frozen SD components (the UNet carries the widened conv_in).
        cond: :class:`~semsr.fusion.mmsr_conditioning.MMSRConditioning` (connector + conv_in).
        meta: the checkpoint's settings (``modalities``, ``edge``, ``tokenizers``).
        sources: per spatial modality, provider options (``{"depth": {"model": PATH}}``).
        tokenizers: per spatial modality its VQ tokenizer (see the module docstring).
        scale: SR factor of a call.
    """

    name = "mmsr"
    tiles_itself = True
    options_class: type[MMSROptions] = MMSROptions

    def __init__(
        self,
        *,
        vae: Any,
        unet: Any,
        text: Any,
        cond: MMSRConditioning,
        meta: Mapping[str, Any],
        scheduler_config: dict[str, Any],
        sources: Mapping[str, Mapping[str, Any]] | None = None,
        tokenizers: Mapping[str, SpatialTokenizer] | None = None,
        vlm: str | Path | None = None,
        **placement: Unpack[Placement],
    ) -> None:
        device, dtype = resolve_placement(placement)
        self.cond = prepare_module(cond, device=device, dtype=dtype)
        self.setup_sd(vae=vae, unet=self.cond.attach(unet), text=text, scheduler_config=scheduler_config, **placement)
        self.meta = dict(meta)
        self.sources = {k: dict(v) for k, v in (sources or {}).items()}
        self.tokenizers = dict(tokenizers or {})
        self.vlm = vlm
        ccfg = self.cond.connector.config
        if int(self.text.width) != int(ccfg.text_width):
            raise SemsrError(f"text encoder width {self.text.width} != connector text width {ccfg.text_width}")
        if int(ccfg.width) != int(self.unet.config.cross_attention_dim):
            raise SemsrError(
                f"connector width {ccfg.width} != UNet cross-attention width {self.unet.config.cross_attention_dim}"
            )
        for m, tok in self.tokenizers.items():
            if int(tok.embed_dim) != int(ccfg.vq_dim):
                raise SemsrError(
                    f"the {m} tokenizer gives {tok.embed_dim}-d vectors, the connector expects {ccfg.vq_dim}-d"
                )
        self._encoders: dict[tuple[str, ...], ModalityTokens] = {}
        self._captioner: Any = None

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        checkpoint: str | Path,
        *,
        base_config: str | Path | None = None,
        depth_model: str | Path | None = None,
        seg_model: str | Path | None = None,
        vq: str | Path | None = None,
        depth_vq: str | Path | None = None,
        seg_vq: str | Path | None = None,
        vlm: str | Path | None = None,
        edge: str | None = None,
        **kwargs: Any,
    ) -> MMSR:
        """Load from local paths (see the module docstring for the checkpoint layout and model discovery).

        ``kwargs``: ``device``, ``dtype``, ``channels_last``, ``compile``, ``scale``.
        """
        device, dtype = resolve_placement(kwargs)
        checkpoint = Path(checkpoint).expanduser()
        cond, meta = load_mmsr(checkpoint)
        comps = load_sd(base, dtype=dtype, config=base_config)
        text = load_text_conditioner(comps, dtype=dtype, device=device)
        near = [checkpoint, checkpoint.parent]
        sources: dict[str, dict[str, Any]] = {"edge": {}}
        for name, given in (("depth", depth_model), ("seg", seg_model)):
            folder = find_model_folder(name, given, near)
            if folder is not None:
                sources[name] = {"model": str(folder)}
        tokenizers = load_mmsr_tokenizers(
            checkpoint,
            meta,
            cond.connector.spatial,
            vq=vq,
            per_modality={"depth": depth_vq, "seg": seg_vq},
            device=device,
        )
        if edge is not None:
            meta = {**meta, "edge": edge}
        return cls(
            vae=comps.vae,
            unet=comps.unet,
            text=text,
            cond=cond,
            meta=meta,
            scheduler_config=comps.scheduler_config,
            sources=sources,
            tokenizers=tokenizers,
            vlm=vlm,
            **{**kwargs, "device": device, "dtype": dtype},
        )

    # ------------------------------------------------------------------ conditions

    def default_modalities(self, no_depth: bool = False, no_segmentation: bool = False) -> list[str]:
        """Caption + every checkpoint modality, less the opted-out ones."""
        out = {"depth": no_depth, "seg": no_segmentation}
        return [CAPTION] + [m for m in self.cond.connector.spatial if not out.get(m, False)]

    def modality_tokens(self, spatial: Sequence[str]) -> ModalityTokens:
        """The (cached) map extractors + tokenizers of the spatial modalities ``spatial``.

        A modality without its model or tokenizer is an error naming the option to pass (or its opt-out).
        """
        key = tuple(spatial)
        if key not in self._encoders:
            for m in spatial:
                opt_out = f", or {_OPT_OUT[m]} to run with its null token" if m in _OPT_OUT else ""
                if m not in self.sources:
                    raise UnavailableError(
                        f"modality {m} needs a model folder: pass --{m}-model PATH (or put a {m}/ folder beside "
                        f"the checkpoint){opt_out}"
                    )
                if m not in self.tokenizers:
                    raise UnavailableError(
                        f"modality {m} has no tokenizer in the checkpoint: pass {_VQ_FLAG[m]} PATH (a "
                        f"{'DepthVQ' if m == 'depth' else 'SegVQ'} folder or a VQGAN), or --vq VQGAN for every "
                        f"map{opt_out}"
                    )
            self._encoders[key] = ModalityTokens(
                list(spatial), self.tokenizers, self.sources, edge=self.meta.get("edge", "canny"), device=self.device
            )
        return self._encoders[key]

    def captions(self, lr: torch.Tensor, prompts: list[str]) -> list[str]:
        """The caption of each image: its prompt, or (empty prompt and ``vlm`` set) a VLM caption."""
        if self.vlm is None or all(prompts):
            return prompts
        if self._captioner is None:
            self._captioner = cached(get_provider("caption", vlm=self.vlm))
        provider = self._captioner
        return [p or str(provider(img[None].float().cpu()).value) for p, img in zip(prompts, lr, strict=True)]

    def check_modalities(self, modalities: Sequence[str]) -> list[str]:
        """The spatial modalities of ``modalities`` in the checkpoint's order (errors on ones it lacks)."""
        spatial = self.cond.connector.spatial
        not_in_ckpt = [m for m in modalities if m != CAPTION and m not in spatial]
        if not_in_ckpt:
            raise SemsrError(
                f"the checkpoint has no {', '.join(not_in_ckpt)} modality (it has "
                f"{', '.join(self.cond.connector.modalities)})"
            )
        return [m for m in spatial if m in modalities]

    def contexts(
        self,
        captions: list[str] | None,
        negatives: list[str],
        spatial: Mapping[str, torch.Tensor],
        *,
        temperatures: Mapping[str, float] | None,
        mode: str,
        need_negative: bool,
        temperature_mode: str = "divide",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(positive, negative)`` connector contexts ``(B, N, D)`` (negative None when not needed).

        Args:
            captions: ``B`` captions, or None when the caption modality is not used (null tokens).
            negatives: ``B`` negative prompts.
            spatial: per used spatial modality, codebook vectors ``(B, 256, vq_dim)``.
            mode: guidance mode (:data:`GUIDANCE_MODES`), choosing the negative branch.
            temperature_mode: how ``temperatures`` act (:data:`~semsr.fusion.mmlc.TEMPERATURE_MODES`).
        """
        bsz = len(negatives)
        spatial = {m: v.to(self.device, self.dtype) for m, v in spatial.items()}
        text = self.encode_prompts(captions) if captions is not None else None
        with torch.no_grad():
            pos = self.cond.context(text, spatial, temperatures, temperature_mode=temperature_mode)
            if text is None and pos.shape[0] != bsz:
                pos = pos.expand(bsz, -1, -1)
            neg = None
            if need_negative:
                use_prompt, keep_modalities = guidance_negative(mode)
                neg_text = self.encode_prompts(negatives if use_prompt else [""] * bsz)
                neg = self.cond.context(
                    neg_text, spatial if keep_modalities else {}, temperatures, temperature_mode=temperature_mode
                )
        return pos.to(self.dtype), neg if neg is None else neg.to(self.dtype)

    def spatial_denoiser(self, z_lr: torch.Tensor):
        """The per-step model call over a latent window: :func:`concat_unet_forward` on ``[x ; z_LR]``."""
        z_lr = z_lr.to(self.device, self.dtype)

        def spatial(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], window: Window) -> torch.Tensor:
            z = crop_window(z_lr, window, 1, batch=x.shape[0])
            with torch.no_grad():
                out = concat_unet_forward(self.unet, x.to(self.dtype), z, t, cond["context"])
            return out.float()

        return spatial

    # ------------------------------------------------------------------ run

    def __call__(
        self,
        lr: torch.Tensor,
        options: MMSROptions | None = None,
        *,
        prompts: list[str] | None = None,
        progress: ProgressFn | bool | None = False,
    ) -> SROutput:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        Args:
            options: the run options (``None``: :class:`MMSROptions` defaults); ``modalities`` None
                means :meth:`default_modalities` (less ``no_depth`` / ``no_segmentation``);
                ``guidance_scale`` is ``w``.
            prompts: one caption per image, overriding ``options.prompt`` (e.g. validation captions).
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
        Returns:
            ``images``; ``priors`` of the first image: ``prompt`` (the caption) and ``caption_source``
            (user / vlm / none) when the caption is used, ``negative_prompt``, ``modalities``,
            ``no_depth`` / ``no_segmentation`` when set, ``modality_temperature`` and
            ``temperature_mode`` when a temperature is set, ``guidance_mode`` and the ``(1, C, H, W)``
            modality maps;
            ``timings`` (``priors``, ``encode``, ``denoise``, ``decode`` seconds).
        """
        opts = options if options is not None else self.options_class()
        guidance_negative(opts.guidance_mode)
        w = float(opts.guidance_scale)
        if w < 0:
            raise SemsrError(f"the MMSR guidance scale w must be >= 0, got {w:g}")
        layout = self.layout(lr, self.scale, latent_tile(opts, self.scale, self.factor))
        bsz = layout.batch
        temps = opts.temperatures()
        opted_out = [m for m, flag in (("depth", opts.no_depth), ("seg", opts.no_segmentation)) if flag]
        if opts.modalities is not None:
            clash = [m for m in opted_out if m in opts.modalities]
            if clash:
                raise SemsrError(f"--modalities has {', '.join(clash)}, which {_OPT_OUT[clash[0]]} turns off")
            mods = list(opts.modalities)
        else:
            mods = self.default_modalities(opts.no_depth, opts.no_segmentation)
        given = list(prompts) if prompts is not None else [opts.prompt] * bsz
        negatives = [opts.negative_prompt] * bsz
        if len(given) != bsz:
            raise SemsrError(f"{len(given)} prompts for {bsz} images")
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        spatial_names = self.check_modalities(mods)
        tokens, maps = self.modality_tokens(spatial_names).encode(layout.hint) if spatial_names else ({}, {})
        captions = self.captions(lr, given) if CAPTION in mods else None
        pos, neg = self.contexts(
            captions,
            negatives,
            tokens,
            temperatures=temps,
            mode=opts.guidance_mode,
            need_negative=w != 0,
            temperature_mode=opts.temperature_mode,
        )
        timings["priors"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        z_lr = self.vae_encode(layout.hint_padded, layout.vae_tile)
        timings["encode"] = time.perf_counter() - t0
        uncond = None if neg is None else {"context": neg}
        image = self.denoise_decode(
            self.spatial_denoiser(z_lr),
            layout,
            opts,
            channels=self.cond.latent_channels,
            cond={"context": pos},
            guide=lambda d: cfg(d, uncond, 1.0 + w),
            init_latents=z_lr,
            progress=progress,
            timings=timings,
        )

        source = "user" if given[0] else ("vlm" if self.vlm is not None else "none")
        priors = compact(
            {
                "prompt": captions[0] if captions is not None else None,
                "caption_source": source if captions is not None else None,
                "negative_prompt": negatives[0],
                "modalities": tuple(mods),
                "no_depth": True if opts.no_depth else None,
                "no_segmentation": True if opts.no_segmentation else None,
                "modality_temperature": temps,
                "temperature_mode": opts.temperature_mode if temps else None,
                "guidance_mode": opts.guidance_mode,
                **{m: v[:1] for m, v in maps.items()},
            }
        )
        return SROutput(image, priors=priors, timings=timings)

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        """The VLM caption (with ``--vlm``; else no prompt), default negative prompt and modalities."""
        caption = self.captions(x, [""])[0] if self.vlm is not None else None
        return compact(
            {
                "prompt": caption,
                "caption": caption,
                "negative_prompt": self.options_class().negative_prompt,
                "modalities": tuple(self.default_modalities()),
            }
        )


# ----------------------------------------------------------------------------- method


def build(options: MMSROptions) -> MMSR:
    """Factory of ``mmsr``: ``base`` SD, ``checkpoint`` MMSR folder; optional depth/seg/VQ/VLM folders."""
    require_paths(
        "mmsr",
        options,
        ("base", "a Stable Diffusion folder or single file"),
        ("checkpoint", "an MMSR checkpoint folder (model_index.json, connector/, conv_in/)"),
    )
    apply_threads(options.threads)
    return MMSR.from_pretrained(
        options.base,
        options.checkpoint,
        base_config=options.base_config,
        depth_model=options.depth_model,
        seg_model=options.seg_model,
        vq=options.vq,
        depth_vq=options.depth_vq,
        seg_vq=options.seg_vq,
        vlm=options.vlm,
        edge=options.edge_detector,
        **options.placement(),
    )


register(
    MethodSpec(
        name="mmsr",
        factory=build,
        options=MMSROptions,
        scale=4,
        summary="MMSR: caption + edge/depth/seg VQ tokens through a Multimodal Latent Connector, LR concatenated, "
        "m-CFG (--base SD, --checkpoint MMSR folder)",
        suggests_priors=True,
        diffusion=True,
        weight_paths=("base", "checkpoint", "depth_model", "seg_model", "vq", "depth_vq", "seg_vq", "vlm"),
        bundled_paths=("vq",),
    )
)

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_NEGATIVE",
    "DEFAULT_STEPS",
    "GUIDANCE_MODES",
    "MMSR",
    "MMSROptions",
    "SPATIAL_MODALITIES",
    "build",
    "guidance_negative",
    "load_mmsr",
    "load_mmsr_tokenizers",
    "save_mmsr",
]
