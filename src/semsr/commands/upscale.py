"""``semsr upscale``: upscale files, folders or globs the way Real-ESRGAN users expect.

    semsr upscale -i photo.jpg                       # -> results/photo_out.jpg (4x, default method)
    semsr upscale -i photos/ -o out -s 2 --ext png   # every image in a folder, exact 2x
    semsr upscale -i 'scans/*.tif' -n bicubic --json report.json
    semsr upscale -n sd-controlnet -h                # the options of one method

Each input is read (:mod:`semsr.core.io`), upscaled (:func:`semsr.api.upscale_picture_output`)
and written atomically as ``<output>/<stem>_<suffix>.<ext>``; an ``-o`` whose name ends in an
image suffix (``-o result.png``) is the output file of a single input. Existing outputs
are skipped unless ``--overwrite``. A bad input is reported and the run goes
on; the exit code is non-zero when any input failed (a single failing input
gives the usual one-line ``semsr: error: <file>: <problem>``).

**Two-stage parsing.** The first stage reads the options every method shares
(input/output, ``-n/--method``, ``-s/--outscale``, ``--alpha-upsampler``,
``--fp32``); the second adds the chosen method's options, generated from its
options class (:mod:`semsr.core.options`): the flag is ``--name-with-dashes``
plus the option's extra ``flags`` (``-t`` for ``--tile``, ``--color-fix``),
a bool that defaults to false is a switch, one that defaults to true has a
``--no-`` form, everything else is text read by the options class. An option
the method does not have is one line naming the closest one it has
(``method 'bicubic' has no option --steps; did you mean --scale?``);
``semsr upscale -n NAME -h`` lists NAME's options under "options of NAME".

**Method config.** ``--config FILE`` reads a YAML file ``{method: NAME, options: {name: value}}``
(``configs/xpsr-released.yaml``): its method unless ``-n`` names the same one (another is an error), its
options as defaults that flags override; ``{weights}`` in a text value expands to the weights folder
(:func:`semsr.core.paths.weights_dir`: ``SEMSR_WEIGHTS``). A bad key fails in one line naming the file.

**Progress.** On a terminal (stderr is a TTY, no ``--no-progress``) a live line shows
the stage (``loading``, then per image ``denoise k/N`` or ``tile k/N``, ``write``) with the
elapsed time and an ETA, and one line per image names the method's stages after the fact
(``SROutput.timings``); see :mod:`semsr.commands._progress`. Piped, nothing of it is printed.

**Side images.** A method may return extra images with its output
(``SROutput.side_images``, e.g. coser's reference); when one of its ``save_*``
switches is on (``--save-reference``) each is written beside the output as
``<output stem>_<name>.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from tqdm.auto import tqdm

from semsr import __version__
from semsr.api import load_method, output_size, upscale_picture_output
from semsr.commands._progress import StageReporter, seconds, stage_summary
from semsr.commands.shard import Shard
from semsr.core.dtypes import describe_dtype
from semsr.core.errors import InputError, SemsrError
from semsr.core.io import (
    DEFAULT_MAX_PIXELS,
    FORMATS,
    IMAGE_EXTENSIONS,
    atomic_write,
    check_memory,
    check_output_file,
    check_output_folder,
    choose_format,
    read_image,
    sweep_temp_files,
    write_error_message,
    write_picture,
)
from semsr.core.machine import peak_rss_mb
from semsr.core.method import Method, MethodSpec
from semsr.core.options import MethodOptions, OptionError, OptionInfo
from semsr.core.paths import weights_dir
from semsr.methods import resolve

log = logging.getLogger("semsr.upscale")

_DESCRIPTION = "Upscale images with a restorer or a diffusion recipe."
_EPILOG = (
    "Only the options every method shares are listed here; `semsr upscale -n NAME -h` adds the options of "
    "method NAME (--tile, --tile-pad, --steps, --prompt...). Option names may also be written with "
    "underscores (--tile_pad). Outputs are written atomically; existing outputs are skipped unless --overwrite."
)


# ---------------------------------------------------------------- parser


def _max_pixels(text: str) -> int:
    """Parse ``--max-pixels``: an integer, optionally with a K/M/G suffix (``100M``); 0 = no limit."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a pixel count: {text!r} (e.g. 100000000 or 100M)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _quality(text: str) -> int:
    """Parse ``--quality``: an integer 1-100 (JPEG/WebP)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 1-100, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options of every method (the first stage): input/output, the method, the final scale."""
    g = p.add_argument_group("input and output")
    g.add_argument(
        "-i", "--input", nargs="+", metavar="PATH", help="image file(s), folder(s) or glob pattern(s) (required)"
    )
    g.add_argument(
        "-o",
        "--output",
        default="results",
        metavar="DIR",
        help="output folder (default: results); a name ending in .png/.jpg/.webp is the output file of one input",
    )
    g.add_argument("--suffix", default="out", help="output name is <stem>_<suffix>.<ext> (default: out; '' = none)")
    g.add_argument(
        "--ext",
        default="auto",
        choices=["auto", "png", "jpg", "jpeg", "webp"],
        help="output format; auto keeps png/jpg/webp inputs' format, png otherwise "
        "(images with alpha never go to jpg: they are written as png)",
    )
    g.add_argument("--quality", type=_quality, default=95, help="JPEG/WebP quality 1-100 (default: 95)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    g.add_argument(
        "--max-pixels",
        type=_max_pixels,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse inputs with more pixels (default: {DEFAULT_MAX_PIXELS // 10**6}M; 0 = no limit)",
    )
    g.add_argument(
        "--json", metavar="PATH", help="write a JSON report (per input: output, status, error, seconds, peak RSS)"
    )
    g.add_argument("--no-progress", action="store_true", help="no stage line (it is shown only on a terminal)")

    g = p.add_argument_group("method")
    g.add_argument(
        "-n",
        "--model",
        "--method",
        dest="method",
        default=None,
        help="method name (default: default; see `semsr models list`)",
    )
    g.add_argument(
        "-s",
        "--outscale",
        type=_positive_float,
        metavar="S",
        help="final scale, any float (model scale, then resize); default: the model's scale",
    )
    g.add_argument(
        "--alpha-upsampler",
        choices=["bicubic", "model", "realesrgan"],
        default="bicubic",
        help="how the alpha channel is upscaled: bicubic, or by the method (model; realesrgan is the same) "
        "(default: bicubic)",
    )
    g.add_argument("--fp32", action="store_true", help="same as --dtype fp32")
    g.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="method config YAML {method: NAME, options: {...}} (e.g. configs/xpsr-released.yaml); flags override "
        "its options; {weights} in its values is the weights folder (SEMSR_WEIGHTS)",
    )
    # Real-ESRGAN's face restoration (GFPGAN): answered with one line in finish_parse
    g.add_argument("--face-enhance", action="store_true", help=argparse.SUPPRESS)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``upscale`` sub-command (first stage; :func:`finish_parse` is the second)."""
    p = subparsers.add_parser(
        "upscale",
        help="upscale images (file, folder or glob)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help (with -n NAME: and NAME's options)")
    add_common_options(p)
    p.set_defaults(func=run, finish_parse=finish_parse)


def option_arguments(info: OptionInfo) -> tuple[list[str], dict[str, Any]]:
    """``(flags, add_argument keywords)`` of one method option (see the module doc)."""
    extra = [f for f in info.flags if f != info.flag]
    flags = [*(f for f in extra if not f.startswith("--")), info.flag, *(f for f in extra if f.startswith("--"))]
    kwargs: dict[str, Any] = {
        "dest": info.name,
        "default": argparse.SUPPRESS,
        "help": info.describe().replace("%", "%%"),
    }
    if info.kind == "bool" and info.default is False:
        kwargs["action"] = "store_true"
    elif info.kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        choices = "{" + ",".join(map(str, info.choices)) + "}" if info.choices else None
        kwargs["metavar"] = info.metavar or choices or info.name.upper()
    return flags, kwargs


def add_method_options(parser: argparse.ArgumentParser, spec: MethodSpec) -> argparse.ArgumentParser:
    """Add ``spec``'s options to ``parser`` (group "options of NAME"); flags ``parser`` has already are skipped."""
    group = parser.add_argument_group(f"options of {spec.name}")
    for info in spec.options.infos().values():
        flags, kwargs = option_arguments(info)
        try:
            group.add_argument(*flags, **kwargs)
        except argparse.ArgumentError as err:  # a flag of the common options (help parser only)
            log.debug("option %s of %s not listed: %s", info.flag, spec.name, err)
    return parser


def help_parser(spec: MethodSpec | None) -> argparse.ArgumentParser:
    """The parser ``semsr upscale -h`` prints: the common options, and ``spec``'s when given."""
    p = argparse.ArgumentParser(prog="semsr upscale", description=_DESCRIPTION, epilog=_EPILOG, allow_abbrev=False)
    add_common_options(p)
    return add_method_options(p, spec) if spec is not None else p


def read_method_config(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """``(method, options)`` of a method config YAML ``{method: NAME, options: {name: value}}``; ``{weights}``
    in text values expands to :func:`~semsr.core.paths.weights_dir`. Raises SemsrError (one line) on a bad file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SemsrError(f"{path}: cannot read the method config: {_one_line(err)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("options", {}), dict):
        raise SemsrError(f"{path}: a method config is a mapping {{method: NAME, options: {{name: value}}}}")
    unknown = sorted(set(data) - {"method", "options"})
    if unknown:
        raise SemsrError(f"{path}: unknown key {unknown[0]!r} (a method config has method and options)")
    weights = str(weights_dir())
    options = {
        str(k): v.replace("{weights}", weights) if isinstance(v, str) else v
        for k, v in (data.get("options") or {}).items()
    }
    method = data.get("method")
    return (str(method) if method is not None else None), options


def parse_method_options(
    spec: MethodSpec, argv: list[str], fp32: bool = False, defaults: dict[str, Any] | None = None
) -> MethodOptions:
    """``spec``'s options from command-line words (the second stage); ``defaults`` (option name -> value,
    e.g. from ``--config``) apply where no flag is given.

    Raises:
        OptionError: a flag the method does not have (naming the closest one), or a bad value.
        SemsrError: words that are no option.
    """
    parser = argparse.ArgumentParser(prog="semsr upscale", add_help=False, allow_abbrev=False, exit_on_error=False)
    add_method_options(parser, spec)
    try:
        ns, left = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:  # e.g. a flag without its value: one line, not usage + message
        raise SemsrError(str(err)) from None
    for word in left:
        if word.startswith("-") and word != "-" and not _is_number(word):
            spec.parse({word.split("=", 1)[0].lstrip("-").replace("-", "_"): ""}, style="flag")  # raises
    if left:
        raise SemsrError(f"unrecognized arguments: {' '.join(left)}")
    values = {**(defaults or {}), **vars(ns)}
    if fp32 and "dtype" not in values:
        values["dtype"] = "fp32"
    return spec.parse(values, style="flag")


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def finish_parse(args: argparse.Namespace, rest: list[str]) -> argparse.Namespace:
    """Second stage: resolve the method, show help or parse its options into ``args.options``."""
    if args.help:
        help_parser(resolve(args.method) if args.method else None).print_help()
        raise SystemExit(0)
    if args.face_enhance:
        raise SemsrError("--face-enhance is not supported: semsr has no face restorer (GFPGAN)")
    if not args.input:
        help_parser(None).error("the following arguments are required: -i/--input")
    if args.alpha_upsampler == "realesrgan":  # Real-ESRGAN's name for running the model on the alpha plane
        args.alpha_upsampler = "model"
    defaults: dict[str, Any] = {}
    if getattr(args, "config", None):
        method, defaults = read_method_config(args.config)
        if args.method and method and resolve(args.method).name != resolve(method).name:
            raise SemsrError(f"{args.config}: the config is for method {method}, not {args.method}")
        args.method = args.method or method
    spec = resolve(args.method or "default")
    if defaults:
        try:
            spec.parse(defaults)
        except OptionError as err:
            raise SemsrError(f"{args.config}: {err}") from None
    args.spec = spec
    args.method = spec.name
    args.options = parse_method_options(spec, rest, fp32=args.fp32, defaults=defaults)
    return args


# ---------------------------------------------------------------- inputs and outputs


def collect_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Expand ``-i`` items: folders -> their image files (sorted, not recursive; broken
    symbolic links with an image suffix are kept, so that they get a report line),
    globs -> matching files; other paths are kept as given (missing ones fail later).

    Returns ``(files, patterns_matching_nothing)``.
    """
    found: list[Path] = []
    unmatched: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(
                f
                for f in path.iterdir()
                if (f.is_file() or (f.is_symlink() and not f.exists()))
                and not f.name.startswith(".")
                and f.suffix.lower() in IMAGE_EXTENSIONS
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


def own_outputs(files: list[Path], out_dir: Path, suffix: str) -> list[Path]:
    """The files among ``files`` that are outputs of an earlier run into ``out_dir``: in ``out_dir``
    itself and named ``<stem>_<suffix>.<ext>`` (``a_out.png``); upscaling them again would give ``a_out_out.png``."""
    if not suffix:
        return []
    here = out_dir.resolve()
    return [f for f in files if f.parent.resolve() == here and f.stem.endswith(f"_{suffix}")]


def first_stage(timings: dict[str, float]) -> str:
    """Label of the time before a method's first progress report: ``upscale``, plus the stages the
    method reported (in ``timings``) before ``denoise`` on the last input (``upscale: priors, stage1``)."""
    keys = list(timings)
    before = keys[: keys.index("denoise")] if "denoise" in keys else []
    return "upscale" + (f": {', '.join(before)}" if before else "")


def output_file(output: str) -> Path | None:
    """The file ``-o`` names when its name ends in an image suffix and it is no folder, else ``None``."""
    path = Path(output)
    if path.suffix.lower().lstrip(".") in (*FORMATS, "jpeg") and not path.is_dir():
        return path
    return None


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
        return peak_rss_mb()


@dataclass
class Result:
    """One line of the report."""

    input: str
    output: str | None
    status: str  # ok | skipped | failed
    error: str | None
    seconds: float
    peak_rss_mb: float
    #: seconds of the method's stages (``stage1``, ``priors``, ``denoise``...) and ``write``; None when not run
    stages: dict[str, float] | None = None


# ---------------------------------------------------------------- running


class _LoadFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _one_line(err: BaseException) -> str:
    """First line of an error's message, without the path (reports show the input separately)."""
    if isinstance(err, SemsrError):
        return err.message.strip().splitlines()[0]
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class _StderrHandler(logging.Handler):
    """Log records as ``semsr: warning: ...`` lines on the *current* ``sys.stderr``, above the stage line."""

    reporter: StageReporter | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = f"semsr: {record.levelname.lower()}: {record.getMessage()}"
        if self.reporter is not None:
            self.reporter.echo(text, file=sys.stderr)
        else:
            tqdm.write(text, file=sys.stderr)


def _setup_logging(reporter: StageReporter | None = None) -> None:
    logger = logging.getLogger("semsr")
    handlers = [h for h in logger.handlers if isinstance(h, _StderrHandler)]
    if not handlers:
        handlers = [_StderrHandler(logging.WARNING)]
        logger.addHandler(handlers[0])
        logger.setLevel(logging.INFO)
    handlers[0].reporter = reporter


def _counts(results: list[Result]) -> dict[str, int]:
    return {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed", "not_run")}


def _write_report(
    path: Path, spec: MethodSpec, args: argparse.Namespace, results: list[Result], interrupted: bool
) -> None:
    """Write the ``--json`` report atomically."""
    report = {
        "semsr_version": __version__,
        "method": spec.name,
        "outscale": args.outscale,
        "tile": args.options.tile,
        "tile_pad": args.options.tile_pad,
        # the precision asked for, what it resolved to on this machine, and why (``--dtype auto``)
        "precision": describe_dtype(getattr(args.options, "dtype", None), getattr(args.options, "device", None)),
        "interrupted": interrupted,
        "load_seconds": getattr(
            args, "load_seconds", None
        ),  # building the method (reading weights); None when nothing was loaded
        "summary": _counts(results),
        "results": [asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


_PER_FILE_ERRORS = (SemsrError, OSError, ValueError, RuntimeError, MemoryError)


def wants_side_images(options: MethodOptions) -> bool:
    """True when one of the method's ``save_*`` switches (``--save-reference``) is on."""
    return any(v is True for k, v in options.values("run").items() if k.startswith("save_"))


class _Runner:
    """Processes one input at a time with the settings of a ``semsr upscale`` invocation."""

    def __init__(self, args: argparse.Namespace, reporter: StageReporter | None = None) -> None:
        self.args = args
        self.spec: MethodSpec = args.spec
        self.options: MethodOptions = args.options
        self.out_file = output_file(args.output)
        self.out_dir = Path(args.output) if self.out_file is None else self.out_file.parent
        self.reporter = reporter if reporter is not None else StageReporter(sys.stderr, False)
        self.claimed: dict[Path, str] = {}
        self._method: Method | None = None
        self.prefix = ""  # "[i/N] name  " of the input being processed
        self.eta_rest: float | None = None  # seconds the inputs after it should take
        self.expected: float | None = None  # seconds it should take (the mean of the inputs before it)
        self.durations: list[float] = []  # seconds of each upscaled input (upscale + write, no loading)
        self.first_stage = "upscale"  # the label before the method's first progress report
        self.written: Path | None = None  # the current input's output once it is on disk
        self.stages: dict[str, float] | None = None  # stage seconds of the current input
        args.load_seconds = getattr(args, "load_seconds", None)

    def method(self) -> Method:
        """The method, built on first use (so a run that skips everything loads nothing)."""
        if self._method is None:
            name = self.spec.name + (f" ({self.spec.alias_of})" if self.spec.alias_of else "")
            t0 = time.perf_counter()
            self.reporter.begin("", f"loading {name}")
            try:
                self._method = load_method(self.spec.name, self.options)
            except Exception as err:
                raise _LoadFailed(err) from err
            self.args.load_seconds = round(time.perf_counter() - t0, 3)
            self.reporter.done(f"loaded {name} in {seconds(self.args.load_seconds)}")
        return self._method

    def output_for(self, src: Path, fmt: str) -> Path:
        """Where ``src``'s output goes: the ``-o`` file, or ``<output>/<stem>_<suffix>.<fmt>``."""
        if self.out_file is None:
            return output_path(self.out_dir, src, self.args.suffix, fmt)
        wanted = self.out_file.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        if fmt != wanted:
            raise InputError(f"-o {self.out_file}: this image is written as {fmt} (give a .{fmt} name)", src)
        return self.out_file

    def echo(self, text: str, file: Any = None) -> None:
        """Print a line above the stage line."""
        self.reporter.echo(text, file=sys.stdout if file is None else file)

    def process(self, src: Path | str) -> tuple[str, Path]:
        """Upscale ``src`` unless its output exists; returns ``(status, output_path)``."""
        a = self.args
        if isinstance(src, str):
            raise InputError("no files match this pattern", src)
        pic = read_image(src, max_pixels=a.max_pixels or None)
        ext = a.ext if self.out_file is None or a.ext != "auto" else self.out_file.suffix
        fmt, note = choose_format(ext, pic)
        out = self.output_for(src, fmt)
        key = out.resolve()
        if key == src.resolve():
            raise InputError(f"output {out} would overwrite the input; use another -o or --suffix", src)
        if key in self.claimed:
            raise InputError(f"output {out} is also the output of {self.claimed[key]}", src)
        self.claimed[key] = str(src)
        if out.exists() and not a.overwrite:
            self.echo(f"skipped {src}: {out} exists (use --overwrite to replace it)")
            return "skipped", out
        if note:
            log.warning("%s: %s", src, note)
        native = (pic.height * self.spec.scale, pic.width * self.spec.scale)
        out_hw = native if a.outscale is None else output_size(pic.height, pic.width, a.outscale)
        check_memory(pic, out_hw, out_hw != native, src)
        method = self.method()
        rep = self.reporter
        t0 = time.perf_counter()
        rep.begin(self.prefix or f"{src.name}  ", self.first_stage, self.eta_rest, self.expected)
        # a self-tiling method reports its sampler steps, the pixel tiler its tiles
        progress = rep.counter("denoise" if method.tiles_itself else "tile") if rep.enabled else False
        result = upscale_picture_output(
            method, pic, self.options, outscale=a.outscale, alpha=a.alpha_upsampler, progress=progress
        )
        t1 = time.perf_counter()
        rep.stage("write")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_picture(result.picture, out, fmt, quality=a.quality)
            self.written = out
        except OSError as err:  # full disk, folder removed or made read-only during the run
            raise SemsrError(write_error_message(err, out), src) from None
        self.stages = {k: round(v, 3) for k, v in {**result.timings, "write": time.perf_counter() - t1}.items()}
        stages = stage_summary(self.stages)
        self.first_stage = first_stage(result.timings)
        self.durations.append(time.perf_counter() - t0)
        rep.done(f"{self.prefix or src.name + '  '}{stages}  (total {seconds(self.durations[-1])})")
        self.echo(f"wrote {out} ({result.picture.width}x{result.picture.height})")
        if wants_side_images(self.options):
            for side in write_side_images(result.side_images, out):
                self.echo(f"wrote {side}")
        return "ok", out


def write_side_images(images: dict[str, Any], out: Path) -> list[Path]:
    """Write side images ``{name: (B or 1, 3, H, W) in [0, 1]}`` (the first of each) beside ``out``
    as ``<stem>_<name>.png``."""
    written = []
    for name, image in images.items():
        arr = (image[0].detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        path = out.with_name(f"{out.stem}_{name}.png")
        with atomic_write(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        written.append(path)
    return written


def _print_summary(results: list[Result], interrupted: bool) -> None:
    counts = _counts(results)
    line = f"done: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed"
    if interrupted:
        line = f"interrupted: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed, "
        line += f"{counts['not_run']} not run"
    print(line, flush=True)
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.input}: {r.error}")


def _check_destinations(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Check ``-o`` (a folder, or an output file) and ``--json`` before any model is loaded; sweep temp
    files of killed runs there. Returns ``(output folder, report path)``."""
    file = output_file(args.output)
    if file is not None:
        out_dir = check_output_file(file, "-o/--output", create=False).parent
    else:
        out_dir = check_output_folder(args.output, "-o/--output", create=False)
    report = check_output_file(args.json, "--json", create=False) if args.json else None
    for folder in {out_dir, *(() if report is None else (report.parent,))}:
        sweep_temp_files(folder)
    return out_dir, report


def run(args: argparse.Namespace) -> int:
    """Upscale every input; returns 0 when none failed, 1 otherwise.

    A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM through the CLI) stops after
    the current file is written or dropped; the summary and the ``--json``
    report (``"interrupted": true``, the rest ``not_run``) are still written,
    then the interrupt goes on to the CLI.
    """
    reporter = StageReporter.for_terminal(args.no_progress)
    _setup_logging(reporter)
    debug = bool(getattr(args, "debug", False))
    spec = args.spec
    out_dir, report_path = _check_destinations(args)
    runner = _Runner(args, reporter)
    files, unmatched = collect_inputs(args.input)
    earlier = own_outputs(files, out_dir, args.suffix) if runner.out_file is None else []
    if earlier:
        print(
            f"skipping {len(earlier)} file(s) in {out_dir} named *_{args.suffix}.* (outputs of an earlier run): "
            + ", ".join(f.name for f in earlier[:5])
            + (" ..." if len(earlier) > 5 else "")
        )
    files = [f for f in files if f not in set(earlier)]
    inputs: list[Path | str] = [*files, *unmatched]
    if not inputs:
        raise InputError("no image files found", " ".join(args.input))
    if runner.out_file is not None and len(inputs) > 1:
        raise SemsrError(
            f"-o {args.output} names one output file, but {len(inputs)} inputs were given; give a folder as -o"
        )
    single = len(inputs) == 1
    shard = Shard.from_env()  # under `accelerate launch`: this process's share of the inputs (commands.shard)
    inputs, earlier = shard.take(inputs), shard.take(earlier)
    results: list[Result] = [Result(str(f), None, "skipped", "output of an earlier run", 0.0, 0.0) for f in earlier]
    rss = PeakRss()
    interrupted: KeyboardInterrupt | None = None
    failure: SemsrError | None = None
    report_failed = False
    reporter.start()
    try:
        for index, src in enumerate(inputs, start=1):
            runner.prefix = "" if single else f"[{index}/{len(inputs)}] {Path(src).name}  "
            done_s = runner.durations
            runner.expected = sum(done_s) / len(done_s) if done_s else None
            left = len(inputs) - index
            runner.eta_rest = runner.expected * left if runner.expected is not None and left else None
            rss.reset()
            t0 = time.perf_counter()
            error: str | None = None
            out: Path | None = None
            runner.written = None
            runner.stages = None
            try:
                status, out = runner.process(src)
            except _LoadFailed as err:
                raise err.error from None
            except KeyboardInterrupt as err:
                interrupted = err
                if runner.written is not None:  # stopped after its output was written: it counts as done
                    results.append(Result(str(src), str(runner.written), "ok", None, 0.0, 0.0))
                break
            except _PER_FILE_ERRORS as err:
                if debug and not isinstance(err, SemsrError):
                    raise
                status, error, out = "failed", _one_line(err), None
                reporter.idle()
                failure = err if isinstance(err, SemsrError) else SemsrError(error, src)
                if not single:
                    runner.echo(f"semsr: error: {src}: {error}", file=sys.stderr)
            results.append(
                Result(
                    str(src),
                    None if out is None else str(out),
                    status,
                    error,
                    round(time.perf_counter() - t0, 3),
                    round(rss.peak_mb(), 1),
                    runner.stages if status == "ok" else None,
                )
            )
    except KeyboardInterrupt as err:  # between two files (progress bar, bookkeeping)
        interrupted = err
    finally:
        reporter.close()
        _setup_logging(None)
        done = {r.input for r in results}
        results += [Result(str(s), None, "not_run", None, 0.0, 0.0) for s in inputs if str(s) not in done]
        if interrupted is not None or not single:
            _print_summary(results, interrupted is not None)
        if report_path is not None:
            try:
                _write_report(shard.part(report_path), spec, args, results, interrupted is not None)
                shard.wait()
                shard.merge_reports(report_path, lambda rs: _counts([Result(**r) for r in rs]))
            except OSError as err:
                print(f"semsr: error: --json: {write_error_message(err, report_path)}", file=sys.stderr)
                report_failed = True
    if interrupted is not None:
        raise interrupted
    if single and failure is not None:
        raise failure
    return 1 if report_failed or any(r.status == "failed" for r in results) else 0
