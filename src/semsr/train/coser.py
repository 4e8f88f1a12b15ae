"""CoSeR training: ``coser-cognitive`` (stage 1) and ``coser-sr`` (stage 2) tasks, and their loss terms.

**Stage 1, ``coser-cognitive``** — the cognitive encoder
(:mod:`semsr.models.cognitive`): pre-SR (trainable SRResNet by default) ->
frozen CLIP vision tower -> Q-Former adapter. Outputs ``cognitive`` ``(B, Te,
D)`` and ``text_tokens``, the caption's SD text-encoder token embeddings
aligned to ``Te`` tokens (CoSeR's alignment, :func:`~semsr.models.cognitive.text_token_targets`);
loss ``cognitive_mse``. ``pre_sr_l1`` (L1 of the pre-SR output to the HR
image) is available but off by default, as in CoSeR's code, where the pre-SR
learns through the adapter loss only. Captions come from the corpus manifest
(``data.manifest``, prior ``data.caption_prior``) or ``data.prompt``; a
training image without a caption while ``data.prompt`` is empty is an error
(the encoder would learn the empty prompt's tokens).
Exports ``final/``: a CoSeR checkpoint with the ``cognitive`` component only.

``model.options``: ``clip`` (CLIP vision folder, required), ``num_queries``
(50), ``qformer`` (``Blip2QFormerConfig`` fields), ``pre_sr`` (``{kind:
srresnet|bicubic|method, ...}``), ``clip_layer`` (-2), ``train_pre_sr``
(true), ``max_lr_side`` (128), ``init`` (a cognitive checkpoint to continue).

**Stage 2, ``coser-sr``** — AiA (:mod:`semsr.fusion.aia`): frozen SD and
cognitive encoder; trainable AiA blocks and the LR/reference control branches
(ControlNets, or the attention-free encoders with ``control: encoder``); loss
``eps_mse``. Context = the cognitive embedding ``(B, Te, D)`` alone, replaced
by the null context (the empty prompt's token embeddings aligned to ``Te``)
with probability ``train.null_prompt_prob``. The reference is, as in CoSeR's
training, another training image (a seeded random crop of it), replaced by
VAE(zeros) with probability ``reference_drop_prob``: one of the
``reference_top_k`` most CLIP-similar images *of the same class* when the
images carry labels (ImageNet-style class folders: ``data.hr`` roots holding
one sub-folder per class), else of all training images
(:class:`NeighbourReferences`, ``reference_pool``). The prediction is the
inference forward, :meth:`AiAFusion.forward <semsr.fusion.aia.AiAFusion.forward>`.
Exports ``final/``: a complete CoSeR checkpoint (``cognitive`` + ``aia``), the
``--checkpoint`` folder of ``semsr upscale --method coser``.

``model.options``: ``clip`` and ``cognitive`` (stage-1 checkpoint folder or its
``cognitive/`` component), required; ``init`` (AiA weights to continue: a
checkpoint folder or its ``aia/`` component), ``reference_top_k`` (10),
``reference_drop_prob`` (0.1), ``reference_pool`` (``auto``: same class when
every image has a class folder, CLIP neighbours when none has; ``class``;
``clip``), ``init_from_self_attention`` (true), ``control`` (``controlnet``
or ``encoder``, see :mod:`semsr.fusion.aia`), ``lr_embedding`` (``image``, the default with ``data.priors``:
the stored cognitive embedding of the crop's whole LR file, no CLIP model in the loop; ``crop``, the
default without: the cognitive encoder on each LR crop, as the paper).

Prior store (``data.priors`` of ``semsr priors build --recipe coser``, with ``data.pairs``): the
reference pool's CLIP embeddings and neighbour lists (:class:`NeighbourReferences`) and, under
``lr_embedding: image``, the cognitive embeddings (``coser-cognitive``, of the encoder given as
``cognitive``: checked by fingerprint) come from it. Validation (inference) attaches CLIP on first use.

Paths may be ``tiny://NAME[/SUB]`` (:func:`semsr.testing.tiny.resolve_model_path`:
``tiny://`` is the tiny SD, ``tiny://clip-vision``, ``tiny://coser``...).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import save_checkpoint
from semsr.core.errors import SemsrError
from semsr.core.fingerprint import fingerprint
from semsr.core.loading import load_clip_tokenizer, load_sd, load_transformers_model
from semsr.core.paths import cache_dir
from semsr.fusion.aia import AiAFusion, install_aia
from semsr.methods.coser import COSER_NEGATIVE, CoSeROptions, CoSeRSR, load_part
from semsr.models.cognitive import (
    RECIPE,
    CLIPVisionTower,
    CognitiveEncoder,
    build_cognitive_encoder,
    load_clip_vision,
    load_cognitive_encoder,
    text_token_targets,
)
from semsr.ops.imresize import imresize
from semsr.pipeline.latent_sr import make_hint
from semsr.pipeline.text import CLIPTextConditioner, MiniLMTextEncoder, PromptEncoder, load_text_conditioner
from semsr.priors.base import PriorResult
from semsr.priors.cache import PriorStore, image_id
from semsr.priors.clip_embed import (
    COSER_CLIP,
    COSER_COGNITIVE,
    COSER_NEIGHBOURS,
    centre_square,
    cognitive_fingerprint,
    pool_embeddings,
)
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.data import CropDataset, ImageItem, expand_path, list_images, load_image, to_tensor
from semsr.train.losses import _require, register_loss
from semsr.train.priors import (
    lr_embedding_mode,
    open_prior_store,
    require_priors,
    training_items,
    training_lr_files,
)
from semsr.train.tasks import LatentDiffusionTask, NoisedBatch, Task, register_task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loading


def load_text_only(path: Path) -> nn.Module:
    """Just the conditioning text encoder of an SD folder (CLIP, or MiniLM + projection)."""
    from transformers import CLIPTextModel  # heavy dependency, imported on use

    if path.is_dir() and (path / "text_encoder").is_dir():
        return CLIPTextConditioner(
            load_clip_tokenizer(path / "tokenizer"),
            load_transformers_model(CLIPTextModel, path / "text_encoder", what="text encoder"),
        )
    if path.is_dir() and (path / "text_projection").is_dir():
        return MiniLMTextEncoder.from_projection(path / "text_projection")
    return load_text_conditioner(load_sd(path))  # single files and other layouts: load the whole checkpoint


def _options(cfg: ExperimentConfig, allowed: set[str], required: tuple[str, ...]) -> dict[str, Any]:
    opts = dict(cfg.model.options)
    unknown = set(opts) - allowed
    if unknown:
        raise SemsrError(f"unknown model.options for {cfg.task}: {sorted(unknown)} (known: {sorted(allowed)})")
    for key in required:
        if not opts.get(key):
            raise SemsrError(f"{cfg.task} needs model.options.{key}")
    return opts


# ----------------------------------------------------------------------------- losses


@register_loss("cognitive_mse")
def cognitive_mse(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """MSE between the cognitive embedding and the aligned caption token embeddings (both ``(B, Te, D)``)."""
    _require(outputs, "cognitive_mse", "cognitive", "text_tokens")
    return F.mse_loss(outputs["cognitive"].float(), outputs["text_tokens"].float())


@register_loss("pre_sr_l1")
def pre_sr_l1(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 between the pre-SR output ``(B, 3, H', W')`` and the HR crop resized to ``H' x W'``."""
    _require(outputs, "pre_sr_l1", "pre_sr", "hr")
    pre, hr = outputs["pre_sr"].float(), outputs["hr"].float()
    if hr.shape[-2:] != pre.shape[-2:]:
        hr = imresize(hr, size=tuple(pre.shape[-2:])).clamp(0, 1)
    return F.l1_loss(pre, hr)


