"""Benchmark runner: upscale every dataset image with every method, score, aggregate.

Flow for one ``run_bench`` call::

    datasets --lrsets.prepare--> LR inputs (cached PNG + manifest)
        --worker (one process per method)--> SR PNGs + seconds + peak RSS   (cached)
        --metrics (this process)-->         per-image metric values        (cached)
        --aggregate-->                      one Row per (method, dataset)

**Method variants.** A method entry may carry options in brackets, so
ablations are separate rows of one table::

    default,default[steps=1],default[no_edge_prior],default[steps=8,seed=3],realesrgan-x4plus

(:func:`split_methods` splits such a list on the commas outside brackets,
:func:`parse_method_entry` reads one entry). A bare key means ``true``; every
other value is text, read by the method's options class
(:meth:`semsr.core.method.MethodSpec.parse`) like the CLI's flags, so an
unknown option or a bad value is one line naming the closest option, before any
work. The entry's options override ``BenchConfig.method_opts``; whether an
option is a build or a run option comes from its stage. The row's ``method``
is the normalised entry (``default[steps=1]``; values as parsed).

**Caching and resume.** Every upscale and every metric value is stored in an
SQLite file (``cache_dir()/bench/results.sqlite``) as soon as it exists, keyed
by (method key, LR-set id, image key). The method key holds the normalised
entry, the build key of its options (threads excepted), the run options that
differ from the defaults, the tile settings and a fingerprint
(:func:`semsr.core.fingerprint.fingerprint`) of the method's weight files (its
catalogue ``info``, an alias's target's, and the files under each weight-path
build option such as ``checkpoint``), so newly trained weights are never served
from stale outputs; the LR-set id holds the dataset, degradation, scale, seed
and degradation configuration; the image key holds the file's content hash. A
rerun -- after an interruption, with more datasets, more metrics or a larger
``--limit`` -- only computes what is missing. SR images are kept as uint8 PNGs
under ``cache_dir()/bench/sr/`` (the SR convention rounds outputs to 8 bits,
and the report and FID read them back).

**Peak RSS.** Each method runs in its own freshly spawned process (default
``isolate=True``): resident memory of one method (weights, allocator caches,
ncnn pools) cannot leak into another's number, and the metric models of this
process do not count either. Inside the worker the kernel's high-water mark
(``VmHWM``) is reset before each image (``/proc/self/clear_refs``) and read
after it, so a per-image value is "peak RSS of the process while it upscaled
this image", including the interpreter, torch and the loaded model (about
0.3 GB of baseline). Per-image values compose: a dataset's peak is their
maximum, whatever was cached. Where the reset is not supported the process
peak (``ru_maxrss``) is used. ``isolate=False`` runs methods in this process
(faster start, used by tests); its RSS then includes everything this process holds.

**Seconds per image** is the wall time of the method call (with pixel tiling),
excluding image I/O and model loading; the first image includes any lazy
initialisation a method does on its first call. On a shared machine wall time
depends on the load, so the CPU time of the method process over the same call
(all its threads) is recorded too (``cpu_seconds_per_image``).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.fingerprint import fingerprint
from semsr.core.machine import peak_rss_mb
from semsr.core.method import MethodSpec
from semsr.core.options import MethodOptions
from semsr.core.paths import cache_dir
from semsr.core.wal import connect_wal
from semsr.eval import atomic
from semsr.eval import metrics as metric_registry
from semsr.eval.datasets import Dataset
from semsr.eval.images import to_uint8
from semsr.eval.lrsets import EvalImage, LRSet, load_gt, load_lr, prepare
from semsr.eval.metrics.base import align_channels, as_rgb
from semsr.eval.metrics.image import load_eval_image
from semsr.methods import resolve
from semsr.models.catalog import ModelInfo
from semsr.pipeline.tiling import upscale_tiled

DEFAULT_METRICS = ("psnr", "psnry", "ssim", "niqe")
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- configuration / results


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        methods: method entries: registry names (:mod:`semsr.methods`), each
            optionally with bracket options, e.g. ``"default[steps=1]"``
            (see the module doc and :func:`parse_method_entry`).
        datasets: resolved datasets (:func:`semsr.eval.datasets.parse_datasets`).
        degradation: ``"bicubic"`` or ``"realesrgan"`` (ground-truth sets only).
        scale: integer scale factor; every method must produce it.
        seed: run seed for random degradations.
        limit: use only the first N images of each dataset.
        metrics: metric names; None = :data:`DEFAULT_METRICS`. Full-reference
            metrics are computed only on sets with ground truth.
        tile: LR tile size in pixels for methods that do not tile themselves
            (0 = whole image); the image is tiled only when larger than the tile.
        tile_pad: overlap (LR pixels) around each tile.
        threads: ``torch.set_num_threads`` in the method process (None: torch default).
        isolate: run each method in its own spawned process (see module doc).
        method_opts: options of every method, as text (``--method-opt dtype=bf16``) or
            Python values; an entry's bracket options override them.
        weights_dir: weights folder of deep metrics (default ``SEMSR_WEIGHTS``).
    """

    methods: list[str]
    datasets: list[Dataset]
    degradation: str = "bicubic"
    scale: int = 4
    seed: int = 0
    limit: int | None = None
    metrics: list[str] | None = None
    tile: int = 512
    tile_pad: int = 16
    threads: int | None = None
    isolate: bool = True
    method_opts: dict[str, Any] = field(default_factory=dict)
    weights_dir: Path | None = None


