"""``rfa``: retrieval-augmented extreme SR (the RFA paper; x16 by default, any scale).

    semsr upscale -i lr32.png -o out --method rfa --base SD --controlnet CN --checkpoint RFA --db DB \\
        [--text-decoder GPT2DIR] [--aligner DIR] [--num-references 4] [--save-reference]

Stage 1 (:class:`ReferenceRetriever`): the LR image is embedded (the
database's embedder), mapped by the Reference-Finding Aligner to the HR
embedding space, and the top-K (4) HR references are retrieved from the
database (:mod:`semsr.priors.retrieval`). The I2T Embedding Enhancer fuses LR
and reference tokens into an enhanced image embedding and a prefix from which
the text decoder writes a prompt (used when the user gives none). Stage 2
(:class:`RFASR`, an :class:`~semsr.pipeline.sd_controlnet.SDControlNetSR`):
SD + ControlNet (LR hint) with the text as the cross-attention context and the
enhanced image embedding as the AdaIN control (:mod:`semsr.fusion.adain`) of
both the UNet and the ControlNet, set for the duration of each call only.

Every stage-1 part is required; running without one is an explicit opt-out
that the output's ``priors`` record (``no_aligner``: query with the raw LR
embedding; ``no_database``: no references, the enhancer sees the LR tokens
only; ``no_text_decoder``: the prompt is ``--prompt`` or empty). Without the
part and without its opt-out, building fails with one line naming both.

Checkpoint folder (``--checkpoint``): an RFA checkpoint
(:func:`semsr.models.rfa.save_rfa_checkpoint`): the components ``aligner``
(``--aligner`` overrides or supplies it), ``enhancer``, ``adain`` (UNet) and
``controlnet_adain`` (ControlNet) and optionally a text decoder folder (a
transformers causal LM + tokenizer) named in the index meta; ``--text-decoder``
overrides it. ``semsr train`` makes the parts: tasks ``rfa-aligner`` and
``rfa-enhancer`` (:mod:`semsr.train.rfa`) export ``final/aligner`` and
``final/enhancer``; ``rfa-sr`` (:mod:`semsr.train.rfa_sr`) exports
``final/controlnet`` (``--controlnet``) and ``final/rfa``, the checkpoint with
its adapters and the stage-1 parts it was given. Every call returns the
retrieved references of the first image as ``side_images`` ``reference1``...
(written beside the output with ``--save-reference``) and in ``priors``.
See docs/rfa.md for the fidelity to the paper.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from semsr.core.components import load_checkpoint, load_component
from semsr.core.dtypes import apply_threads
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.method import MethodSpec, ProgressFn
from semsr.core.options import option
from semsr.core.outputs import SROutput, compact
from semsr.fusion.adain import AdaINAdapters, adain_control, attach_adain
from semsr.methods import register
from semsr.models.rfa import (
    RFA_RECIPE,
    EmbeddingEnhancer,
    ReferenceFindingAligner,
    check_embedder,
    encode,
    generate_text,
    load_text_decoder,
    text_decoder_dir,
)
from semsr.pipeline.options import ControlNetSROptions, guidance_option, require_paths, steps_option
from semsr.pipeline.sd_controlnet import DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, DEFAULT_STEPS, SDControlNetSR
from semsr.priors.retrieval.embedders import Embedder, embedder_from_spec
from semsr.priors.retrieval.index import Hit, ReferenceDB, load_rgb
from semsr.priors.retrieval.references import ReferenceTokens

DEFAULT_SCALE = 16
DEFAULT_REFERENCES = 4
#: Reference token sets a built method keeps in memory (about 1 MB each with CLIP ViT-L/14).
REFERENCE_CACHE = 64


@dataclass(kw_only=True, frozen=True)
class RFAOptions(ControlNetSROptions):
    """Options of ``rfa``: the RFA parts (build), the references (run) and ``sd-controlnet``'s sampling."""

    scale: int = option(DEFAULT_SCALE, stage="build", min=1, max=64, help="SR factor of the model", metavar="S")
    checkpoint: Path | None = option(
        None, stage="build", metavar="DIR", help="RFA checkpoint folder (aligner, enhancer, AdaIN adapters)"
    )
    clip: Path | None = option(
        None,
        stage="build",
        metavar="DIR",
        help="CLIP vision folder embedding the queries (default: the database's embedder)",
    )
    db: Path | None = option(None, stage="build", metavar="DB", help="reference database folder (`semsr index build`)")
    aligner: Path | None = option(
        None, stage="build", metavar="DIR", help="Reference-Finding Aligner folder (default: the checkpoint's)"
    )
    text_decoder: Path | None = option(
        None,
        stage="build",
        metavar="DIR",
        help="causal LM folder for the I2T text (default: the checkpoint's text decoder)",
    )
    no_aligner: bool = option(
        False, stage="build", help="opt-out: query the database with the raw LR embedding (no aligner)"
    )
    no_database: bool = option(
        False, stage="build", help="opt-out: no references (the enhancer sees the LR tokens only; needs --clip)"
    )
    no_text_decoder: bool = option(
        False, stage="build", help="opt-out: no decoded text (the prompt is --prompt, or empty)"
    )
    negative_prompt: str = option(DEFAULT_NEGATIVE, help="negative prompt")
    steps: int = steps_option(DEFAULT_STEPS)
    guidance_scale: float = guidance_option(DEFAULT_GUIDANCE)
    num_references: int = option(
        DEFAULT_REFERENCES, min=0, max=1024, metavar="K", help="references retrieved per image"
    )
    save_reference: bool = option(
        False, help="write the reference(s) used beside the output (<output stem>_reference*.png)"
    )


