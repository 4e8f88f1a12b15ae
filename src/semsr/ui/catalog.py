"""What the web demo shows about each registered method (built from the registry).

Nothing here is specific to a method: the picker lists :func:`semsr.methods.specs`,
availability comes from the same rows as ``semsr models list``
(:func:`semsr.models.catalog.method_row`) plus the weight paths the server was
started with (a method taking weight paths is offered once at least one of
them is given; ``missing_paths`` lists the others, and a run that needs them
fails with the method's own one-line message), and the form fields of a method
come from its options class (:mod:`semsr.core.options`): its *run* options
that are not ``hidden`` (build options are server-side and come from the
``semsr serve`` command line). Widgets follow the option: ``widget="image"``
is an image upload (a reference for CoSeR/RFA), ``widget="slider"`` a range
slider (``min``/``max``/``step``), choices a select, a bool a checkbox, numbers
a number field, anything else a text field.

The shared run options (:data:`COMMON_FIELDS`: prompt, negative prompt, steps,
guidance, seed, colour fix) have fixed places on the page, shown when the
method has them. A method that suggests priors (``MethodSpec.suggests_priors``)
implements :class:`~semsr.core.method.SuggestsPriors`; the page then extracts
priors right after an upload and pre-fills the prompt fields with them (and
any text option named like a suggested key, e.g. xpsr's ``low_prompt``), then
runs with ``priors_in_prompt`` so the method uses the (edited) fields as given.
Bool options named ``save_*`` (e.g. coser's ``save_reference``) are switched on
by the server so the side images they produce are shown with the priors.

Options declared ``advanced=True`` (research ablations, tiling internals) are
marked ``advanced`` and shown behind the page's "Advanced options" disclosure.
Every field carries its real default: the declared one, or for a ``None``
default that a checkpoint decides (the default model's ``steps``) the value of
:meth:`~semsr.core.options.MethodOptions.resolved_defaults` with the server's
weight paths. :func:`presets` turns those defaults into the page's fidelity /
balanced / detail presets: concrete values of the method's own options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from semsr.core.errors import SemsrError
from semsr.core.method import MethodSpec
from semsr.core.options import OptionInfo
from semsr.methods import specs
from semsr.models.catalog import method_row
from semsr.priors.report import PRIORS_IN_PROMPT

#: Weight-path options ``semsr serve`` takes (``--base PATH`` or ``--base METHOD=PATH``) and
#: gives to the methods that have them.
SERVE_PATHS = (
    "base",
    "controlnet",
    "checkpoint",
    "vlm",
    "clip",
    "tagger",
    "irpad",
    "depth_model",
    "seg_model",
    "db",
    "aligner",
    "text_decoder",
)
#: Run options with a fixed place on the page (shown when the method has them).
COMMON_FIELDS = ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "colour_fix")
#: The page's presets, in display order (see :func:`presets`).
PRESETS = ("fidelity", "balanced", "detail")
#: Colour fixes a fidelity preset picks, first available wins (keeps the input's colours).
_FAITHFUL_COLOUR = ("wavelet", "adain")
#: Options the page never renders per method (fixed fields, or sent by the page itself).
_SKIP = {"tile", "tile_pad", PRIORS_IN_PROMPT, *COMMON_FIELDS}


def path_options(spec: MethodSpec) -> list[str]:
    """The server's weight-path options (:data:`SERVE_PATHS`) the method has (``spec.weight_paths``)."""
    return [p for p in SERVE_PATHS if p in spec.weight_paths]


def required_paths(spec: MethodSpec) -> list[str]:
    """The path options the server must be given: :func:`path_options` minus the ones the
    method fills from packaged files (``spec.bundled_paths``)."""
    return [p for p in path_options(spec) if p not in spec.bundled_paths]


def paths_for(spec: MethodSpec, paths: Mapping[str, Any]) -> dict[str, str]:
    """The weight paths a method is built with, picked from the server's ``paths``.

    ``paths`` maps a path option (``"checkpoint"``) either to one path for every method
    that takes it, or to ``{method name: path}`` (key ``""`` = every method). A path
    for every method never replaces packaged weights (``spec.bundled_paths``):
    ``semsr serve --checkpoint /runs/mmsr`` must not feed an MMSR checkpoint to the
    shipped default model; ``--checkpoint default-diffusion=/runs/mine`` does reach it
    (a method name keys its aliases too: ``default`` for the default's target).
    """
    names = (spec.name, spec.alias_of)
    chosen: dict[str, str] = {}
    for opt in path_options(spec):
        value = paths.get(opt)
        scoped = dict(value) if isinstance(value, Mapping) else {"": value}
        own = next((scoped[n] for n in names if n and scoped.get(n)), None)
        path = own or (None if opt in spec.bundled_paths else scoped.get(""))
        if path:
            chosen[opt] = str(path)
    return chosen


def _widget(info: OptionInfo) -> str:
    if info.widget is not None:
        return info.widget
    if info.choices and info.kind != "strs":
        return "select"
    if info.kind == "bool":
        return "checkbox"
    return "number" if info.kind in ("int", "float") else "text"