@dataclass
class Row:
    """Mean results of one method on one dataset (the ``--json`` row schema)."""

    method: str
    dataset: str
    degradation: str
    scale: int
    metrics: dict[str, float | None]
    seconds_per_image: float
    peak_rss_mb: float | None
    n_images: int
    cpu_seconds_per_image: float | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["unavailable"]:
            del out["unavailable"]
        return out


@dataclass
class Stats:
    """How much work a run did versus took from the cache."""

    upscaled: int = 0
    upscale_cached: int = 0
    metrics_computed: int = 0
    metrics_cached: int = 0


@dataclass
class UpscaleRecord:
    """What is cached per upscaled image (besides the SR PNG)."""

    seconds: float
    cpu_seconds: float | None
    peak_rss_mb: float | None


# --------------------------------------------------------------------------- method entries


@dataclass
class MethodEntry:
    """One ``--methods`` entry: a registry name and its bracket options (text; ``True`` for a bare key), in written order."""

    name: str
    opts: dict[str, str | bool] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The entry as written, spaces dropped and ``-`` in keys read as ``_``, e.g. ``default[steps=8,seed=3]``."""
        if not self.opts:
            return self.name
        return f"{self.name}[{','.join(_format_option(k, v) for k, v in self.opts.items())}]"


@dataclass
class MethodPlan:
    """A method entry resolved for a run.

    Attributes:
        label: the row's ``method``: the registry name with the entry's options as parsed
            (``default[steps=1]``; :func:`plan_label`).
        name: registry name to build.
        options: the method's options (``BenchConfig.method_opts``, the entry's options, the
            bench's scale, threads and tile settings where the entry does not set them).
        key: cache key (:func:`method_key`) of its outputs.
    """

    label: str
    name: str
    options: MethodOptions
    key: str

    @property
    def build_values(self) -> dict[str, Any]:
        """The build options that differ from the method's defaults."""
        return self.options.changed("build")

    @property
    def run_values(self) -> dict[str, Any]:
        """The run options that differ from the method's defaults."""
        return self.options.changed("run")


def _format_option(key: str, value: Any) -> str:
    if value is True:
        return key
    if value is False:
        return f"{key}=false"
    if isinstance(value, float):
        return f"{key}={value!r}"
    if isinstance(value, tuple):
        return f"{key}={','.join(map(str, value))}"
    if isinstance(value, dict):
        return f"{key}={','.join(f'{k}={v!r}' for k, v in value.items())}"
    return f"{key}={value}"


def split_methods(text: str) -> list[str]:
    """Split a ``--methods`` list on the commas outside brackets; unbalanced brackets are an error.

    ``"a,b[x=1,y],c"`` -> ``["a", "b[x=1,y]", "c"]`` (empty entries dropped).
    """
    entries: list[str] = []
    depth = start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SemsrError(f"unbalanced ']' in method list {text!r}")
        elif ch == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
    if depth:
        raise SemsrError(f"unbalanced '[' in method list {text!r}")
    entries.append(text[start:])
    return [e.strip() for e in entries if e.strip()]


