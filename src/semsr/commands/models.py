"""``semsr models list [--json]``: the registered upscaling methods and their files.

For each method: name, scale, runtime, source package, file sizes, licence of
the weights and whether it can run on this machine (package importable and
files present). ``--json`` prints a JSON array of objects with at least the
keys ``name``, ``scale`` and ``available``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from semsr import methods
from semsr.models.catalog import method_row


def rows() -> list[dict[str, Any]]:
    """One JSON-ready row per registered method, in registration order (:func:`semsr.models.catalog.method_row`)."""
    return [method_row(s.name, s.scale, s.summary, s.info) for s in methods.specs()]


def _human(n: int) -> str:
    if n <= 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(table: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`rows`."""
    head = ("name", "scale", "runtime", "size", "available", "package", "licence")
    lines = [
        (
            r["name"] + (f" -> {r['alias_of']}" if r.get("alias_of") else ""),
            str(r["scale"]),
            r["runtime"],
            _human(r["size_bytes"]),
            "yes" if r["available"] else "no",
            f"{r['package']}=={r['package_version']}"
            if r.get("package") and r.get("package_version")
            else (r.get("package") or (f"needs {r['needs']}" if r.get("needs") else "-")),
            r["licence"] or "-",
        )
        for r in table
    ]
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln).rstrip() for ln in lines]
    trained = [r for r in table if r.get("training_data") and not r.get("alias_of")]
    if trained:
        out += ["", "trained by semsr:"] + [f"  {r['name']}: {r['training_data']}" for r in trained]
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
