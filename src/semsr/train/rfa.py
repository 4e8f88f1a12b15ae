"""Stage-1 training of the RFA recipe: Reference-Finding Aligner and I2T Embedding Enhancer.

Two tasks of the shared trainer (``semsr train --config ...``; stage 2 is
``rfa-sr`` in :mod:`semsr.train.rfa_sr`):

**``rfa-aligner``** — the aligner (:class:`~semsr.models.rfa.ReferenceFindingAligner`)
on the trainer's (HR crop, degraded LR) pairs: the LR crop's embedder tokens
and raw embedding -> predicted HR embedding, loss ``rfa_align_l2`` (the
paper's ``||C_hat_LR - C_HR||^2``) to the embedder's embedding of the HR crop.
The paper's setting is 512-px crops, ``scale: 16`` (32x32 LR) and
``degradation: {type: bicubic}``. Exports ``final/aligner/``.
``model.options``: ``embedder`` (required: ``hed-vgg`` or ``clip:FOLDER``,
the reference database's), ``width`` (256), ``depth`` (2), ``heads`` (4),
``residual`` (true), ``init`` (an aligner folder to continue from).

**``rfa-enhancer``** — the enhancer (:class:`~semsr.models.rfa.EmbeddingEnhancer`).
Per sample: LR tokens; the top-K references retrieved from the reference
database ``db`` with the aligned LR query (``aligner``; the raw LR embedding
only with the explicit ``no_aligner: true``), skipping the database entry of the training image itself
(same content hash) so the enhancer cannot copy its target; their tokens
(cached in memory per database row). Outputs the enhanced image embedding
(loss ``rfa_image_cos``: ``1 - cos`` to the HR crop's embedding) and the
prefix of the frozen text decoder, whose greedy text is encoded by the frozen
CLIP text encoder and aligned to the CLIP text embedding of the image's
caption (loss ``rfa_text_clip``, made differentiable as described in
:mod:`semsr.models.rfa_text`). ``rfa_caption_nll`` (teacher-forced LM loss
of the caption after the prefix) is an optional auxiliary term, not the
paper's. Captions come from the corpus manifest (``data.manifest``, prior
``data.caption_prior``) or ``data.prompt``. Exports ``final/enhancer/``.
``model.options``: ``embedder``, ``db``, ``text_decoder`` (causal LM
folder) and ``aligner`` (folder or ``default``; or ``no_aligner: true``)
required; ``clip_text`` (CLIP text encoder: SD or CLIP folder, default
``model.pretrained``),
``num_refs`` (4), ``exclude_self`` (true), ``width``/``depth``/``heads``/
``prefix_len`` (256/2/4/4), ``decode_len`` (16 tokens), ``tau`` (1.0),
``ref_cache`` (1024 reference token sets kept), ``init`` (enhancer folder).

Neither task renders images, so ``validation.every`` must be 0; the
aligner's held-out retrieval is measured by ``semsr bench retrieval
--aligner RUN/final/aligner``. Paths may be ``tiny://`` forms
(:func:`semsr.testing.tiny.resolve_model_path`).

Also here: the (LR, HR) feature pairs ``semsr bench retrieval`` scores an
aligner on. Its pairs are whole images: LR = the HR image resized by
MATLAB-compatible bicubic to ``lr_size`` x ``lr_size`` (aspect not kept — the
embedders also resize to a square), target = the image's entry in the
reference database. LR features are cached per content hash under
``cache_dir()/retrieval/lr/<embedder>/<lr_size>/<sha256>.npz``. Training
images come from the offline corpus, never from benchmark sets.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semsr.core.components import load_component
from semsr.core.errors import SemsrError
from semsr.core.fingerprint import fingerprint
from semsr.core.io import atomic_write_bytes
from semsr.core.paths import cache_dir
from semsr.models.rfa import (
    EmbeddingEnhancer,
    ReferenceFindingAligner,
    align_loss,
    aligner_dir,
    caption_loss,
    check_embedder,
    encode,
    enhancer_loss,
    load_text_decoder,
)
from semsr.models.rfa_text import VocabBridge, load_clip_text, soft_decode
from semsr.ops.imresize import imresize
from semsr.pipeline.text import PromptEncoder
from semsr.priors.retrieval.embedders import Embedder, embedder_from_spec
from semsr.priors.retrieval.index import ReferenceDB, file_sha256, load_rgb
from semsr.priors.retrieval.references import ReferenceTokens
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.data import CropDataset
from semsr.train.losses import _require, register_loss
from semsr.train.priors import training_items
from semsr.train.tasks import Task, register_task

LR_SIZE = 32


# ----------------------------------------------------------------------------- loss terms


@register_loss("rfa_align_l2")
def rfa_align_l2(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The paper's ``||aligned - hr_embed||^2`` (summed over the embedding, mean over the batch); ``(B, D)`` each."""
    _require(outputs, "rfa_align_l2", "aligned", "hr_embed")
    return align_loss(outputs["aligned"].float(), outputs["hr_embed"].float())