def parse_method_entry(text: str) -> MethodEntry:
    """Parse ``name`` or ``name[k=v,flag,...]``; a one-line :class:`SemsrError` if malformed.

    Keys are identifiers (``-`` read as ``_``), a bare key means ``True``,
    values stay text (stripped). Neither the name nor the options are looked up here.
    """
    entry = text.strip()
    name, inner = entry, None
    if "[" in entry or "]" in entry:
        open_at = entry.find("[")
        if open_at < 0 or not entry.endswith("]") or entry.count("[") != 1 or entry.count("]") != 1:
            raise SemsrError(f"malformed method entry {entry!r} (expected NAME or NAME[KEY=VALUE,...])")
        name, inner = entry[:open_at].strip(), entry[open_at + 1 : -1]
    if not name:
        raise SemsrError(f"malformed method entry {entry!r}: no method name")
    opts: dict[str, str | bool] = {}
    for part in [] if inner is None else inner.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise SemsrError(f"malformed option {part.strip()!r} in method entry {entry!r} (expected KEY or KEY=VALUE)")
        if key in opts:
            raise SemsrError(f"option {key!r} given twice in method entry {entry!r}")
        if sep and not value.strip():
            raise SemsrError(f"option {key!r} has no value in method entry {entry!r}")
        opts[key] = value.strip() if sep else True
    return MethodEntry(name, opts)


def plan_label(name: str, keys: Iterable[str], options: MethodOptions) -> str:
    """``name[k=v,...]`` with the parsed values of ``keys`` (a true flag as its bare key)."""
    keys = list(keys)
    if not keys:
        return name
    return f"{name}[{','.join(_format_option(k, getattr(options, k)) for k in keys)}]"


def plan_methods(config: BenchConfig) -> list[MethodPlan]:
    """Parse and resolve ``config.methods`` (before any work): one plan per distinct entry.

    Entries may themselves be comma lists (:func:`split_methods`). The options of an
    entry are ``config.method_opts`` overridden by its bracket options, parsed by the
    method's options class (an unknown or malformed option is one line, naming the
    closest valid one); the bench's ``scale`` and ``threads`` fill the method's
    options of those names and ``tile``/``tile_pad`` fill the tile settings when the
    entry does not set them. The cache key: :func:`plan_key`.
    """
    entries = [parse_method_entry(e) for m in config.methods for e in split_methods(m)]
    if not entries:
        raise SemsrError("no methods given")
    specs = [resolve(e.name) for e in entries]  # unknown names fail before any work
    plans: dict[str, MethodPlan] = {}
    for entry, spec in zip(entries, specs):
        values: dict[str, Any] = {**config.method_opts, **entry.opts}
        names = spec.options.names()
        for name, value in (
            ("scale", config.scale),
            ("threads", config.threads),
            ("tile", config.tile),
            ("tile_pad", config.tile_pad),
        ):
            if name in names and name not in values and value is not None:
                values[name] = value
        options = spec.parse(values)
        label = plan_label(spec.name, entry.opts, options)
        plans.setdefault(label, MethodPlan(label, spec.name, options, plan_key(spec, label, options)))
    return list(plans.values())


@dataclass
class BenchResult:
    rows: list[Row]
    stats: Stats
    lrsets: list[LRSet]
    method_keys: dict[str, str]
    metric_info: dict[str, Any]

    def sr_path(self, method: str, lrset: LRSet, item: EvalImage) -> Path:
        return sr_file(self.method_keys[method], lrset, item)


# --------------------------------------------------------------------------- cache


def method_key(name: str, opts: dict[str, Any]) -> str:
    """Cache identity of a method with the options that change its output."""
    blob = json.dumps(opts, sort_keys=True, default=str)
    return f"{name}#{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def plan_key(spec: MethodSpec, label: str, options: MethodOptions) -> str:
    """:func:`method_key` of a planned entry: its label, build key (``threads`` left out: it does not
    change outputs), changed run options and :func:`weights_fingerprint`."""
    build = [[k, v] for k, v in options.build_key() if k != "threads"]
    return method_key(
        spec.name, {"label": label, "build": build, "run": options.changed("run"), **weights_fingerprint(spec, options)}
    )


