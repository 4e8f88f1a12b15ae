"""semsr: semantics-guided diffusion super-resolution, offline-first.

Public API (imported lazily so ``import semsr`` stays fast)::

    import semsr
    img = semsr.upscale("photo.jpg", "default", outscale=4)
"""

from __future__ import annotations

from typing import Any

from semsr.core.version import __version__

__all__ = ["__version__", "upscale", "load", "Pipeline", "Result"]


def __getattr__(name: str) -> Any:
    if name in ("upscale", "load", "Pipeline", "Result"):
        from semsr import api

        return getattr(api, name)
    raise AttributeError(f"module 'semsr' has no attribute {name!r}")
