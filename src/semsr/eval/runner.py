"""Benchmark runner: upscale every dataset image with every method, score, aggregate.

Flow for one ``run_bench`` call::

    datasets --lrsets.prepare--> LR inputs (cached PNG + manifest)
        --worker (one process per method)--> SR PNGs + seconds + peak RSS   (cached)
        --metrics (this process)-->         per-image metric values        (cached)
        --aggregate-->                      one Row per (method, dataset)

**Caching and resume.** Every upscale and every metric value is stored in an
SQLite file (``cache_dir()/bench/results.sqlite``) as soon as it exists, keyed
by (method key, LR-set id, image key). The method key holds the method name
and every option that changes its output (build options, tile size); the
LR-set id holds the dataset, degradation, scale, seed and degradation
configuration; the image key holds the file's content hash. A rerun -- after
an interruption, with more datasets, more metrics or a larger ``--limit`` --
only computes what is missing. SR images are kept as uint8 PNGs under
``cache_dir()/bench/sr/`` (the SR convention rounds outputs to 8 bits, and the
report and FID read them back).

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
import inspect
import json
import math
import multiprocessing as mp
import os
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from semsr.errors import SemsrError, UnavailableError
from semsr.eval import atomic
from semsr.eval.datasets import Dataset
from semsr.eval.images import to_uint8
from semsr.eval.metrics.base import align_channels, as_rgb
from semsr.eval.metrics.image import load_eval_image
from semsr.eval.lrsets import EvalImage, LRSet, load_gt, load_lr, prepare
from semsr.paths import cache_dir

DEFAULT_METRICS = ("psnr", "psnry", "ssim", "niqe")
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- configuration / results

@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        methods: registry names (:mod:`semsr.methods`).
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
        method_opts: build options passed to every ``get_method`` call.
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


def sr_file(mkey: str, lrset: LRSet, item: EvalImage) -> Path:
    """Where the uint8 SR output of ``item`` is cached."""
    safe = mkey.replace("/", "_").replace("#", "-")
    return cache_dir() / "bench" / "sr" / safe / lrset.uid / f"{item.key}.png"


class ResultCache:
    """SQLite store of upscale records and metric values (one writer: the runner)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "bench" / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.executescript(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS upscale (
                method TEXT, lrset TEXT, image TEXT,
                seconds REAL, peak_rss_mb REAL, created REAL, cpu_seconds REAL,
                PRIMARY KEY (method, lrset, image));
            CREATE TABLE IF NOT EXISTS metric (
                method TEXT, lrset TEXT, image TEXT, metric TEXT, value REAL,
                PRIMARY KEY (method, lrset, image, metric));
            """
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(upscale)")}
        if "cpu_seconds" not in columns:  # caches written before CPU time was recorded
            with self.db:
                self.db.execute("ALTER TABLE upscale ADD COLUMN cpu_seconds REAL")

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
            self.db.execute(
                "INSERT OR REPLACE INTO metric VALUES (?, ?, ?, ?, ?)", (mkey, lrset, image, metric, value)
            )


# --------------------------------------------------------------------------- memory

def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's RSS high-water mark in MiB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


# --------------------------------------------------------------------------- upscaling

def upscale(method: Any, x: torch.Tensor, scale: int, tile: int, tile_pad: int) -> torch.Tensor:
    """Upscale ``x`` ``(1, 3, h, w)`` in [0, 1] with ``method`` -> ``(1, 3, scale*h, scale*w)``.

    Methods that do not tile themselves are run tile by tile
    (:func:`semsr.pipeline.tiling.tiled_apply`) when the image is larger than ``tile``.
    """
    from semsr.pipeline.tiling import tiled_apply

    try:
        y = tiled_apply(method, x, tile=tile, tile_pad=tile_pad)
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


def _build_method(name: str, opts: dict[str, Any], scale: int, threads: int | None = None) -> Any:
    """Build method ``name``; ``scale`` and ``threads`` are passed when its factory takes them."""
    from semsr.methods import get_method, resolve

    spec = resolve(name)
    try:
        params = inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):
        params = {}
    extra: dict[str, Any] = {}
    if "scale" in params:
        extra["scale"] = scale
    if threads and "threads" in params:
        extra["threads"] = threads
    method = get_method(spec.name, **{**extra, **opts})
    if int(getattr(method, "scale", scale)) != scale:
        raise SemsrError(f"method {name} upscales x{method.scale}, but --scale {scale} was asked")
    return method


def _process_jobs(spec: dict[str, Any], jobs: list[_Job], emit: Callable[[dict], None]) -> None:
    """Upscale ``jobs`` with the method described by ``spec``; ``emit`` one record per finished image."""
    scale, tile, tile_pad = spec["scale"], spec["tile"], spec["tile_pad"]
    method = _build_method(spec["name"], spec["opts"], scale, spec.get("threads"))
    for job in jobs:
        x = as_rgb(load_eval_image(job.lr_path))
        reset_peak_rss()  # when unsupported, peak_rss_mb() is the process peak so far
        start, cpu_start = time.perf_counter(), time.process_time()
        y = upscale(method, x, scale, tile, tile_pad)
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
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        _process_jobs(spec, [_Job(**j) for j in spec["jobs"]], conn.send)
        conn.send({"done": True})
    except SemsrError as err:
        conn.send({"error": str(err), "semsr": True, "unavailable": isinstance(err, UnavailableError)})
    except BaseException as err:  # report, then let the parent decide
        conn.send({"error": f"{type(err).__name__}: {err}", "semsr": False})
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
                raise SemsrError(f"method process died (exit code {proc.exitcode})", spec["name"]) from None
            if msg.get("done"):
                break
            if "error" in msg:
                if msg["semsr"]:
                    cls = UnavailableError if msg.get("unavailable") else SemsrError
                    raise cls(msg["error"])
                raise RuntimeError(f"method {spec['name']} failed: {msg['error']}")
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
        from semsr.eval.metrics import get_metric, list_metrics

        infos = {m.name: m for m in list_metrics()}
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in infos]
        if unknown:
            raise SemsrError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(sorted(infos))}")
        objects: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        for n in names:
            opts = {"weights_dir": weights_dir} if weights_dir and infos[n].kind in ("deep", "distribution") else {}
            try:
                objects[n] = get_metric(n, **opts)
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

def run_bench(config: BenchConfig, progress: Progress | None = None, cache: ResultCache | None = None) -> BenchResult:
    """Run (or resume) a benchmark and return one :class:`Row` per (method, dataset)."""
    from semsr.methods import resolve

    say = progress or (lambda _msg: None)
    if not config.methods:
        raise SemsrError("no methods given")
    if not config.datasets:
        raise SemsrError("no datasets given")
    specs = [resolve(m) for m in config.methods]  # unknown names fail before any work
    metrics = _MetricSet.build(config.metrics or DEFAULT_METRICS, config.weights_dir)
    for name, reason in metrics.unavailable.items():
        say(f"metric {name} unavailable: {reason}")
    lrsets = []
    for ds in config.datasets:
        say(f"preparing {ds.name} ({config.degradation} x{config.scale})")
        lrsets.append(prepare(ds.limited(config.limit), config.degradation, config.scale, config.seed))

    own_cache = cache is None
    cache = cache or ResultCache()
    stats = Stats()
    keys: dict[str, str] = {}
    rows: list[Row] = []
    try:
        for spec in specs:
            mkey = method_key(spec.name, {**config.method_opts, "tile": config.tile, "tile_pad": config.tile_pad})
            keys[spec.name] = mkey
            _ensure_upscaled(config, spec.name, mkey, lrsets, cache, stats, say)
            for lrset in lrsets:
                rows.append(_evaluate(config, spec.name, mkey, lrset, metrics, cache, stats, say))
    finally:
        if own_cache:
            cache.close()
    info = {n: asdict(i) if hasattr(i, "__dataclass_fields__") else dict(vars(i)) for n, i in metrics.info.items()}
    return BenchResult(rows, stats, lrsets, keys, info)


def _ensure_upscaled(
    config: BenchConfig, name: str, mkey: str, lrsets: list[LRSet], cache: ResultCache, stats: Stats, say: Progress
) -> None:
    jobs: list[_Job] = []
    cached = 0
    for lrset in lrsets:
        for item in lrset.images:
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
        "name": name,
        "opts": config.method_opts,
        "scale": config.scale,
        "tile": config.tile,
        "tile_pad": config.tile_pad,
        "threads": config.threads,
    }
    if config.isolate:
        _run_isolated({**spec, "jobs": [asdict(j) for j in jobs]}, record)
    else:
        _process_jobs(spec, jobs, record)


def _evaluate(
    config: BenchConfig, name: str, mkey: str, lrset: LRSet, metrics: _MetricSet, cache: ResultCache, stats: Stats, say: Progress
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
