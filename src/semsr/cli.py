"""The ``semsr`` command line.

Every sub-command lives in its own module under :mod:`semsr.commands`; a module
there defines ``register(subparsers)`` which adds one or more parsers and sets
``func`` (a callable ``(argparse.Namespace) -> int``) on each. Modules named
``bench_*`` are kinds of ``semsr bench`` (:mod:`semsr.commands.bench` registers
them), not commands. This file only discovers the modules, parses, and turns
:class:`~semsr.core.errors.SemsrError` into a one-line message and an exit code.

A command whose options depend on other options (``semsr upscale``: the
chosen method's options) parses in two stages: it sets ``finish_parse``
(``(namespace, leftover arguments) -> namespace``), which receives what the
first stage did not recognise; other commands get argparse's usual
"unrecognized arguments" error.

Only the module of the command being run is imported (``semsr upscale`` does not import
the training or benchmark code): :func:`command_word` finds the command in ``argv`` and
:func:`build_parser` registers that one module when it names one; ``semsr``, ``semsr -h``
and an unknown command build the full parser.

Option names may be spelled with underscores (``--tile_pad`` is ``--tile-pad``,
Real-ESRGAN's habit): :func:`normalise_flags` rewrites them before parsing. A
command that needs an optional package that is not installed (faiss, matplotlib)
ends with one line naming the extra that provides it (:data:`EXTRAS`), exit code 3.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

import semsr.commands as commands_pkg
from semsr import __version__
from semsr.core.errors import SemsrError, Terminated


def command_modules() -> list[str]:
    """Names of the modules under :mod:`semsr.commands` that define commands (each is its command's name)."""
    names = [info.name for info in pkgutil.iter_modules(commands_pkg.__path__)]
    return sorted(n for n in names if not n.startswith(("_", "bench_")))  # bench_*: kinds of `semsr bench`


def command_word(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (its first word that is not a top-level option), or None."""
    for word in argv:
        if word in ("-h", "--help", "--version"):
            return None
        if not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser: with every discovered sub-command, or only with ``command``'s module
    when ``command`` names one (start-up of a run imports nothing of the other commands)."""
    parser = argparse.ArgumentParser(
        prog="semsr",
        description="Semantics-guided diffusion super-resolution (offline-first).",
    )
    parser.add_argument("--version", action="version", version=f"semsr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = command_modules()
    for name in [command] if command in names else names:
        module = importlib.import_module(f"semsr.commands.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


#: Optional packages (top-level module) -> the extra of semsr that installs them (pyproject.toml).
EXTRAS: dict[str, str] = {"faiss": "index", "matplotlib": "report"}
#: Commands whose use of an optional package belongs to another extra than :data:`EXTRAS` says.
_COMMAND_EXTRAS: dict[tuple[str, str], str] = {("train", "matplotlib"): "train"}


def normalise_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` with underscores in long option names turned into dashes (``--tile_pad=8`` ->
    ``--tile-pad=8``); words after a bare ``--`` and values are left alone."""
    out: list[str] = []
    for i, word in enumerate(argv):
        if word == "--":
            return out + list(argv[i:])
        if word.startswith("--") and "_" in word.split("=", 1)[0]:
            name, sep, value = word.partition("=")
            word = name.replace("_", "-") + sep + value
        out.append(word)
    return out


def missing_extra_message(err: ModuleNotFoundError, args: argparse.Namespace) -> str | None:
    """One line for an optional package that is not installed, naming its extra; ``None`` for other modules."""
    module = (err.name or "").split(".")[0]
    command = getattr(args, "command", None) or "semsr"
    extra = _COMMAND_EXTRAS.get((command, module), EXTRAS.get(module))
    if extra is None:
        return None
    words = [command, *(str(v) for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str))]
    return f"semsr {' '.join(words)} needs the optional package {module}: pip install 'semsr[{extra}]'"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code.

    SIGTERM is handled like Ctrl-C (:class:`~semsr.core.errors.Terminated` is a
    ``KeyboardInterrupt``): commands finish or drop the current output, write their
    reports, and the exit code is 143 (130 for Ctrl-C).
    """
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    words = normalise_flags(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_word(words))
    args, rest = parser.parse_known_args(words)
    finish = getattr(args, "finish_parse", None)
    if finish is None and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if finish is not None:
            args = finish(args, rest)
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except SemsrError as err:
        if args.debug:
            raise
        print(f"semsr: error: {err}", file=sys.stderr)
        return err.exit_code
    except Terminated as err:
        print("semsr: terminated", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("semsr: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        message = missing_extra_message(err, args)
        if message is None or args.debug:
            raise
        print(f"semsr: error: {message}", file=sys.stderr)
        return 3
    except MemoryError:
        if args.debug:
            raise
        print("semsr: error: out of memory (try a smaller --tile)", file=sys.stderr)
        return 1


def run() -> NoReturn:
    """The console entry point (``semsr``, ``python -m semsr``): :func:`main`, then :func:`quick_exit`
    (``SEMSR_SLOW_EXIT=1``: the interpreter's usual exit)."""
    code = main()
    if os.environ.get("SEMSR_SLOW_EXIT", "") not in ("", "0"):
        sys.exit(code)
    quick_exit(code)


def quick_exit(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown of every imported module and object
    (torch, diffusers, transformers and the loaded models), once nothing is left to do: the exit handlers
    (``atexit``: logging, temporary folders, coverage) run and the standard streams are flushed first. While
    another non-daemon thread is alive it exits the usual way, which waits for it."""
    if any(t is not threading.current_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the usual exit runs first; CPython's own (stable) hook
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: the usual exit would not write it either
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
