"""``semsr dev``: developer tools (tiny random models for tests and demos)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semsr.testing.tiny import write_tiny_models


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dev", help="developer tools (tiny test models)")
    dev_sub = parser.add_subparsers(dest="dev_command", metavar="DEV_COMMAND")
    tiny = dev_sub.add_parser(
        "tiny-models",
        help="write randomly initialised few-million-parameter models in the real on-disk formats",
        description="Write tiny random versions of every component semsr loads (SD folder, ControlNet, "
        "single-file SD, ...) into OUT/<name>. The outputs are noise; they exist to exercise "
        "the loading and pipeline code paths offline.",
    )
    tiny.add_argument("--out", required=True, type=Path, help="output folder")
    tiny.add_argument("--only", nargs="+", metavar="NAME", help="write only these components")
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tiny.set_defaults(func=run_tiny_models)
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])


def run_tiny_models(args: argparse.Namespace) -> int:
    skipped: dict[str, str] = {}
    out = write_tiny_models(args.out, args.only, seed=args.seed, skipped=skipped)
    for entry in sorted(out.iterdir()):
        print(entry)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0
