"""Benchmark reports: tables (markdown, CSV, HTML) and a visual report folder.

Tables put the peers side by side: one row per method, one column group per
dataset, each metric flagged ↑ (higher is better) or ↓ (lower is better),
the best value of each column in bold.

The visual report (``semsr bench --report DIR``) holds, per dataset and
degradation:

- ``<dataset>_<degradation>_x<s>.html`` -- mean table, a quality-vs-seconds
  plot and, for a few images, a PNG grid of the *same* crop side by side:
  the LR input (nearest-neighbour enlarged), every method, the ground truth;
- ``<dataset>_<degradation>_x<s>_<image>.png`` (grids) and ``..._speed.png`` (plot);

plus ``index.html`` linking every page ever written to DIR (kept in
``report.json``) with the full tables, and ``results_<degradation>_x<s>.{md,csv,json}``.
Crops are small (``crop`` SR pixels, default 96, shown at 2x) so that a whole
report stays a few MB.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from semsr.eval import atomic
from semsr.eval.images import to_uint8
from semsr.eval.lrsets import REAL, EvalImage, LRSet, load_gt, load_lr
from semsr.eval.metrics import list_metrics
from semsr.eval.metrics.image import load_eval_image

# decimals per metric in tables (others: 4)
DECIMALS = {"psnr": 2, "psnry": 2, "fid": 2, "musiq": 2}
# preference order of the plotted quality axis: fidelity first, then perceptual
FIDELITY = ("psnry", "psnr", "ssim")
PERCEPTUAL = ("lpips", "dists", "niqe", "musiq", "clipiqa", "maniqa", "fid")


def higher_better_map() -> dict[str, bool]:
    """``{metric name: higher is better}`` from the metrics registry."""
    return {m.name: m.higher_better for m in list_metrics()}


def _flag(name: str, hb: dict[str, bool]) -> str:
    return name + ("↑" if hb.get(name, True) else "↓")


def _fmt(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{DECIMALS.get(name, 4)}f}"


def _row_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [r.to_json() if hasattr(r, "to_json") else dict(r) for r in rows]


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """Rows split by (degradation, scale); LR-only sets (``real``) join every group."""
    real = [r for r in rows if r["degradation"] == REAL]
    keys = list(dict.fromkeys((r["degradation"], r["scale"]) for r in rows if r["degradation"] != REAL))
    if not keys:
        keys = list(dict.fromkeys((r["degradation"], r["scale"]) for r in real))
        return [(d, s, [r for r in real if r["scale"] == s]) for d, s in keys]
    return [
        (d, s, [r for r in rows if (r["degradation"], r["scale"]) == (d, s)] + [r for r in real if r["scale"] == s])
        for d, s in keys
    ]


def _best(values: list[float | None], higher: bool) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < 2:
        return None
    return max(vals) if higher else min(vals)


@dataclass
class _Table:
    """A methods x (dataset, metrics) grid, rendered as markdown or HTML."""

    title: str
    header: list[str]
    body: list[list[str]]
    notes: list[str]


def _build_table(rows: list[dict[str, Any]], hb: dict[str, bool], title: str, bold: tuple[str, str]) -> _Table:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {(r["method"], r["dataset"]): r for r in rows}
    metrics_of = {d: list(dict.fromkeys(m for r in rows if r["dataset"] == d for m in r["metrics"])) for d in datasets}
    header = ["Method"] + [f"{d} ({' / '.join(_flag(m, hb) for m in metrics_of[d])})" for d in datasets]
    header += ["s/img", "CPU s/img", "peak RSS MB"]
    best = {
        (d, m): _best([by[(me, d)]["metrics"].get(m) for me in methods if (me, d) in by], hb.get(m, True))
        for d in datasets
        for m in metrics_of[d]
    }
    body = []
    for me in methods:
        cells = [me]
        secs, cpu, rss = [], [], []
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
            secs.append(r["seconds_per_image"] * r["n_images"])
            c = r.get("cpu_seconds_per_image")
            cpu.append(None if c is None else c * r["n_images"])
            rss.append(r.get("peak_rss_mb"))
        n = sum(by[(me, d)]["n_images"] for d in datasets if (me, d) in by)
        cells.append(f"{sum(secs) / n:.3f}" if n else "")
        cells.append(f"{sum(cpu) / n:.3f}" if n and None not in cpu else "n/a")
        known = [v for v in rss if v is not None]
        cells.append(f"{max(known):.0f}" if known else "n/a")
        body.append(cells)
    notes = []
    counts = {d: sorted({by[(me, d)]["n_images"] for me in methods if (me, d) in by}) for d in datasets}
    notes.append("images: " + ", ".join(f"{d} {'/'.join(map(str, c))}" for d, c in counts.items()))
    reasons = {m: why for r in rows for m, why in r.get("unavailable", {}).items()}
    notes += [f"{m}: unavailable ({why})" for m, why in reasons.items()]
    return _Table(title, header, body, notes)


def _title(deg: str, scale: int) -> str:
    return f"x{scale}, LR by {deg} degradation" if deg != REAL else f"x{scale}, real LR inputs"


def markdown_tables(rows: Sequence[Any], hb: dict[str, bool] | None = None) -> str:
    """Markdown: one table per (degradation, scale), methods as rows, datasets as column groups.

    The last columns are wall and CPU seconds per image (means over every
    image of the row's datasets) and the peak RSS of the method's process
    (max over them).
    """
    hb = hb if hb is not None else higher_better_map()
    out = []
    for deg, scale, group in _groups(_row_dicts(rows)):
        t = _build_table(group, hb, _title(deg, scale), ("**", "**"))
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
        t = _build_table(group, hb, _title(deg, scale), ("<b>", "</b>"))
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


def choose_crop(lr: torch.Tensor, scale: int, crop: int) -> tuple[int, int, int]:
    """Pick the most detailed ``crop x crop`` SR window of an image; returns (top, left, size) in SR pixels.

    Computed on the LR input (always available, identical for all methods) and
    aligned to the LR grid, so the LR, SR and GT crops show the same region.
    """
    h, w = lr.shape[-2:]
    c = max(1, min(crop // scale, h, w))
    energy = _detail_map(lr)
    win = F.avg_pool2d(energy[None, None], kernel_size=c, stride=1)[0, 0]
    idx = int(torch.argmax(win))
    top, left = divmod(idx, win.shape[1])
    return top * scale, left * scale, c * scale


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


def speed_plot(rows: list[dict[str, Any]], hb: dict[str, bool], path: Path, title: str) -> None:
    """Quality vs seconds per image: one point per method, one panel per quality axis.

    Uses CPU seconds when every row has them (stable on a busy machine), else wall seconds.
    """
    import matplotlib  # optional heavy dependency, only for the report's plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional heavy dependency (see above)

    axes_names = _quality_axes(rows)
    cpu = all(r.get("cpu_seconds_per_image") is not None for r in rows)
    key = "cpu_seconds_per_image" if cpu else "seconds_per_image"
    fig, axes = plt.subplots(1, len(axes_names), figsize=(4.2 * len(axes_names), 3.2), dpi=80, squeeze=False)
    for ax, m in zip(axes[0], axes_names):
        for r in rows:
            v = r["metrics"].get(m)
            if v is None:
                continue
            t = r[key]
            ax.scatter([t], [v], s=30)
            ax.annotate(r["method"], (t, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"{'CPU ' if cpu else ''}seconds per image (log)")
        ax.set_ylabel(f"{m} ({'higher' if hb.get(m, True) else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
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


def write_report(
    result: Any,
    cache: Any,
    out_dir: Path,
    images_per_set: int = 2,
    crop: int = 96,
    zoom: int = 2,
) -> list[Path]:
    """Write the visual report of a :class:`semsr.eval.runner.BenchResult` into ``out_dir``.

    Args:
        result: the benchmark result (rows, LR sets, method keys).
        cache: the :class:`~semsr.eval.runner.ResultCache` (per-image metric values).
        out_dir: report folder (created); pages of earlier runs stay and are indexed.
        images_per_set: images shown per dataset.
        crop: crop side in SR pixels; ``zoom``: nearest-neighbour enlargement of the crops.

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hb = higher_better_map()
    rows = _row_dicts(result.rows)
    methods = list(result.method_keys)
    written: list[Path] = []
    index_entries = []
    for lrset in result.lrsets:
        ds_rows = [r for r in rows if r["dataset"] == lrset.dataset.name and r["degradation"] == lrset.degradation]
        if not ds_rows:
            continue
        stem = _slug(lrset.dataset.name, lrset.degradation, f"x{lrset.scale}")
        title = f"{lrset.dataset.name} — {_title(lrset.degradation, lrset.scale)}"
        plot = out_dir / f"{stem}_speed.png"
        speed_plot(ds_rows, hb, plot, title)
        written.append(plot)
        body = [
            f"<p><a href='index.html'>all results</a></p><h1>{html.escape(title)}</h1>",
            html_tables(ds_rows, hb),
            f"<img src='{plot.name}' alt='quality vs seconds per image'>",
        ]
        for item in pick_images(lrset, images_per_set):
            grid_path, table = _image_grid(result, cache, lrset, item, methods, hb, crop, zoom, out_dir, stem)
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
            }
        )
    written += _write_index(out_dir, rows, index_entries, hb)
    return written


