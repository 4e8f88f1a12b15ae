"""``rfa``: retrieval-augmented extreme SR (seed 003; x16 by default, any scale).

    semsr upscale -i lr32.png -o out --method rfa --base SD --controlnet CN --checkpoint RFA --db DB \\
        [--text-decoder GPT2DIR] [--num-references 4] [--save-reference]

Stage 1: the LR image is embedded (the database's embedder), mapped by the
Reference-Finding Aligner to the HR embedding space, and the top-K (4) HR
references are retrieved from the database (:mod:`semsr.priors.retrieval`).
The I2T Embedding Enhancer fuses LR and reference tokens into an enhanced
image embedding and a prefix from which the text decoder writes a prompt
(used when the user gives none). Stage 2: SD + ControlNet (LR hint) with the
text as the cross-attention context and the enhanced image embedding as the
AdaIN control (:mod:`semsr.fusion.adain`).

Checkpoint folder (``--checkpoint``): ``aligner/``, ``enhancer/`` (each
``config.json`` + ``model.safetensors``), ``adain/`` (``config.json`` with
``control_dim`` + ``model.safetensors``) and optionally ``text-decoder/`` (a
transformers causal LM + tokenizer; ``--text-decoder`` overrides). The three
trained parts are the ``final/`` exports of ``semsr train`` with the tasks
``rfa-aligner``, ``rfa-enhancer`` (:mod:`semsr.train.rfa`) and ``rfa-sr``
(:mod:`semsr.train.rfa_sr`, whose ``final/controlnet`` is ``--controlnet``).
With ``--save-reference`` the retrieved references are written beside the
output (``<stem>_reference1.png`` ...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from semsr.core.errors import SemsrError, UnavailableError
from semsr.methods import MethodSpec, register
from semsr.pipeline.sd_controlnet import sd_cli_options
from semsr.priors.report import PriorReporter, first

DEFAULT_SCALE = 16
DEFAULT_REFERENCES = 4
_RUN_KEYS = {"num_references": DEFAULT_REFERENCES, "save_reference": False, "prompt": ""}


class RFAStage1:
    """Retrieval + enhancement: LR ``(B, 3, h, w)`` -> references, enhanced embedding, text."""

    def __init__(self, embedder: Any, db: Any, aligner: Any, enhancer: Any, lm: Any = None,
                 tokenizer: Any = None) -> None:
        self.embedder, self.db, self.aligner, self.enhancer = embedder, db, aligner, enhancer
        self.lm, self.tokenizer = lm, tokenizer

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, k: int = DEFAULT_REFERENCES) -> dict[str, Any]:
        """Returns ``{"embedding": (B, D), "text": [str]*B, "hits": [[Hit]]*B, "references": [[(1,3,H,W)]]*B}``."""
        from semsr.models.rfa import encode, generate_text
        from semsr.priors.retrieval.index import load_rgb

        vec, tok = encode(self.embedder, lr.float())
        query = F.normalize(self.aligner(tok, vec), dim=-1) if self.aligner is not None else vec
        k = min(int(k), self.enhancer.config.num_refs)
        hits = self.db.search(query.numpy(), k) if self.db is not None and k > 0 else [[] for _ in range(len(lr))]
        n_ref = min(len(h) for h in hits)
        refs_img: list[list[torch.Tensor]] = []
        ref_tokens = []
        for row in hits:
            imgs = [load_rgb(Path(h.entry.path)) for h in row[:n_ref]]
            refs_img.append(imgs)
            toks = [encode(self.embedder, im)[1][0] for im in imgs]
            ref_tokens.append(torch.stack(toks) if toks else tok.new_zeros(0, *tok.shape[1:]))
        image_embed, prefix = self.enhancer(tok, torch.stack(ref_tokens))
        text = generate_text(self.lm, self.tokenizer, prefix) if self.lm is not None else [""] * len(lr)
        return {"embedding": F.normalize(image_embed, dim=-1), "text": text, "hits": hits, "references": refs_img}


class RFAMethod(PriorReporter):
    """``rfa`` as a registry :class:`~semsr.methods.Method`.

    Run options: num_references (4), save_reference, prompt (default: the
    decoded text) and every ``sd-controlnet`` run option. After a call
    ``side_outputs`` holds the references when ``save_reference`` was set and
    ``last_stage1`` the retrieved paths/scores and the text; ``last_priors``
    the first image's prompt (and its source), reference paths, scores and images.
    """

    name = "rfa"
    tiles_itself = True

    def __init__(self, inner: Any, stage1: RFAStage1, adapters: Any, scale: int = DEFAULT_SCALE) -> None:
        self.inner = inner  # SDControlNetMethod
        self.stage1 = stage1
        self.adapters = adapters
        self.scale = int(scale)
        self.inner.scale = self.scale
        self.device = inner.device
        self.side_outputs: dict[str, torch.Tensor] = {}
        self.last_stage1: list[dict[str, Any]] = []

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        opts = {**_RUN_KEYS, **{k: v for k, v in run_opts.items() if k in _RUN_KEYS and v is not None}}
        s1 = self.stage1(x, opts["num_references"])
        prompt = opts["prompt"] or s1["text"]
        self.last_stage1 = [{"text": t, "references": [h.as_dict() for h in hits]}
                            for t, hits in zip(s1["text"], s1["hits"])]
        self.side_outputs = {}
        if opts["save_reference"] and s1["references"]:
            for i, img in enumerate(s1["references"][0], start=1):
                self.side_outputs[f"reference{i}"] = img
        inner_opts = {k: v for k, v in run_opts.items() if k not in _RUN_KEYS}
        emb = s1["embedding"].to(self.device)
        with self.adapters.control(emb):
            out = self.inner(x, prompt=prompt, **inner_opts)
        source = "user" if opts["prompt"] else ("text decoder" if self.stage1.lm is not None else "none")
        self.report_priors(**self.inner.last_priors, prompt_source=source, **stage1_priors(s1),
                           **{f"reference{i}": img for i, img in enumerate(first(s1["references"]) or [], start=1)})
        return out

    def prior_suggestion(self, x: torch.Tensor) -> dict[str, Any]:
        """The decoded text (the default prompt; "" without a text decoder) and the retrieved references."""
        s1 = self.stage1(x, DEFAULT_REFERENCES)
        return {"prompt": first(s1["text"]), "negative_prompt": self.inner.prior_suggestion(x).get("negative_prompt"),
                **stage1_priors(s1)}


def stage1_priors(s1: dict[str, Any]) -> dict[str, Any]:
    """Display priors of the first image of a stage-1 result: reference paths and cosine scores."""
    hits = first(s1["hits"]) or []
    return {"reference_paths": tuple(str(h.entry.path) for h in hits),
            "reference_scores": tuple(round(float(h.score), 4) for h in hits)}


def load_adain(folder: Path, unet: Any) -> Any:
    """Attach AdaIN adapters to ``unet`` and load their weights from ``folder``."""
    from safetensors.torch import load_file

    from semsr.fusion.adain import attach_adain

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UnavailableError("missing AdaIN adapter config", cfg_file)
    adapters = attach_adain(unet, int(json.loads(cfg_file.read_text())["control_dim"]))
    if (folder / "model.safetensors").is_file():
        missing, unexpected = adapters.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        if unexpected or missing:
            raise SemsrError(f"AdaIN weights do not fit this UNet ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected keys)", folder)
    return adapters.to(unet.device, unet.dtype)


def save_adain(adapters: Any, folder: str | Path) -> Path:
    """Write adapters as ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import save

    from semsr.eval.atomic import write_bytes, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes(folder / "model.safetensors", save({k: v.contiguous() for k, v in adapters.state_dict().items()}))
    write_text(folder / "config.json", json.dumps({"control_dim": adapters.control_dim}))
    return folder


