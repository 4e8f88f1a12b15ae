"""Benchmark reports: tables (markdown, CSV, HTML) and a visual report folder.

Tables put the peers side by side: one row per method, one column group per
dataset, each metric flagged ↑ (higher is better) or ↓ (lower is better),
the best value of each column in bold. Each (degradation, scale) gets a
quality table and a timing table; real photos (LR-only sets, degradation
``real``) get tables of their own with no-reference metrics only, never a
column inside a synthetic-degradation table. Timing is per set (wall and CPU
seconds per image of that set, peak RSS, the set's LR size), never averaged
across sets of different image sizes.

The visual report (``semsr bench --report DIR``) holds, per dataset and
degradation:

- ``<dataset>_<degradation>_x<s>.html`` -- which images it covers (all, or
  the first N of the set), the CPU it ran on, the tables, a quality-vs-seconds
  plot and, for a few images, a PNG grid of the *same* crops side by side:
  the LR input (nearest-neighbour enlarged), every method, the ground truth,
  one row per crop (``crops``, ``--report-crops``);
- ``<dataset>_<degradation>_x<s>_<image>.png`` (grids) and ``..._speed.png`` (plot);

plus ``index.html`` linking every page ever written to DIR (kept in
``report.json``) with the full tables, and ``results_<degradation>_x<s>.{md,csv}``.
Crops are small (``crop`` SR pixels, default 96, shown at 2x) so that a whole
report stays a few MB.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from semsr.core.dtypes import describe_dtype
from semsr.eval import atomic
from semsr.eval.images import to_uint8
from semsr.eval.lrsets import REAL, EvalImage, LRSet, load_gt, load_lr
from semsr.eval.metrics import list_metrics
from semsr.eval.metrics.image import list_images, load_eval_image

# decimals per metric in tables (others: 4)
DECIMALS = {"psnr": 2, "psnry": 2, "fid": 2, "musiq": 2}
# preference order of the plotted quality axis: fidelity first, then perceptual
FIDELITY = ("psnry", "psnr", "ssim")
PERCEPTUAL = ("lpips", "dists", "gmsd", "ms-ssim", "noise_sigma", "niqe", "musiq", "clipiqa", "maniqa", "fid")


def higher_better_map() -> dict[str, bool]:
    """``{metric name: higher is better}`` from the metrics registry."""
    return {m.name: m.higher_better for m in list_metrics()}


def no_reference_metrics() -> set[str]:
    """Names of the registered metrics that need no ground truth (the only ones shown for real photos)."""
    return {m.name for m in list_metrics() if not m.needs_gt}


def _flag(name: str, hb: dict[str, bool]) -> str:
    return name + ("↑" if hb.get(name, True) else "↓")


def _fmt(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{DECIMALS.get(name, 4)}f}"


def _row_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [r.to_json() if hasattr(r, "to_json") else dict(r) for r in rows]


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """Rows split by (degradation, scale).

    Real photos (degradation ``real``, no ground truth) form their own groups
    after the synthetic ones: their numbers are not comparable with a
    synthetic degradation's, so they never share a table with them.
    """
    keys = list(dict.fromkeys((r["degradation"], r["scale"]) for r in rows if r["degradation"] != REAL))
    keys += list(dict.fromkeys((r["degradation"], r["scale"]) for r in rows if r["degradation"] == REAL))
    return [(d, s, [r for r in rows if (r["degradation"], r["scale"]) == (d, s)]) for d, s in keys]


def _best(values: list[float | None], higher: bool) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < 2:
        return None
    return max(vals) if higher else min(vals)


@dataclass
class _Table:
    """A methods x datasets grid, rendered as markdown or HTML."""

    title: str
    header: list[str]
    body: list[list[str]]
    notes: list[str]


def _shown_metrics(rows: list[dict[str, Any]], dataset: str, real: bool, no_ref: set[str]) -> list[str]:
    names = list(dict.fromkeys(m for r in rows if r["dataset"] == dataset for m in r["metrics"]))
    return [m for m in names if m in no_ref] if real else names


def _build_tables(
    rows: list[dict[str, Any]], hb: dict[str, bool], title: str, bold: tuple[str, str], real: bool
) -> list[_Table]:
    """The quality table and the timing table of one (degradation, scale) group.

    Timing is per set (seconds per image on that set's images, whose LR size
    the header gives), never averaged across sets of different image sizes.
    """
    no_ref = no_reference_metrics()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {(r["method"], r["dataset"]): r for r in rows}
    metrics_of = {d: _shown_metrics(rows, d, real, no_ref) for d in datasets}
    header = ["Method"] + [f"{d} ({' / '.join(_flag(m, hb) for m in metrics_of[d])})" for d in datasets]
    best = {
        (d, m): _best([by[(me, d)]["metrics"].get(m) for me in methods if (me, d) in by], hb.get(m, True))
        for d in datasets
        for m in metrics_of[d]
    }
    body = []
    for me in methods:
        cells = [me]
        for d in datasets:
            r = by.get((me, d))
            if r is None:
                cells.append("")
                continue
            parts = []
            for m in metrics_of[d]:
                v = r["metrics"].get(m)
                s = _fmt(m, v)
                b = best[(d, m)]
                if b is not None and v is not None and _fmt(m, v) == _fmt(m, b):
                    s = f"{bold[0]}{s}{bold[1]}"
                parts.append(s)
            cells.append(" / ".join(parts))
        body.append(cells)
    notes = []
    counts = {d: sorted({by[(me, d)]["n_images"] for me in methods if (me, d) in by}) for d in datasets}
    notes.append("images: " + ", ".join(f"{d} {'/'.join(map(str, c))}" for d, c in counts.items()))
    if real:
        notes.append("real photos: no ground truth, so only no-reference metrics; not comparable with synthetic tables")
    reasons = {m: why for r in rows for m, why in r.get("unavailable", {}).items() if not real or m in no_ref}
    notes += [f"{m}: unavailable ({why})" for m, why in reasons.items()]
    quality = _Table(title, header, body, notes)

    size = {d: next((by[(me, d)].get("lr_size") for me in methods if (me, d) in by), None) for d in datasets}
    t_header = ["Method"] + [
        f"{d} ({size[d] + ', ' if size[d] else ''}{'/'.join(map(str, counts[d]))} img): s/img · CPU s/img · peak RSS MB"
        for d in datasets
    ]
    t_body = []
    for me in methods:
        cells = [me]
        for d in datasets:
            r = by.get((me, d))
            if r is None:
                cells.append("")
                continue
            c, rss = r.get("cpu_seconds_per_image"), r.get("peak_rss_mb")
            cells.append(
                f"{r['seconds_per_image']:.3f} · {'n/a' if c is None else f'{c:.3f}'} · "
                f"{'n/a' if rss is None else f'{rss:.0f}'}"
            )
        t_body.append(cells)
    timing = _Table(
        f"{title}: time and memory per set",
        t_header,
        t_body,
        ["seconds are per image of that set (wall, then CPU time of the method process); never averaged across sets"],
    )
    return [quality, timing]


def _title(deg: str, scale: int) -> str:
    return f"x{scale}, LR by {deg} degradation" if deg != REAL else f"x{scale}, real photos (no ground truth)"


def markdown_tables(rows: Sequence[Any], hb: dict[str, bool] | None = None) -> str:
    """Markdown: per (degradation, scale) a quality table and a per-set timing table.

    Quality: methods as rows, datasets as column groups, best per column in
    bold. Real photos get their own tables with no-reference metrics only.
    Timing: per set, wall and CPU seconds per image and the peak RSS of the
    method's process (with the set's LR size when the row carries ``lr_size``).
    """
    hb = hb if hb is not None else higher_better_map()
    out = []
    for deg, scale, group in _groups(_row_dicts(rows)):
        for t in _build_tables(group, hb, _title(deg, scale), ("**", "**"), deg == REAL):
            out.append(f"**{t.title}**\n")
            out.append("| " + " | ".join(t.header) + " |")
            out.append("|" + "|".join(["---"] + [":---:"] * (len(t.header) - 1)) + "|")
            out += ["| " + " | ".join(r) + " |" for r in t.body]
            out.append("")
            out += [f"- {n}" for n in t.notes]
            out.append("")
    return "\n".join(out)


def csv_text(rows: Sequence[Any]) -> str:
    """CSV with one line per (method, dataset, degradation, scale) and one column per metric."""
    dicts = _row_dicts(rows)
    metrics = list(dict.fromkeys(m for r in dicts for m in r["metrics"]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "method",
            "dataset",
            "degradation",
            "scale",
            "n_images",
            "lr_size",
            *metrics,
            "seconds_per_image",
            "cpu_seconds_per_image",
            "peak_rss_mb",
        ]
    )
    for r in dicts:
        vals = [r["metrics"].get(m) for m in metrics]
        w.writerow(
            [
                r["method"],
                r["dataset"],
                r["degradation"],
                r["scale"],
                r["n_images"],
                r.get("lr_size", ""),
                *("" if v is None else repr(float(v)) for v in vals),
                f"{r['seconds_per_image']:.6f}",
                "" if r.get("cpu_seconds_per_image") is None else f"{r['cpu_seconds_per_image']:.6f}",
                "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.1f}",
            ]
        )
    return buf.getvalue()


def html_tables(rows: Sequence[Any], hb: dict[str, bool]) -> str:
    """The markdown tables as HTML fragments."""
    out = []
    for deg, scale, group in _groups(_row_dicts(rows)):
        for t in _build_tables(group, hb, _title(deg, scale), ("<b>", "</b>"), deg == REAL):
            out.append(f"<h3>{html.escape(t.title)}</h3><table><tr>")
            out.append("".join(f"<th>{html.escape(h)}</th>" for h in t.header) + "</tr>")
            for r in t.body:
                # cells contain only numbers, method names and our own <b> tags
                out.append("<tr>" + "".join(f"<td>{c if '<b>' in c else html.escape(c)}</td>" for c in r) + "</tr>")
            out.append("</table><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in t.notes) + "</ul>")
    return "\n".join(out)


# --------------------------------------------------------------------------- grids


def _detail_map(x: torch.Tensor) -> torch.Tensor:
    """``(1, C, h, w)`` -> ``(h, w)`` local gradient energy (where differences between methods show)."""
    g = x.mean(dim=1, keepdim=True).float()
    dx = (g[..., :, 1:] - g[..., :, :-1]).abs()
    dy = (g[..., 1:, :] - g[..., :-1, :]).abs()
    e = torch.zeros_like(g)
    e[..., :, 1:] += dx
    e[..., 1:, :] += dy
    return e[0, 0]


def choose_crops(lr: torch.Tensor, scale: int, crop: int, count: int = 1) -> list[tuple[int, int, int]]:
    """Pick the ``count`` most detailed, non-overlapping ``crop x crop`` SR windows of an image.

    Computed on the ``(1, C, h, w)`` LR input (always available, identical for
    all methods) and aligned to the LR grid, so the LR, SR and GT crops show the
    same region. Windows are taken greedily by detail; each excludes the
    windows overlapping it, so fewer than ``count`` come back when the image is small.

    Returns:
        ``[(top, left, size), ...]`` in SR pixels, most detailed first.
    """
    h, w = lr.shape[-2:]
    c = max(1, min(crop // scale, h, w))
    energy = _detail_map(lr)
    win = F.avg_pool2d(energy[None, None], kernel_size=c, stride=1)[0, 0].clone()
    out = []
    for _ in range(count):
        if not torch.isfinite(win).any():
            break
        idx = int(torch.argmax(win))
        top, left = divmod(idx, win.shape[1])
        out.append((top * scale, left * scale, c * scale))
        # windows whose top-left lies within c-1 of this one overlap it
        win[max(0, top - c + 1) : top + c, max(0, left - c + 1) : left + c] = -math.inf
    return out


def choose_crop(lr: torch.Tensor, scale: int, crop: int) -> tuple[int, int, int]:
    """The most detailed ``crop x crop`` SR window: ``(top, left, size)`` in SR pixels (see :func:`choose_crops`)."""
    return choose_crops(lr, scale, crop, 1)[0]


def _to_rgb_uint8(x: torch.Tensor) -> np.ndarray:
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return to_uint8(x)


def _label_strip(width: int, lines: list[str], font: Any) -> np.ndarray:
    im = Image.new("RGB", (width, 16 * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        text = line
        while text and draw.textlength(text, font=font) > width - 4:
            text = text[:-2] + "…"
        draw.text((2, 2 + 16 * i), text, fill=(0, 0, 0), font=font)
    return np.asarray(im)


def _font() -> Any:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: bitmap font
        return ImageFont.load_default()


def make_grid(tiles: list[tuple[list[str], torch.Tensor]], zoom: int = 2, gap: int = 4) -> np.ndarray:
    """Lay out labelled crops side by side: each ``(labels, (1, C, c, c) in [0, 1])`` -> one uint8 image."""
    font = _font()
    columns = []
    n_lines = max(len(lbl) for lbl, _ in tiles)
    for labels, t in tiles:
        img = _to_rgb_uint8(t)
        img = np.repeat(np.repeat(img, zoom, axis=0), zoom, axis=1)
        strip = _label_strip(img.shape[1], labels + [""] * (n_lines - len(labels)), font)
        columns.append(np.concatenate([strip, img], axis=0))
    height = max(c.shape[0] for c in columns)
    parts = []
    for i, c in enumerate(columns):
        if c.shape[0] < height:
            c = np.concatenate([c, np.full((height - c.shape[0], c.shape[1], 3), 255, np.uint8)], axis=0)
        parts.append(c)
        if i < len(columns) - 1:
            parts.append(np.full((height, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def pick_images(lrset: LRSet, k: int) -> list[EvalImage]:
    """``k`` images spread evenly over the set (deterministic)."""
    n = len(lrset.images)
    if k >= n:
        return list(lrset.images)
    idx = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    return [lrset.images[i] for i in idx]


# --------------------------------------------------------------------------- plot


def _quality_axes(rows: list[dict[str, Any]]) -> list[str]:
    have = list(dict.fromkeys(m for r in rows for m, v in r["metrics"].items() if v is not None))
    axes = [next((m for m in FIDELITY if m in have), None), next((m for m in PERCEPTUAL if m in have), None)]
    return [a for a in axes if a is not None] or have[:1]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def speed_figure(rows: list[dict[str, Any]], hb: dict[str, bool], title: str) -> Any:
    """Quality vs seconds per image (a matplotlib ``Figure``): one point per method, one panel per quality axis.

    Uses CPU seconds when every row has them (stable on a busy machine), else
    wall seconds. Methods are told apart by marker and colour, named in one
    legend below the panels: no text sits next to a point, so near-identical
    points cannot make labels overlap.
    """
    import matplotlib  # optional heavy dependency, only for the report's plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional heavy dependency (see above)

    axes_names = _quality_axes(rows)
    cpu = all(r.get("cpu_seconds_per_image") is not None for r in rows)
    key = "cpu_seconds_per_image" if cpu else "seconds_per_image"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab10")
    style = {me: (MARKERS[i % len(MARKERS)], colours(i % 10)) for i, me in enumerate(methods)}
    ncol = min(len(methods), 3 * len(axes_names))
    height = 3.2 + 0.22 * math.ceil(len(methods) / max(ncol, 1))
    fig, axes = plt.subplots(
        1, len(axes_names), figsize=(4.2 * len(axes_names), height), dpi=80, squeeze=False, layout="constrained"
    )
    handles = {}
    for ax, m in zip(axes[0], axes_names):
        for r in rows:
            v = r["metrics"].get(m)
            if v is None:
                continue
            marker, colour = style[r["method"]]
            handles[r["method"]] = ax.scatter(
                [r[key]], [v], s=36, marker=marker, color=colour, alpha=0.8, label=r["method"]
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{'CPU ' if cpu else ''}seconds per image (log)")
        ax.set_ylabel(f"{m} ({'higher' if hb.get(m, True) else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    fig.suptitle(title, fontsize=9)
    named = [me for me in methods if me in handles]
    fig.legend([handles[me] for me in named], named, loc="outside lower center", ncol=ncol, fontsize=7, frameon=False)
    return fig


def speed_plot(rows: list[dict[str, Any]], hb: dict[str, bool], path: Path, title: str) -> None:
    """Write :func:`speed_figure` as a PNG to ``path``."""
    import matplotlib.pyplot as plt  # optional heavy dependency, only for the report's plots

    fig = speed_figure(rows, hb, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- pages

_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:center;font-size:13px}img{max-width:100%}
.grid{margin:1em 0 2em}h2,h3{margin-top:1.2em}"""


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _slug(*parts: Any) -> str:
    keep = "".join(c if c.isalnum() or c in "-._" else "-" for c in "_".join(str(p) for p in parts))
    return keep.strip("-")