def weights_fingerprint(spec: MethodSpec, options: MethodOptions) -> dict[str, str]:
    """Key entries that change when the weight files of method ``spec`` change.

    ``"#weights"``: the files of ``spec.info`` (for an alias such as ``default``, its
    target's), with the files it ``uses``; ``"#<option>"``: the files under each
    weight-path build option (``spec.weight_paths``) that is given. Empty for methods
    without weight files.
    """
    out: dict[str, str] = {}
    info = spec.info
    if spec.alias_of:
        target = resolve(spec.alias_of).info
        info = target if isinstance(target, ModelInfo) else info
    paths = info.paths() if isinstance(info, ModelInfo) else None
    if paths:
        out["#weights"] = fingerprint([*paths, *(info.used_paths() or [])])
    for name in spec.weight_paths:
        value = getattr(options, name, None)
        if value is not None:
            out[f"#{name}"] = fingerprint([value])
    return out


def sr_file(mkey: str, lrset: LRSet, item: EvalImage) -> Path:
    """Where the uint8 SR output of ``item`` is cached."""
    safe = mkey.replace("/", "_").replace("#", "-")
    return cache_dir() / "bench" / "sr" / safe / lrset.uid / f"{item.key}.png"


_RESULT_SCHEMA = """
CREATE TABLE IF NOT EXISTS upscale (
    method TEXT, lrset TEXT, image TEXT,
    seconds REAL, peak_rss_mb REAL, created REAL, cpu_seconds REAL,
    PRIMARY KEY (method, lrset, image));
CREATE TABLE IF NOT EXISTS metric (
    method TEXT, lrset TEXT, image TEXT, metric TEXT, value REAL,
    PRIMARY KEY (method, lrset, image, metric));
"""