def _image_grid(
    result: Any,
    cache: Any,
    lrset: LRSet,
    item: EvalImage,
    methods: list[str],
    hb: dict[str, bool],
    crop: int,
    zoom: int,
    out_dir: Path,
    stem: str,
) -> tuple[Path, str]:
    s = lrset.scale
    lr = load_lr(item)
    top, left, c = choose_crop(lr, s, crop)
    lr_crop = lr[..., top // s : (top + c) // s, left // s : (left + c) // s]
    tiles: list[tuple[list[str], torch.Tensor]] = [
        (["LR (nearest)"], lr_crop.repeat_interleave(s, -1).repeat_interleave(s, -2))
    ]
    per_image: dict[str, dict[str, float]] = {}
    for me in methods:
        mkey = result.method_keys[me]
        sr = load_eval_image(result.sr_path(me, lrset, item))
        vals = cache.metrics(mkey, lrset.uid, item.key)
        per_image[me] = vals
        shown = [m for m in _quality_axes([{"metrics": vals}]) if m in vals]
        tiles.append(
            ([me, " ".join(f"{m} {_fmt(m, vals[m])}" for m in shown)], sr[..., top : top + c, left : left + c])
        )
    if item.gt_path is not None:
        gt = load_gt(item, s)
        tiles.append((["ground truth"], gt[..., top : top + c, left : left + c]))
    grid = make_grid(tiles, zoom=zoom)
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
        f"<li><a href='{html.escape(p['page'])}'>{html.escape(p['title'])}</a></li>" for p in state["pages"]
    )
    tables = " · ".join(f"<a href='{f.name}'>{f.name}</a>" for f in written if f.suffix in (".md", ".csv"))
    body = (
        f"<h1>semsr benchmark report</h1><h2>Pages</h2><ul>{links}</ul>"
        f"<h2>Results</h2><p>{tables}</p>{html_tables(state['rows'], hb)}"
    )
    index = out_dir / "index.html"
    atomic.write_text(index, _page("semsr benchmark report", body))
    return written + [index]
