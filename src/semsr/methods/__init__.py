"""The method registry: every restorer and diffusion recipe, by name.

A *method* turns an RGB image tensor into an upscaled one (the
:class:`~semsr.core.method.Method` protocol); it is registered as a
:class:`~semsr.core.method.MethodSpec` naming its factory and its typed
options class. Everything the CLI, the Python API, the benchmark runner and
the web demo run goes through :func:`resolve`, so a new restorer or recipe
only has to register a spec.

The built-in modules register on first lookup (``_BUILTIN``), so importing
this package imports no model code.
"""

from __future__ import annotations

from semsr.core.method import Method, MethodSpec
from semsr.core.options import MethodOptions
from semsr.core.registry import Registry

__all__ = ["Method", "MethodSpec", "build", "register", "resolve", "specs"]

# Modules that register methods when imported, in registration order.
_BUILTIN: tuple[str, ...] = (
    "semsr.methods.restorers",
    "semsr.methods.sd_controlnet",
    "semsr.methods.coser",
    "semsr.methods.xpsr",
    "semsr.methods.dalpsr",
    "semsr.methods.mmsr",
    "semsr.methods.rfa",
    "semsr.methods.default_diffusion",
    "semsr.methods.default_alias",  # last: "default" points at a method registered above
)
REGISTRY: Registry[MethodSpec] = Registry(_BUILTIN, "method")


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (later registrations replace earlier ones)."""
    return REGISTRY.add(spec.name, spec, spec.aliases)


def specs() -> list[MethodSpec]:
    """All registered methods, in registration order."""
    return REGISTRY.specs()


def resolve(name: str) -> MethodSpec:
    """The spec of ``name`` (or an alias); a one-line error naming the closest name if unknown."""
    return REGISTRY.resolve(name)


def build(name: str, options: MethodOptions | dict | None = None) -> Method:
    """Build method ``name`` from its options object, or from a dict of option values (validated)."""
    spec = resolve(name)
    opts = options if isinstance(options, MethodOptions) else spec.parse(options)
    return spec.factory(opts)
