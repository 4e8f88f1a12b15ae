"""Stage-2 training of the RFA recipe: task ``rfa-sr`` (SD + ControlNet + AdaIN adapters on both).

Frozen SD (VAE, UNet, text encoder) and frozen stage-1 parts (aligner,
enhancer). Trainable: the AdaIN adapters (gates alpha/beta/gamma and their
style heads, :class:`~semsr.fusion.adain.AdaINAdapters`) of the UNet *and* of
the ControlNet, and part of the ControlNet (the paper: "the adapters and part of
the ControlNet are fine-tuned"; which part is not said: by default the hint
encoder and the zero convolutions, ``controlnet_trainable``).

The AdaIN control is what inference feeds it: the LR crop's tokens, the top-K
references retrieved from the database ``db`` with the aligned LR query
(the training image itself skipped), through the I2T enhancer, normalised
(:class:`EnhancedEmbedding`). Captions (or the empty prompt) are the
cross-attention context, as the decoded text is at inference. The model call is
``controlnet_sr``'s (:class:`~semsr.train.tasks.ControlNetSRTask`, the inference
forward) inside both adapter sets' ``control`` block. The paper's LR is bicubic
32 -> 512 (``degradation: {type: bicubic}``, ``scale: 16``; configs/rfa.yaml).

``model.options``:
    ``embedder``: ``hed-vgg`` | ``clip:FOLDER`` (``tiny://`` paths allowed; the database's);
    ``enhancer``, ``db``: the ``rfa-enhancer`` run's ``final/enhancer`` and the reference database (required);
    ``aligner``: the ``rfa-aligner`` run's ``final/aligner`` (required unless ``no_aligner: true``:
    the raw LR embedding is the query);
    ``num_refs`` (the enhancer's), ``exclude_self`` (true), ``ref_cache`` (1024): as for ``rfa-enhancer``;
    ``controlnet_trainable``: ``all`` or a list of ControlNet module-name prefixes
    (default :data:`CONTROLNET_TRAINABLE`);
    ``text_decoder``: the enhancer's causal LM folder (copied into the exported checkpoint);
    ``conditioning_channels``: as for ``controlnet_sr``;
    ``lr_embedding``: ``image`` (the default with ``data.priors``) or ``crop`` (the default without).

Prior store (``data.priors`` of ``semsr priors build --recipe rfa``, with ``data.pairs``): under
``lr_embedding: image`` the control of a crop is that of its whole LR file: the stored tokens of the
LR file and of its stored references (``rfa-refs``: retrieved at build time with the aligned query,
the training image skipped) through the frozen enhancer, once per LR file; no embedder is built for
training (:class:`StoredEnhancedEmbedding`). ``lr_embedding: crop`` embeds each LR crop in the loop,
as the paper (and as without a store). Validation (inference) builds the embedder on first use.

Export: ``<folder>/controlnet`` (diffusers ControlNet: ``--controlnet``) and
``<folder>/rfa``, an RFA checkpoint (:func:`semsr.models.rfa.save_rfa_checkpoint`)
with the trained ``adain`` and ``controlnet_adain`` and the stage-1 parts (``--checkpoint`` of ``--method rfa``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import Component, load_component
from semsr.core.errors import SemsrError
from semsr.fusion.adain import AdaINAdapters, adain_control, attach_adain
from semsr.models.rfa import EmbeddingEnhancer, check_embedder, encode, save_rfa_checkpoint
from semsr.priors.cache import PriorStore
from semsr.priors.clip_embed import RFA_REFS
from semsr.priors.retrieval.embedders import Embedder, embedder_from_spec
from semsr.priors.retrieval.index import ReferenceDB
from semsr.priors.retrieval.references import ReferenceTokens
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.priors import lr_embedding_mode, open_prior_store, require_priors, training_lr_files
from semsr.train.rfa import TrainingHashes, aligner_fingerprint, resolve_embedder_spec, retrieval_aligner
from semsr.train.tasks import ControlNetSRTask, register_task

#: ``model.options`` of ``rfa-sr`` besides those of ``controlnet_sr``.
RFA_OPTIONS = (
    "embedder",
    "aligner",
    "no_aligner",
    "enhancer",
    "db",
    "num_refs",
    "exclude_self",
    "ref_cache",
    "controlnet_trainable",
    "text_decoder",
    "lr_embedding",
)
#: The ControlNet parts trained by default: the hint encoder and the zero convolutions (diffusers names).
CONTROLNET_TRAINABLE = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


def set_trainable(model: nn.Module, prefixes: str | Sequence[str]) -> list[str]:
    """Freeze ``model`` but the parameters whose names start with one of ``prefixes`` (``"all"``: train all).

    Returns the trainable parameter names; raises :class:`SemsrError` for a prefix that names nothing.
    """
    names = [n for n, _ in model.named_parameters()]
    if prefixes == "all":
        model.requires_grad_(True)
        return names
    prefixes = [str(p) for p in ([prefixes] if isinstance(prefixes, str) else prefixes)]
    unused = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unused:
        raise SemsrError(f"model.options.controlnet_trainable: no ControlNet parameters under {unused}")
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(name == p or name.startswith(p + ".") for p in prefixes))
        if param.requires_grad:
            chosen.append(name)
    return chosen


class EnhancedEmbedding:
    """Stage 1 as at inference, for training stage 2: LR ``(B, 3, h, w)`` -> ``(B, D)`` unit enhanced embeddings.

    LR tokens -> (aligned) query -> top-K reference tokens (:class:`~semsr.priors.retrieval.references.ReferenceTokens`,
    hits in ``exclude`` skipped) -> frozen enhancer. Runs on the CPU in float32.
    """

    def __init__(self, embedder: Embedder, enhancer: EmbeddingEnhancer, refs: ReferenceTokens) -> None:
        self.embedder, self.enhancer, self.refs = embedder, enhancer.float().eval().requires_grad_(False), refs

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, exclude: Sequence[str | None] | None = None) -> torch.Tensor:
        vec, tok = encode(self.embedder, lr.float().cpu())
        ref = self.refs(tok, vec, list(exclude) if exclude is not None else [None] * len(lr))
        return F.normalize(self.enhancer(tok, ref)[0], dim=-1)


@dataclass(frozen=True)
class StoredEmbedder:
    """An embedder's spec and shapes without its model (``lr_embedding: image``: the store holds its outputs)."""

    spec: str
    dim: int
    token_dim: int
    num_tokens: int

    @classmethod
    def of(cls, spec: str, enhancer: EmbeddingEnhancer) -> StoredEmbedder:
        c = enhancer.config
        return cls(spec, int(c.out_dim), int(c.token_dim), int(c.num_tokens))


