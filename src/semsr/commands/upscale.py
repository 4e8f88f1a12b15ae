"""``semsr upscale``: upscale files, folders or globs the way Real-ESRGAN users expect.

    semsr upscale -i photo.jpg                       # -> results/photo_out.jpg (4x, default method)
    semsr upscale -i photos/ -o out -s 2 --ext png   # every image in a folder, exact 2x
    semsr upscale -i 'scans/*.tif' -n bicubic --json report.json

Each input is read (:mod:`semsr.core.io`), upscaled (:func:`semsr.api.upscale_picture`)
and written atomically as ``<output>/<stem>_<suffix>.<ext>``. Existing outputs
are skipped unless ``--overwrite``. A bad input is reported and the run goes
on; the exit code is non-zero when any input failed (a single failing input
gives the usual one-line ``semsr: error: <file>: <problem>``).

**Method options.** Options shared by many methods are built in: device and
precision (build options) and the diffusion run options (``--prompt``,
``--negative-prompt``, ``--steps``, ``--guidance-scale``, ``--seed``,
``--colour-fix``), plus weight paths ``--base/--controlnet/--checkpoint/
--vlm/--clip`` (build options). All are forwarded only when given. A method
adds its own options by listing them in its ``MethodSpec.extra["cli_options"]``::

    MethodSpec(..., extra={"cli_options": [
        {"flags": ["--sfa-scale"], "type": float, "target": "run",
         "help": "weight of the semantic-fusion attention"},
        {"flags": ["--irpad"], "target": "build", "help": "IRPAD checkpoint folder"},
    ]})

Each entry is ``argparse.add_argument`` keywords plus ``flags`` and ``target``
(``"run"``: passed on every call, default; ``"build"``: passed to the factory);
the keyword name is ``dest`` or the first long flag with dashes as
underscores; an optional ``"ui"`` dict holds web-demo hints (see
:mod:`semsr.ui.catalog`) and is not given to argparse; the default is always ``None`` (= not given, not forwarded). The
options appear under "options of <method>" in ``semsr upscale --help``; an
option declared by several methods with the same ``dest`` is added once.

**Side outputs.** A method may leave extra images of its last call in a
``side_outputs`` attribute (``{name: (1, 3, H, W) tensor in [0, 1]}``, e.g.
coser's reference with ``--save-reference``); each is written beside the
output as ``<output stem>_<name>.png``.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from semsr import __version__
from semsr.api import PATH_OPTIONS, load, option_dest, upscale_picture
from semsr.core.errors import InputError, SemsrError
from semsr.core.io import DEFAULT_MAX_PIXELS, atomic_write, choose_format, read_image, write_picture
from semsr.methods import Method, MethodSpec, resolve, specs

log = logging.getLogger("semsr.upscale")

#: Run options every method may receive (forwarded only when given).
RUN_OPTIONS = ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "colour_fix")


# ---------------------------------------------------------------- parser


def _max_pixels(text: str) -> int:
    """Parse ``--max-pixels``: an integer, optionally with a K/M/G suffix (``100M``); 0 = no limit."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a pixel count: {text!r} (e.g. 100000000 or 100M)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``upscale`` sub-command."""
    p = subparsers.add_parser(
        "upscale",
        help="upscale images (file, folder or glob)",
        description="Upscale images with a restorer or a diffusion recipe.",
        epilog="Outputs are written atomically; existing outputs are skipped unless --overwrite.",
    )
    g = p.add_argument_group("input and output")
    g.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                   help="image file(s), folder(s) or glob pattern(s)")
    g.add_argument("-o", "--output", default="results", metavar="DIR", help="output folder (default: results)")
    g.add_argument("--suffix", default="out", help="output name is <stem>_<suffix>.<ext> (default: out; '' = none)")
    g.add_argument("--ext", default="auto", choices=["auto", "png", "jpg", "jpeg", "webp"],
                   help="output format; auto keeps png/jpg/webp inputs' format, png otherwise "
                        "(images with alpha never go to jpg: they are written as png)")
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default: 95)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    g.add_argument("--max-pixels", type=_max_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse inputs with more pixels (default: {DEFAULT_MAX_PIXELS // 10**6}M; 0 = no limit)")
    g.add_argument("--json", metavar="PATH", help="write a JSON report (per input: output, status, error, seconds, peak RSS)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = p.add_argument_group("method")
    g.add_argument("-n", "--model", "--method", dest="method", default="default",
                   help="method name (default: default; see `semsr models list`)")
    g.add_argument("-s", "--outscale", type=_positive_float, metavar="S",
                   help="final scale, any float (model scale, then resize); default: the model's scale")
    g.add_argument("-t", "--tile", type=_non_negative_int, metavar="N",
                   help="tile side in input pixels; 0 = no tiling; default: automatic (512 for restorers)")
    g.add_argument("--tile-pad", type=_non_negative_int, metavar="P",
                   help="context pixels around each tile; default: what the method needs to be seamless "
                        "(64 unless it says otherwise; Real-ESRGAN's 10 is faster but shows seams)")
    g.add_argument("--alpha-upsampler", choices=["bicubic", "model"], default="bicubic",
                   help="how the alpha channel is upscaled (default: bicubic)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="compute precision (default: the method's)")
    g.add_argument("--fp32", dest="dtype", action="store_const", const="fp32", help="same as --dtype fp32")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")

    g = p.add_argument_group("diffusion options (passed to the method when given)")
    g.add_argument("--prompt", help="positive prompt")
    g.add_argument("--negative-prompt", help="negative prompt")
    g.add_argument("--steps", type=int, help="sampling steps")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, help="random seed")
    g.add_argument("--colour-fix", "--color-fix", dest="colour_fix", choices=["adain", "wavelet", "none"],
                   help="colour correction against the input")

    g = p.add_argument_group("weight paths (passed to the method when given)")
    g.add_argument("--base", help="base diffusion model folder")
    g.add_argument("--controlnet", help="ControlNet folder")
    g.add_argument("--checkpoint", help="checkpoint file or folder (e.g. a Real-ESRGAN .pth)")
    g.add_argument("--vlm", help="vision-language model folder (captions)")
    g.add_argument("--clip", help="CLIP model folder")

    _add_method_options(p)
    p.set_defaults(func=run)


def _method_cli_options(spec: MethodSpec) -> list[dict[str, Any]]:
    return list(spec.extra.get("cli_options") or ())


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """Add every registered method's ``extra["cli_options"]`` (see the module doc)."""
    taken = {a.dest for a in parser._actions}
    for spec in specs():
        entries = [o for o in _method_cli_options(spec) if option_dest(o) not in taken]
        if not entries:
            continue
        group = parser.add_argument_group(f"options of {spec.name}")
        for opt in entries:
            dest = option_dest(opt)
            kwargs = {k: v for k, v in opt.items() if k not in ("flags", "target", "dest", "default", "ui")}
            try:
                group.add_argument(*opt["flags"], dest=dest, default=None, **kwargs)
            except argparse.ArgumentError as err:  # a flag another method already uses differently
                log.debug("option %s of %s not added: %s", opt["flags"], spec.name, err)
                continue
            taken.add(dest)


# ---------------------------------------------------------------- inputs and outputs

_IMAGE_SUFFIXES = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def collect_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Expand ``-i`` items: folders -> their image files (sorted, not recursive),
    globs -> matching files; other paths are kept as given (missing ones fail later).

    Returns ``(files, patterns_matching_nothing)``.
    """
    found: list[Path] = []
    unmatched: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(
                f for f in path.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _IMAGE_SUFFIXES
            )
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).is_file())
            found += matches
            if not matches:
                unmatched.append(item)
        else:
            found.append(path)
    seen: set[Path] = set()
    unique = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, unmatched


def output_path(out_dir: Path, src: Path, suffix: str, fmt: str) -> Path:
    """``<out_dir>/<stem>_<suffix>.<fmt>`` (no ``_`` when ``suffix`` is empty)."""
    stem = f"{src.stem}_{suffix}" if suffix else src.stem
    return out_dir / f"{stem}.{fmt}"


class PeakRss:
    """Peak resident memory of this process since the last :meth:`reset` (Linux: exact, via
    ``/proc/self/clear_refs``; elsewhere the process-lifetime peak)."""

    def __init__(self) -> None:
        self.resettable = True

    def reset(self) -> None:
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self.resettable = False

    def peak_mb(self) -> float:
        try:
            with open("/proc/self/status") as fh:
                m = re.search(r"VmHWM:\s+(\d+)\s+kB", fh.read())
            if m:
                return int(m.group(1)) / 1024.0
        except OSError:
            pass
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


@dataclass
class Result:
    """One line of the report."""

    input: str
    output: str | None
    status: str  # ok | skipped | failed
    error: str | None
    seconds: float
    peak_rss_mb: float


# ---------------------------------------------------------------- running


class _LoadFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _given(args: argparse.Namespace, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def method_options(args: argparse.Namespace, spec: MethodSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(build_opts, run_opts)`` the user gave for ``spec`` (generic + the method's own options)."""
    build = _given(args, PATH_OPTIONS)
    run = _given(args, RUN_OPTIONS)
    for opt in _method_cli_options(spec):
        dest = option_dest(opt)
        value = getattr(args, dest, None)
        if value is not None:
            (build if opt.get("target", "run") == "build" else run)[dest] = value
    return build, run


def _one_line(err: BaseException) -> str:
    """First line of an error's message, without the path (reports show the input separately)."""
    if isinstance(err, SemsrError):
        return err.message.strip().splitlines()[0]
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class _StderrHandler(logging.Handler):
    """Log records as ``semsr: warning: ...`` lines on the *current* ``sys.stderr``, above progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"semsr: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _setup_logging() -> None:
    logger = logging.getLogger("semsr")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler(logging.WARNING))
        logger.setLevel(logging.INFO)


def _write_report(path: Path, spec: MethodSpec, args: argparse.Namespace, results: list[Result]) -> None:
    """Write the ``--json`` report atomically."""
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    report = {
        "semsr_version": __version__,
        "method": spec.name,
        "outscale": args.outscale,
        "tile": args.tile,
        "tile_pad": args.tile_pad,
        "summary": counts,
        "results": [asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


_PER_FILE_ERRORS = (SemsrError, OSError, ValueError, RuntimeError, MemoryError)


class _Runner:
    """Processes one input at a time with the settings of a ``semsr upscale`` invocation."""

    def __init__(self, args: argparse.Namespace, spec: MethodSpec) -> None:
        self.args = args
        self.spec = spec
        self.build, self.run_opts = method_options(args, spec)
        self.out_dir = Path(args.output)
        self.progress: bool | None = False if args.no_progress else None
        self.claimed: dict[Path, str] = {}
        self._method: Method | None = None

    def method(self) -> Method:
        """The method, built on first use (so a run that skips everything loads nothing)."""
        if self._method is None:
            a = self.args
            try:
                self._method = load(self.spec.name, device=a.device, dtype=a.dtype, threads=a.threads, **self.build)
            except Exception as err:
                raise _LoadFailed(err) from err
        return self._method

    def process(self, src: Path | str) -> tuple[str, Path]:
        """Upscale ``src`` unless its output exists; returns ``(status, output_path)``."""
        a = self.args
        if isinstance(src, str):
            raise InputError("no files match this pattern", src)
        pic = read_image(src, max_pixels=a.max_pixels or None)
        fmt, note = choose_format(a.ext, pic)
        out = output_path(self.out_dir, src, a.suffix, fmt)
        key = out.resolve()
        if key == src.resolve():
            raise InputError(f"output {out} would overwrite the input; use another -o or --suffix", src)
        if key in self.claimed:
            raise InputError(f"output {out} is also the output of {self.claimed[key]}", src)
        self.claimed[key] = str(src)
        if out.exists() and not a.overwrite:
            tqdm.write(f"skipped {src}: {out} exists (use --overwrite to replace it)", file=sys.stdout)
            return "skipped", out
        if note:
            log.warning("%s: %s", src, note)
        result = upscale_picture(
            self.method(), pic, outscale=a.outscale, tile=a.tile, tile_pad=a.tile_pad,
            alpha=a.alpha_upsampler, progress=self.progress, run_opts=self.run_opts,
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_picture(result, out, fmt, quality=a.quality)
        tqdm.write(f"wrote {out} ({result.width}x{result.height})", file=sys.stdout)
        for side in write_side_outputs(self.method(), out):
            tqdm.write(f"wrote {side}", file=sys.stdout)
        return "ok", out


def write_side_outputs(method: Method, out: Path) -> list[Path]:
    """Write the method's ``side_outputs`` of its last call beside ``out`` (``<stem>_<name>.png``)."""
    written = []
    for name, image in (getattr(method, "side_outputs", None) or {}).items():
        arr = (image[0].detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        path = out.with_name(f"{out.stem}_{name}.png")
        with atomic_write(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        written.append(path)
    return written


def _print_summary(results: list[Result]) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    print(f"done: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed")
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.input}: {r.error}")


def run(args: argparse.Namespace) -> int:
    """Upscale every input; returns 0 when none failed, 1 otherwise."""
    _setup_logging()
    debug = bool(getattr(args, "debug", False))
    spec = resolve(args.method)
    runner = _Runner(args, spec)
    files, unmatched = collect_inputs(args.input)
    inputs: list[Path | str] = [*files, *unmatched]
    if not inputs:
        raise InputError("no image files found", " ".join(args.input))
    single = len(inputs) == 1
    results: list[Result] = []
    rss = PeakRss()
    # runner.progress: False = --no-progress, None = bars only on a terminal (tqdm's disable=None)
    bar = tqdm(inputs, desc="images", unit="img", disable=True if single or runner.progress is False else None)
    try:
        for src in bar:
            rss.reset()
            t0 = time.perf_counter()
            error: str | None = None
            failure: SemsrError | None = None
            out: Path | None = None
            try:
                status, out = runner.process(src)
            except _LoadFailed as err:
                raise err.error from None
            except _PER_FILE_ERRORS as err:
                if debug and not isinstance(err, SemsrError):
                    raise
                status, error, out = "failed", _one_line(err), None
                failure = err if isinstance(err, SemsrError) else SemsrError(error, src)
                if not single:
                    tqdm.write(f"semsr: error: {src}: {error}", file=sys.stderr)
            results.append(Result(str(src), None if out is None else str(out), status, error,
                                  round(time.perf_counter() - t0, 3), round(rss.peak_mb(), 1)))
            if single and failure is not None:
                raise failure
    finally:
        bar.close()
        if args.json:
            _write_report(Path(args.json), spec, args, results)
    if not single:
        _print_summary(results)
    return 1 if any(r.status == "failed" for r in results) else 0