class ResultCache:
    """SQLite store of upscale records and metric values (one writer: the runner)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "bench" / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect_wal(self.path, _RESULT_SCHEMA, timeout=60)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(upscale)")}
        if "cpu_seconds" not in columns:  # caches written before CPU time was recorded
            try:
                with self.db:
                    self.db.execute("ALTER TABLE upscale ADD COLUMN cpu_seconds REAL")
            except sqlite3.OperationalError as err:  # another process added it first
                if "duplicate column" not in str(err):
                    raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upscale(self, mkey: str, lrset: str, image: str) -> UpscaleRecord | None:
        row = self.db.execute(
            "SELECT seconds, cpu_seconds, peak_rss_mb FROM upscale WHERE method=? AND lrset=? AND image=?",
            (mkey, lrset, image),
        ).fetchone()
        return None if row is None else UpscaleRecord(*row)

    def put_upscale(self, mkey: str, lrset: str, image: str, rec: UpscaleRecord) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO upscale (method, lrset, image, seconds, cpu_seconds, peak_rss_mb, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (mkey, lrset, image, rec.seconds, rec.cpu_seconds, rec.peak_rss_mb, time.time()),
            )
            # a new SR image invalidates its metric values and the set-level ones
            self.db.execute(
                "DELETE FROM metric WHERE method=? AND lrset=? AND (image=? OR image LIKE '*set:%')",
                (mkey, lrset, image),
            )

    def metrics(self, mkey: str, lrset: str, image: str) -> dict[str, float]:
        rows = self.db.execute(
            "SELECT metric, value FROM metric WHERE method=? AND lrset=? AND image=?",
            (mkey, lrset, image),
        ).fetchall()
        return {m: v for m, v in rows}

    def put_metric(self, mkey: str, lrset: str, image: str, metric: str, value: float) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO metric VALUES (?, ?, ?, ?, ?)", (mkey, lrset, image, metric, value))


# --------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- upscaling


def upscale(method: Any, x: torch.Tensor, scale: int, options: MethodOptions | None = None) -> torch.Tensor:
    """Upscale ``x`` ``(1, 3, h, w)`` in [0, 1] with ``method`` -> ``(1, 3, scale*h, scale*w)``.

    Methods that do not tile themselves are run tile by tile
    (:func:`semsr.pipeline.tiling.upscale_tiled`, ``options.tile``/``tile_pad``) when the
    image is larger than the tile; ``options`` go to every method call.
    """
    try:
        y = upscale_tiled(method, x, options).images
    except RuntimeError as err:
        if "returned shape" in str(err):
            raise SemsrError(str(err), getattr(method, "name", None)) from None
        raise
    h, w = x.shape[-2:]
    if tuple(y.shape) != (x.shape[0], 3, h * scale, w * scale):
        raise SemsrError(f"method returned {tuple(y.shape)} for {tuple(x.shape)}; expected x{scale}")
    return y.float().clamp(0, 1)


@dataclass
class _Job:
    lrset: str
    image: str
    lr_path: str
    out_path: str


def _build_method(name: str, values: dict[str, Any], scale: int) -> tuple[Any, MethodOptions]:
    """Build method ``name`` with options ``values`` (Python values, validated again); check its scale."""
    spec = resolve(name)
    options = spec.parse(values)
    method = spec.factory(options)
    if int(getattr(method, "scale", scale)) != scale:
        raise SemsrError(f"method {name} upscales x{method.scale}, but --scale {scale} was asked")
    return method, options


def _process_jobs(spec: dict[str, Any], jobs: list[_Job], emit: Callable[[dict], None]) -> None:
    """Upscale ``jobs`` with the method described by ``spec``; ``emit`` one record per finished image."""
    scale = spec["scale"]
    method, options = _build_method(spec["name"], spec["options"], scale)
    for job in jobs:
        x = as_rgb(load_eval_image(job.lr_path))
        reset_peak_rss()  # when unsupported, peak_rss_mb() is the process peak so far
        start, cpu_start = time.perf_counter(), time.process_time()
        y = upscale(method, x, scale, options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        atomic.write_png(Path(job.out_path), to_uint8(y))
        emit(
            {
                "lrset": job.lrset,
                "image": job.image,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_rss_mb": peak_rss_mb(),
            }
        )


def _worker_main(spec: dict[str, Any], conn: Any) -> None:
    """Entry point of the per-method process: run the jobs, stream records to ``conn``."""
    try:
        try:
            if spec.get("threads"):
                torch.set_num_threads(int(spec["threads"]))
            _process_jobs(spec, [_Job(**j) for j in spec["jobs"]], conn.send)
            conn.send({"done": True})
        except SemsrError as err:
            conn.send({"error": str(err), "semsr": True, "unavailable": isinstance(err, UnavailableError)})
        except BaseException as err:  # report, then let the parent decide
            conn.send({"error": f"{type(err).__name__}: {err}", "semsr": False})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the bench process is gone (killed): nobody to report to; finished outputs are cached
    finally:
        conn.close()


def _run_isolated(spec: dict[str, Any], on_record: Callable[[dict], None]) -> None:
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_main, args=(spec, child_conn), daemon=True)
    proc.start()
    child_conn.close()
    try:
        while True:
            try:
                msg = parent_conn.recv()
            except EOFError:
                proc.join()
                raise SemsrError(f"method process died (exit code {proc.exitcode})", spec["label"]) from None
            if msg.get("done"):
                break
            if "error" in msg:
                if msg["semsr"]:
                    cls = UnavailableError if msg.get("unavailable") else SemsrError
                    raise cls(msg["error"])
                raise RuntimeError(f"method {spec['label']} failed: {msg['error']}")
            on_record(msg)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()


# --------------------------------------------------------------------------- metrics


@dataclass
class _MetricSet:
    """The metrics of a run, built once; unavailable ones keep their reason."""

    names: list[str]
    objects: dict[str, Any]
    info: dict[str, Any]
    unavailable: dict[str, str]

    @classmethod
    def build(cls, names: Iterable[str], weights_dir: Path | None = None) -> _MetricSet:
        infos = {m.name: m for m in metric_registry.list_metrics()}
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in infos]
        if unknown:
            raise SemsrError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(sorted(infos))}")
        objects: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        for n in names:
            opts = {"weights_dir": weights_dir} if weights_dir and infos[n].kind in ("deep", "distribution") else {}
            try:
                objects[n] = metric_registry.get_metric(n, **opts)
            except UnavailableError as err:
                unavailable[n] = str(err)
        return cls(names, objects, {n: infos[n] for n in names}, unavailable)

    def applicable(self, has_gt: bool) -> list[str]:
        return [n for n in self.names if has_gt or not self.info[n].needs_gt]

    def per_image(self, has_gt: bool) -> list[str]:
        return [n for n in self.applicable(has_gt) if n in self.objects and self.info[n].kind != "distribution"]

    def per_set(self, has_gt: bool) -> list[str]:
        return [n for n in self.applicable(has_gt) if n in self.objects and self.info[n].kind == "distribution"]


def _score_image(
    metrics: _MetricSet, names: list[str], sr: torch.Tensor, gt: torch.Tensor | None, scale: int, where: EvalImage
) -> dict[str, float]:
    out = {}
    for n in names:
        needs_gt = metrics.info[n].needs_gt
        try:
            out[n] = float(metrics.objects[n](sr, gt if needs_gt else None, crop_border=scale))
        except SemsrError as err:  # e.g. an image too small for NIQE: name the image, drop nothing silently
            raise SemsrError(f"metric {n}: {err.message}", where.gt_path or where.lr_path) from None
    return out


def _set_key(lrset: LRSet) -> str:
    """Cache key of set-level metrics: depends on exactly which images are in the set."""
    digest = hashlib.sha1("\n".join(i.key for i in lrset.images).encode()).hexdigest()[:12]
    return f"*set:{len(lrset.images)}:{digest}"


def _score_set(metric: Any, sr_paths: list[Path], gt_paths: list[Path]) -> float:
    """Set-level metric (FID) between folders of links to the SR outputs and the ground truth."""
    with tempfile.TemporaryDirectory(prefix="semsr-fid-") as tmp:
        dirs = [Path(tmp) / "sr", Path(tmp) / "gt"]
        for folder, paths in zip(dirs, (sr_paths, gt_paths)):
            folder.mkdir()
            for i, p in enumerate(paths):
                os.symlink(p.resolve(), folder / f"{i:05d}{p.suffix.lower()}")
        return float(metric.compute_folders(dirs[0], dirs[1]))


# --------------------------------------------------------------------------- the run


def run_bench(
    config: BenchConfig,
    progress: Progress | None = None,
    cache: ResultCache | None = None,
    part: tuple[int, int] = (0, 1),
    wait: Callable[[], None] = lambda: None,
) -> BenchResult:
    """Run (or resume) a benchmark and return one :class:`Row` per (method entry, dataset).

    Several processes (``part`` = ``(rank, world)``, ``wait`` a barrier of all of them) share the
    work: rank 0 prepares the LR sets first, each rank upscales every ``world``-th image (of the
    LR sets in order) of every method into the shared result cache, and after the barrier rank 0
    computes the metrics and returns the rows; the other ranks return no rows.
    """
    rank, world = part
    say = progress or (lambda _msg: None)
    if not config.methods:
        raise SemsrError("no methods given")
    if not config.datasets:
        raise SemsrError("no datasets given")
    plans = plan_methods(config)  # malformed entries and unknown names fail before any work
    metrics = _MetricSet.build(config.metrics or DEFAULT_METRICS, config.weights_dir)
    for name, reason in metrics.unavailable.items():
        say(f"metric {name} unavailable: {reason}")
    lrsets = []
    for turn in (0, 1):  # rank 0 writes the LR sets, then the others find them prepared
        if (rank == 0) == (turn == 0):
            for ds in config.datasets:
                kind = f"{config.degradation} x{config.scale}" if ds.has_gt else f"real LR photos, x{config.scale}"
                say(f"preparing {ds.name} ({kind})")
                lrsets.append(prepare(ds.limited(config.limit), config.degradation, config.scale, config.seed))
        if turn == 0:
            wait()

    own_cache = cache is None
    cache = cache or ResultCache()
    stats = Stats()
    keys: dict[str, str] = {}
    rows: list[Row] = []
    try:
        for plan in plans:
            keys[plan.label] = plan.key
            _ensure_upscaled(config, plan, lrsets, cache, stats, say, part)
        wait()
        for plan in plans if rank == 0 else ():
            for lrset in lrsets:
                rows.append(_evaluate(config, plan.label, plan.key, lrset, metrics, cache, stats, say))
    finally:
        if own_cache:
            cache.close()
    info = {n: asdict(i) if hasattr(i, "__dataclass_fields__") else dict(vars(i)) for n, i in metrics.info.items()}
    return BenchResult(rows, stats, lrsets, keys, info)


def _ensure_upscaled(
    config: BenchConfig,
    plan: MethodPlan,
    lrsets: list[LRSet],
    cache: ResultCache,
    stats: Stats,
    say: Progress,
    part: tuple[int, int] = (0, 1),
) -> None:
    """Upscale what the cache lacks of this process's share (``part`` = ``(rank, world)``) of the images."""
    name, mkey = plan.label, plan.key
    jobs: list[_Job] = []
    cached = 0
    rank, world = part
    every = [(lrset, item) for lrset in lrsets for item in lrset.images]
    for lrset, item in every[rank::world]:
        out = sr_file(mkey, lrset, item)
        if cache.upscale(mkey, lrset.uid, item.key) is not None and out.is_file():
            cached += 1
        else:
            jobs.append(_Job(lrset.uid, item.key, str(item.lr_path), str(out)))
    stats.upscale_cached += cached
    if not jobs:
        return
    say(f"{name}: upscaling {len(jobs)} image(s) ({cached} cached)")
    done = 0
    set_names = {ls.uid: ls.dataset.name for ls in lrsets}

    def record(msg: dict) -> None:
        nonlocal done
        done += 1
        stats.upscaled += 1
        rec = UpscaleRecord(msg["seconds"], msg["cpu_seconds"], msg["peak_rss_mb"])
        cache.put_upscale(mkey, msg["lrset"], msg["image"], rec)
        say(f"{name}: {done}/{len(jobs)} {set_names[msg['lrset']]} {msg['image'].split('@')[0]} {msg['seconds']:.2f} s")

    spec = {
        "name": plan.name,
        "label": plan.label,
        "options": plan.options.values(),  # plain values: the spawned process parses them again
        "scale": config.scale,
        "threads": config.threads,
    }
    if config.isolate:
        _run_isolated({**spec, "jobs": [asdict(j) for j in jobs]}, record)
    else:
        _process_jobs(spec, jobs, record)