# ----------------------------------------------------------------------------- stage 1


@register_task("coser-cognitive")
class CoSeRCognitiveTask(Task):
    """Stage 1: train the cognitive encoder's adapter (and pre-SR) to predict caption token embeddings."""

    OPTIONS = {"clip", "num_queries", "qformer", "pre_sr", "clip_layer", "train_pre_sr", "max_lr_side", "init"}

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        opts = _options(cfg, self.OPTIONS, ("clip",))
        if not cfg.data.prompt.strip():
            train, _ = list_images(cfg.data, cfg.data.crop_size)
            bare = [it.path for it in train if not (it.caption or "").strip()]
            if bare:
                raise SemsrError(
                    f"coser-cognitive learns caption tokens, but {len(bare)} training image(s) have no caption "
                    "(set data.manifest with data.caption_prior, or data.prompt)",
                    bare[0],
                )
        self.text = load_text_only(resolve_model_path(cfg.model.pretrained)).requires_grad_(False).eval()
        clip = load_clip_vision(
            resolve_model_path(str(opts["clip"])), layer=int(opts.get("clip_layer", -2)), require_processor=True
        )
        if opts.get("init"):
            encoder = load_cognitive_encoder(resolve_model_path(str(opts["init"])), clip)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                encoder = build_cognitive_encoder(
                    clip,
                    text_width=int(self.text.width),
                    num_queries=int(opts.get("num_queries", 50)),
                    pre_sr=opts.get("pre_sr"),
                    qformer=opts.get("qformer"),
                    max_lr_side=int(opts.get("max_lr_side", 128)),
                )
        if encoder.text_width != int(self.text.width):
            raise SemsrError(f"cognitive encoder width {encoder.text_width} != text encoder width {self.text.width}")
        encoder.pre_sr.requires_grad_(bool(opts.get("train_pre_sr", True)))
        self.trainable = encoder.float().train()
        te = encoder.num_queries
        self.targets = PromptEncoder(lambda prompts: text_token_targets(self.text, prompts, te))
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device, self.weight_dtype = device, weight_dtype
        self.text.to(device=device, dtype=weight_dtype)
        self.targets.clear()

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``cognitive``/``text_tokens`` ``(B, Te, D)``, ``pre_sr`` ``(B, 3, 4h, 4w)`` and ``hr``."""
        lr = batch["lr"].to(self.device)
        cognitive, pre_sr = model(lr)
        targets = self.targets(list(batch["prompt"])).to(self.device, torch.float32)
        return {"cognitive": cognitive, "text_tokens": targets, "pre_sr": pre_sr, "hr": batch["hr"].to(self.device)}

    @torch.no_grad()
    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """The pre-SR output at ``data.scale`` (what the CLIP tower sees), ``(B, 3, s*h, s*w)``."""
        out = model.pre_sr(lr.to(self.device)).float().clamp(0, 1)
        size = (lr.shape[-2] * self.cfg.data.scale, lr.shape[-1] * self.cfg.data.scale)
        return out if tuple(out.shape[-2:]) == size else imresize(out, size=size).clamp(0, 1)

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write a CoSeR checkpoint with the ``cognitive`` component (pre-SR + adapter) into ``folder``."""
        save_checkpoint(folder, RECIPE, {"cognitive": model})


