"""The method name ``default``: an alias of :data:`semsr.models.catalog.DEFAULT_TARGET`.

Registered after every built-in method module (last in ``semsr.methods._BUILTIN``),
so the target can be any registered method — a restorer or a diffusion recipe.
``semsr upscale`` without ``--method``, ``semsr.upscale(...)`` and the web demo
use it. The alias advertises the target's factory signature (callers inspect it
to know which build options apply) and lists the target's files and licence.
"""
from __future__ import annotations

import inspect
from typing import Any

from semsr.methods import Method, MethodSpec, _METHODS, register
from semsr.models import catalog as cat


def _register() -> None:
    target = _METHODS.entries[cat.DEFAULT_TARGET]

    def build_default(**opts: Any) -> Method:
        return target.factory(**opts)

    build_default.__signature__ = inspect.signature(target.factory)  # type: ignore[attr-defined]
    info = target.extra.get("model_info")
    extra: dict[str, Any] = {k: v for k, v in target.extra.items() if k != "model_info"}
    extra["alias_of"] = target.name
    if isinstance(info, cat.ModelInfo):
        extra["model_info"] = cat.default_info(info)
    register(MethodSpec("default", build_default, target.scale,
                        f"the bundled default (currently {target.name})", extra=extra))


_register()
