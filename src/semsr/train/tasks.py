"""Training tasks: which modules exist, which train, and how a batch becomes outputs.

A task owns the models of one recipe. The trainer only needs:

- ``task.trainable``: one ``nn.Module`` holding every trainable parameter (a
  recipe with several trainable parts wraps them in a container whose
  ``forward`` the task calls); the trainer hands it to Accelerate (DDP) and the
  optimiser, and keeps its EMA;
- ``task.setup(device, weight_dtype)``: move/cast the frozen modules;
- ``task.compute(model, batch)``: named outputs for the loss terms of
  :mod:`semsr.train.losses` (``pred``/``target`` at least). ``model`` is the
  prepared (possibly DDP-wrapped) ``trainable`` and must be *called* (not its
  sub-modules) so gradient synchronisation works;
- ``task.sample(model, lr, prompts, steps, guidance_scale, seed)``: SR images
  for validation (``model`` is a detached copy of the trainable weights);
- ``task.export(model, folder)``: save the trainable weights for inference
  into ``folder`` (a staging folder the trainer moves into place when complete).

All random draws inside ``compute`` use per-sample generators seeded by
``batch["seed"]`` (see :mod:`semsr.train.data`) — never the global RNG — so
results do not depend on batch split, process count or resume point.

Tasks on a frozen Stable Diffusion derive from :class:`LatentDiffusionTask`,
which loads the SD parts and runs the shared noise-prediction step; a recipe
supplies its model call through the :meth:`LatentDiffusionTask.predict` hook
(:class:`ControlNetSRTask` is the ControlNet one; its forward is the inference
pipeline's :func:`~semsr.pipeline.sd_controlnet.controlnet_unet_forward`).
Model paths in configs go through :func:`semsr.testing.tiny.resolve_model_path`
(``tiny://NAME`` -> a tiny random model written into the cache on first use).

New tasks register with :func:`register_task`::

    @register_task("xpsr")
    class XPSRTask(ControlNetSRTask): ...

and list their module in :data:`TASK_MODULES` (a one-line edit) so that
``task: xpsr`` finds them; the module may register its loss terms too.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.errors import SemsrError
from semsr.core.loading import load_controlnet, load_sd
from semsr.pipeline.latent_sr import make_hint
from semsr.pipeline.options import ControlNetSROptions
from semsr.pipeline.sd_controlnet import DEFAULT_NEGATIVE, SDControlNetSR, controlnet_unet_forward, new_controlnet
from semsr.pipeline.text import PromptEncoder, load_text_conditioner
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig

log = logging.getLogger(__name__)

_TASKS: dict[str, type[Task]] = {}

#: Modules imported before a task is looked up; each registers tasks (and loss terms).
TASK_MODULES: list[str] = [
    "semsr.train.coser",
    "semsr.train.mmsr",
    "semsr.train.xpsr",
    "semsr.train.default",
    "semsr.train.rfa_sr",
    "semsr.train.rfa",
    "semsr.train.irpad",
    "semsr.train.dalpsr_encoder",
    "semsr.train.vq",
]


def import_task_modules() -> None:
    """Import every module of :data:`TASK_MODULES` (registers their tasks and losses)."""
    for name in TASK_MODULES:
        importlib.import_module(name)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a :class:`Task` subclass under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def available_tasks() -> list[str]:
    """Names of the registered tasks."""
    import_task_modules()
    return sorted(_TASKS)


def build_task(cfg: ExperimentConfig) -> Task:
    """Instantiate the task named by ``cfg.task`` (loads its models)."""
    import_task_modules()
    cls = _TASKS.get(cfg.task)
    if cls is None:
        raise SemsrError(f"unknown task '{cfg.task}' (known: {', '.join(available_tasks())})")
    return cls(cfg)


class Task:
    """Base class; see the module docstring for the contract."""

    name = "task"
    trainable: nn.Module

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move frozen modules to ``device`` in ``weight_dtype`` (trainable stays fp32)."""
        raise NotImplementedError

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Named outputs for the loss terms from one micro-batch."""
        raise NotImplementedError

    def sample(
        self,
        model: nn.Module,
        lr: torch.Tensor,
        prompts: list[str],
        steps: int,
        guidance_scale: float,
        seed: int,
    ) -> torch.Tensor:
        """Super-resolve ``lr (B, 3, h, w)`` in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1]."""
        raise NotImplementedError

    def export(self, model: nn.Module, folder: Path) -> None:
        """Save the (unwrapped) trainable weights in an inference-loadable layout into the empty ``folder``."""
        raise NotImplementedError

    @property
    def pixel_multiple(self) -> int:
        """HR sizes must be multiples of this (e.g. the VAE factor); 1 by default."""
        return 1

    def train_items(self, items: list[Any]) -> list[Any]:
        """The training images this task uses from the listed ones (all by default; a task may hold some out)."""
        return items


def per_sample_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample from ``seeds (B,)`` int64."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


def randn_like_per_sample(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``x (B, ...)``, row ``i`` drawn from ``gens[i]``."""
    rows = [torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in gens]
    return torch.stack(rows).to(device=x.device, dtype=x.dtype)