@dataclass
class Retrieval:
    """Stage-1 result for a batch of ``B`` LR images.

    Attributes:
        embedding: ``(B, D)`` unit enhanced image embeddings (the AdaIN control).
        text: decoded prompt per image (``""`` with the ``no_text_decoder`` opt-out).
        hits: retrieved database entries per image, best first.
        references: the reference images per image, ``(1, 3, H, W)`` each in [0, 1].
    """

    embedding: torch.Tensor
    text: list[str]
    hits: list[list[Hit]]
    references: list[list[torch.Tensor]]

    def priors(self) -> dict[str, Any]:
        """Display priors of the first image: ``reference_paths`` and cosine ``reference_scores``."""
        hits = self.hits[0] if self.hits else []
        return {
            "reference_paths": tuple(str(h.entry.path) for h in hits),
            "reference_scores": tuple(round(float(h.score), 4) for h in hits),
        }

    def images(self) -> dict[str, torch.Tensor]:
        """The first image's references as ``{"reference1": (1, 3, H, W), ...}``."""
        first = self.references[0] if self.references else []
        return {f"reference{i}": img for i, img in enumerate(first, start=1)}


class ReferenceRetriever:
    """Stage 1: LR ``(B, 3, h, w)`` -> references, enhanced embedding, text (see the module docstring).

    Runs on the CPU in float32 (embedder, aligner, enhancer, text decoder), whatever the device of stage 2.
    ``aligner``, ``db`` and ``lm`` are None only under the method's explicit opt-outs (``no_aligner``:
    the raw LR embedding is the query; ``no_database``: no references; ``no_text_decoder``: no text).
    """

    def __init__(
        self,
        embedder: Embedder,
        db: ReferenceDB | None,
        aligner: ReferenceFindingAligner | None,
        enhancer: EmbeddingEnhancer,
        lm: Any = None,
        tokenizer: Any = None,
    ) -> None:
        self.embedder, self.enhancer = embedder, enhancer
        self.refs = ReferenceTokens(db, embedder, aligner, DEFAULT_REFERENCES, cache_size=REFERENCE_CACHE)
        self.lm, self.tokenizer = lm, tokenizer

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, k: int = DEFAULT_REFERENCES) -> Retrieval:
        """Retrieve up to ``k`` references per image (at most the enhancer's ``num_refs``; the fewest any
        image of the batch has) and run the enhancer and the text decoder."""
        vec, tok = encode(self.embedder, lr.float().cpu())
        hits = self.refs.search(tok, vec, k=min(int(k), self.enhancer.config.num_refs))
        refs_img = [[load_rgb(Path(h.entry.path)) for h in row] for row in hits]
        image_embed, prefix = self.enhancer(tok, self.refs.tokens(hits, tok))
        text = generate_text(self.lm, self.tokenizer, prefix) if self.lm is not None else [""] * len(lr)
        return Retrieval(F.normalize(image_embed, dim=-1), text, hits, refs_img)