# ----------------------------------------------------------------------------- stage 2


#: ``model.options.reference_pool`` values of ``coser-sr``.
REFERENCE_POOLS = ("auto", "class", "clip")


def class_labels(items: list[ImageItem], roots: list[Path]) -> list[str | None]:
    """Class label of every training image: the name of its sub-folder when it sits in a class folder of a
    ``data.hr`` root (``root/<class>/<image>``, ImageNet-style), else None."""
    resolved = [r.resolve() for r in roots]
    labels: list[str | None] = []
    for item in items:
        parent = item.path.resolve().parent
        labels.append(parent.name if parent.parent in resolved else None)
    return labels


class NeighbourReferences:
    """Training references: for the training image a crop comes from, one of its ``top_k`` most
    CLIP-similar *other* training images (seeded choice), cropped at the crop size; with ``pool="class"``
    only images of the same class are candidates (CoSeR's ImageNet training: same-class images ranked by
    CLIP similarity).

    ``pool="auto"`` is ``class`` when every training image has a class label (:func:`class_labels`) and
    ``clip`` when none has; a mix is an error, as is an image with no other candidate (a lone image, or a
    class with one image): its reference would be itself. :attr:`pool` is the pool used.

    Embeddings are the CLIP tower's pooled image embeddings of a centre square of every training image
    (prior ``coser-clip``, :mod:`semsr.priors.clip_embed`). With a prior ``store`` (``data.priors``, from
    ``semsr priors build --recipe coser``) they, and the neighbour lists ``coser-neighbours``, are read
    from it and no CLIP model is needed (``clip`` may be None); a stored list narrowed to the training
    images (and the class) is used when it still holds ``top_k`` candidates (or all there are), else the
    ranking is recomputed from the stored embeddings. Without a store, ``clip`` embeds the images that
    have no embedding yet in the per-CLIP-model store ``<cache>/coser-clip-store/<model>/`` (batched,
    resumable; an image whose file changed is embedded again), so resumed runs and the other processes
    of a multi-process run (the task is built on the main process first) only read them.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        clip: CLIPVisionTower | None,
        top_k: int = 10,
        *,
        pool: str = "auto",
        clip_dir: Path | None = None,
        batch: int = 16,
        store: PriorStore | None = None,
    ) -> None:
        if pool not in REFERENCE_POOLS:
            raise SemsrError(f"model.options.reference_pool must be one of {', '.join(REFERENCE_POOLS)}, got {pool!r}")
        items = training_items(cfg.data)
        self.items = items
        labels = class_labels(items, [expand_path(h) for h in cfg.data.hr])
        labelled = sum(label is not None for label in labels)
        if pool == "auto":
            if 0 < labelled < len(items):
                raise SemsrError(
                    f"{labelled} of {len(items)} training images are in class folders: set "
                    "model.options.reference_pool to class (same-class references) or clip (CLIP neighbours)"
                )
            pool = "class" if labelled else "clip"
        if pool == "class" and labelled < len(items):
            missing = items[labels.index(None)].path
            raise SemsrError(
                "model.options.reference_pool is class but this training image is not in a class folder "
                "(data.hr roots must hold one sub-folder per class)",
                missing,
            )
        self.pool = pool
        self.labels = labels
        self.dataset = CropDataset(items, cfg.data, lambda hr, seed: hr, cfg.seed)  # positions -> image, crops
        k = max(1, int(top_k))
        names = sorted({str(label) for label in labels})
        codes = torch.tensor([names.index(str(label)) for label in labels])
        if store is not None:
            require_priors(store, [it.path for it in items], (COSER_CLIP,))
        stored = self._stored_neighbours(store, codes, k) if store is not None else None
        if stored is not None:
            #: per training image, the indices of its (up to) ``top_k`` candidates, most similar first
            self.neighbours = stored
            how = "stored"
        else:
            self.neighbours = self._rank(self._embeddings(clip, clip_dir, batch, store), codes, k)
            how = "ranked"
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        log.info("CoSeR references: %d training images, top-%d CLIP neighbours (%s pool, %s)", len(items), k, pool, how)

    def _candidates(self, codes: torch.Tensor) -> torch.Tensor:
        """``(N,)`` how many other images each image may take a reference from; an image with none is an error."""
        if self.pool == "class":
            counts = torch.bincount(codes)[codes] - 1
        else:
            counts = torch.full((len(codes),), len(codes) - 1)
        if int(counts.min()) < 1:
            lone = int(counts.argmin())
            what = f"class {self.labels[lone]!r} has" if self.pool == "class" else "the training set has"
            raise SemsrError(
                f"{what} no other image to take a reference from (CoSeR references are other training images)",
                self.items[lone].path,
            )
        return counts

    def _rank(self, emb: torch.Tensor, codes: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Per image the indices of its up to ``k`` most similar candidates, from embeddings ``(N, Hc)``."""
        candidates = self._candidates(codes)
        emb = F.normalize(emb.float(), dim=-1)
        sims = emb @ emb.T
        sims.fill_diagonal_(-float("inf"))  # never the image itself
        if self.pool == "class":
            sims = sims.masked_fill(codes[:, None] != codes[None, :], -float("inf"))
        return [row.topk(min(k, int(n))).indices for row, n in zip(sims, candidates, strict=True)]

    def _stored_neighbours(self, store: PriorStore, codes: torch.Tensor, k: int) -> list[torch.Tensor] | None:
        """The stored ``coser-neighbours`` narrowed to the training images (and class); None when an image has
        no list or its narrowed list is shorter than ``min(k, candidates)`` (then rank from the embeddings)."""
        candidates = self._candidates(codes)
        done = store.done(COSER_NEIGHBOURS)
        ids = [image_id(it.path) for it in self.items]
        if any(i not in done for i in ids):
            return None
        index = {name: i for i, name in enumerate(ids)}
        rows = []
        for i, name in enumerate(ids):
            found = [index[n] for n in store.tags(name, COSER_NEIGHBOURS) if n in index and index[n] != i]
            if self.pool == "class":
                found = [j for j in found if int(codes[j]) == int(codes[i])]
            if len(found) < min(k, int(candidates[i])):
                return None
            rows.append(torch.tensor(found[:k], dtype=torch.long))
        return rows

    def _embeddings(
        self, clip: CLIPVisionTower | None, clip_dir: Path | None, batch: int, store: PriorStore | None
    ) -> torch.Tensor:
        """``(N, Hc)`` pooled CLIP embeddings of the training images: from ``store``, else from the per-model
        store in the cache, embedding the images it lacks (see the class docstring)."""
        paths = [it.path for it in self.items]
        if store is None:
            if clip is None:
                raise SemsrError("CoSeR references need a CLIP model or a prior store (data.priors)")
            model = (
                fingerprint([clip_dir]) if clip_dir else hashlib.sha256(repr(clip.model.config).encode()).hexdigest()
            )
            store = PriorStore(cache_dir() / "coser-clip-store" / model[:32], create=True)
            self._embed_missing(store, clip, paths, batch)
        return torch.stack([torch.from_numpy(np.array(store.array(p, COSER_CLIP))).float() for p in paths])

    @staticmethod
    def _embed_missing(store: PriorStore, clip: CLIPVisionTower, paths: list[Path], batch: int) -> None:
        """Embed into ``store`` the images of ``paths`` it lacks or whose file changed since (size, mtime)."""

        def stamp(path: Path) -> dict[str, int]:
            st = path.stat()
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

        done = store.done(COSER_CLIP)
        todo = [p for p in paths if image_id(p) not in done or store.meta(p, COSER_CLIP) != stamp(p)]
        for start in range(0, len(todo), max(1, batch)):
            chunk = todo[start : start + max(1, batch)]
            imgs = torch.cat([centre_square(to_tensor(load_image(p))[None], clip.image_size) for p in chunk])
            emb = pool_embeddings(clip, imgs)
            store.put_many(
                (p, COSER_CLIP, PriorResult("embedding", e[None], stamp(p))) for p, e in zip(chunk, emb, strict=True)
            )

    def _image(self, path: Path) -> np.ndarray:
        img = self._cache.get(path)
        if img is None:
            img = self._cache[path] = load_image(path)
            if len(self._cache) > 64:
                self._cache.popitem(last=False)
        return img

    def neighbour(self, position: int, gen: torch.Generator) -> int:
        """Index of the reference image for the sample at ``position``."""
        row = self.neighbours[self.dataset.index_at(int(position))]
        return int(row[int(torch.randint(len(row), (), generator=gen))])

    def batch(self, positions: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """``(B, 3, S, S)`` reference crops in [0, 1] for the samples at ``positions``."""
        out = []
        for pos, gen in zip(positions.tolist(), gens, strict=True):
            j = self.neighbour(pos, gen)
            out.append(self.dataset.crop(self._image(self.items[j].path), int(pos)))
        return torch.stack(out)


@register_task("coser-sr")
class CoSeRSRTask(LatentDiffusionTask):
    """Stage 2: AiA blocks + LR/reference encoders on a frozen SD UNet, eps-MSE."""

    OPTIONS = {
        "clip",
        "cognitive",
        "init",
        "reference_top_k",
        "reference_drop_prob",
        "reference_pool",
        "init_from_self_attention",
        "control",
        "lr_embedding",
    }

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        opts = _options(cfg, self.OPTIONS, ("clip", "cognitive"))
        self.store = open_prior_store(cfg)
        self.lr_embedding = lr_embedding_mode(cfg, self.store, opts.get("lr_embedding"))
        self.load_frozen_sd(resolve_model_path(cfg.model.pretrained))
        self.unet = install_aia(self.unet)
        self.clip_dir = clip_dir = resolve_model_path(str(opts["clip"]))
        # with the store, no CLIP model in the loop: the cognitive embeddings and the reference pool are stored
        clip = load_clip_vision(clip_dir, require_processor=True) if self.lr_embedding == "crop" else None
        cognitive_path = resolve_model_path(str(opts["cognitive"]))
        self.cognitive: CognitiveEncoder = load_cognitive_encoder(cognitive_path, clip)
        self.cognitive.requires_grad_(False).eval()
        if self.cognitive.text_width != int(self.unet.config.cross_attention_dim):
            raise SemsrError(
                f"cognitive encoder width {self.cognitive.text_width} != UNet cross-attention width "
                f"{self.unet.config.cross_attention_dim}"
            )
        if self.lr_embedding == "image":
            assert self.store is not None
            self._check_stored_cognitive(self.store, training_lr_files(cfg.data), cognitive_path)
        self.null_tokens = PromptEncoder(lambda p: text_token_targets(self.text, p, self.cognitive.num_queries))
        if opts.get("init"):
            fusion = load_part(resolve_model_path(str(opts["init"])), "aia", AiAFusion)
            fusion.check_unet(self.unet)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                fusion = AiAFusion.from_unet(
                    self.unet,
                    init_from_self_attention=bool(opts.get("init_from_self_attention", True)),
                    control=str(opts.get("control", "controlnet")),
                )
        self.trainable = fusion.float().train().requires_grad_(True)
        self.reference_drop_prob = float(opts.get("reference_drop_prob", 0.1))
        if not 0.0 <= self.reference_drop_prob <= 1.0:
            raise SemsrError("model.options.reference_drop_prob must be in [0, 1]")
        self._zero_latents: dict[tuple[int, int], torch.Tensor] = {}
        self.references = NeighbourReferences(
            cfg,
            clip if self.store is None else None,
            int(opts.get("reference_top_k", 10)),
            pool=str(opts.get("reference_pool", "auto")),
            clip_dir=clip_dir,
            store=self.store,
        )

    def _check_stored_cognitive(self, store: PriorStore, lr_files: list[Path], cognitive_path: Path) -> None:
        """One-line error before training when a stored cognitive embedding is missing, of another shape or
        of another cognitive encoder than ``model.options.cognitive``."""
        require_priors(store, lr_files, (COSER_COGNITIVE,))
        if not lr_files:
            return
        shape = tuple(store.array(lr_files[0], COSER_COGNITIVE).shape)
        want = (self.cognitive.num_queries, self.cognitive.text_width)
        if shape != want:
            raise SemsrError(f"stored cognitive embeddings are {shape}, the cognitive encoder gives {want}", store.root)
        if store.meta(lr_files[0], COSER_COGNITIVE).get("cognitive") != cognitive_fingerprint(cognitive_path):
            raise SemsrError(
                "the store's cognitive embeddings were made by another cognitive encoder than "
                "model.options.cognitive (rebuild them: semsr priors build --recipe coser --cognitive ...)",
                store.root,
            )

    def stored_cognitive(self, lr_files: list[str]) -> torch.Tensor:
        """``(B, Te, D)`` stored cognitive embeddings of the whole LR files (``lr_embedding: image``)."""
        assert self.store is not None
        arrays = [torch.from_numpy(np.array(self.store.array(f, COSER_COGNITIVE))) for f in lr_files]
        return torch.stack(arrays).to(self.device, self.weight_dtype)

    def attach_clip(self) -> None:
        """Attach the CLIP tower to the cognitive encoder when it has none (validation runs inference)."""
        if self.cognitive.clip is None:
            clip = load_clip_vision(
                self.clip_dir, layer=int(self.cognitive.config["clip_layer"]), require_processor=True
            )
            self.cognitive.attach_clip(clip)
            self.cognitive.to(self.device, self.weight_dtype)

    def frozen_modules(self) -> list[nn.Module]:
        return [*super().frozen_modules(), self.cognitive]

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().setup(device, weight_dtype)
        self.null_tokens.clear()
        self._zero_latents.clear()

    @torch.no_grad()
    def conditions(
        self,
        lr: torch.Tensor,
        positions: torch.Tensor,
        gens: list[torch.Generator],
        size: tuple[int, int],
        lr_files: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(context (B, Te, D), z_lr (B, 4, h, w), z_ref (B, 4, h, w))`` with the per-sample drop-outs.

        The cognitive embedding is of the LR crops ``lr``, or (``lr_embedding: image``) the stored one of
        their whole LR files ``lr_files``. Draws per sample, in order: cognition drop, reference drop,
        reference choice.
        """
        bsz = lr.shape[0]
        p_null = self.cfg.train.null_prompt_prob
        keep_cog = torch.tensor([float(torch.rand((), generator=g)) >= p_null for g in gens], device=self.device)
        keep_ref = torch.tensor(
            [float(torch.rand((), generator=g)) >= self.reference_drop_prob for g in gens], device=self.device
        )
        if self.lr_embedding == "image":
            if lr_files is None:
                raise SemsrError("lr_embedding: image needs the batch's LR files (data.pairs)")
            cog = self.stored_cognitive(lr_files)
        else:
            cog = self.cognitive.embed(lr.to(self.device, self.weight_dtype)).to(self.weight_dtype)
        null = self.null_tokens([""] * bsz).to(self.device, self.weight_dtype)
        context = torch.where(keep_cog[:, None, None], cog, null)
        z_lr = self.vae_mode(make_hint(lr, size))
        z_ref = self.vae_mode(self.references.batch(positions, gens))
        if size not in self._zero_latents:  # VAE(zeros): zero in the VAE's [-1, 1] input range
            self._zero_latents[size] = self.vae_mode(torch.full((1, 3, *size), 0.5))
        z_zero = self._zero_latents[size].expand_as(z_ref)
        return context, z_lr, torch.where(keep_ref[:, None, None, None], z_ref, z_zero)

    def predict(self, model: nn.Module, step: NoisedBatch) -> dict[str, Any]:
        """``pred (B, 4, h, w)`` of the AiA UNet; draws those of :meth:`conditions` after the base task's."""
        files = list(step.batch["lr_path"]) if "lr_path" in step.batch else None
        context, z_lr, z_ref = self.conditions(
            step.lr, step.batch["position"], step.gens, tuple(step.hr.shape[-2:]), files
        )
        noisy = step.noisy.to(self.weight_dtype)
        return {
            "pred": model(
                self.unet, noisy, step.timesteps, context, z_lr.to(self.weight_dtype), z_ref.to(self.weight_dtype)
            )
        }

    @torch.no_grad()
    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """The full CoSeR pipeline (reference generation, uncached, + AiA SR) with ``model`` as the AiA weights;
        conditioned on the cognitive embedding alone (``prompts``, the captions, take no part), the negative
        prompt is CoSeR's.

        The pipeline casts and freezes ``model``: pass a copy, never the trained module.
        """
        self.attach_clip()
        pipe = CoSeRSR(
            vae=self.vae,
            unet=self.unet,
            text=self.text,
            cognitive=self.cognitive,
            fusion=model,
            scheduler_config=self.components.scheduler_config,
            device=self.device,
            dtype=self.weight_dtype,
            scale=self.cfg.data.scale,
        )
        options = CoSeROptions(negative_prompt=COSER_NEGATIVE, steps=steps, guidance_scale=guidance_scale, seed=seed)
        return pipe(lr, options).images

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write a complete CoSeR checkpoint (``cognitive`` + ``aia``) into ``folder``."""
        save_checkpoint(folder, RECIPE, {"cognitive": self.cognitive, "aia": model})
