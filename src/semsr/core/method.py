"""The :class:`Method` protocol and the :class:`MethodSpec` a method is registered with.

A *method* turns an RGB image batch into an upscaled one. It is built by its
spec's ``factory`` from its typed options (:mod:`semsr.core.options`) and
called with them; every call returns an :class:`~semsr.core.outputs.SROutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from semsr.core.options import MethodOptions
from semsr.core.outputs import SROutput

#: ``progress(done, total)``: called as a method's steps (or tiles) advance.
ProgressFn = Callable[[int, int], None]


@runtime_checkable
class Method(Protocol):
    """What every upscaling method provides.

    Attributes:
        name: registry name, e.g. ``"realesrgan-x4plus"``.
        scale: native scale factor of the model.
        tiles_itself: True when the method does its own tiling (diffusion
            methods tile in latent space); otherwise callers tile in pixels.
    """

    name: str
    scale: int
    tiles_itself: bool

    def __call__(self, x: torch.Tensor, options: Any = None, *, progress: ProgressFn | None = None) -> SROutput:
        """Upscale ``x`` ``(B, 3, H, W)`` float in [0, 1] with the run options of ``options``.

        ``options`` is the method's options dataclass (``None``: the defaults).
        Returns ``images`` ``(B, 3, scale*H, scale*W)`` float in [0, 1].
        """
        ...


@runtime_checkable
class SuggestsPriors(Protocol):
    """A method that can extract its priors before a run, for a user to edit them."""

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        """Priors for ``x`` ``(1, 3, H, W)`` in [0, 1]; keys naming run options pre-fill those fields."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    """Registry entry: how to build a method and what to tell users about it.

    Attributes:
        name: registry name.
        factory: ``factory(options) -> Method``; reads the build options.
        options: the method's options dataclass.
        scale: native scale factor.
        summary: one line for ``semsr models list`` and the web picker.
        aliases: other names resolving to this spec.
        info: catalogue row (files, licence, training data) of packaged weights, if any.
        suggests_priors: built methods implement :class:`SuggestsPriors`.
        diffusion: a diffusion method (the web form shows the diffusion settings).
        weight_paths: build options naming weight files or folders (``base``, ``checkpoint``...).
        bundled_paths: those of ``weight_paths`` the method fills from packaged files when not given.
        alias_of: for an alias entry (``default``), the target's name.
    """

    name: str
    factory: Callable[[Any], Method]
    options: type[MethodOptions]
    scale: int
    summary: str = ""
    aliases: tuple[str, ...] = ()
    info: Any = None
    suggests_priors: bool = False
    diffusion: bool = False
    weight_paths: tuple[str, ...] = ()
    bundled_paths: tuple[str, ...] = ()
    alias_of: str | None = None

    def parse(self, values: Any = None, *, style: str = "name") -> MethodOptions:
        """This method's options from ``values`` (see :meth:`MethodOptions.parse`)."""
        return self.options.parse(values, method=self.name, style=style)

    def build(self, options: MethodOptions | None = None) -> Method:
        """Build the method with ``options`` (default: all defaults)."""
        return self.factory(options if options is not None else self.options())
