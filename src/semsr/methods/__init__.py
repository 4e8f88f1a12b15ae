"""Registry of upscaling methods (restorers and diffusion recipes).

A *method* turns an RGB image tensor into an upscaled one. Everything the CLI,
the Python API, the benchmark runner and the web demo run goes through
:func:`get_method`, so a new restorer or recipe only has to register a factory.

Factories are registered lazily by module path (see ``_BUILTIN``) so importing
the registry does not import torch models, ncnn or diffusers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from semsr.core.registry import Registry


@runtime_checkable
class Method(Protocol):
    """What every upscaling method provides.

    Attributes:
        name: registry name, e.g. ``"realesrgan-x4plus"``.
        scale: native integer scale factor of the model.
        tiles_itself: True when the method does its own tiling (diffusion
            methods tile in latent space); otherwise callers tile in pixels.
    """

    name: str
    scale: int
    tiles_itself: bool

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        """Upscale ``x`` of shape ``(B, 3, H, W)``, float in [0, 1].

        Returns ``(B, 3, scale*H, scale*W)`` float in [0, 1]. ``run_opts`` are
        per-call options (prompt, negative_prompt, steps, guidance_scale, seed,
        tile, tile_pad, colour_fix, progress...); methods ignore the ones that
        do not apply to them.
        """
        ...


@dataclass
class MethodSpec:
    """Registry entry: how to build a method and what to tell users about it."""

    name: str
    factory: Callable[..., Method]
    scale: int
    summary: str = ""
    aliases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


# Modules that register methods when imported. Add a module here when it
# defines new methods; keep the list short and import-cheap.
_BUILTIN: tuple[str, ...] = (
    "semsr.models.restorers",
    "semsr.pipeline.sd_controlnet",
    "semsr.methods.coser",
    "semsr.methods.xpsr",
    "semsr.methods.dalpsr",
    "semsr.methods.mmsr",
    "semsr.methods.rfa",
    "semsr.methods.default_diffusion",
    "semsr.methods.default_alias",  # last: "default" points at a method registered above
)
_METHODS: Registry[MethodSpec] = Registry(_BUILTIN, "method")
_REGISTRY = _METHODS.entries
_ALIASES = _METHODS.aliases


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (later registrations replace earlier ones)."""
    return _METHODS.add(spec.name, spec, spec.aliases)


def specs() -> list[MethodSpec]:
    """All registered methods, in registration order."""
    return _METHODS.specs()


def resolve(name: str) -> MethodSpec:
    """Return the spec for ``name`` (or an alias); raise a one-line error if unknown."""
    return _METHODS.resolve(name)


def get_method(name: str, **build_opts: Any) -> Method:
    """Build the method ``name`` with ``build_opts`` (device, dtype, paths...)."""
    return resolve(name).factory(**build_opts)
