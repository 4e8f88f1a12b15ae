"""``semsr models list [--json]``: the registered upscaling methods and their files.

For each method: name, scale, runtime, file size, whether it can run on this
machine (package importable and files present; "needs weights" for a method
whose weights the user must provide) and the licence of the weights, in 100
columns. ``--json`` prints a JSON array of objects with at least the keys
``name``, ``scale`` and ``available`` (plus packages, files, whole licences, ``needs``).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from semsr import methods
from semsr.core.method import MethodSpec
from semsr.models.catalog import method_row

#: Width the table fits in (a terminal of 100 columns).
WIDTH = 100


def user_weights(spec: MethodSpec) -> list[str]:
    """The weight options a user must fill for ``spec`` (``spec.weight_paths`` the method does not
    fill from packaged files), as flags: ``["--base", "--controlnet"]``; ``[]`` for a method that runs as shipped."""
    return [f"--{p.replace('_', '-')}" for p in spec.weight_paths if p not in spec.bundled_paths]


def rows() -> list[dict[str, Any]]:
    """One JSON-ready row per registered method, in registration order (:func:`semsr.models.catalog.method_row`).

    A method that needs weights the user must provide (``sd-controlnet``, the recipes,
    ``realesrgan-pth``) is ``"available": false`` with ``"needs"`` naming them: no
    weights are installed with semsr for it, so it cannot run as installed.
    """
    out = []
    for spec in methods.specs():
        row = method_row(spec.name, spec.scale, spec.summary, spec.info)
        flags = user_weights(spec)
        if flags:
            row["available"] = False
            given = row.get("needs")  # the catalogue's "weights=PATH"
            shown = [f"--{given.split('=')[0]}"] if given else flags
            row["needs"] = "weights: " + ", ".join(f"{f} PATH" for f in shown)
        out.append(row)
    return out


def _human(n: int) -> str:
    if n <= 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _available(row: dict[str, Any]) -> str:
    if row["available"]:
        return "yes"
    return "needs weights" if row.get("needs") else "no"


def format_table(table: list[dict[str, Any]], width: int = WIDTH) -> str:
    """Plain-text table of :func:`rows` that fits in ``width`` columns (long licences are shortened;
    ``--json`` has them whole, with the files and packages)."""
    head = ("name", "scale", "runtime", "size", "available", "licence")
    lines = [
        (
            r["name"] + (f" -> {r['alias_of']}" if r.get("alias_of") else ""),
            str(r["scale"]),
            r["runtime"],
            _human(r["size_bytes"]),
            _available(r),
            r["licence"].split(" (")[0].split(";")[0] or "-",  # the licence's name; --json has it whole
        )
        for r in table
    ]
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    widths[-1] = max(len(head[-1]), min(widths[-1], width - sum(widths[:-1]) - 2 * (len(head) - 1)))
    lines = [(*ln[:-1], textwrap.shorten(ln[-1], widths[-1], placeholder="...")) for ln in lines]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln).rstrip() for ln in lines]
    packages = sorted({f"{r['package']}=={r['package_version']}" for r in table if r.get("package_version")})
    if packages:
        text = "weights from: " + ", ".join(packages)
        out += ["", *textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False)]
    aliases = [f"{a} = {r['name']}" for r in table for a in r.get("aliases") or ()]
    if aliases:
        out += ["", *textwrap.wrap("Real-ESRGAN's names: " + ", ".join(aliases), width, subsequent_indent="  ")]
    needs = [r for r in table if r.get("needs") and not r["available"]]
    if needs:
        out += ["", "needs weights you provide (see `semsr upscale -n NAME -h`):"]
        out += [
            ln
            for r in needs
            for ln in textwrap.wrap(f"{r['name']}: {r['needs']}", width, initial_indent="  ", subsequent_indent="    ")
        ]
    trained = [r for r in table if r.get("training_data") and not r.get("alias_of")]
    if trained:
        out += ["", "trained by semsr:"]
        out += [
            ln
            for r in trained
            for ln in textwrap.wrap(
                f"{r['name']}: {r['training_data']}", width, initial_indent="  ", subsequent_indent="    "
            )
        ]
    out += ["", "(semsr models list --json: files, packages and whole licences)"]
    return "\n".join(out)


def run_list(args: argparse.Namespace) -> int:
    table = rows()
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(format_table(table))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the available upscaling models")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    lst = sub.add_parser("list", help="list models: scale, package, size, licence, availability")
    lst.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    lst.set_defaults(func=run_list)
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])