def _auto_note() -> str:
    """What ``dtype=auto`` (every method's default precision) resolves to on this CPU, and why."""
    info = describe_dtype("auto", "cpu")
    return f"; dtype auto = {info['dtype']} ({info['dtype_reason']})"


def cpu_description() -> str:
    """This machine's CPU for the report: model name, logical cores and the bf16/AMX/AVX-512 flags it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    have = [f for f in CPU_FLAGS if f in flags]
    listed = ", ".join(have) if have else "none"
    return f"{model}, {os.cpu_count()} logical cores; flags of note: {listed}" if text else f"{model}"


#: CPU flags that change which dtypes and kernels are fast, named on the report pages
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def set_size_label(lrset: LRSet) -> str:
    """The LR input size of a set's images: ``"LR 128×128"`` or ``"LR 62×91 to 256×256"`` (by area)."""
    sizes = []
    for item in lrset.images:
        with Image.open(item.lr_path) as im:
            sizes.append(im.size)
    if not sizes:
        return ""
    lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return f"LR {lo[0]}×{lo[1]}" if lo == hi else f"LR {lo[0]}×{lo[1]} to {hi[0]}×{hi[1]}"


def write_report(
    result: Any,
    cache: Any,
    out_dir: Path,
    images_per_set: int = 2,
    crop: int = 96,
    zoom: int = 2,
    crops: int = 1,
    threads: int | None = None,
) -> list[Path]:
    """Write the visual report of a :class:`semsr.eval.runner.BenchResult` into ``out_dir``.

    Args:
        result: the benchmark result (rows, LR sets, method keys).
        cache: the :class:`~semsr.eval.runner.ResultCache` (per-image metric values).
        out_dir: report folder (created); pages of earlier runs stay and are indexed.
        images_per_set: images shown per dataset.
        crop: crop side in SR pixels; ``zoom``: nearest-neighbour enlargement of the crops.
        crops: crops per image (the most detailed non-overlapping windows, one grid row each).
        threads: torch threads per method process, stated on the pages (None: not stated).

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hb = higher_better_map()
    rows = _row_dicts(result.rows)
    methods = list(result.method_keys)
    cpu = cpu_description()
    written: list[Path] = []
    index_entries = []
    for lrset in result.lrsets:
        ds_rows = [r for r in rows if r["dataset"] == lrset.dataset.name and r["degradation"] == lrset.degradation]
        if not ds_rows:
            continue
        size = set_size_label(lrset)
        for r in ds_rows:
            r["lr_size"] = size
        stem = _slug(lrset.dataset.name, lrset.degradation, f"x{lrset.scale}")
        title = f"{lrset.dataset.name} — {_title(lrset.degradation, lrset.scale)}"
        total = len(list_images(lrset.dataset.root))
        coverage = _coverage(lrset.dataset.name, len(lrset.images), total, size)
        machine = f"CPU: {cpu}" + (f"; {threads} torch thread(s) per method" if threads else "") + _auto_note()
        plot = out_dir / f"{stem}_speed.png"
        speed_plot(ds_rows, hb, plot, title)
        written.append(plot)
        body = [
            f"<p><a href='index.html'>all results</a></p><h1>{html.escape(title)}</h1>",
            f"<p>{html.escape(coverage)}<br>{html.escape(machine)}</p>",
            html_tables(ds_rows, hb),
            f"<img src='{plot.name}' alt='quality vs seconds per image'>",
        ]
        for item in pick_images(lrset, images_per_set):
            grid_path, table = _image_grid(result, cache, lrset, item, methods, hb, crop, zoom, crops, out_dir, stem)
            written.append(grid_path)
            body.append(
                f"<div class='grid'><h3>{html.escape(item.name)}</h3>"
                f"<img src='{grid_path.name}' alt='{html.escape(item.name)} crops'>{table}</div>"
            )
        page = out_dir / f"{stem}.html"
        atomic.write_text(page, _page(title, "\n".join(body)))
        written.append(page)
        index_entries.append(
            {
                "page": page.name,
                "title": title,
                "dataset": lrset.dataset.name,
                "degradation": lrset.degradation,
                "scale": lrset.scale,
                "methods": methods,
                "coverage": coverage,
                "machine": machine,
            }
        )
    written += _write_index(out_dir, rows, index_entries, hb)
    return written


def _coverage(name: str, n: int, total: int, size: str) -> str:
    part = f"all {n} images" if n >= total else f"the first {n} of {total} images (--limit {n})"
    return f"{name}: {part}; {size}"


def _image_grid(
    result: Any,
    cache: Any,
    lrset: LRSet,
    item: EvalImage,
    methods: list[str],
    hb: dict[str, bool],
    crop: int,
    zoom: int,
    crops: int,
    out_dir: Path,
    stem: str,
) -> tuple[Path, str]:
    """One PNG per image: a row per crop (LR, every method, GT), labels and metric values on the first row."""
    s = lrset.scale
    lr = load_lr(item)
    srs = {me: load_eval_image(result.sr_path(me, lrset, item)) for me in methods}
    gt = load_gt(item, s) if item.gt_path is not None else None
    per_image = {me: cache.metrics(result.method_keys[me], lrset.uid, item.key) for me in methods}
    rows = []
    for i, (top, left, c) in enumerate(choose_crops(lr, s, crop, crops)):
        lr_crop = lr[..., top // s : (top + c) // s, left // s : (left + c) // s]
        tiles: list[tuple[list[str], torch.Tensor]] = [
            (["LR (nearest)"] if i == 0 else [], lr_crop.repeat_interleave(s, -1).repeat_interleave(s, -2))
        ]
        for me in methods:
            vals = per_image[me]
            shown = [m for m in _quality_axes([{"metrics": vals}]) if m in vals]
            labels = [me, " ".join(f"{m} {_fmt(m, vals[m])}" for m in shown)] if i == 0 else []
            tiles.append((labels, srs[me][..., top : top + c, left : left + c]))
        if gt is not None:
            tiles.append((["ground truth"] if i == 0 else [], gt[..., top : top + c, left : left + c]))
        rows.append(make_grid(tiles, zoom=zoom))
    gap = np.full((8, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([part for r in rows for part in (r, gap)][:-1], axis=0)
    path = out_dir / f"{stem}_{_slug(Path(item.name).stem)}.png"
    atomic.write_png(path, grid)
    names = list(dict.fromkeys(m for v in per_image.values() for m in v))
    table = "<table><tr><th>method</th>" + "".join(f"<th>{html.escape(_flag(m, hb))}</th>" for m in names) + "</tr>"
    for me, vals in per_image.items():
        table += (
            f"<tr><td>{html.escape(me)}</td>" + "".join(f"<td>{_fmt(m, vals.get(m))}</td>" for m in names) + "</tr>"
        )
    table += "</table>"
    return path, table


def _write_index(
    out_dir: Path, rows: list[dict[str, Any]], entries: list[dict[str, Any]], hb: dict[str, bool]
) -> list[Path]:
    """Merge this run into ``report.json`` and rewrite ``index.html`` and the results tables."""
    state_path = out_dir / "report.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {"pages": [], "rows": []}
    pages = {p["page"]: p for p in state.get("pages", [])}
    pages.update({e["page"]: e for e in entries})
    key = lambda r: (r["method"], r["dataset"], r["degradation"], r["scale"])  # noqa: E731
    merged = {key(r): r for r in state.get("rows", [])}
    merged.update({key(r): r for r in rows})
    state = {"pages": sorted(pages.values(), key=lambda p: p["page"]), "rows": list(merged.values())}
    atomic.write_json(state_path, state)
    written = [state_path]
    for deg, scale, group in _groups(state["rows"]):
        stem = out_dir / _slug("results", deg, f"x{scale}")
        md, cs = stem.with_suffix(".md"), stem.with_suffix(".csv")
        atomic.write_text(md, markdown_tables(group, hb))
        atomic.write_text(cs, csv_text(group))
        written += [md, cs]
    links = "".join(
        f"<li><a href='{html.escape(p['page'])}'>{html.escape(p['title'])}</a>"
        + "".join(f"<br><small>{html.escape(p[k])}</small>" for k in ("coverage", "machine") if p.get(k))
        + "</li>"
        for p in state["pages"]
    )
    tables = " · ".join(f"<a href='{f.name}'>{f.name}</a>" for f in written if f.suffix in (".md", ".csv"))
    body = (
        f"<h1>semsr benchmark report</h1><h2>Pages</h2><ul>{links}</ul>"
        f"<h2>Results</h2><p>{tables}</p>{html_tables(state['rows'], hb)}"
    )
    index = out_dir / "index.html"
    atomic.write_text(index, _page("semsr benchmark report", body))
    return written + [index]
