"""``semsr serve``: the local web demo (upload, pick a method, compare, download).

    semsr serve                                  # http://127.0.0.1:7860/
    semsr serve --port 7861 --base /models/sd15 --controlnet /models/cn-sr

Binds to 127.0.0.1 unless ``--host`` says otherwise, and answers only requests
addressed to localhost (``Host``) from its own page (``Origin``) unless
``--allow-host``/``--allow-origin`` add others. Runs one job at a time; others
wait in a queue (``--max-jobs``); a running job can be cancelled and stops after
``--job-timeout`` seconds; ``--max-steps`` caps sampling steps. Uploads above
``--max-upload-mb`` or ``--max-pixels`` are refused with a message in the page.
Connections time out after ``--request-timeout`` seconds of silence and at most
``--max-connections`` are served at once. The page is served from the package
(no CDN, fonts or analytics), so it works offline. ``docs/security.md`` lists
what the server refuses.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from semsr.commands.upscale import _max_pixels
from semsr.core.dtypes import DTYPE_CHOICES
from semsr.core.errors import SemsrError
from semsr.methods import resolve
from semsr.ui.catalog import SERVE_PATHS
from semsr.ui.server import make_server

log = logging.getLogger("semsr.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command."""
    p = subparsers.add_parser(
        "serve",
        help="run the local web demo",
        description="Serve the semsr web demo (one job at a time, localhost by default).",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 = any free port)")
    p.add_argument("--method", dest="default_method", default="default", help="initially selected method")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default: 20)")
    p.add_argument(
        "--max-pixels",
        type=_max_pixels,
        default=2_000_000,
        metavar="N",
        help="largest input image in pixels (default: 2M)",
    )
    p.add_argument("--max-jobs", type=int, default=8, help="jobs waiting or running at once (default: 8)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=200,
        metavar="N",
        help="most sampling steps per job (default: 200; 0 = the methods' own)",
    )
    p.add_argument(
        "--job-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="a running job stops at its next step after this long (default: 1800; 0 = no limit)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests addressed to this host name (repeatable; '*' = any; "
        "default: localhost, 127.0.0.1, ::1 and the --host address)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="also accept requests from pages of this origin, e.g. http://example.lan:8080 (repeatable; '*' = any; "
        "default: only the demo's own page)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection silent for this long (default: 30)",
    )
    p.add_argument(
        "--max-connections", type=int, default=32, metavar="N", help="connections served at once (default: 32)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--dtype",
        choices=list(DTYPE_CHOICES),
        default="auto",
        help="compute precision (default auto: bf16 on CPUs with native bf16, fp32 elsewhere)",
    )
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    g = p.add_argument_group(
        "weights of diffusion methods (local paths)",
        "PATH goes to every method that needs it; METHOD=PATH (repeatable) to that method only, "
        "which is also how a method with packaged weights (default-diffusion) gets other ones",
    )
    for name in SERVE_PATHS:
        g.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="[METHOD=]PATH",
            action="append",
            help=f"{name.replace('_', ' ')} for methods that take it",
        )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for flag, value, least in (
        ("--max-jobs", args.max_jobs, 1),
        ("--max-connections", args.max_connections, 1),
        ("--max-steps", args.max_steps, 0),
        ("--job-timeout", args.job_timeout, 0),
    ):
        if not value >= least:  # `not >=`: NaN too
            raise SemsrError(f"{flag} must be >= {least}, got {value:g}")
    if not args.request_timeout > 0 or args.request_timeout == float("inf"):
        raise SemsrError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout:g}")
    paths = {name: scoped_paths(name, getattr(args, name) or []) for name in SERVE_PATHS}
    try:
        server = make_server(
            args.host,
            args.port,
            paths={k: v for k, v in paths.items() if v},
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_pixels=args.max_pixels or 10**12,
            max_jobs=args.max_jobs,
            default_method=args.default_method,
            max_steps=args.max_steps,
            job_timeout=args.job_timeout,
            allowed_hosts=args.allow_host,
            allowed_origins=args.allow_origin,
            request_timeout=args.request_timeout,
            max_connections=args.max_connections,
        )
    except OSError as err:
        raise SemsrError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s: anyone who can reach this machine can use the demo "
            "(requests must name an allowed host: localhost, the --host address or --allow-host NAME)",
            args.host,
        )
    print(f"semsr web demo on {server.url}  (Ctrl+C to stop)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _stop)  # `kill` cleans up like Ctrl+C (temporary files removed)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def scoped_paths(option: str, values: list[str]) -> dict[str, str]:
    """``--OPTION`` values as ``{method name: path}`` (``""`` = every method).

    ``mmsr=/runs/mmsr`` is scoped when ``mmsr`` names a registered method (aliases
    resolve to their method); any other value is one path for every method, so a
    path that merely contains ``=`` still works. The same scope twice is an error.
    """
    out: dict[str, str] = {}
    for value in values:
        scope, path = "", value
        head, sep, tail = value.partition("=")
        if sep and head and "/" not in head and tail:
            try:
                spec = resolve(head)
                scope, path = spec.alias_of or spec.name, tail
            except SemsrError:
                if not Path(value).exists():
                    raise SemsrError(f"--{option} {value}: unknown method {head!r} (see `semsr models list`)") from None
        if scope in out:
            raise SemsrError(f"--{option} given twice for {scope or 'every method'}")
        out[scope] = path
    return out


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
