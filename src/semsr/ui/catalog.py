"""What the web demo shows about each registered method (built from the registry).

Nothing here is specific to a method: the picker lists :func:`semsr.methods.specs`,
availability comes from the same rows as ``semsr models list`` plus the weight
paths the server was started with (a method taking weight paths is offered once
at least one of them is given; ``missing_paths`` lists the others, and a run
that needs them fails with the method's own one-line message), and each method's own options are rendered
from its ``MethodSpec.extra["cli_options"]`` (run options only; build options
are server-side and come from the ``semsr serve`` command line).

An option entry may carry a ``"ui"`` dict of hints for the page:
``{"widget": "slider", "min": 0, "max": 2, "step": 0.05}`` (a range slider,
e.g. MMSR's per-modality temperatures) or ``{"widget": "image"}`` (an image
upload, e.g. a reference for CoSeR/RFA; also inferred from ``metavar="IMAGE"``).
``{"hidden": true}`` keeps an option off the page.

A method whose ``MethodSpec.extra["suggests_priors"]`` is true implements the
``suggest_priors`` hook (:data:`semsr.api.SUGGEST_HOOK`); the page then extracts
priors right after an upload and pre-fills the prompt fields with them (and any
text option named like a suggested key, e.g. xpsr's ``low_prompt``), then runs
with ``priors_in_prompt`` so the method uses the (edited) fields as given.
Flag options named ``save_*`` (e.g. coser's ``--save-reference``) are switched
on by the server so the side outputs they produce are shown with the priors.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from semsr.api import PATH_OPTIONS, option_dest
from semsr.methods import MethodSpec, specs

#: Run options the page always offers (the shared diffusion options); ``priors_in_prompt``
#: (:data:`semsr.priors.report.PRIORS_IN_PROMPT`) is sent when the prompts were pre-filled from priors.
COMMON_RUN_OPTIONS = ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "colour_fix",
                      "priors_in_prompt")
#: Options the page never renders per method (covered by common fields or meaningless in a browser).
_SKIP = {"progress", "tile", "tile_pad", *COMMON_RUN_OPTIONS}


def path_options(spec: MethodSpec) -> list[str]:
    """Weight-path options (:data:`~semsr.api.PATH_OPTIONS`) the method's factory takes."""
    try:
        params = inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):
        return []
    return [p for p in PATH_OPTIONS if p in params]


def required_paths(spec: MethodSpec) -> list[str]:
    """The path options the server must be given: :func:`path_options` minus the ones the
    method fills from packaged files (``spec.extra["bundled_paths"]``)."""
    bundled = set(spec.extra.get("bundled_paths") or ())
    return [p for p in path_options(spec) if p not in bundled]


def paths_for(spec: MethodSpec, paths: Mapping[str, Any]) -> dict[str, str]:
    """The weight paths a method is built with, picked from the server's ``paths``.

    ``paths`` maps a path option (``"checkpoint"``) either to one path for every method
    that takes it, or to ``{method name: path}`` (key ``""`` = every method). A path
    for every method never replaces packaged weights (``spec.extra["bundled_paths"]``):
    ``semsr serve --checkpoint /runs/mmsr`` must not feed an MMSR checkpoint to the
    shipped default model; ``--checkpoint default-diffusion=/runs/mine`` does reach it
    (a method name keys its aliases too: ``default`` for the default's target).
    """
    bundled = set(spec.extra.get("bundled_paths") or ())
    names = (spec.name, spec.extra.get("alias_of"))
    chosen: dict[str, str] = {}
    for opt in path_options(spec):
        value = paths.get(opt)
        scoped = dict(value) if isinstance(value, Mapping) else {"": value}
        own = next((scoped[n] for n in names if scoped.get(n)), None)
        path = own or (None if opt in bundled else scoped.get(""))
        if path:
            chosen[opt] = str(path)
    return chosen


def _type_name(opt: Mapping[str, Any]) -> str:
    if opt.get("action") in ("store_true", "store_false"):
        return "bool"
    t = opt.get("type")
    return {int: "int", float: "float"}.get(t, "str")


def option_schema(opt: Mapping[str, Any]) -> dict[str, Any] | None:
    """JSON description of one ``cli_options`` entry for the page, or ``None`` to skip it."""
    if opt.get("target", "run") != "run":
        return None
    ui = dict(opt.get("ui") or {})
    dest = option_dest(opt)
    if dest in _SKIP or ui.get("hidden") or (dest.startswith("save_") and _type_name(opt) == "bool"):
        return None
    widget = ui.get("widget")
    kind = _type_name(opt)
    if widget is None:
        if opt.get("metavar") == "IMAGE":
            widget = "image"
        elif opt.get("choices"):
            widget = "select"
        elif kind == "bool":
            widget = "checkbox"
        else:
            widget = "number" if kind in ("int", "float") else "text"
    label = next((f for f in opt["flags"] if f.startswith("--")), opt["flags"][0]).lstrip("-")
    return {
        "dest": dest, "label": label, "widget": widget, "type": kind,
        "choices": [str(c) for c in opt.get("choices") or []],
        "help": str(opt.get("help", "")),
        "min": ui.get("min"), "max": ui.get("max"), "step": ui.get("step"), "default": ui.get("default"),
    }


def method_entry(spec: MethodSpec, row: Mapping[str, Any], paths: Mapping[str, Any]) -> dict[str, Any]:
    """One method as the page sees it: name, scale, summary, availability (+ reason), options."""
    needs = required_paths(spec)
    available = bool(row.get("available", True))
    reason = "" if available else f"weights not installed ({row.get('package') or 'package missing'})"
    diffusion = bool(spec.extra.get("diffusion", "base" in needs))
    given = paths_for(spec, paths)
    missing = [p for p in needs if p not in given]
    if available and needs and len(missing) == len(needs):
        available = False
        reason = "needs " + ", ".join(f"--{p}" for p in needs) + " given to `semsr serve`"
    if row.get("needs") and len(missing) == len(needs):
        available, reason = False, f"needs {row['needs']}"
    options = [s for s in (option_schema(o) for o in spec.extra.get("cli_options") or ()) if s is not None]
    return {
        "name": spec.name, "scale": spec.scale, "summary": spec.summary, "available": available,
        "reason": reason, "diffusion": diffusion, "options": options,
        "missing_paths": missing if available else [],
        "suggests_priors": bool(spec.extra.get("suggests_priors", False)),
        "forced_options": {option_dest(o): True for o in spec.extra.get("cli_options") or ()
                           if o.get("target", "run") == "run" and option_dest(o).startswith("save_")
                           and _type_name(o) == "bool"},
        "colour_fixes": list(spec.extra.get("colour_fixes") or []),
        "alias_of": row.get("alias_of"),
    }


def catalogue(paths: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every registered method for the picker; available ones first, registry order within."""
    from semsr.commands.models import rows

    by_name = {r["name"]: r for r in rows()}
    entries = [method_entry(s, by_name.get(s.name, {}), paths or {}) for s in specs()]
    return sorted(entries, key=lambda e: (not e["available"], e["name"] != "default"))


def find(entries: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The entry called ``name``."""
    return next((e for e in entries if e["name"] == name), None)
