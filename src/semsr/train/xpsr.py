"""XPSR and DaLPSR training: tasks ``xpsr`` and ``dalpsr`` (frozen SD; trainable ControlNet + new attention).

Prompts per sample, high-level ``c_h`` and low-level ``c_l``:

- **precomputed** (``prompts: FILE``, XPSR's released way and the XPSR config's): the record of the
  sample's HR image in the JSON-lines file (:mod:`semsr.train.xpsr_prompts`): ``c_h`` = the caption of
  the HR image, ``c_l`` = the quality answer for its LR image (``low_gt``, the answer for the HR
  image, where the HR crop is the hint); with ``low_source: irpad`` ``c_l`` is IRPAD's description of
  the hint. A training image without a record is a one-line error before the first step.
- **prior store** (``data.priors: STORE`` of ``semsr priors build --recipe xpsr|dalpsr``, with
  ``data.pairs``): as the prompts file, from the store: ``c_h`` = the ``caption`` of the HR image,
  ``c_l`` = the ``quality`` (``low_source: vlm``) or ``irpad`` (``low_source: irpad``) prior of the
  sample's LR file (of the HR image where it is the hint). No prior model is built for training;
  a missing prior is a one-line error before the first step.
- **online** (no ``prompts``, no ``data.priors``): :class:`~semsr.priors.prompts.TextPriors` on the hint image (cached per
  image content): XPSR asks the VLM (``low_source: vlm``), DaLPSR uses IRPAD (``low_source: irpad``;
  tags from ``tagger`` steer the caption). A non-empty batch caption (manifest or ``data.prompt``)
  replaces the caption. Without ``vlm`` this needs ``no_vlm: true`` (no silent fallback).

With probability ``train.null_prompt_prob`` both prompts become ``""`` (classifier-free guidance).
With probability ``gt_hint_prob`` (XPSR: 0.1, as released; DaLPSR: 0) the HR crop replaces the
bicubic LR as the ControlNet hint (released: ``original_image_ratio=0.1``). Validation SRs the
held-out LR images with prompts from ``TextPriors`` (the VLM, or ``no_vlm``), as inference does.

Model: :class:`XPSRTrainable` = ControlNet (SFA processors) + :class:`~semsr.fusion.sfa.SFAFusion`
(low-level and fusion attentions, UNet conditional attention) + :class:`~semsr.fusion.dfc.DFCHeads`;
its forward is the inference one (:meth:`~semsr.fusion.sfa.SFAFusion.controlnet_unet_forward`)
with the DFC features captured. Outputs ``pred``/``target`` (eps-MSE) and
``dfc_pred``/``dfc_target`` (loss term ``dfc``, registered here); the XPSR configs
weight them ``eps_mse: 1.0, dfc: 0.05``, the DaLPSR ones train with ``eps_mse`` alone
(the paper's plain diffusion loss; without a ``dfc`` term the task has no DFC heads). ``export`` writes a complete
``--checkpoint`` folder: the checkpoint of recipe ``xpsr`` / ``dalpsr``
(:func:`semsr.core.components.save_checkpoint`) with the components
``controlnet``, ``sfa`` and ``dfc``. ``dfc_heads``: ``paper`` (3 latent heads, default) or
``released`` (every residual + mid), see :mod:`semsr.fusion.dfc`.

``model.options`` (besides ``conditioning_channels``): ``sfa_mode``
(parallel|serial|high|low; xpsr: parallel, dalpsr: serial), ``conditional_attention``
(xpsr: true, dalpsr: false), ``unet_prompts`` (the UNet's cross-attention context, high|both;
xpsr: high, dalpsr: both), ``init`` (checkpoint folder to continue from), ``vlm``,
``tagger``, ``irpad`` (folders; ``tiny://vlm``, ``tiny://tagger``,
``tiny://irpad-untrained`` are the tiny ones, see :func:`semsr.testing.tiny.resolve_model_path`), ``low_source`` (vlm|irpad),
``no_vlm`` (the explicit no-VLM opt-out), ``prompts`` (precomputed prompts file), ``gt_hint_prob``,
``dfc_heads`` (paper|released), ``max_new_tokens`` (VLM answer length), ``added_prompt`` (appended to the
high-level prompt at validation, XPSR's "clean, high-resolution, 8k, high quality").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.components import save_checkpoint
from semsr.core.errors import SemsrError
from semsr.fusion.dfc import LATENT_HEADS, DFCHeads, dfc_loss, dfc_targets
from semsr.fusion.sfa import SFAFusion
from semsr.methods.xpsr import (
    UNET_PROMPTS,
    XPSR_ADDED_POSITIVE,
    TwoPromptSR,
    XPSROptions,
    join_prompt,
    read_two_prompt_checkpoint,
    unet_context,
)
from semsr.priors.prompts import TextPriors
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.data import expand_path
from semsr.train.losses import _require, register_loss
from semsr.train.pairs import read_pairs
from semsr.train.priors import open_prior_store
from semsr.train.tasks import ControlNetSRTask, NoisedBatch, register_task
from semsr.train.xpsr_prompts import XPSRPromptFile


@register_loss("dfc")
def dfc_term(outputs: Mapping[str, Any]) -> torch.Tensor:
    """Loss term ``dfc``: needs task outputs ``dfc_pred`` and ``dfc_target`` (dicts of tensors)."""
    _require(outputs, "dfc", "dfc_pred", "dfc_target")
    return dfc_loss(outputs["dfc_pred"], outputs["dfc_target"])


def _local(path: str | None) -> str | None:
    """A configured model folder as a local path (``tiny://NAME`` -> the tiny component); None stays None."""
    return None if path is None else str(resolve_model_path(path))


class XPSRTrainable(nn.Module):
    """The trainable part: ``controlnet``, ``sfa`` and ``dfc`` (None: no DFC term); ``forward`` runs one
    noise prediction with the UNet on :func:`~semsr.methods.xpsr.unet_context` (``unet_prompts``)."""

    def __init__(self, controlnet: nn.Module, sfa: SFAFusion, dfc: DFCHeads | None, unet_prompts: str = "high") -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sfa = sfa
        self.dfc = dfc
        self.unet_prompts = unet_prompts

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        high: torch.Tensor,
        low: torch.Tensor,
        hint: torch.Tensor,
        unet: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x (B, 4, h, w)`` noisy latent (the frozen UNet's dtype), ``high``/``low`` ``(B, L, D)``, ``hint
        (B, 3, 8h, 8w)`` -> ``(UNet output (B, 4, h, w), DFC head predictions)``.

        The model call is the inference one (:meth:`SFAFusion.controlnet_unet_forward`, the UNet on
        :func:`~semsr.methods.xpsr.unet_context`); the DFC heads read the ControlNet features
        captured during it (no predictions without heads).
        """
        self.sfa.install(self.controlnet, unet)  # point the processors at *these* weights (copies too)
        context = unet_context(high, low, self.unet_prompts)
        if self.dfc is None:
            return self.sfa.controlnet_unet_forward(
                unet, self.controlnet, x, t, high, low, hint, unet_context=context
            ), {}
        with self.dfc.capture(self.controlnet) as feats:
            pred = self.sfa.controlnet_unet_forward(unet, self.controlnet, x, t, high, low, hint, unet_context=context)
        return pred, self.dfc(feats)


@register_task("xpsr")
class XPSRTask(ControlNetSRTask):
    """XPSR: SFA ControlNet + UNet conditional attention, eps-MSE + 0.05 DFC (see the module docstring)."""

    OPTIONS = ControlNetSRTask.OPTIONS | {
        "sfa_mode",
        "conditional_attention",
        "init",
        "vlm",
        "tagger",
        "irpad",
        "low_source",
        "max_new_tokens",
        "added_prompt",
        "unet_prompts",
        "no_vlm",
        "prompts",
        "gt_hint_prob",
        "dfc_heads",
    }
    DEFAULTS: dict[str, Any] = {
        "sfa_mode": "parallel",
        "conditional_attention": True,
        "low_source": "vlm",
        "max_new_tokens": None,
        "added_prompt": XPSR_ADDED_POSITIVE,
        "unet_prompts": "high",
        "no_vlm": False,
        "prompts": None,
        "gt_hint_prob": 0.1,  # XPSR's released original_image_ratio
        "dfc_heads": "paper",
    }

    def __init__(self, cfg: ExperimentConfig) -> None:
        opts = dict(cfg.model.options)
        base_opts = {k: v for k, v in opts.items() if k in ControlNetSRTask.OPTIONS}
        unknown = set(opts) - self.OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for {self.name}: {sorted(unknown)}")
        cfg.model.options = base_opts
        try:
            super().__init__(cfg)
        finally:
            cfg.model.options = opts
        self.opts = {**self.DEFAULTS, **opts}
        controlnet = self.trainable
        init = self.opts.get("init")
        if init:
            parts = read_two_prompt_checkpoint(resolve_model_path(init), names=None)
            controlnet = parts["controlnet"].float()
            sfa = parts["sfa"]
            sfa.mode = self.opts["sfa_mode"]
            dfc = parts["dfc"] if "dfc" in parts else DFCHeads.from_controlnet(controlnet, self.opts["dfc_heads"])
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed + 1)
                sfa = SFAFusion.from_models(
                    controlnet, self.unet if self.opts["conditional_attention"] else None, mode=self.opts["sfa_mode"]
                )
                dfc = DFCHeads.from_controlnet(controlnet, self.opts["dfc_heads"])
        if self.opts["dfc_heads"] not in LATENT_HEADS:
            raise SemsrError(f"model.options.dfc_heads must be one of {', '.join(LATENT_HEADS)}")
        if not 0.0 <= float(self.opts["gt_hint_prob"]) <= 1.0:
            raise SemsrError("model.options.gt_hint_prob must be in [0, 1]")
        if self.opts["unet_prompts"] not in UNET_PROMPTS:
            raise SemsrError(f"model.options.unet_prompts must be one of {', '.join(UNET_PROMPTS)}")
        if not cfg.losses.get("dfc", 0):  # plain diffusion loss: no DFC heads
            dfc = None
        self.trainable = XPSRTrainable(controlnet, sfa, dfc, self.opts["unet_prompts"])
        self.trainable.float().train().requires_grad_(True)
        sfa.freeze_unused()  # e.g. serial (DaLPSR) never runs attentions_connect
        self._priors: TextPriors | None = None
        prompts = self.opts["prompts"]
        self.prompt_file = XPSRPromptFile.load(expand_path(str(prompts))) if prompts else None
        self.store = open_prior_store(cfg)
        if self.store is not None and self.prompt_file is not None:
            raise SemsrError("give model.options.prompts or data.priors, not both")
        self.pairs = read_pairs(cfg.data.pairs) if self.store is not None else {}
        precomputed = self.store is not None or (self.prompt_file is not None and self.opts["low_source"] == "vlm")
        if not precomputed or cfg.validation.every:
            self.text_priors()  # training or validation asks it: a missing VLM fails now, not at step 1

    # -- prompts ---------------------------------------------------------
    def text_priors(self) -> TextPriors:
        """The :class:`~semsr.priors.prompts.TextPriors` of this task (built on first use)."""
        if self._priors is None:
            o = self.opts
            self._priors = TextPriors(
                vlm=_local(o.get("vlm")),
                tagger=_local(o.get("tagger")),
                low_source=o["low_source"],
                irpad_weights=_local(o.get("irpad")),
                user_mode="replace",
                no_vlm=bool(o["no_vlm"]),
                max_new_tokens=o["max_new_tokens"],
            )
        return self._priors

    def two_prompts(self, lr: torch.Tensor, prompts: list[str]) -> tuple[list[str], list[str]]:
        """``(high, low)`` prompts of each image ``(B, 3, h, w)`` from :meth:`text_priors`; ``prompts`` are
        the batch captions (a non-empty caption replaces the VLM caption)."""
        priors = self.text_priors()
        highs, lows = [], []
        for img, prompt in zip(lr.float().cpu(), prompts, strict=True):
            cond = priors(img[None].clamp(0, 1), prompt or None)
            highs.append(cond.high)
            lows.append(cond.low)
        return highs, lows

    def train_items(self, items: list[Any]) -> list[Any]:
        """All listed images; with a prompts file, checks first that each has its record (one-line error)."""
        if self.prompt_file is not None:
            for item in items:
                self.prompt_file.get(item.path, self._record_fields())
        if self.store is not None:
            gt = float(self.opts["gt_hint_prob"]) > 0
            for item in items:
                self.store.text(item.path, "caption")
                for image in [*self.pairs.get(item.path, []), *([item.path] if gt else [])]:
                    self.store.text(image, self._low_prior())
        return items

    def _low_prior(self) -> str:
        """The store's prior for the low-level prompt."""
        return "quality" if self.opts["low_source"] == "vlm" else "irpad"

    def _record_fields(self) -> tuple[str, ...]:
        if self.opts["low_source"] != "vlm":
            return ("high",)
        return ("high", "low", "low_gt") if float(self.opts["gt_hint_prob"]) > 0 else ("high", "low")

    def sample_prompts(self, step: NoisedBatch, gt_hint: list[bool]) -> tuple[list[str], list[str]]:
        """``(high, low)`` per sample of ``step`` (module docstring); ``gt_hint[i]``: the HR crop is sample
        ``i``'s hint, so its low-level prompt describes the HR image."""
        images = [hr if gt else lr for hr, lr, gt in zip(step.hr, step.lr, gt_hint, strict=True)]
        if self.store is not None:
            paths, lr_paths = step.batch["path"], step.batch["lr_path"]
            highs = [self.store.text(p, "caption") for p in paths]
            hints = [p if gt else q for p, q, gt in zip(paths, lr_paths, gt_hint, strict=True)]
            return highs, [self.store.text(h, self._low_prior()) for h in hints]
        if self.prompt_file is None:
            highs, lows = [], []
            for img, caption in zip(images, step.batch["prompt"], strict=True):
                h, low = self.two_prompts(img[None], [caption])
                highs += h
                lows += low
            return highs, lows
        records = [self.prompt_file.get(p, self._record_fields()) for p in step.batch["path"]]
        highs = [r["high"] for r in records]
        if self.opts["low_source"] == "vlm":
            return highs, [r["low_gt"] if gt else r["low"] for r, gt in zip(records, gt_hint, strict=True)]
        lows = [self.text_priors()(img[None].float().cpu().clamp(0, 1), h).low for img, h in zip(images, highs)]
        return highs, lows

    # -- training --------------------------------------------------------
    def predict(self, model: nn.Module, step: NoisedBatch) -> dict[str, Any]:
        """``pred`` and ``dfc_pred``/``dfc_target`` (the base adds ``target``/``latents``/``timesteps``).

        Draws, after the base task's draws, the prompt dropout (both prompts together) and then,
        when ``gt_hint_prob`` > 0, whether the HR crop is the hint.
        """
        p = self.cfg.train.null_prompt_prob
        drops = [float(torch.rand((), generator=g)) < p for g in step.gens]
        p_gt = float(self.opts["gt_hint_prob"])
        gt_hint = [p_gt > 0 and float(torch.rand((), generator=g)) < p_gt for g in step.gens]
        highs, lows = self.sample_prompts(step, gt_hint)
        highs = ["" if d else s for s, d in zip(highs, drops, strict=True)]
        lows = ["" if d else s for s, d in zip(lows, drops, strict=True)]
        high = self.prompts(highs).to(self.device, self.weight_dtype)
        low = self.prompts(lows).to(self.device, self.weight_dtype)
        hint = self.hint(step)
        if any(gt_hint):
            use_hr = torch.tensor(gt_hint, device=hint.device)[:, None, None, None]
            hint = torch.where(use_hr, step.hr.to(hint.device, hint.dtype), hint)
        pred, dfc_pred = model(step.noisy.to(self.weight_dtype), step.timesteps, high, low, hint, self.unet)
        if not dfc_pred:  # plain diffusion loss (no ``dfc`` term)
            return {"pred": pred}
        return {"pred": pred, "dfc_pred": dfc_pred, "dfc_target": dfc_targets(dfc_pred, step.latents, step.hr)}

    # -- validation / export -------------------------------------------------
    @torch.no_grad()
    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """SR of ``lr`` ``(B, 3, h, w)`` by :class:`~semsr.methods.xpsr.TwoPromptSR` with ``model``, a *copy*
        of the trainable weights (the pipeline casts and freezes them); XPSR's inference defaults."""
        highs, lows = self.two_prompts(lr, prompts * lr.shape[0] if len(prompts) == 1 else prompts)
        pipe = TwoPromptSR(
            vae=self.vae,
            unet=self.unet,
            controlnet=model.controlnet,
            text=self.text,
            sfa=model.sfa,
            scheduler_config=self.components.scheduler_config,
            device=self.device,
            dtype=self.weight_dtype,
            scale=self.cfg.data.scale,
            name=self.name,
            unet_prompts=model.unet_prompts,
        )
        options = XPSROptions(steps=int(steps), guidance_scale=float(guidance_scale), seed=int(seed))
        return pipe(
            lr, options, prompts=[join_prompt(h, self.opts["added_prompt"]) for h in highs], low_prompts=lows
        ).images

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the ``xpsr`` / ``dalpsr`` checkpoint ``folder``: components ``controlnet``, ``sfa`` and,
        when trained (a ``dfc`` loss term), ``dfc``."""
        parts = {"controlnet": model.controlnet, "sfa": model.sfa}
        if model.dfc is not None:
            parts["dfc"] = model.dfc
        save_checkpoint(folder, self.name, parts)


@register_task("dalpsr")
class DaLPSRTask(XPSRTask):
    """DaLPSR: IRPAD degradation prompt + (tag-steered) semantic prompt, serial cross-attentions, one stage."""

    DEFAULTS = {
        **XPSRTask.DEFAULTS,
        "gt_hint_prob": 0.0,  # XPSR's released trick, not DaLPSR's
        "sfa_mode": "serial",
        "conditional_attention": False,
        "low_source": "irpad",
        "unet_prompts": "both",  # the paper: both prompts condition the denoising UNet by cross-attention
    }