def build(base: str | None = None, controlnet: str | None = None, checkpoint: str | None = None,
          clip: str | None = None, db: str | None = None, text_decoder: str | None = None, *, device: str = "cpu",
          dtype: str | torch.dtype | None = None, scale: int = DEFAULT_SCALE, base_config: str | None = None,
          channels_last: bool = False, compile: bool = False, threads: int | None = None) -> RFAMethod:
    """Factory of ``rfa`` (see the module docstring for the checkpoint layout)."""
    from semsr.pipeline.sd_controlnet import build as build_sd_controlnet
    from semsr.models.rfa import load_aligner, load_enhancer, load_text_decoder
    from semsr.priors.retrieval.embedders import embedder_from_spec
    from semsr.priors.retrieval.index import ReferenceDB

    if checkpoint is None:
        raise UnavailableError("rfa needs --checkpoint (folder with aligner/, enhancer/, adain/)")
    ckpt = Path(checkpoint).expanduser()
    database = ReferenceDB(db) if db else None
    if database is None and clip is None:
        raise UnavailableError("rfa needs --db (a reference database from `semsr index build`) or at least --clip")
    spec = f"clip:{clip}" if clip else database.embedder_spec  # type: ignore[union-attr]
    if database is not None and clip and embedder_from_spec(spec).spec != database.embedder_spec:
        raise SemsrError(f"--clip differs from the database's embedder {database.embedder_spec}", db)
    embedder = embedder_from_spec(spec)
    aligner = load_aligner(ckpt / "aligner", embedder.spec) if (ckpt / "aligner").is_dir() else None
    enhancer = load_enhancer(ckpt / "enhancer")
    for part in (aligner, enhancer):
        c = getattr(part, "config", None)
        if c is not None and (c.token_dim, c.num_tokens) != (embedder.token_dim, embedder.num_tokens):
            raise SemsrError(f"the checkpoint's {type(part).__name__} takes {c.num_tokens} tokens of {c.token_dim}, "
                             f"the embedder {embedder.spec} gives {embedder.num_tokens} of {embedder.token_dim} "
                             "(build the database with the embedder the checkpoint was trained for)", ckpt)
    td = Path(text_decoder).expanduser() if text_decoder else ckpt / "text-decoder"
    lm, tok = load_text_decoder(td) if (text_decoder or td.is_dir()) else (None, None)
    inner = build_sd_controlnet(base, controlnet, device=device, dtype=dtype, scale=scale, base_config=base_config,
                                channels_last=channels_last, compile=compile, threads=threads)
    adapters = load_adain(ckpt / "adain", inner.pipeline.unet)
    return RFAMethod(inner, RFAStage1(embedder, database, aligner, enhancer, lm, tok), adapters, scale=scale)


def _cli_options() -> list[dict[str, Any]]:
    shared = sd_cli_options()
    return shared + [
        {"flags": ["--db"], "target": "build", "metavar": "DB",
         "help": "rfa: reference database folder (`semsr index build`)"},
        {"flags": ["--text-decoder"], "target": "build", "metavar": "DIR",
         "help": "rfa: causal LM folder for the I2T text (default: <checkpoint>/text-decoder if present)"},
        {"flags": ["--num-references"], "target": "run", "type": int, "metavar": "K",
         "help": f"rfa: references retrieved per image (default {DEFAULT_REFERENCES})"},
        {"flags": ["--save-reference"], "target": "run", "action": "store_true",
         "help": "write the reference(s) used beside the output (<output stem>_reference*.png)"},
    ]


register(MethodSpec(
    name="rfa",
    factory=build,
    scale=DEFAULT_SCALE,
    summary="RFA: retrieval-augmented x16 SR (aligned LR retrieval, I2T enhancer, AdaIN adapters; "
            "--base SD, --controlnet, --checkpoint RFA folder, --db reference database)",
    extra={"cli_options": _cli_options(), "suggests_priors": True},
))