@register_loss("rfa_image_cos")
def rfa_image_cos(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``1 - cos(image_embed, hr_embed)`` averaged: enhanced vs GT HR image embedding, ``(B, D)`` each."""
    _require(outputs, "rfa_image_cos", "image_embed", "hr_embed")
    return enhancer_loss(outputs["image_embed"].float(), outputs["hr_embed"].float())


@register_loss("rfa_text_clip")
def rfa_text_clip(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``1 - cos(text_embed, caption_embed)`` averaged: CLIP text embedding of the decoded text vs the
    caption's, ``(B, Dt)`` each (see :mod:`semsr.models.rfa_text`)."""
    _require(outputs, "rfa_text_clip", "text_embed", "caption_embed")
    return (
        1
        - torch.nn.functional.cosine_similarity(outputs["text_embed"].float(), outputs["caption_embed"].float(), dim=-1)
    ).mean()


@register_loss("rfa_caption_nll")
def rfa_caption_nll(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced LM loss of the caption after the prefix (scalar; auxiliary, not the paper's)."""
    _require(outputs, "rfa_caption_nll", "caption_nll")
    return outputs["caption_nll"]


@dataclass
class PairFeatures:
    """Features of (LR, HR) pairs.

    Attributes:
        lr_vec: ``(N, D)`` raw LR embeddings (unit vectors).
        lr_tokens: ``(N, L, T)`` LR tokens.
        hr_vid: ``(N,)`` row of each pair's HR image in the database.
        sha: content hash per pair.
    """

    lr_vec: torch.Tensor
    lr_tokens: torch.Tensor
    hr_vid: torch.Tensor
    sha: list[str]

    def subset(self, idx: Sequence[int]) -> PairFeatures:
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return PairFeatures(self.lr_vec[i], self.lr_tokens[i], self.hr_vid[i], [self.sha[j] for j in i.tolist()])


def make_lr(hr: torch.Tensor, lr_size: int = LR_SIZE) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, lr_size, lr_size)`` (MATLAB bicubic, clamped)."""
    return imresize(hr.float(), size=(lr_size, lr_size)).clamp(0, 1)


def _cache_file(embedder_spec: str, lr_size: int, sha: str) -> Path:
    safe = embedder_spec.replace(":", "-").replace("/", "_")[-120:]
    return cache_dir() / "retrieval" / "lr" / safe / str(lr_size) / f"{sha}.npz"


def lr_pair_features(
    db: ReferenceDB,
    files: Sequence[Path],
    embedder: Embedder,
    *,
    lr_size: int = LR_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> PairFeatures:
    """Embed the LR versions of ``files`` whose HR content is in ``db`` (others are skipped)."""
    vecs, toks, vids, shas = [], [], [], []
    for i, path in enumerate(files):
        sha = file_sha256(path)
        entry = db.entry_by_hash(sha)
        if entry is None:
            continue
        cache = _cache_file(embedder.spec, lr_size, sha)
        if cache.is_file():
            with np.load(cache) as z:
                vec, tok = torch.from_numpy(z["vec"]), torch.from_numpy(z["tokens"])
        else:
            with torch.inference_mode():
                vec, tok = encode(embedder, make_lr(load_rgb(path), lr_size))
            vec, tok = vec[0].float(), tok[0].float()
            buf = io.BytesIO()
            np.savez(buf, vec=vec.numpy(), tokens=tok.numpy())
            atomic_write_bytes(cache, buf.getvalue())
        vecs.append(vec)
        toks.append(tok)
        vids.append(entry.vid)
        shas.append(sha)
        if progress is not None:
            progress(i + 1, len(files))
    if not vecs:
        return PairFeatures(torch.zeros(0, 0), torch.zeros(0, 0, 0), torch.zeros(0, dtype=torch.long), [])
    return PairFeatures(torch.stack(vecs), torch.stack(toks), torch.as_tensor(vids), shas)


def split_by_hash(shas: Sequence[str], holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index split keyed by content hash."""
    order = sorted(range(len(shas)), key=lambda i: shas[i])
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    n_hold = max(1, int(round(len(order) * holdout))) if holdout > 0 else 0
    return sorted(order[n_hold:]), sorted(order[:n_hold])


def aligner_outputs(
    model: nn.Module, lr_tokens: torch.Tensor, lr_vec: torch.Tensor, hr_vec: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One aligner forward as named outputs for the loss terms (the ``rfa-aligner`` task's step).

    Args: ``lr_tokens (B, N, T)``, ``lr_vec (B, D)`` raw LR embedding, ``hr_vec (B, D)`` target.
    Returns ``aligned`` (prediction), ``hr_embed`` and ``lr_embed``, all ``(B, D)``.
    """
    return {"aligned": model(lr_tokens, lr_vec), "hr_embed": hr_vec, "lr_embed": lr_vec}


def hit_rates(
    db: ReferenceDB, queries: torch.Tensor, target_vids: torch.Tensor, ks: Sequence[int] = (1, 4)
) -> dict[str, float]:
    """Fraction of queries ``(N, D)`` whose target row is among the top-k database hits, for each k."""
    hits = db.search(queries.numpy(), k=max(ks))
    out = {}
    for k in ks:
        found = [int(t) in [h.entry.vid for h in row[:k]] for row, t in zip(hits, target_vids.tolist())]
        out[f"top{k}"] = float(np.mean(found)) if found else float("nan")
    return out


# ----------------------------------------------------------------------------- trainer tasks


def resolve_embedder_spec(text: str) -> str:
    """Configured embedder -> spec; ``clip:tiny://clip-vision`` and other ``tiny://`` folders -> real paths."""
    if text.startswith("clip:"):
        return "clip:" + str(resolve_model_path(text.split(":", 1)[1]))
    return text


def aligner_folder(value: object, embedder_spec: str) -> Path:
    """The folder of a configured aligner (``tiny://`` forms, ``default``: the shipped one for the embedder)."""
    return aligner_dir("default", embedder_spec) if str(value) == "default" else resolve_model_path(str(value))


def aligner_fingerprint(value: object | None, embedder_spec: str) -> str | None:
    """Fingerprint of a configured aligner's files (None: no aligner, the raw LR embedding is the query); the
    prior store records it with the references it retrieved."""
    return None if value is None else fingerprint([aligner_folder(value, embedder_spec)])


def load_aligner(value: object, embedder: Embedder) -> ReferenceFindingAligner:
    """The aligner of a configured folder (``tiny://`` forms, ``default``: the shipped one), checked against
    ``embedder``."""
    folder = aligner_folder(value, embedder.spec)
    model = load_component(ReferenceFindingAligner, folder)
    check_embedder(model, embedder, folder)
    return model


class _Stage1Task(Task):
    """Common parts of the stage-1 tasks: options, the frozen embedder, no image validation."""

    OPTIONS: frozenset[str] = frozenset()
    REQUIRED: tuple[str, ...] = ("embedder",)

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        if cfg.validation.every:
            raise SemsrError(
                f"{cfg.task} renders no images: set validation.every: 0 (measure retrieval with "
                "`semsr bench retrieval --aligner RUN/final/aligner`)"
            )
        opts = dict(cfg.model.options)
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for {cfg.task}: {sorted(unknown)} (known: {sorted(self.OPTIONS)})")
        for key in self.REQUIRED:
            if not opts.get(key):
                raise SemsrError(f"{cfg.task} needs model.options.{key}")
        self.opts = opts
        self.embedder = embedder_from_spec(resolve_embedder_spec(str(opts["embedder"])))
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device, self.weight_dtype = device, weight_dtype

    @torch.no_grad()
    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding (B, D), tokens (B, N, T))`` of ``img (B, 3, H, W)`` in [0, 1], on the task device.

        The frozen embedder runs in fp32 on the CPU (as in ``rfa-sr``).
        """
        vec, tok = encode(self.embedder, img.float().cpu())
        return vec.float().to(self.device), tok.float().to(self.device)

    @torch.no_grad()
    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Embedding ``(B, D)`` of ``img (B, 3, H, W)`` in [0, 1], on the task device."""
        return self.embedder.embed(img.float().cpu()).float().to(self.device)

    def seeded(self, build: Callable[[], nn.Module]) -> nn.Module:
        """``build()`` with torch's RNG seeded by the experiment seed (caller's RNG untouched)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            return build()

    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        raise SemsrError(f"{self.cfg.task} renders no images (set validation.every: 0)")


@register_task("rfa-aligner")
class RFAAlignerTask(_Stage1Task):
    """Reference-Finding Aligner on (HR crop, degraded LR) pairs, ``rfa_align_l2`` (see module docstring)."""

    OPTIONS = frozenset({"embedder", "width", "depth", "heads", "residual", "init"})

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        o, emb = self.opts, self.embedder
        if o.get("init"):
            model = load_aligner(o["init"], emb)
        else:
            model = self.seeded(
                lambda: ReferenceFindingAligner(
                    token_dim=int(emb.token_dim),
                    out_dim=int(emb.dim),
                    num_tokens=int(emb.num_tokens),
                    width=int(o.get("width", 256)),
                    depth=int(o.get("depth", 2)),
                    heads=int(o.get("heads", 4)),
                    residual=bool(o.get("residual", True)),
                    embedder=emb.spec,
                )
            )
        self.trainable = model.float().train().requires_grad_(True)

    def compute(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """``aligned``/``hr_embed``/``lr_embed`` ``(B, D)`` from ``batch["lr"]`` and ``batch["hr"]``."""
        lr_vec, lr_tok = self.encode(batch["lr"])
        return aligner_outputs(model, lr_tok, lr_vec, self.embed(batch["hr"]))

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the component folder ``folder/aligner/``."""
        model.save_pretrained(Path(folder) / "aligner", safe_serialization=True)


class TrainingHashes:
    """Content hash of the training image behind each global sample position (as the trainer's dataset maps
    positions to images), so retrieval can skip the database entry of the training image itself."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self._items = training_items(cfg.data)
        self._positions = CropDataset(self._items, cfg.data, lambda hr, seed: hr, cfg.seed)
        self._shas: dict[Path, str] = {}

    def __call__(self, position: int) -> str:
        path = self._items[self._positions.index_at(int(position))].path
        if path not in self._shas:
            self._shas[path] = file_sha256(path)
        return self._shas[path]


def retrieval_aligner(opts: dict, embedder: Embedder, what: str) -> ReferenceFindingAligner | None:
    """The aligner a task retrieves with: ``model.options.aligner`` (a folder or ``default``), or None under
    ``model.options.no_aligner: true`` (the raw LR embedding is the query); one line naming both otherwise."""
    if opts.get("no_aligner"):
        if opts.get("aligner"):
            raise SemsrError(f"{what}: model.options.aligner and model.options.no_aligner contradict each other")
        return None
    if not opts.get("aligner"):
        raise SemsrError(
            f"{what} needs model.options.aligner (the rfa-aligner run's final/aligner), or "
            "model.options.no_aligner: true to query with the raw LR embedding"
        )
    return load_aligner(opts["aligner"], embedder)


@register_task("rfa-enhancer")
class RFAEnhancerTask(_Stage1Task):
    """I2T Embedding Enhancer: ``rfa_image_cos`` + ``rfa_text_clip`` (see module docstring)."""

    OPTIONS = frozenset(
        {
            "embedder",
            "db",
            "aligner",
            "no_aligner",
            "num_refs",
            "exclude_self",
            "width",
            "depth",
            "heads",
            "prefix_len",
            "init",
            "text_decoder",
            "clip_text",
            "decode_len",
            "tau",
            "ref_cache",
        }
    )
    REQUIRED = ("embedder", "db", "text_decoder")

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        o, emb = self.opts, self.embedder
        self.lm, self.tokenizer = load_text_decoder(resolve_model_path(str(o["text_decoder"])))
        self.lm.requires_grad_(False)
        lm_dim = int(self.lm.get_input_embeddings().embedding_dim)
        if o.get("init"):
            init = resolve_model_path(str(o["init"]))
            model = load_component(EmbeddingEnhancer, init)
            c = model.config
            if (c.token_dim, c.out_dim, c.num_tokens, c.lm_dim) != (emb.token_dim, emb.dim, emb.num_tokens, lm_dim):
                raise SemsrError("model.options.init: enhancer does not fit this embedder / text decoder", init)
        else:
            model = self.seeded(
                lambda: EmbeddingEnhancer(
                    token_dim=int(emb.token_dim),
                    out_dim=int(emb.dim),
                    num_tokens=int(emb.num_tokens),
                    lm_dim=lm_dim,
                    num_refs=int(o.get("num_refs", 4)),
                    width=int(o.get("width", 256)),
                    depth=int(o.get("depth", 2)),
                    heads=int(o.get("heads", 4)),
                    prefix_len=int(o.get("prefix_len", 4)),
                    embedder=emb.spec,
                )
            )
        self.trainable = model.float().train().requires_grad_(True)

        db = ReferenceDB(resolve_model_path(str(o["db"])))
        if db.embedder_spec != emb.spec:
            raise SemsrError(
                f"database embedder {db.embedder_spec!r} differs from model.options.embedder {emb.spec!r}", db.folder
            )
        aligner = retrieval_aligner(o, emb, "rfa-enhancer")
        self.refs = ReferenceTokens(
            db,
            emb,
            aligner,
            min(int(o.get("num_refs", model.config.num_refs)), model.config.num_refs),
            int(o.get("ref_cache", 1024)),
        )
        self.hashes = TrainingHashes(cfg) if bool(o.get("exclude_self", True)) else None

        self.decode_len = int(o.get("decode_len", 16))
        self.tau = float(o.get("tau", 1.0))
        self.clip_text = None
        if cfg.losses.get("rfa_text_clip", 0):
            self.clip_text = load_clip_text(resolve_model_path(str(o.get("clip_text") or cfg.model.pretrained)))
            self.bridge = VocabBridge(
                self.tokenizer, self.clip_text.tokenizer, int(self.lm.get_input_embeddings().num_embeddings)
            )
            self.captions = PromptEncoder(self.clip_text.embed)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().setup(device, weight_dtype)
        self.lm.to(device=device, dtype=weight_dtype)
        if self.clip_text is not None:
            self.clip_text.to(device=device, dtype=weight_dtype)
            self.captions.clear()

    def compute(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """``image_embed``/``hr_embed`` ``(B, D)``; with the text terms on, ``text_embed``/``caption_embed``
        ``(B, Dt)`` and/or ``caption_nll`` (scalar)."""
        lr_vec, lr_tok = self.encode(batch["lr"])
        positions = [int(p) for p in batch["position"]]
        exclude = [self.hashes(p) if self.hashes is not None else None for p in positions]
        ref_tok = self.refs(lr_tok, lr_vec, exclude).to(self.device)
        image_embed, prefix = model(lr_tok, ref_tok)
        out = {"image_embed": image_embed, "hr_embed": self.embed(batch["hr"])}
        prompts = list(batch["prompt"])
        if self.clip_text is not None:
            dec = soft_decode(self.lm, prefix, self.decode_len, self.tokenizer.eos_token_id, self.tau)
            out["text_embed"] = self.clip_text.embed_decoded(dec, self.bridge)
            out["caption_embed"] = self.captions(prompts).to(self.device, torch.float32)
        if self.cfg.losses.get("rfa_caption_nll", 0):
            enc = self.tokenizer([p + self.tokenizer.eos_token for p in prompts], return_tensors="pt", padding=True)
            out["caption_nll"] = caption_loss(
                self.lm, prefix, enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
            )
        return out

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the component folder ``folder/enhancer/``."""
        model.save_pretrained(Path(folder) / "enhancer", safe_serialization=True)
