"""XPSR and DaLPSR training: tasks ``xpsr`` and ``dalpsr`` (frozen SD; trainable ControlNet + new attention).

Per sample: the high-level prompt ``c_h`` and the low-level prompt ``c_l`` come
from :class:`~semsr.priors.prompts.TextPriors` on the LR crop (cached per
image content): XPSR asks the VLM for the quality description
(``low_source: vlm``), DaLPSR uses IRPAD's degradation description
(``low_source: irpad``; tags from ``tagger`` steer the caption). The batch
caption (manifest or ``data.prompt``) is the high-level prompt when it is not
empty; otherwise the VLM caption (or ``""`` without a VLM). With probability
``train.null_prompt_prob`` both prompts become ``""`` (classifier-free guidance).

Model: :class:`XPSRTrainable` = ControlNet (SFA processors) + :class:`~semsr.fusion.sfa.SFAFusion`
(low-level and fusion attentions, UNet conditional attention) + :class:`~semsr.fusion.dfc.DFCHeads`.
Outputs ``pred``/``target`` (eps-MSE) and ``dfc_pred``/``dfc_target``; the
configs weight them ``eps_mse: 1.0, dfc: 0.05``. ``export`` writes a complete
``--checkpoint`` folder: ``controlnet/``, ``sfa/``, ``dfc/``.

``model.options`` (besides ``conditioning_channels``): ``sfa_mode``
(parallel|serial|high|low; xpsr: parallel, dalpsr: serial), ``conditional_attention``
(xpsr: true, dalpsr: false), ``init`` (checkpoint folder to continue from), ``vlm``,
``tagger``, ``irpad`` (folders; ``tiny://vlm``, ``tiny://tagger``,
``tiny://irpad-untrained`` are the tiny ones), ``low_source`` (vlm|irpad),
``max_new_tokens`` (VLM answer length), ``added_prompt`` (appended to the
high-level prompt at validation, XPSR's "clean, high-resolution, 8k, high quality").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.errors import SemsrError
from semsr.fusion.dfc import DFCHeads, dfc_targets
from semsr.fusion.sfa import SFAFusion, two_prompt_context
from semsr.train.config import ExperimentConfig
from semsr.train.tasks import ControlNetSRTask, NoisedBatch, register_task


def resolve_path(path: str | None) -> str | None:
    """``tiny://<component>`` -> the cached tiny component (written on first use); other paths unchanged."""
    if path is None or not str(path).startswith("tiny://"):
        return path
    from semsr.train.coser import ensure_tiny
    from semsr.train.tasks import resolve_model_path

    name = str(path)[len("tiny://"):].strip("/")
    if name in ("", "sd", "controlnet"):
        return str(resolve_model_path(str(path)))
    return str(ensure_tiny(name))