class RFASR(SDControlNetSR):
    """The ``rfa`` method: :class:`ReferenceRetriever` + SD/ControlNet with AdaIN adapters on both.

    Attributes:
        retriever: stage 1.
        adapters: the :class:`~semsr.fusion.adain.AdaINAdapters` attached to ``unet`` (off outside a call).
        controlnet_adapters: those attached to ``controlnet`` (off outside a call).
        opt_outs: the build's opt-out options that are on (``no_aligner``, ``no_database``,
            ``no_text_decoder``), recorded in every output's ``priors``.
    """

    name = "rfa"
    options_class: type[RFAOptions] = RFAOptions

    def __init__(
        self,
        *,
        retriever: ReferenceRetriever,
        adain: AdaINAdapters,
        controlnet_adain: AdaINAdapters,
        opt_outs: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.retriever = retriever
        self.opt_outs = tuple(opt_outs)
        self.adapters = attach_adain(self.unet, adain).to(self.device, self.dtype).eval().requires_grad_(False)
        self.controlnet_adapters = (
            attach_adain(self.controlnet, controlnet_adain).to(self.device, self.dtype).eval().requires_grad_(False)
        )

    def __call__(
        self, x: torch.Tensor, options: RFAOptions | None = None, *, progress: ProgressFn | bool | None = False
    ) -> SROutput:
        """Super-resolve ``x`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        The prompt is ``options.prompt`` or, when empty, the decoded text of each image. Returns the
        first image's ``priors`` (prompt, its source, negative prompt, reference paths, scores and
        images, and ``<opt-out>: True`` for each opt-out of the build) and its references as
        ``side_images``; ``timings`` add ``retrieve`` seconds.
        """
        opts = options if options is not None else self.options_class()
        t0 = time.perf_counter()
        found = self.retriever(x, opts.num_references)
        retrieve = time.perf_counter() - t0
        prompts = [opts.prompt] * len(x) if opts.prompt else list(found.text)
        with adain_control((self.adapters, self.controlnet_adapters), found.embedding.to(self.device)):
            out = super().__call__(x, opts, prompts=prompts, progress=progress)
        source = "user" if opts.prompt else ("text decoder" if self.retriever.lm is not None else "none")
        references = found.images()
        opt_outs = dict.fromkeys(self.opt_outs, True)
        priors = compact({**out.priors, "prompt_source": source, **opt_outs, **found.priors(), **references})
        return SROutput(
            out.images, priors=priors, timings={"retrieve": retrieve, **out.timings}, side_images=references
        )

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        """The decoded text (the default prompt; ``""`` under ``no_text_decoder``), the default negative
        prompt and the retrieved references' paths and scores for ``x`` ``(1, 3, H, W)`` in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise SemsrError(f"expected a (1, 3, H, W) image tensor, got shape {tuple(x.shape)}")
        with torch.no_grad():
            found = self.retriever(x[:1].float().clamp(0, 1), DEFAULT_REFERENCES)
        return compact(
            {"prompt": found.text[0], "negative_prompt": self.options_class().negative_prompt, **found.priors()}
        )


def _opt_out_conflicts(options: RFAOptions) -> None:
    """One line when a part is both given and opted out of."""
    for part, opt in (("db", "no_database"), ("aligner", "no_aligner"), ("text_decoder", "no_text_decoder")):
        if getattr(options, part) is not None and getattr(options, opt):
            flag = part.replace("_", "-")
            raise SemsrError(f"rfa: --{flag} and --{opt.replace('_', '-')} contradict each other: pass one")
    if options.no_database and (options.aligner is not None or options.no_aligner):
        raise SemsrError("rfa: without a database nothing is retrieved: drop --aligner / --no-aligner")


def build(options: RFAOptions) -> RFASR:
    """Factory of ``rfa`` (see the module docstring for the checkpoint and the opt-outs)."""
    require_paths(
        "rfa",
        options,
        ("base", "a Stable Diffusion checkpoint (a diffusers SD folder or a .safetensors/.ckpt file)"),
        ("checkpoint", "an RFA checkpoint folder (aligner, enhancer, adain, controlnet_adain)"),
    )
    _opt_out_conflicts(options)
    if options.db is None and not options.no_database:
        raise UnavailableError(
            "rfa needs a reference database: pass --db DB (`semsr index build`), or --no-database to run "
            "without references"
        )
    if options.no_database and options.clip is None:
        raise UnavailableError(
            "rfa --no-database needs --clip DIR (the CLIP vision folder the enhancer was trained on)"
        )
    apply_threads(options.threads)
    database = ReferenceDB(options.db) if options.db is not None else None
    spec = f"clip:{options.clip}" if options.clip is not None else database.embedder_spec  # type: ignore[union-attr]
    embedder = embedder_from_spec(spec)
    if database is not None:
        if embedder.spec != database.embedder_spec:
            raise SemsrError(f"--clip differs from the database's embedder {database.embedder_spec}", options.db)
        database.check_dim(embedder.dim)
    ckpt = Path(options.checkpoint).expanduser()  # type: ignore[arg-type]
    parts, index = load_checkpoint(ckpt, RFA_RECIPE)
    for name in ("enhancer", "adain", "controlnet_adain"):
        if name not in parts:
            raise UnavailableError(f"the rfa checkpoint has no {name!r} component (retrain it with rfa-sr)", ckpt)
    enhancer = parts["enhancer"]
    aligner = _aligner(options, parts.get("aligner"), ckpt) if database is not None else None
    for part in (aligner, enhancer):
        if part is not None:
            check_embedder(part, embedder, ckpt)
    for name in ("adain", "controlnet_adain"):
        if enhancer.config.out_dim != parts[name].control_dim:
            raise SemsrError(
                f"the enhancer's embedding ({enhancer.config.out_dim}) is not the {name} control "
                f"({parts[name].control_dim})",
                ckpt,
            )
    decoder = options.text_decoder or text_decoder_dir(ckpt, index.meta)
    if decoder is None and not options.no_text_decoder:
        raise UnavailableError(
            "rfa needs a text decoder and the checkpoint has none: pass --text-decoder DIR, or "
            "--no-text-decoder to use --prompt (or the empty prompt)",
            ckpt,
        )
    lm, tok = load_text_decoder(decoder) if decoder is not None and not options.no_text_decoder else (None, None)
    opt_outs = tuple(name for name in ("no_aligner", "no_database", "no_text_decoder") if getattr(options, name))
    return RFASR.from_pretrained(
        options.base,
        options.controlnet,
        base_config=options.base_config,
        **options.placement(),
        retriever=ReferenceRetriever(embedder, database, aligner, enhancer, lm, tok),
        adain=parts["adain"],
        controlnet_adain=parts["controlnet_adain"],
        opt_outs=opt_outs,
    )


def _aligner(options: RFAOptions, stored: Any, ckpt: Path) -> ReferenceFindingAligner | None:
    """The aligner of a build with a database: ``--aligner``, else the checkpoint's, else None under
    ``--no-aligner``; one line naming both options otherwise."""
    if options.no_aligner:
        return None
    if options.aligner is not None:
        return load_component(ReferenceFindingAligner, Path(options.aligner).expanduser())
    if stored is None:
        raise UnavailableError(
            "rfa needs a Reference-Finding Aligner and the checkpoint has none: pass --aligner DIR "
            "(`semsr train`, task rfa-aligner), or --no-aligner to query with the raw LR embedding",
            ckpt,
        )
    return stored


register(
    MethodSpec(
        name="rfa",
        factory=build,
        options=RFAOptions,
        scale=DEFAULT_SCALE,
        summary="RFA: retrieval-augmented x16 SR (aligned LR retrieval, I2T enhancer, AdaIN adapters; "
        "--base SD, --controlnet, --checkpoint RFA folder, --db reference database)",
        suggests_priors=True,
        diffusion=True,
        weight_paths=("base", "controlnet", "checkpoint", "clip", "db", "aligner", "text_decoder"),
    )
)
