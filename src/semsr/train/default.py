"""Training task ``default_sr``: the bundled default model (:mod:`semsr.models.default_sr`,
inference in :mod:`semsr.methods.default_diffusion`).

Per micro-batch (``hr (B, 3, H, W)``, ``lr (B, 3, H/s, W/s)`` from the Real-ESRGAN
degradation of :mod:`semsr.train.data`)::

    y1  = stage1(lr)                           frozen (realesrgan-x4plus; bicubic in the tiny config)
    r0  = unshuffle(k * (hr - y1))             the clean scaled residual (the "sample" target)
    t, eps per sample; r_t = add_noise(r0, eps, t)
    text = prompt + IRPAD(lr)  -> "" with prob train.null_prompt_prob
    edges = canny(y1)          -> 0  with prob model.options.edge_drop_prob
    pred = model(r_t, t, {stage1, tokens, edges})   -> outputs pred/target (= r0)

The loss terms ``eps_mse`` (MSE of the x0 prediction), ``residual_l1``
(registered here; L1 of the same, i.e. ``k`` times the pixel L1 of the SR
image), ``gradient_l1`` and ``texture_energy`` (registered here; see
:func:`gradient_l1`, :func:`texture_energy`) come from :mod:`semsr.train.losses`.

``model.options`` (all optional): the :class:`~semsr.models.default_sr.DefaultSR` config
fields (``block_out_channels``, ``unshuffle``, ``stage1``, ``residual_scale``...),
``init`` (a checkpoint folder to start from), ``mean_start_prob`` (default 0: the share of
samples trained as the first step of ``start="mean"`` sampling, ``t = T - 1`` from ``r_t = 0``), ``irpad`` (IRPAD folder; ``null`` =
the shipped weights, silently absent if none), ``use_irpad`` (default true),
``edge_drop_prob`` (default 0.1). ``model.pretrained`` / ``model.controlnet`` are unused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from semsr.core.errors import SemsrError
from semsr.methods import build as build_method
from semsr.methods.default_diffusion import (
    DefaultDiffusionOptions,
    DefaultSRPipeline,
    DegradationText,
    TextTokens,
    edge_map,
    join_prompt,
)
from semsr.models.default_sr import (
    DefaultSR,
    blur_residual,
    from_space,
    load_default_sr,
    save_default_sr,
    to_space,
)
from semsr.train.config import ExperimentConfig
from semsr.train.losses import _require, register_loss
from semsr.train.tasks import Task, per_sample_generators, randn_like_per_sample, register_task

log = logging.getLogger(__name__)

#: DefaultSR config keys an ``init`` checkpoint may change (inference settings, not architecture)
INFERENCE_SETTINGS = {
    "start",
    "residual_blur",
    "text_prior",
    "default_steps",
    "residual_core",
    "residual_gain",
    "flat_smooth",
    "flat_gate",
}
_TASK_OPTIONS = {"init", "irpad", "use_irpad", "edge_drop_prob", "mean_start_prob"}


@register_loss("residual_l1")
def residual_l1(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L1 between ``pred`` and ``target`` ``(B, C, h, w)`` (the x0 residual of ``default_sr``)."""
    _require(outputs, "residual_l1", "pred", "target")
    return F.l1_loss(outputs["pred"].float(), outputs["target"].float())