def _evaluate(
    config: BenchConfig,
    name: str,
    mkey: str,
    lrset: LRSet,
    metrics: _MetricSet,
    cache: ResultCache,
    stats: Stats,
    say: Progress,
) -> Row:
    has_gt = lrset.dataset.has_gt
    per_image = metrics.per_image(has_gt)
    values: dict[str, list[float]] = {n: [] for n in per_image}
    records: list[UpscaleRecord] = []
    for item in lrset.images:
        rec = cache.upscale(mkey, lrset.uid, item.key)
        assert rec is not None
        records.append(rec)
        have = cache.metrics(mkey, lrset.uid, item.key)
        missing = [n for n in per_image if n not in have]
        stats.metrics_cached += len(per_image) - len(missing)
        if missing:
            sr = load_eval_image(sr_file(mkey, lrset, item)).to(torch.float64)
            gt = load_gt(item, config.scale).to(torch.float64) if has_gt else None
            ref = gt if gt is not None else (load_lr(item) if item.grey else sr)
            sr = align_channels(sr, ref)
            if gt is not None and sr.shape != gt.shape:
                raise SemsrError(f"SR {tuple(sr.shape)} and ground truth {tuple(gt.shape)} differ", item.gt_path)
            for n, v in _score_image(metrics, missing, sr, gt, config.scale, item).items():
                cache.put_metric(mkey, lrset.uid, item.key, n, v)
                have[n] = v
                stats.metrics_computed += 1
        for n in per_image:
            values[n].append(have[n])
    means: dict[str, float | None] = {n: (sum(v) / len(v) if v else None) for n, v in values.items()}
    for n in metrics.per_set(has_gt):
        skey = _set_key(lrset)
        have = cache.metrics(mkey, lrset.uid, skey)
        if n in have:
            stats.metrics_cached += 1
        else:
            say(f"{name}: {n} on {lrset.dataset.name}")
            have[n] = _score_set(
                metrics.objects[n],
                [sr_file(mkey, lrset, i) for i in lrset.images],
                [i.gt_path for i in lrset.images if i.gt_path is not None],
            )
            cache.put_metric(mkey, lrset.uid, skey, n, have[n])
            stats.metrics_computed += 1
        means[n] = have[n]
    unavailable = {n: r for n, r in metrics.unavailable.items() if n in metrics.applicable(has_gt)}
    ordered = {n: means.get(n) for n in metrics.applicable(has_gt)}
    peaks = [r.peak_rss_mb for r in records if r.peak_rss_mb is not None]
    cpu = [r.cpu_seconds for r in records if r.cpu_seconds is not None]
    return Row(
        method=name,
        dataset=lrset.dataset.name,
        degradation=lrset.degradation,
        scale=config.scale,
        metrics=ordered,
        seconds_per_image=sum(r.seconds for r in records) / len(records),
        peak_rss_mb=max(peaks) if peaks else None,
        n_images=len(lrset.images),
        cpu_seconds_per_image=sum(cpu) / len(cpu) if cpu and len(cpu) == len(records) else None,
        unavailable=unavailable,
    )


def rows_to_json(rows: list[Row]) -> dict[str, Any]:
    """The ``--json`` document: ``{"rows": [...]}`` with NaN written as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {"rows": [clean(r.to_json()) for r in rows]}