@dataclass
class NoisedBatch:
    """One micro-batch on the task's device, noised for a training step.

    Attributes:
        batch: the micro-batch as the loader gave it (``prompt``, ``position``, ...).
        hr: ``(B, 3, H, W)`` HR crops in [0, 1]; lr: ``(B, 3, h, w)`` degraded LR.
        gens: per-sample generators (already past the latent, noise and timestep draws).
        latents: ``(B, C, H/f, W/f)`` float32 scaled VAE latents ``z_0`` of ``hr``.
        noise: diffusion noise like ``latents``; timesteps: ``(B,)`` int64.
        noisy: ``z_t`` float32 (``noise_scheduler.add_noise``).
    """

    batch: dict[str, Any]
    hr: torch.Tensor
    lr: torch.Tensor
    gens: list[torch.Generator]
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


class LatentDiffusionTask(Task):
    """Base of the tasks that train extra modules on a frozen Stable Diffusion (noise prediction on latents).

    :meth:`load_frozen_sd` (called by the subclass's ``__init__``) sets
    ``components``, ``vae``, ``unet``, ``text`` (the text conditioner),
    ``prompts`` (its cached :class:`PromptEncoder`), ``noise_scheduler``
    (DDPM, from the checkpoint) and ``vae_factor``. :meth:`compute` draws per
    sample, in order, the VAE posterior noise, the diffusion noise and the
    timestep, then calls the :meth:`predict` hook (which makes the recipe's own
    draws and model call) and adds the eps / velocity ``target``.
    """

    def load_frozen_sd(self, path: Path) -> Any:
        """Load the SD folder/file ``path`` frozen (see the class docstring); returns the components."""
        from diffusers import DDPMScheduler  # heavy dependency, imported on use

        sd = load_sd(path)
        self.components = sd
        self.vae = sd.vae.requires_grad_(False).eval()
        self.unet = sd.unet.requires_grad_(False).eval()
        self.noise_scheduler = DDPMScheduler.from_config(sd.scheduler_config)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.text = load_text_conditioner(sd).requires_grad_(False).eval()
        self.prompts = PromptEncoder(self.text.encode)
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32
        return sd

    @property
    def pixel_multiple(self) -> int:
        """VAE factor times the UNet's down-sampling: latents the UNet maps back to their own size."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen modules :meth:`setup` moves and casts (subclasses add theirs)."""
        return [self.vae, self.unet, self.text]

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.device, self.weight_dtype = device, weight_dtype
        for m in self.frozen_modules():
            m.to(device=device, dtype=weight_dtype)
        self.prompts.clear()

    # -- training --------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self, hr: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """VAE latents of ``hr (B, 3, H, W)`` in [0, 1], sampled with per-sample noise.

        Returns ``(B, C, H/f, W/f)`` float32, scaled by the VAE's scaling (and shift) factor.
        """
        dist = self.vae.encode((hr * 2 - 1).to(self.weight_dtype)).latent_dist
        z = dist.mean.float() + dist.std.float() * randn_like_per_sample(dist.mean.float(), gens)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def vae_mode(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled posterior-mode latent of ``image (B, 3, H, W)`` in [0, 1] (as the inference pipeline encodes)."""
        z = self.vae.encode((image * 2 - 1).to(self.device, self.weight_dtype)).latent_dist.mode().float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def draw_prompts(self, prompts: list[str], gens: list[torch.Generator]) -> list[str]:
        """Replace each prompt by ``""`` with probability ``train.null_prompt_prob``."""
        p = self.cfg.train.null_prompt_prob
        drops = [float(torch.rand((), generator=g)) < p for g in gens]
        return ["" if d else text for text, d in zip(prompts, drops, strict=True)]

    def predict(self, model: nn.Module, step: NoisedBatch) -> dict[str, Any]:
        """The recipe's model call on ``step.noisy``: ``{"pred": (B, C, h, w), **extra outputs}``."""
        raise NotImplementedError

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Noise-prediction outputs for ``batch`` (``hr``, ``lr``, ``prompt``, ``seed``, ...).

        Returns ``pred``/``target`` ``(B, C, h, w)``, ``latents``, ``timesteps (B,)``
        and the extra outputs of :meth:`predict`. Per-sample draws, in order: VAE
        posterior noise, diffusion noise, timestep, then those of :meth:`predict`.
        """
        hr = batch["hr"].to(self.device)
        lr = batch["lr"].to(self.device)
        gens = per_sample_generators(batch["seed"])
        latents = self.encode_latents(hr, gens)
        noise = randn_like_per_sample(latents, gens)
        t_max = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, t_max, (), generator=g) for g in gens]).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        out = dict(self.predict(model, NoisedBatch(batch, hr, lr, gens, latents, noise, timesteps, noisy)))
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return {"pred": out.pop("pred"), "target": target, "latents": latents, "timesteps": timesteps, **out}


@register_task("controlnet_sr")
class ControlNetSRTask(LatentDiffusionTask):
    """SD + SR ControlNet: frozen VAE, UNet and text encoder; trainable ControlNet.

    The LR image, bicubic-upsampled to the HR size exactly as at inference
    (:func:`semsr.pipeline.latent_sr.make_hint`), is the ControlNet hint;
    the loss target is the noise (or velocity, for v-prediction schedulers).
    Captions are replaced by the empty prompt with probability
    ``train.null_prompt_prob`` so classifier-free guidance works at inference.

    ``model.options``:
        ``conditioning_channels``: ControlNet hint-embedding widths when the
        ControlNet is created from the UNet (default: a width per VAE
        down-sampling step, like SD's ``(16, 32, 96, 256)``).
    """

    OPTIONS = {"conditioning_channels"}

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        unknown = set(cfg.model.options) - self.OPTIONS
        if unknown:
            raise SemsrError(f"unknown model.options for controlnet_sr: {sorted(unknown)}")
        self.load_frozen_sd(resolve_model_path(cfg.model.pretrained))
        if cfg.model.controlnet:
            controlnet = load_controlnet(resolve_model_path(cfg.model.controlnet))
        else:
            steps = self.vae_factor.bit_length() - 1
            default = (16, 32, 96, 256, 256, 256)[: steps + 1]
            widths = tuple(cfg.model.options.get("conditioning_channels", default))
            if 2 ** (len(widths) - 1) != self.vae_factor:
                raise SemsrError(
                    f"model.options.conditioning_channels needs {steps + 1} entries for a VAE "
                    f"down-sampling factor of {self.vae_factor}"
                )
            with torch.random.fork_rng():  # the hint encoder's random init depends on the seed only
                torch.manual_seed(cfg.seed)
                controlnet = new_controlnet(self.unet, conditioning_embedding_out_channels=widths)
        self.trainable = controlnet.float().train().requires_grad_(True)

    @property
    def pixel_multiple(self) -> int:
        """The VAE factor only: the ControlNet's residuals follow the UNet's own resizing."""
        return self.vae_factor

    # -- training --------------------------------------------------------
    def denoise(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, hint: torch.Tensor
    ) -> torch.Tensor:
        """UNet output ``(B, C, h, w)`` with the residuals of the trainable ControlNet ``model``.

        ``noisy`` ``(B, C, h, w)`` float32, ``timesteps`` ``(B,)``, ``context`` ``(B, L, D)`` and ``hint``
        ``(B, 3, f*h, f*w)`` in the frozen dtype. This is the inference forward
        (:func:`~semsr.pipeline.sd_controlnet.controlnet_unet_forward`): under mixed precision
        Accelerate returns the prepared ControlNet's outputs in fp32 and the residuals are cast to
        the frozen UNet's dtype there.
        """
        return controlnet_unet_forward(self.unet, model, noisy.to(self.weight_dtype), timesteps, context, hint)

    def hint(self, step: NoisedBatch) -> torch.Tensor:
        """The ControlNet hint ``(B, 3, H, W)`` of ``step`` (bicubic LR at the HR size) in the frozen dtype."""
        return make_hint(step.lr, tuple(step.hr.shape[-2:])).to(self.weight_dtype)

    def predict(self, model: nn.Module, step: NoisedBatch) -> dict[str, Any]:
        """Draws the prompt dropout, then the ControlNet + UNet prediction on the hint."""
        prompts = self.draw_prompts(list(step.batch["prompt"]), step.gens)
        context = self.prompts(prompts).to(self.device, self.weight_dtype)
        return {"pred": self.denoise(model, step.noisy, step.timesteps, context, self.hint(step))}

    # -- validation / export -------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        lr: torch.Tensor,
        prompts: list[str],
        steps: int,
        guidance_scale: float,
        seed: int,
    ) -> torch.Tensor:
        """Run :class:`~semsr.pipeline.sd_controlnet.SDControlNetSR` with ``model`` as the ControlNet.

        ``prompts`` holds one prompt per image of ``lr``; the negative prompt is
        :data:`~semsr.pipeline.sd_controlnet.DEFAULT_NEGATIVE` (used when ``guidance_scale`` != 1).
        The pipeline casts ``model`` to the frozen modules' dtype and freezes
        it: pass a copy of the trainable module, never the module itself.
        """
        pipe = SDControlNetSR(
            vae=self.vae,
            unet=self.unet,
            controlnet=model,
            text=self.text,
            scheduler_config=self.components.scheduler_config,
            device=self.device,
            dtype=self.weight_dtype,
            scale=self.cfg.data.scale,
        )
        options = ControlNetSROptions(
            negative_prompt=DEFAULT_NEGATIVE, steps=steps, guidance_scale=guidance_scale, seed=seed
        )
        return pipe(lr, options, prompts=list(prompts)).images

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write a diffusers ControlNet folder (``config.json`` + safetensors) into ``folder``."""
        model.save_pretrained(folder, safe_serialization=True)
