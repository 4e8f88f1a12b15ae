"""The method registry: every restorer and diffusion recipe, by name.

A *method* turns an RGB image tensor into an upscaled one (the
:class:`~semsr.core.method.Method` protocol); it is registered as a
:class:`~semsr.core.method.MethodSpec` naming its factory and its typed
options class. Everything the CLI, the Python API, the benchmark runner and
the web demo run goes through :func:`resolve`, so a new restorer or recipe
only has to register a spec.

The built-in modules register on first lookup (``_BUILTIN``), so importing
this package imports no model code; looking up one built-in name imports only
the module that registers it (:func:`builtin_module`), so ``semsr upscale -n
default`` does not import the code of the other recipes.
"""

from __future__ import annotations

import difflib

from semsr.core.errors import SemsrError
from semsr.core.method import Method, MethodSpec
from semsr.core.options import MethodOptions
from semsr.core.registry import Registry
from semsr.models.catalog import UPSTREAM_WITHOUT_WEIGHTS, catalog

__all__ = ["Method", "MethodSpec", "build", "register", "resolve", "specs"]

# Modules that register methods when imported, in registration order.
_BUILTIN: tuple[str, ...] = (
    "semsr.methods.restorers",
    "semsr.methods.sd_controlnet",
    "semsr.methods.coser",
    "semsr.methods.xpsr",
    "semsr.methods.dalpsr",
    "semsr.methods.seesr",
    "semsr.methods.mmsr",
    "semsr.methods.rfa",
    "semsr.methods.default_diffusion",
    "semsr.methods.default_alias",  # last: "default" points at a method registered above
)
#: Built-in method names (folded, see :func:`resolve`) of the modules other than the restorers (whose names are
#: the catalogue's); a name missing here still resolves, after every built-in module is imported.
_BUILTIN_NAMES: dict[str, str] = {
    "sd-controlnet": "semsr.methods.sd_controlnet",
    "coser": "semsr.methods.coser",
    "xpsr": "semsr.methods.xpsr",
    "dalpsr": "semsr.methods.dalpsr",
    "seesr": "semsr.methods.seesr",
    "mmsr": "semsr.methods.mmsr",
    "rfa": "semsr.methods.rfa",
    "default-diffusion": "semsr.methods.default_diffusion",
    "default": "semsr.methods.default_alias",
}


def builtin_module(name: str) -> str | None:
    """The built-in module that registers method ``name`` (any spelling :func:`resolve` accepts), or None."""
    key = _fold(name)
    if key in _BUILTIN_NAMES:
        return _BUILTIN_NAMES[key]
    if any(key in (_fold(i.name), *map(_fold, i.aliases)) for i in catalog()):
        return "semsr.methods.restorers"
    return None


REGISTRY: Registry[MethodSpec] = Registry(_BUILTIN, "method", builtin_module)


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (later registrations replace earlier ones)."""
    # the module that registers it (the alias module for an alias): listings keep the built-in order even when
    # a module was imported directly (``from semsr.methods.restorers import ...``) before the first lookup
    origin = "semsr.methods.default_alias" if spec.alias_of else getattr(spec.factory, "func", spec.factory).__module__
    return REGISTRY.add(spec.name, spec, spec.aliases, origin=origin if origin in _BUILTIN else None)


def specs() -> list[MethodSpec]:
    """All registered methods, in registration order."""
    return REGISTRY.specs()


def resolve(name: str) -> MethodSpec:
    """The spec of ``name`` (or an alias, in any case, ``_`` for ``-``: ``RealESRGAN_x4plus``).

    Raises:
        SemsrError: one line: for an upstream Real-ESRGAN name whose weights semsr does not
            ship, the closest method it has; otherwise the closest registered name.
    """
    REGISTRY.load_for(name)
    for _ in range(2):  # the second time after importing every built-in module
        known = {**{n: n for n in REGISTRY.entries}, **REGISTRY.aliases}
        if name in known:
            return REGISTRY.resolve(name)
        folded = {_fold(k): k for k in known}
        if _fold(name) in folded:
            return REGISTRY.resolve(folded[_fold(name)])
        REGISTRY.load_builtins()
    raise SemsrError(unknown_method_message(name, list(known)))


def _fold(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def unknown_method_message(name: str, known: list[str]) -> str:
    """One line for an unknown method ``name``: the closest of ``known`` (or for an upstream name
    without shipped weights, semsr's closest method and a hint)."""
    upstream = {_fold(k): (k, v) for k, v in UPSTREAM_WITHOUT_WEIGHTS.items()}
    if _fold(name) in upstream:
        original, (near, hint) = upstream[_fold(name)]
        return f"semsr does not ship the weights of {original}; the closest method is {near!r} ({hint})"
    pool: dict[str, str] = {}
    for k in known:  # registered names before aliases: the canonical spelling is suggested
        pool.setdefault(_fold(k), k)
    near = difflib.get_close_matches(_fold(name), list(pool), n=1, cutoff=0.5)
    hint = f"did you mean {pool[near[0]]!r}? " if near else ""
    return f"unknown method {name!r}; {hint}`semsr models list` lists them"


def build(name: str, options: MethodOptions | dict | None = None) -> Method:
    """Build method ``name`` from its options object, or from a dict of option values (validated)."""
    spec = resolve(name)
    opts = options if isinstance(options, MethodOptions) else spec.parse(options)
    return spec.factory(opts)