class StoredEnhancedEmbedding:
    """:class:`EnhancedEmbedding` from the prior store (``semsr priors build --recipe rfa``): per LR file,
    its whole-image ``rfa-tokens`` and the ``rfa-tokens`` of its stored references
    (``rfa-refs``, retrieved at build time with the aligned query, the training image skipped) through the
    frozen enhancer; ``(D,)`` per LR file, computed once and kept in memory."""

    def __init__(
        self, store: PriorStore, enhancer: EmbeddingEnhancer, spec: str, k: int, aligner: str | None = None
    ) -> None:
        self.store, self.enhancer, self.spec, self.k = store, enhancer.float().eval().requires_grad_(False), spec, k
        self.aligner = aligner  # fingerprint of the training's aligner (None: no aligner)
        self._memo: dict[str, torch.Tensor] = {}

    def check(self, lr_files: list[Path]) -> None:
        """One-line error before training when a prior of ``lr_files`` is missing or was built otherwise."""
        require_priors(self.store, lr_files, ("rfa-tokens", RFA_REFS))
        if not lr_files:
            return
        meta = self.store.meta(lr_files[0], RFA_REFS)
        if meta.get("embedder") != self.spec:
            raise SemsrError(
                f"the store's references were retrieved with embedder {meta.get('embedder')!r}, "
                f"model.options.embedder is {self.spec!r}",
                self.store.root,
            )
        if meta.get("aligner") != self.aligner:
            raise SemsrError(
                "the store's references were retrieved with another aligner than model.options.aligner "
                "(or no_aligner); rebuild them with the same --aligner / --no-aligner",
                self.store.root,
            )
        refs = sorted({r for lr in lr_files for r in self.store.tags(lr, RFA_REFS)[: self.k]})
        require_priors(self.store, refs, ("rfa-tokens",))
        short = [lr for lr in lr_files if len(self.store.tags(lr, RFA_REFS)) < self.k]
        if short:
            raise SemsrError(f"the store has fewer than {self.k} references of this image (--num-refs)", short[0])
        tok = self.store.array(lr_files[0], "rfa-tokens")
        c = self.enhancer.config
        if tuple(tok.shape) != (c.num_tokens, c.token_dim):
            raise SemsrError(
                f"stored tokens are {tuple(tok.shape)}, the enhancer takes {(c.num_tokens, c.token_dim)}",
                self.store.root,
            )

    def _array(self, image: str | Path, prior: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.store.array(image, prior))).float()

    @torch.no_grad()
    def __call__(self, lr_files: Sequence[str | Path]) -> torch.Tensor:
        """``(B, D)`` unit enhanced embeddings of the LR files."""
        out = []
        for lr in lr_files:
            key = str(lr)
            if key not in self._memo:
                tok = self._array(lr, "rfa-tokens")[None]
                refs = self.store.tags(lr, RFA_REFS)[: self.k]
                ref = torch.stack([self._array(r, "rfa-tokens") for r in refs])[None]
                self._memo[key] = F.normalize(self.enhancer(tok, ref)[0], dim=-1)[0]
            out.append(self._memo[key])
        return torch.stack(out)


