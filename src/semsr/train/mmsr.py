"""MMSR training task (``task: mmsr``): Multimodal Latent Connector + widened conv_in on a frozen SD UNet.

Per micro-batch (HR crop, degraded LR, caption, seed)::

    hint = bicubic(LR) to the HR size          z_LR = VAE mode(hint)        z_0 = VAE sample(HR)
    spatial modalities of the hint (edge/depth/seg providers, uncached) --VQ--> (B, 256, 256) each
    caption -> text tokens (B, 77, D)          (caption -> "" with train.null_prompt_prob, text CFG)
    every modality (caption included) -> its null token with model.options.modality_drop_prob (10 %)
    eps-MSE on UNet([z_t ; z_LR], t, connector(caption, modalities))

``model.options``:
    ``modalities``: spatial modalities (default ``[edge, depth, seg]``);
    ``depth_model`` / ``seg_model``: transformers folders (``tiny://depth``, ``tiny://seg`` for the tiny ones);
    ``vq``: one tokenizer for every map (a VQGAN: diffusers folder or taming .safetensors, as the paper);
    ``depth_vq`` / ``seg_vq``: per-modality tokenizers (DepthVQ / SegVQ folders from tasks ``depth-vq`` /
    ``seg-vq``; ``tiny://vq-depth``, ``tiny://vq-seg``); edges default to the shipped edge VQ; a depth or
    seg modality without a tokenizer is an error; ``edge``: ``canny`` (default) or ``hed``;
    ``modality_drop_prob``: null-token substitution probability per modality (0.1);
    ``connector``: :class:`~semsr.fusion.mmlc.MultimodalLatentConnector` arguments (``num_latents``, ``heads``,
    ``cross_layers``, ``self_layers``, ``mlp_ratio``); width and text width follow the UNet / text encoder;
    ``init``: an MMSR checkpoint folder to continue from;
    ``train_cross_attention``: train (copies of) the UNet's cross-attention layers (``attn2``), which
    read the connector's tokens instead of the CLIP text tokens they were trained on (default true: the
    paper does not say which UNet parts train, and a frozen cross-attention would read foreign tokens;
    false trains only the connector and conv_in).

With ``data.priors: STORE`` (``semsr priors build --recipe mmsr``, with ``data.pairs``) the edge / depth
/ seg maps are read from the store (each LR file's maps at its HR size, cropped at the sample's HR box
and mirrored with it) and only tokenized here: no depth / seg / edge model is built for training (the
frozen tokenizers are part of the model). VQ tokens themselves are not cached: they depend on the crop.

Trainable: the connector, the widened conv_in and the UNet's cross-attention layers (the rest is
frozen). Depth / seg models run on the training device. Export: an MMSR checkpoint folder
(:func:`semsr.methods.mmsr.save_mmsr`) with semsr's own tokenizers inside (``vq_<m>/``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.components import read_index
from semsr.core.errors import SemsrError
from semsr.fusion.mmlc import CAPTION, SPATIAL_MODALITIES, MultimodalLatentConnector
from semsr.fusion.mmsr_conditioning import MMSRConditioning
from semsr.methods.mmsr import MMSR, MMSROptions, load_mmsr, load_mmsr_tokenizers, save_mmsr
from semsr.models.vq import EdgeVQ, SpatialTokenizer, check_modality_tokenizer, load_tokenizer
from semsr.pipeline.latent_sr import make_hint
from semsr.priors.mmsr import ModalityTokens
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.priors import open_prior_store
from semsr.train.tasks import LatentDiffusionTask, NoisedBatch, register_task

_CONNECTOR_KEYS = {"num_latents", "heads", "cross_layers", "self_layers", "mlp_ratio"}


@register_task("mmsr")
class MMSRTask(LatentDiffusionTask):
    """See the module docstring."""

    OPTIONS = {
        "modalities",
        "depth_model",
        "seg_model",
        "vq",
        "depth_vq",
        "seg_vq",
        "edge",
        "modality_drop_prob",
        "connector",
        "init",
        "train_cross_attention",
    }

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        opts = dict(cfg.model.options)
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for mmsr: {sorted(unknown)} (known: {sorted(self.OPTIONS)})")
        self.modalities = list(opts.get("modalities") or SPATIAL_MODALITIES)
        bad = [m for m in self.modalities if m not in SPATIAL_MODALITIES]
        if bad:
            raise SemsrError(f"model.options.modalities: unknown {bad}; known: {list(SPATIAL_MODALITIES)}")
        self.drop_prob = float(opts.get("modality_drop_prob", 0.1))
        if not 0.0 <= self.drop_prob <= 1.0:
            raise SemsrError("model.options.modality_drop_prob must be in [0, 1]")
        self.load_frozen_sd(resolve_model_path(cfg.model.pretrained))
        self.sources: dict[str, dict[str, Any]] = {"edge": {}}
        for name in ("depth", "seg"):
            if name in self.modalities:
                given = opts.get(f"{name}_model")
                if not given:
                    raise SemsrError(f"modality {name} needs model.options.{name}_model")
                self.sources[name] = {"model": str(resolve_model_path(str(given)))}
        self.edge = str(opts.get("edge", "canny"))
        self.tokenizers = self.load_tokenizers(opts)
        self.tokens: ModalityTokens | None = None  # built on the training device by setup()
        self.store = open_prior_store(cfg)
        if opts.get("init"):
            cond, _ = load_mmsr(resolve_model_path(str(opts["init"])))
            if cond.connector.spatial != self.modalities:
                raise SemsrError(
                    f"init checkpoint has modalities {cond.connector.spatial}, the config {self.modalities}"
                )
        else:
            extra = dict(opts.get("connector") or {})
            bad = set(extra) - _CONNECTOR_KEYS
            if bad:
                raise SemsrError(f"model.options.connector: unknown {sorted(bad)} (known: {sorted(_CONNECTOR_KEYS)})")
            width = int(self.unet.config.cross_attention_dim)
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                connector = MultimodalLatentConnector(
                    width=width,
                    text_width=int(self.text.width),
                    spatial=self.modalities,
                    vq_dim=int(next(iter(self.tokenizers.values())).embed_dim),
                    **extra,
                )
                cond = MMSRConditioning.new(
                    self.unet, connector, cross_attention=bool(opts.get("train_cross_attention", True))
                )
        for m, tok in self.tokenizers.items():
            if int(cond.connector.config.vq_dim) != int(tok.embed_dim):
                raise SemsrError(
                    f"connector expects {cond.connector.config.vq_dim}-d VQ vectors, the {m} tokenizer gives "
                    f"{tok.embed_dim}"
                )
        self.trainable = cond.float().train().requires_grad_(True)

    def load_tokenizers(self, opts: dict[str, Any]) -> dict[str, SpatialTokenizer]:
        """Per spatial modality its tokenizer: ``<m>_vq``, else ``vq``, else the ``init`` checkpoint's, else
        (edge only) the shipped edge VQ; each checked against its modality."""
        shared = load_tokenizer(resolve_model_path(str(opts["vq"]))) if opts.get("vq") else None
        inherited: dict[str, SpatialTokenizer] = {}
        init_shipped_edge = False
        if opts.get("init"):
            init = resolve_model_path(str(opts["init"]))
            index = read_index(init, "mmsr")
            inherited = load_mmsr_tokenizers(init, index.meta, self.modalities)
            recorded = index.meta.get("tokenizers") or {}
            init_shipped_edge = not (
                "vq_edge" in index.components or recorded.get("edge") or index.meta.get("tokenizer")
            )
        out: dict[str, SpatialTokenizer] = {}
        self.shipped: set[str] = set()
        for m in self.modalities:
            own = opts.get(f"{m}_vq")
            if own:
                out[m] = load_tokenizer(resolve_model_path(str(own)))
            elif shared is not None:
                out[m] = shared
            elif m in inherited:
                out[m] = inherited[m]
                if m == "edge" and init_shipped_edge:
                    self.shipped.add(m)
            elif m == "edge":
                out[m] = load_tokenizer(None)
                self.shipped.add(m)
            else:
                raise SemsrError(
                    f"modality {m} needs a tokenizer: model.options.{m}_vq (a {'DepthVQ' if m == 'depth' else 'SegVQ'}"
                    f" folder, task {m}-vq) or model.options.vq (a VQGAN for every map)"
                )
            check_modality_tokenizer(m, out[m], str(opts.get(f"{m}_vq") or opts.get("vq") or m))
        return out

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """The frozen SD on ``device``; the depth / seg models and tokenizers too."""
        super().setup(device, weight_dtype)
        for tok in self.tokenizers.values():
            tok.to(device)
        self.tokens = ModalityTokens(
            self.modalities,
            self.tokenizers,
            self.sources,
            edge=self.edge,
            use_cache=False,
            device=device,
            extract=self.store is None,
        )

    def stored_maps(self, batch: dict[str, Any], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Per modality ``(B, C, h, w)`` maps in [0, 1] of the batch's crops (``size`` = ``(h, w)``) from the store."""
        assert self.store is not None and self.tokens is not None
        out: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        for lr_path, box in zip(batch["lr_path"], batch["box"].tolist(), strict=True):
            top, left, flip = box
            for m in self.modalities:
                full = self.store.spatial(lr_path, self.tokens.provider_names[m])
                crop = full[:, top : top + size[0], left : left + size[1]]
                if tuple(crop.shape[-2:]) != size:
                    raise SemsrError(
                        f"the stored {m} map is smaller than its HR image (built at another scale?)", lr_path
                    )
                out[m].append(crop.flip(-1) if flip else crop)
        return {m: torch.stack(v) for m, v in out.items()}

    def draw_drops(self, gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Per modality (caption first, then the spatial ones) a ``(B,)`` bool: replace by the null token."""
        names = [CAPTION, *self.modalities]
        return {
            m: torch.tensor([float(torch.rand((), generator=g)) < self.drop_prob for g in gens], device=self.device)
            for m in names
        }

    def predict(self, model: nn.Module, step: NoisedBatch) -> dict[str, Any]:
        """``pred (B, 4, h, w)`` of UNet([z_t ; z_LR]) on the connector's tokens (the inference model call,
        :func:`~semsr.fusion.mmsr_conditioning.concat_unet_forward`, through ``model``'s forward).

        Draws, after the base task's: prompt dropout, modality drops.
        """
        prompts = self.draw_prompts(list(step.batch["prompt"]), step.gens)
        drops = self.draw_drops(step.gens)
        text = self.prompts(prompts).to(self.device, torch.float32)
        hint = make_hint(step.lr, tuple(step.hr.shape[-2:]))
        assert self.tokens is not None, "setup() builds the modality tokens"
        if self.store is not None:
            vectors = self.tokens.embed(self.stored_maps(step.batch, tuple(step.hr.shape[-2:])))
        else:
            vectors = self.tokens(hint)
        spatial = {m: v.to(self.device) for m, v in vectors.items()}
        z_lr = self.vae_mode(hint)
        return {
            "pred": model(
                self.unet,
                step.noisy.to(self.weight_dtype),
                z_lr.to(self.weight_dtype),
                step.timesteps,
                text,
                spatial,
                drops,
            )
        }

    @torch.no_grad()
    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """The MMSR pipeline (m-CFG, ``guidance_scale`` = w) with ``model`` (a copy) as connector + conv_in."""
        pipe = MMSR(
            vae=self.vae,
            unet=self.unet,
            text=self.text,
            cond=model,
            meta={"modalities": self.modalities, "edge": self.edge},
            scheduler_config=self.components.scheduler_config,
            sources=self.sources,
            tokenizers=self.tokenizers,
            device=self.device,
            dtype=self.weight_dtype,
            scale=self.cfg.data.scale,
        )
        options = MMSROptions(
            modalities=(CAPTION, *self.modalities), steps=steps, guidance_scale=guidance_scale, seed=seed
        )
        return pipe(lr, options, prompts=list(prompts)).images

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write an MMSR checkpoint folder (``model_index.json``, ``connector/``, ``conv_in/``, ``unet_attention/``,
        ``vq_<m>/`` for semsr's own tokenizers but the shipped edge one; a VQGAN is recorded by its path)."""
        toks: dict[str, Any] = {}
        for m, tok in self.tokenizers.items():
            if m in self.shipped:
                toks[m] = None
            else:
                toks[m] = copy.deepcopy(tok).cpu() if isinstance(tok, EdgeVQ) else tok
        save_mmsr(folder, model, modalities=self.modalities, edge=self.edge, tokenizers=toks)