def option_schema(info: OptionInfo, resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON description of one option for the page; ``resolved``: real values of ``None`` defaults."""
    value = info.default
    if value is None and resolved and info.name in resolved:
        value = resolved[info.name]
    default = value if isinstance(value, (str, int, float, bool)) or value is None else None
    if isinstance(value, tuple):
        default = ",".join(map(str, value))
    return {
        "dest": info.name,
        "label": info.name.replace("_", "-"),
        "widget": _widget(info),
        "type": info.kind,
        "choices": [str(c) for c in info.choices],
        "help": info.describe(),
        "min": info.min,
        "max": info.max,
        "step": info.step,
        "default": default,
        "advanced": info.advanced,
    }


def resolved_defaults(spec: MethodSpec, paths: Mapping[str, Any]) -> dict[str, Any]:
    """The method's :meth:`~semsr.core.options.MethodOptions.resolved_defaults` with the server's weight paths
    (``{}`` when those paths do not parse)."""
    try:
        return spec.parse(paths_for(spec, paths)).resolved_defaults()
    except SemsrError:
        return {}


def presets(common: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fidelity / balanced / detail as concrete values of the method's common options.

    ``common``: the entry's common fields (:func:`option_schema`, defaults resolved, bounds the server's).
    ``balanced`` is the method's defaults; ``fidelity`` halves the sampling steps (rounded down, so a
    1-step default gives 0 where the method allows it: its deterministic first stage), brings the
    guidance halfway to 1 and picks a colour-preserving fix; ``detail`` doubles the steps (at least 4)
    and raises guidance above 1 by half. Only options the method has, clamped to their bounds; no
    presets for a method without a steps option (a single-pass restorer has nothing to trade).
    """
    steps = common.get("steps")
    if not steps or not isinstance(steps.get("default"), int):
        return {}

    def clamp(field: Mapping[str, Any], value: float) -> float:
        lo, hi = field.get("min"), field.get("max")
        value = max(value, lo) if lo is not None else value
        return min(value, hi) if hi is not None else value

    n = int(steps["default"])
    out: dict[str, dict[str, Any]] = {
        "fidelity": {"steps": int(clamp(steps, n // 2))},
        "balanced": {"steps": n},
        "detail": {"steps": int(clamp(steps, max(2 * n, 4)))},
    }
    guidance = common.get("guidance_scale")
    if guidance and isinstance(guidance.get("default"), (int, float)):
        g = float(guidance["default"])
        out["fidelity"]["guidance_scale"] = round(clamp(guidance, 1.0 + (g - 1.0) / 2 if g > 1 else g), 2)
        out["balanced"]["guidance_scale"] = g
        out["detail"]["guidance_scale"] = round(clamp(guidance, 1.0 + (g - 1.0) * 1.5 if g > 1 else g), 2)
    colour = common.get("colour_fix")
    if colour:
        faithful = next((c for c in _FAITHFUL_COLOUR if c in colour["choices"]), None)
        default = colour.get("default")
        for name in PRESETS:
            value = faithful if name == "fidelity" and faithful else default
            if value is not None:
                out[name]["colour_fix"] = value
    return out


def form_options(spec: MethodSpec) -> list[OptionInfo]:
    """The method's own fields: run options, not hidden, not fixed on the page, not ``save_*`` switches."""
    return [
        i
        for i in spec.options.infos().values()
        if i.stage == "run"
        and not i.hidden
        and i.name not in _SKIP
        and not (i.name.startswith("save_") and i.kind == "bool")
    ]


def forced_options(spec: MethodSpec) -> dict[str, bool]:
    """Run switches the server always turns on: ``save_*`` (their side images are shown as priors)."""
    return {
        i.name: True
        for i in spec.options.infos().values()
        if i.stage == "run" and i.kind == "bool" and i.name.startswith("save_")
    }


def method_entry(spec: MethodSpec, row: Mapping[str, Any], paths: Mapping[str, Any]) -> dict[str, Any]:
    """One method as the page sees it: name, scale, summary, availability (+ reason), fields."""
    needs = required_paths(spec)
    available = bool(row.get("available", True))
    reason = "" if available else f"weights not installed ({row.get('package') or 'package missing'})"
    given = paths_for(spec, paths)
    missing = [p for p in needs if p not in given]
    if available and needs and len(missing) == len(needs):
        available = False
        reason = "needs " + ", ".join(f"--{p}" for p in needs) + " given to `semsr serve`"
    if row.get("needs") and len(missing) == len(needs):
        available, reason = False, f"needs {row['needs']}"
    infos = spec.options.infos()
    resolved = resolved_defaults(spec, paths)
    common = {n: option_schema(infos[n], resolved) for n in COMMON_FIELDS if n in infos and not infos[n].hidden}
    return {
        "name": spec.name,
        "scale": spec.scale,
        "summary": spec.summary,
        "available": available,
        "reason": reason,
        "diffusion": spec.diffusion,
        "common": common,
        "options": [option_schema(i, resolved) for i in form_options(spec)],
        "presets": presets(common),
        "missing_paths": missing if available else [],
        "suggests_priors": spec.suggests_priors,
        "priors_in_prompt": PRIORS_IN_PROMPT in infos,
        "forced_options": forced_options(spec),
        "colour_fixes": [str(c) for c in infos["colour_fix"].choices] if "colour_fix" in infos else [],
        "alias_of": spec.alias_of,
    }


def catalogue(paths: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every registered method for the picker; available ones first, registry order within."""
    entries = [method_entry(s, method_row(s.name, s.scale, s.summary, s.info), paths or {}) for s in specs()]
    return sorted(entries, key=lambda e: (not e["available"], e["name"] != "default"))


def find(entries: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The entry called ``name``."""
    return next((e for e in entries if e["name"] == name), None)