class ControlNetWithAdaIN(nn.Module):
    """Trainable container: ``forward`` runs the ControlNet; ``adain`` and ``controlnet_adain`` hold the
    adapters of the UNet and of the ControlNet."""

    def __init__(self, controlnet: nn.Module, adain: AdaINAdapters, controlnet_adain: AdaINAdapters) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.adain = adain
        self.controlnet_adain = controlnet_adain

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.controlnet(*args, **kwargs)


@register_task("rfa-sr")
class RFASRTask(ControlNetSRTask):
    """SD + partly trainable ControlNet + AdaIN adapters on both, controlled by the enhancer's embedding
    (see module docstring)."""

    OPTIONS = {"conditioning_channels", *RFA_OPTIONS}

    def __init__(self, cfg: ExperimentConfig) -> None:
        opts = dict(cfg.model.options)
        for key in ("embedder", "enhancer", "db"):
            if not opts.get(key):
                raise SemsrError(f"rfa-sr needs model.options.{key} (see configs/rfa.yaml)")
        own = {k: opts.pop(k) for k in RFA_OPTIONS if k in opts}
        cfg.model.options = opts  # the base class validates the rest
        try:
            super().__init__(cfg)
        finally:
            cfg.model.options = {**opts, **own}
        self.store = open_prior_store(cfg)
        self.lr_embedding = lr_embedding_mode(cfg, self.store, own.get("lr_embedding"))
        spec = resolve_embedder_spec(str(own["embedder"]))
        with torch.random.fork_rng():  # loading the stage-1 parts leaves the RNG as it is
            folder = resolve_model_path(str(own["enhancer"]))
            enhancer = load_component(EmbeddingEnhancer, folder)
            # from the store, the embedder is not loaded: its shapes are the enhancer's (checked on the store)
            emb: Any = embedder_from_spec(spec) if self.lr_embedding == "crop" else StoredEmbedder.of(spec, enhancer)
            check_embedder(enhancer, emb, folder)
            if enhancer.config.out_dim != emb.dim:
                raise SemsrError(f"the enhancer gives {enhancer.config.out_dim}-d embeddings, {emb.spec} {emb.dim}-d")
            aligner = retrieval_aligner(own, emb, "rfa-sr")
        self.stage1: dict[str, Component] = {"enhancer": enhancer}  # exported with the adapters
        if aligner is not None:
            self.stage1["aligner"] = aligner
        self.db = db = ReferenceDB(resolve_model_path(str(own["db"])))
        if db.embedder_spec != emb.spec:
            raise SemsrError(
                f"database embedder {db.embedder_spec!r} differs from model.options.embedder {emb.spec!r}", db.folder
            )
        db.check_dim(emb.dim)
        self.num_refs = min(int(own.get("num_refs", enhancer.config.num_refs)), enhancer.config.num_refs)
        self.own, self.enhancer, self.aligner = own, enhancer, aligner
        self._enhanced: EnhancedEmbedding | None = None
        self.stored: StoredEnhancedEmbedding | None = None
        if self.lr_embedding == "crop":
            self.hashes = TrainingHashes(cfg) if bool(own.get("exclude_self", True)) else None
            self.live_embedding()
        else:
            assert self.store is not None
            if not bool(own.get("exclude_self", True)):
                raise SemsrError(
                    "the stored references skip the training image itself; exclude_self: false needs "
                    "model.options.lr_embedding: crop"
                )
            self.hashes = None
            fp = aligner_fingerprint(own.get("aligner") if aligner is not None else None, spec)
            self.stored = StoredEnhancedEmbedding(self.store, enhancer, spec, self.num_refs, fp)
            self.stored.check(training_lr_files(cfg.data))
        self.text_decoder = resolve_model_path(str(own["text_decoder"])) if own.get("text_decoder") else None
        controlnet = self.trainable
        set_trainable(controlnet, own.get("controlnet_trainable", CONTROLNET_TRAINABLE))
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            unet_adain = attach_adain(self.unet, AdaINAdapters.for_model(self.unet, control_dim=int(emb.dim)))
            cn_adain = attach_adain(controlnet, AdaINAdapters.for_model(controlnet, control_dim=int(emb.dim)))
        self.trainable = ControlNetWithAdaIN(
            controlnet,
            unet_adain.float().train().requires_grad_(True),
            cn_adain.float().train().requires_grad_(True),
        )

    def live_embedding(self) -> EnhancedEmbedding:
        """Stage 1 run on LR images (``lr_embedding: crop``, and validation, which runs inference): the embedder
        and the database references, built on first use."""
        if self._enhanced is None:
            emb = embedder_from_spec(resolve_embedder_spec(str(self.own["embedder"])))
            refs = ReferenceTokens(self.db, emb, self.aligner, self.num_refs, int(self.own.get("ref_cache", 1024)))
            self._enhanced = EnhancedEmbedding(emb, self.enhancer, refs)
        return self._enhanced

    @property
    def enhanced(self) -> EnhancedEmbedding:
        """The live stage 1 (:meth:`live_embedding`)."""
        return self.live_embedding()

    @property
    def embedder(self) -> Embedder:
        """The embedder of the live stage 1 (loaded on first use)."""
        return self.live_embedding().embedder

    def control(self, lr: torch.Tensor, positions: Sequence[int] | None = None) -> torch.Tensor:
        """The AdaIN control ``(B, D)`` of LR crops ``(B, 3, h, w)``: the enhancer's embedding, the training
        images at ``positions`` excluded from the references (see :class:`EnhancedEmbedding`)."""
        exclude = [self.hashes(p) for p in positions] if positions is not None and self.hashes is not None else None
        return self.live_embedding()(lr, exclude).to(self.device)

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """As ``controlnet_sr`` with the AdaIN control of :meth:`control` on ``batch["lr"]``."""
        if self.stored is not None:  # the stored control of each crop's whole LR file
            control = self.stored(list(batch["lr_path"])).to(self.device)
        else:
            control = self.control(batch["lr"], [int(p) for p in batch["position"]])
        with adain_control(self._adapters(model), control.to(self.weight_dtype)):
            return super().compute(model, batch)

    def _adapters(self, model: nn.Module) -> tuple[AdaINAdapters, AdaINAdapters]:
        """The adapters of ``model`` (a container, DDP-wrapped or plain), attached to the UNet and to its
        ControlNet."""
        inner = getattr(model, "module", model)
        return attach_adain(self.unet, inner.adain), attach_adain(inner.controlnet, inner.controlnet_adain)

    @torch.no_grad()
    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """SR with the copy's ControlNet and adapters, controlled by the enhancer's embedding of ``lr``."""
        adapters = self._adapters(model)
        with adain_control(adapters, self.control(lr).to(self.weight_dtype)):
            return super().sample(model.controlnet, lr, prompts, steps, guidance_scale, seed)

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write ``folder/controlnet`` and the RFA checkpoint ``folder/rfa`` (see the module docstring)."""
        model.controlnet.save_pretrained(Path(folder) / "controlnet", safe_serialization=True)
        parts = {**self.stage1, "adain": model.adain, "controlnet_adain": model.controlnet_adain}
        save_rfa_checkpoint(Path(folder) / "rfa", parts, self.text_decoder)
