"""The denoising loop as a plain function over a diffusers scheduler.

A *denoiser* is any callable ``(x_t, t, cond) -> model_output`` where ``x_t``
is the ``(B, C, h, w)`` float32 latent, ``t`` a scalar timestep tensor and
``cond`` whatever the model needs (a tensor, or a dict/tuple of tensors with
batch first). Guidance is not done here: wrap the denoiser
(:mod:`semsr.pipeline.guidance`) before passing it in.

Schedulers: ``ddpm`` (XPSR's default, 20 steps), ``ddim``, ``dpm++``
(DPM-Solver++ multistep), all built from the checkpoint's scheduler config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from semsr.core.errors import SemsrError
from semsr.pipeline.guidance import Denoiser

Progress = Callable[[int, int], None]

SCHEDULER_NAMES = ("ddpm", "ddim", "dpm++")
_ALIASES = {"dpmsolver++": "dpm++", "dpm-solver++": "dpm++", "dpmpp": "dpm++", "dpm": "dpm++"}


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """Build scheduler ``name`` (``ddpm`` | ``ddim`` | ``dpm++``) from an SD ``scheduler_config``."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # heavy, imported on use

    key = _ALIASES.get(name.lower(), name.lower())
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if key == "ddpm":
        return DDPMScheduler.from_config(config)
    if key == "ddim":
        return DDIMScheduler.from_config(config)
    if key == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise SemsrError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULER_NAMES)}")


def sample(
    denoiser: Denoiser,
    scheduler: Any,
    *,
    shape: tuple[int, ...],
    cond: Any,
    steps: int = 20,
    generator: torch.Generator | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    init_timestep: int | None = None,
    added_noise_level: int | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run the reverse diffusion and return the final latent ``shape`` (float32).

    Args:
        denoiser: ``(x_t, t, cond) -> model output`` (epsilon or v, as the scheduler expects),
            guidance included (:mod:`semsr.pipeline.guidance`).
        scheduler: a diffusers scheduler (see :func:`make_scheduler`); mutated.
        shape: latent shape ``(B, C, h, w)``.
        cond: the condition passed to ``denoiser`` at every step.
        steps: number of denoising steps.
        generator: ``torch.Generator`` for the initial and per-step noise (CPU).
        init_latents: optional ``shape`` latent to start from (e.g. the LR
            latent), noised to the first timestep used; None starts from pure noise.
        strength: with ``init_latents``, the fraction of the schedule to run
            (1.0 = from t=T, XPSR; smaller skips the noisiest steps).
        init_timestep: with ``init_latents``, the timestep they are noised to instead of the first one
            used (SeeSR: 999, while its 50-step schedule starts at 981).
        added_noise_level: with ``init_latents``, noise the noised start once more, with fresh noise from
            ``generator``, to this training timestep (XPSR's released script: 800); None: no.
        progress: called as ``progress(done, total)`` after each step.
    """
    if steps < 1:
        raise SemsrError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if init_latents is None:
        x = noise * scheduler.init_noise_sigma
    else:
        if not 0.0 < strength <= 1.0:
            raise SemsrError(f"strength must be in (0, 1], got {strength}")
        start = min(int(round(steps * (1.0 - strength))), steps - 1)
        timesteps = timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        at = timesteps[:1] if init_timestep is None else torch.tensor([int(init_timestep)], device=timesteps.device)
        x = scheduler.add_noise(init_latents.float().to(device), noise, at)
        if added_noise_level is not None:
            added = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
            x = scheduler.add_noise(x, added, torch.tensor([int(added_noise_level)], device=device))
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        out = denoiser(x_in, t, cond).float()
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, total)
    return x
