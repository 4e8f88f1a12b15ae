"""The method name ``default``: an alias of :data:`semsr.models.catalog.DEFAULT_TARGET`.

Registered after every built-in method module (last in ``semsr.methods._BUILTIN``),
so the target can be any registered method — a restorer or a diffusion recipe.
``semsr upscale`` without ``--method``, ``semsr.upscale(...)`` and the web demo
use it. The alias has the target's options class and factory (so it takes the
same options) and lists the target's files and licence (``info``).
"""

from __future__ import annotations

from dataclasses import replace

from semsr.core.method import MethodSpec
from semsr.methods import register, resolve
from semsr.models import catalog as cat


def alias_spec(target: MethodSpec, name: str = "default") -> MethodSpec:
    """A spec called ``name`` that builds ``target`` (``alias_of`` names it)."""
    info = cat.default_info(target.info) if isinstance(target.info, cat.ModelInfo) else target.info
    return replace(
        target,
        name=name,
        summary=f"the bundled default (currently {target.name})",
        aliases=(),
        info=info,
        alias_of=target.name,
    )


register(alias_spec(resolve(cat.DEFAULT_TARGET)))