@register_loss("sr_l1")
def sr_l1(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L1 between the SR image (the residual as the method adds it, low-pass included) and HR, ``(B, 3, H, W)``."""
    _require(outputs, "sr_l1", "sr", "hr")
    return F.l1_loss(outputs["sr"].float(), outputs["hr"].float())


#: BT.601 luma weights for the texture statistics
_LUMA = (0.299, 0.587, 0.114)


def luma_gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of the luma: ``(B, 3, H, W)`` -> ``dx, dy`` ``(B, 1, H, W)`` (zero on the last column/row)."""
    w = image.new_tensor(_LUMA).view(1, 3, 1, 1)
    y = (image.float() * w).sum(1, keepdim=True)
    dx = F.pad(y[..., :, 1:] - y[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(y[..., 1:, :] - y[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def local_gradient_energy(image: torch.Tensor, window: int = 8) -> torch.Tensor:
    """Mean luma gradient magnitude per ``window``-px cell: ``(B, 3, H, W)`` -> ``(B, 1, H//window, W//window)``.

    Magnitude ``sqrt(dx^2 + dy^2 + 1e-6)`` of :func:`luma_gradients`.
    """
    dx, dy = luma_gradients(image)
    return F.avg_pool2d(torch.sqrt(dx * dx + dy * dy + 1e-6), window)


@register_loss("gradient_l1")
def gradient_l1(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L1 between the luma gradients of the predicted SR image and the HR image (``sr``/``hr`` ``(B, 3, H, W)``).

    Pixel-aligned, so it keeps PSNR; the L1 median of an uncertain gradient is zero, so it sharpens the edges
    the model is sure of without painting grain where it is not.
    """
    _require(outputs, "gradient_l1", "sr", "hr")
    (sx, sy), (hx, hy) = luma_gradients(outputs["sr"]), luma_gradients(outputs["hr"])
    return F.l1_loss(sx, hx) + F.l1_loss(sy, hy)


@register_loss("texture_energy")
def texture_energy(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L1 between the local gradient energies of the predicted SR image and the HR image.

    ``outputs["sr"]`` / ``outputs["hr"]``: ``(B, 3, H, W)`` in [0, 1]. The statistic pools gradient
    *magnitudes* over 8-px cells, so it does not care where inside a cell an edge or a grain sits: it
    asks for as much detail as the photograph has without asking for the pixel-exact detail that a
    regression loss can only average away (the source of the blur that no-reference metrics such as
    NIQE punish).
    """
    _require(outputs, "texture_energy", "sr", "hr")
    return F.l1_loss(local_gradient_energy(outputs["sr"]), local_gradient_energy(outputs["hr"]))


@register_task("default_sr")
class DefaultSRTask(Task):
    """Residual diffusion refiner over a frozen stage-1 restorer; everything in :class:`DefaultSR` trains."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        opts = dict(cfg.model.options)
        arch = {k: v for k, v in opts.items() if k not in _TASK_OPTIONS}
        self.options = {
            "init": None,
            "irpad": None,
            "use_irpad": True,
            "edge_drop_prob": 0.1,
            "mean_start_prob": 0.0,
            **{k: v for k, v in opts.items() if k in _TASK_OPTIONS},
        }
        if self.options["init"]:
            model = load_default_sr(Path(str(self.options["init"])).expanduser()).train().requires_grad_(True)
            settings = {k: arch.pop(k) for k in list(arch) if k in INFERENCE_SETTINGS}
            if arch:
                raise SemsrError(f"model.options {sorted(arch)} cannot change an 'init' checkpoint's architecture")
            if settings:  # validated by a throwaway config check, then recorded in the exported meta
                current = {k: v for k, v in model.config.items() if not k.startswith("_")}
                parts = {"unet": model.unet, "controlnet": model.controlnet, "text_proj": model.text_proj}
                DefaultSR.from_options({**current, **settings}, **parts)
                model.register_to_config(**settings)
        else:
            arch.setdefault("scale", cfg.data.scale)
            with torch.random.fork_rng():  # the init depends on the seed only
                torch.manual_seed(cfg.seed)
                model = DefaultSR.from_options(arch)
        if model.config.scale != cfg.data.scale:
            raise SemsrError(f"model scale {model.config.scale} != data.scale {cfg.data.scale}")
        self.trainable = model.float().train()
        self.mconfig = model.config
        self.multiple, self.channels = model.multiple, model.channels
        self.noise_scheduler = DDPMScheduler.from_config(model.config.scheduler)
        self.stage1 = build_method(model.config.stage1)
        self.text = TextTokens()
        self.degradation = DegradationText(self.options["irpad"], enabled=bool(self.options["use_irpad"]))
        if not self.degradation.available and self.options["use_irpad"]:
            log.info(
                "default_sr: no IRPAD weights (%s); the text condition is the prompt only", self.degradation.reason
            )
        self.device = torch.device("cpu")

    @property
    def pixel_multiple(self) -> int:
        return self.multiple

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device = device  # stage 1 and the text encoder stay fp32 on the CPU-side helpers

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Outputs ``pred``/``target`` ``(B, 3u^2, H/u, W/u)``, ``timesteps (B,)`` and the images
        ``sr`` (``y1 + residual(pred)``) / ``hr`` ``(B, 3, H, W)`` for pixel-space terms.

        Per-sample draws, in order: diffusion noise, timestep, prompt dropout, edge dropout, mean start.
        A "mean start" sample (probability ``model.options.mean_start_prob``) is the first step of
        ``start="mean"`` sampling: ``t = T - 1`` and the input ``r_t = 0`` (the prior's mean).
        """
        cfg = self.mconfig
        hr = batch["hr"].float()
        lr = batch["lr"].float()
        if hr.shape[-1] % self.multiple or hr.shape[-2] % self.multiple:
            raise SemsrError(f"data.crop_size must be a multiple of {self.multiple} for this model")
        gens = per_sample_generators(batch["seed"])
        with torch.no_grad():
            y1 = self.stage1(lr).images.float().clamp(0, 1)
            target = to_space((hr - y1) * cfg.residual_scale, cfg.unshuffle)
            noise = randn_like_per_sample(target, gens)
            t_max = self.noise_scheduler.config.num_train_timesteps
            timesteps = torch.stack([torch.randint(0, t_max, (), generator=g) for g in gens])
            p_text = self.cfg.train.null_prompt_prob
            p_edge = float(self.options["edge_drop_prob"])
            drop_text = [float(torch.rand((), generator=g)) < p_text for g in gens]
            drop_edge = [float(torch.rand((), generator=g)) < p_edge for g in gens]
            p_mean = float(self.options["mean_start_prob"])
            mean_start = [p_mean > 0 and float(torch.rand((), generator=g)) < p_mean for g in gens]
            deg = self.degradation(lr)
            prompts = ["" if d else join_prompt(p, q) for p, q, d in zip(batch["prompt"], deg, drop_text, strict=True)]
            edges = edge_map(y1) * torch.tensor([0.0 if d else 1.0 for d in drop_edge]).view(-1, 1, 1, 1)
            noisy = self.noise_scheduler.add_noise(target, noise, timesteps)
            if any(mean_start):
                keep = torch.tensor([0.0 if m else 1.0 for m in mean_start]).view(-1, 1, 1, 1)
                noisy = noisy * keep
                timesteps = torch.where(torch.tensor(mean_start), torch.full_like(timesteps, t_max - 1), timesteps)
            cond = {"stage1": to_space(y1 * 2 - 1, cfg.unshuffle), "tokens": self.text(prompts), "edges": edges}
        dev = self.device
        cond = {k: v.to(dev) for k, v in cond.items()}
        pred = model(noisy.to(dev), timesteps.to(dev), cond)
        # the SR image as the method makes it: the residual low-passed by residual_blur (0: unchanged)
        sr = y1.to(dev) + blur_residual(from_space(pred, cfg.unshuffle) / cfg.residual_scale, cfg.residual_blur)
        return {"pred": pred, "target": target.to(dev), "timesteps": timesteps.to(dev), "sr": sr, "hr": hr.to(dev)}

    @torch.no_grad()
    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """SR of ``lr (B, 3, h, w)`` with a copy of the trainable model (see :class:`DefaultSRPipeline`)."""
        pipe = DefaultSRPipeline(
            model, stage1=self.stage1, text=self.text, degradation=self.degradation, device=self.device
        )
        options = DefaultDiffusionOptions(steps=steps, seed=seed, guidance_scale=guidance_scale)
        return pipe(lr, options, prompts=list(prompts)).images

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the ``default-sr`` checkpoint (loadable by ``--method default-diffusion --checkpoint``)."""
        save_default_sr(model, folder)