class XPSRTrainable(nn.Module):
    """The trainable part: ``controlnet``, ``sfa`` and ``dfc``; ``forward`` runs one noise prediction."""

    def __init__(self, controlnet: nn.Module, sfa: SFAFusion, dfc: DFCHeads) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sfa = sfa
        self.dfc = dfc

    def forward(self, x: torch.Tensor, t: torch.Tensor, high: torch.Tensor, low: torch.Tensor, hint: torch.Tensor,
                unet: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x (B, 4, h, w)`` noisy latent (the frozen UNet's dtype), ``high``/``low`` ``(B, L, D)``, ``hint
        (B, 3, 8h, 8w)`` -> ``(UNet output (B, 4, h, w), DFC head predictions)``."""
        self.sfa.install(self.controlnet, unet)  # point the processors at *these* weights (copies too)
        with self.dfc.capture(self.controlnet) as feats:
            down, mid = self.controlnet(x, t, encoder_hidden_states=two_prompt_context(high, low),
                                        controlnet_cond=hint, return_dict=False)
        dtype = x.dtype
        down = [d.to(dtype) for d in down]
        mid = mid.to(dtype)
        with self.sfa.unet_features(down, mid):
            pred = unet(x, t, encoder_hidden_states=high, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
        return pred, self.dfc(feats)


@register_task("xpsr")
class XPSRTask(ControlNetSRTask):
    """XPSR: SFA ControlNet + UNet conditional attention, eps-MSE + 0.05 DFC (see the module docstring)."""

    OPTIONS = ControlNetSRTask.OPTIONS | {"sfa_mode", "conditional_attention", "init", "vlm", "tagger", "irpad",
                                          "low_source", "max_new_tokens", "added_prompt"}
    DEFAULTS: dict[str, Any] = {"sfa_mode": "parallel", "conditional_attention": True, "low_source": "vlm",
                                "max_new_tokens": None, "added_prompt": "clean, high-resolution, 8k, high quality"}

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
            from semsr.core.loading import load_controlnet

            init = Path(str(resolve_path(init)))
            controlnet = load_controlnet(init / "controlnet").float()
            sfa = SFAFusion.load(init / "sfa", controlnet, self.unet, mode=self.opts["sfa_mode"])
            dfc = DFCHeads.load(init / "dfc", controlnet) if (init / "dfc").is_dir() else DFCHeads(controlnet)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed + 1)
                sfa = SFAFusion(controlnet, self.unet if self.opts["conditional_attention"] else None,
                                mode=self.opts["sfa_mode"])
                dfc = DFCHeads(controlnet)
        self.trainable = XPSRTrainable(controlnet, sfa, dfc).float().train().requires_grad_(True)
        self._priors: Any = None

    # -- prompts ---------------------------------------------------------
    def text_priors(self) -> Any:
        """The :class:`~semsr.priors.prompts.TextPriors` of this task (built on first use)."""
        if self._priors is None:
            from semsr.priors.prompts import TextPriors

            o = self.opts
            self._priors = TextPriors(vlm=resolve_path(o.get("vlm")), tagger=resolve_path(o.get("tagger")),
                                      low_source=o["low_source"], irpad_weights=resolve_path(o.get("irpad")),
                                      user_mode="replace", max_new_tokens=o["max_new_tokens"])
        return self._priors

    def two_prompts(self, lr: torch.Tensor, prompts: list[str]) -> tuple[list[str], list[str]]:
        """``(high, low)`` prompts of each LR image ``(B, 3, h, w)``; ``prompts`` are the batch captions."""
        from semsr.priors.prompts import UserPrompts

        priors = self.text_priors()
        highs, lows = [], []
        for img, prompt in zip(lr.float().cpu(), prompts, strict=True):
            priors.user = UserPrompts(prompt or None)
            cond = priors(img[None].clamp(0, 1))
            highs.append(cond.high)
            lows.append(cond.low)
        return highs, lows

    # -- training --------------------------------------------------------
    def predict(self, model: nn.Module, step: NoisedBatch) -> dict[str, Any]:
        """``pred`` and ``dfc_pred``/``dfc_target`` (the base adds ``target``/``latents``/``timesteps``).

        Draws the prompt dropout (both prompts together) after the base task's draws.
        """
        p = self.cfg.train.null_prompt_prob
        drops = [float(torch.rand((), generator=g)) < p for g in step.gens]
        highs, lows = self.two_prompts(step.lr, list(step.batch["prompt"]))
        highs = ["" if d else s for s, d in zip(highs, drops, strict=True)]
        lows = ["" if d else s for s, d in zip(lows, drops, strict=True)]
        high = self.prompts(highs).to(self.device, self.weight_dtype)
        low = self.prompts(lows).to(self.device, self.weight_dtype)
        pred, dfc_pred = model(step.noisy.to(self.weight_dtype), step.timesteps, high, low, self.hint(step), self.unet)
        return {"pred": pred, "dfc_pred": dfc_pred, "dfc_target": dfc_targets(dfc_pred, step.latents, step.hr)}

    # -- validation / export -------------------------------------------------
    @torch.no_grad()
    def sample(self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float,
               seed: int) -> torch.Tensor:
        """Run :class:`~semsr.methods.xpsr.TwoPromptSR` with a *copy* of the trainable weights."""
        from semsr.methods.xpsr import XPSR_NEGATIVE, TwoPromptSR, join_prompt

        highs, lows = self.two_prompts(lr, prompts * lr.shape[0] if len(prompts) == 1 else prompts)
        pipe = TwoPromptSR(vae=self.vae, unet=self.unet, controlnet=model.controlnet, text=self.text,
                           sfa=model.sfa, scheduler_config=self.components.scheduler_config, device=self.device,
                           dtype=self.weight_dtype)
        return pipe(lr, scale=self.cfg.data.scale, prompt=[join_prompt(h, self.opts["added_prompt"]) for h in highs],
                    low_prompt=lows, negative_prompt=XPSR_NEGATIVE, steps=steps, guidance_scale=guidance_scale,
                    seed=seed)

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write ``folder/controlnet`` (diffusers), ``folder/sfa`` and ``folder/dfc``."""
        folder = Path(folder)
        model.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
        model.sfa.save(folder / "sfa")
        model.dfc.save(folder / "dfc")


@register_task("dalpsr")
class DaLPSRTask(XPSRTask):
    """DaLPSR: IRPAD degradation prompt + (tag-steered) semantic prompt, serial cross-attentions, one stage."""

    DEFAULTS = {**XPSRTask.DEFAULTS, "sfa_mode": "serial", "conditional_attention": False, "low_source": "irpad"}
