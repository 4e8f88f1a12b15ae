"""Options every Stable Diffusion latent SR method shares (recipes subclass them).

:class:`LatentSROptions` holds the sampling options of every latent diffusion
recipe and the build options of a Stable Diffusion base; recipes derive their
own options class from it, redefine a field to change its default (XPSR's
negative prompt, MMSR's 50 steps) and add their own fields.

Tiles: ``tile`` (from :class:`~semsr.core.options.MethodOptions`) is in
*input* pixels, as for every method; ``latent_tile`` (latent pixels) overrides
it. :func:`latent_tile` is the one conversion between the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from semsr.core.dtypes import resolve_device, resolve_dtype
from semsr.core.errors import UnavailableError
from semsr.core.options import MethodOptions, option
from semsr.pipeline.colorfix import COLOUR_FIXES
from semsr.pipeline.precision import COMPILE_MODES
from semsr.pipeline.sampler import SCHEDULER_NAMES
from semsr.pipeline.tome import MAX_TOME_RATIO, TOME_TARGET_SETS


class Placement(TypedDict, total=False):
    """Where and how a latent SR pipeline runs its models: the keywords every pipeline constructor passes on
    to :meth:`~semsr.pipeline.latent_sr.LatentSRPipeline.setup_sd` (defaults there)."""

    device: str | torch.device
    dtype: str | torch.dtype
    channels_last: bool
    compile: bool | str | None
    scale: int


def resolve_placement(placement: Mapping[str, Any]) -> tuple[torch.device, torch.dtype]:
    """The device and dtype that :class:`Placement` keywords name (defaults: CPU, fp32; ``dtype="auto"``
    resolved for the device)."""
    device = resolve_device(placement.get("device", "cpu"))
    return device, resolve_dtype(placement.get("dtype", "fp32"), device)


def steps_option(default: int) -> Any:
    """The ``steps`` field (sampling steps, 1-1000) with a recipe's default."""
    return option(default, min=1, max=1000, help="sampling steps", metavar="N")


def guidance_option(default: float) -> Any:
    """The ``guidance_scale`` field (classifier-free guidance scale, 0-100) with a recipe's default."""
    return option(default, min=0.0, max=100.0, help="classifier-free guidance scale", metavar="S")


@dataclass(kw_only=True, frozen=True)
class SamplingOptions(MethodOptions):
    """Prompts and sampling of a diffusion method."""

    prompt: str = option("", help="positive prompt")
    negative_prompt: str = option("", help="negative prompt")
    steps: int = steps_option(20)
    guidance_scale: float = guidance_option(1.0)
    seed: int = option(0, min=0, max=2**63 - 1, help="random seed", metavar="N")
    scheduler: str = option("ddpm", choices=SCHEDULER_NAMES, help="sampler")
    colour_fix: str = option(
        "adain", choices=COLOUR_FIXES, flags=("--color-fix",), help="colour correction against the input"
    )
    tile_overlap: int | None = option(
        None, min=0, max=1 << 16, units="latent px", metavar="N", help="overlap of latent tiles (default: tile/4)"
    )


@dataclass(kw_only=True, frozen=True)
class LatentSROptions(SamplingOptions):
    """A Stable Diffusion base (build) and the latent SR sampling options (run)."""

    scale: int = option(4, stage="build", min=1, max=64, help="SR factor of the model", metavar="S")
    base: Path | None = option(None, stage="build", metavar="PATH", help="Stable Diffusion folder or single file")
    base_config: Path | None = option(
        None, stage="build", metavar="DIR", help="local diffusers config folder for a single-file --base"
    )
    channels_last: bool = option(False, stage="build", hidden=True, help="channels-last memory format")
    compile: str | None = option(
        None,
        stage="build",
        choices=COMPILE_MODES,
        hidden=True,
        help="torch.compile the UNet and ControlNet once per pipeline: default (inductor), "
        "reduce-overhead (CUDA graphs, GPU) or freeze (inductor weight freezing, CPU)",
    )
    latent_tile: int | None = option(
        None,
        min=0,
        max=1 << 16,
        units="latent px",
        metavar="N",
        help="latent tile side, overrides --tile (default: untiled when the step fits in free device memory, else 64)",
    )
    partial_load: bool = option(
        False,
        stage="build",
        help="load weight files whose tensors do not match the model (a warning lists the keys); "
        "default: fail naming the file and the first keys",
    )
    start_from_lr: bool = option(True, help="start from the LR latent noised to the first timestep")
    strength: float = option(1.0, min=1e-6, max=1.0, help="fraction of the schedule run from the noised LR latent")
    tome_ratio: float = option(
        0.0,
        min=0.0,
        max=MAX_TOME_RATIO,
        metavar="R",
        help="token merging: fraction of the tokens merged before self-attention in the UNet's and ControlNet's "
        "highest-resolution transformer blocks (faster steps, slightly different output; 0 = off, exact)",
    )
    tome_targets: str = option(
        "attn1",
        choices=TOME_TARGET_SETS,
        help="the sub-modules of each merged transformer block that run on the merged tokens: attn1 "
        "(self-attention, as ToMe for SD), attn2 (cross-attention queries), ff (feed-forward)",
        advanced=True,
    )

    def placement(self) -> Placement:
        """The pipeline keywords these options set (an unset ``dtype`` is ``auto``)."""
        return Placement(
            device=self.device,
            dtype=self.dtype or "auto",
            channels_last=self.channels_last,
            compile=self.compile,
            scale=self.scale,
        )


@dataclass(kw_only=True, frozen=True)
class ControlNetSROptions(LatentSROptions):
    """:class:`LatentSROptions` plus an SR ControlNet (its folder and residual scale)."""

    controlnet: Path | None = option(None, stage="build", metavar="DIR", help="SR ControlNet folder")
    conditioning_scale: float = option(1.0, min=0.0, max=10.0, help="ControlNet residual scale", hidden=True)
    cache_hint: bool = option(
        True,
        help="embed the ControlNet hint of each tile once per call instead of at every step (same output)",
    )


def require_paths(method: str, options: MethodOptions, *fields: tuple[str, str]) -> None:
    """Raise ``"<method> needs <what>: pass --<field> PATH"`` for the first ``(field, what)`` not given."""
    for name, what in fields:
        if getattr(options, name) is None:
            raise UnavailableError(f"{method} needs {what}: pass --{name.replace('_', '-')} PATH")


def latent_tile(options: LatentSROptions, scale: float, factor: int, default: int | None = None) -> int | None:
    """The latent tile side of a call: ``latent_tile`` if given, else ``tile`` (input pixels) in latent
    pixels of the ``scale`` x output (VAE factor ``factor``), at least 1, else the method's ``default``
    (``None`` = automatic)."""
    if options.latent_tile is not None:
        return options.latent_tile
    if options.tile:
        return max(1, round(int(options.tile) * scale / factor))
    return default
