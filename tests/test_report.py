"""Tests of the benchmark report (`semsr bench --report`): separate real-photo tables, per-set timing,
crop count, non-overlapping plot labels, coverage and CPU on the pages."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr.cli import main
from semsr.eval.report import choose_crops, csv_text, markdown_tables, speed_figure

HB = {"psnr": True, "psnry": True, "ssim": True, "niqe": False}


def _row(method: str, dataset: str, degradation: str, seconds: float, n: int, **metrics: float) -> dict:
    return {
        "method": method,
        "dataset": dataset,
        "degradation": degradation,
        "scale": 4,
        "metrics": dict(metrics),
        "seconds_per_image": seconds,
        "cpu_seconds_per_image": seconds,
        "peak_rss_mb": 500.0,
        "n_images": n,
    }


def _tables(md: str) -> dict[str, str]:
    """``{bold title: table text}`` of a markdown_tables output."""
    parts = re.split(r"^\*\*(.+)\*\*$", md, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _rows() -> list[dict]:
    return [
        _row("a", "Set5", "bicubic", 1.0, 5, psnr=30.0, niqe=5.0),
        _row("a", "Set14", "bicubic", 10.0, 14, psnr=25.0, niqe=4.0),
        _row("a", "RealSRSet", "real", 40.0, 2, niqe=6.0),
        _row("b", "Set5", "bicubic", 2.0, 5, psnr=31.0, niqe=6.0),
        _row("b", "Set14", "bicubic", 20.0, 14, psnr=24.0, niqe=3.0),
        _row("b", "RealSRSet", "real", 80.0, 2, niqe=5.5),
    ]


def test_real_photos_get_their_own_tables_with_no_reference_metrics_only() -> None:
    tables = _tables(markdown_tables(_rows(), HB))
    synthetic = [t for title, t in tables.items() if "bicubic degradation" in title]
    real = [t for title, t in tables.items() if "real photos" in title]
    assert synthetic and real
    assert all("RealSRSet" not in t for t in synthetic), "a real-photo column inside a synthetic table"
    quality = next(t for t in real if "niqe↓" in t)
    assert "psnr" not in quality and "RealSRSet (niqe↓)" in quality and "**5.5000**" in quality


def test_timing_is_per_set_and_never_averaged_across_sets() -> None:
    rows = _rows()
    for r in rows:
        r["lr_size"] = {"Set5": "LR 64×64", "Set14": "LR 100×120", "RealSRSet": "LR 200×200"}[r["dataset"]]
    md = markdown_tables(rows, HB)
    # method a: (1*5 + 10*14) / 19 = 7.632 was the old cross-set mean; (5+140+80)/21 = 10.714 with RealSRSet
    for mean in ("7.632", "10.714", "15.263"):
        assert mean not in md
    timing = next(t for title, t in _tables(md).items() if "bicubic" in title and "time" in title)
    header, _, row_a, row_b = timing.strip().splitlines()[:4]
    assert "Set5 (LR 64×64, 5 img)" in header and "Set14 (LR 100×120, 14 img)" in header
    assert "1.000" in row_a and "10.000" in row_a and "20.000" in row_b
    assert "LR 100×120" in csv_text(rows)


def test_choose_crops_gives_distinct_non_overlapping_windows() -> None:
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, 40, 48, generator=g) * 0.05
    lr[..., 5:13, 30:38] = torch.rand(1, 3, 8, 8, generator=g)  # the most detailed spot
    crops = choose_crops(lr, 4, 32, 3)
    assert len(crops) == 3 and crops[0] == (20, 120, 32)
    for (t1, l1, c), (t2, l2, _) in combinations(crops, 2):
        assert t1 + c <= t2 or t2 + c <= t1 or l1 + c <= l2 or l2 + c <= l1, "crops overlap"
    assert all(0 <= t <= 160 - c and 0 <= left <= 192 - c for t, left, c in crops)
    assert len(choose_crops(lr[..., :8, :8], 4, 32, 3)) == 1  # no room for a second window


def test_speed_plot_labels_never_overlap_even_for_identical_points() -> None:
    import matplotlib.pyplot as plt

    names = ["realesrgan-x4plus", "realsr-df2k-x4", "default", "default[steps=1]", "bicubic", "realcugan-4x"]
    rows = [_row(n, "Set5", "bicubic", 10.0 + 1e-3 * i, 5, psnr=25.0 + 1e-3 * i, niqe=5.0) for i, n in enumerate(names)]
    fig = speed_figure(rows, HB, "Set5")
    try:
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        labels = [t for ax in fig.axes for t in ax.texts] + [t for lg in fig.legends for t in lg.get_texts()]
        assert sorted(t.get_text() for t in labels) == sorted(names)
        boxes = [t.get_window_extent(renderer) for t in labels]
        for a, b in combinations(boxes, 2):
            assert not a.overlaps(b), "two method labels overlap"
        fig_box = fig.bbox
        for box in boxes:  # inside the figure, and off every panel (never on top of the points)
            assert fig_box.x0 <= box.x0 and box.x1 <= fig_box.x1 and fig_box.y0 <= box.y0 and box.y1 <= fig_box.y1
            assert not any(box.overlaps(ax.bbox) for ax in fig.axes)
    finally:
        plt.close(fig)


def _write_images(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_bench_report_crops_coverage_and_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / "cache"))
    hr = _write_images(tmp_path / "hr", 3, 128)
    heights = {}
    for crops in (1, 3):
        out = tmp_path / f"report{crops}"
        args = ["bench", "--methods", "bicubic", "--datasets", str(hr), "--limit", "2", "--metrics", "psnr"]
        args += ["--no-isolate", "-q", "--report", str(out), "--report-crop", "32", "--report-crops", str(crops)]
        assert main(args + ["--threads", "1"]) == 0
        with Image.open(out / "hr_bicubic_x4_img0.png") as im:
            heights[crops] = im.height
        page = (out / "hr_bicubic_x4.html").read_text()
        assert "the first 2 of 3 images (--limit 2)" in page and "LR 32×32" in page
        assert "CPU: " in page and "1 torch thread(s) per method" in page
        assert "the first 2 of 3 images" in (out / "index.html").read_text()
    assert heights[3] > 2.5 * (heights[1] - 40), heights  # three crop rows under one label strip
    capsys.readouterr()
    assert main(["bench", "--methods", "bicubic", "--datasets", str(hr), "--report-crops", "0"]) != 0
    assert "--report-crops must be >= 1" in capsys.readouterr().err


REPORT = Path(__file__).resolve().parents[1] / "docs" / "report"


def test_committed_report_is_consistent() -> None:
    """docs/report: every file belongs to an indexed page or the tables, no stale page, no machine path,
    the default model in every table, real photos apart, coverage and CPU on every page."""
    state = json.loads((REPORT / "report.json").read_text())
    pages = {p["page"] for p in state["pages"]}
    assert pages == {p.name for p in REPORT.glob("*.html")} - {"index.html"}
    referenced = {"index.html", "report.json"}
    for page in sorted(REPORT.glob("*.html")):
        text = page.read_text()
        refs = set(re.findall(r"(?:src|href)='([^']+)'", text))
        assert all((REPORT / r).is_file() for r in refs), page.name
        referenced |= refs
    assert {f.name for f in REPORT.iterdir()} == referenced, "files no page links to (stale?)"
    for f in REPORT.iterdir():
        if f.suffix in (".html", ".json", ".md", ".csv"):
            assert not re.search(r"/(work|root|tmp|home)/", f.read_text()), f.name
    for p in state["pages"]:
        assert p["coverage"].startswith(p["dataset"]) and "CPU: " in p["machine"], p["page"]
    for key in {(r["dataset"], r["degradation"]) for r in state["rows"]}:
        assert "default" in {r["method"] for r in state["rows"] if (r["dataset"], r["degradation"]) == key}, key
    real_sets = {r["dataset"] for r in state["rows"] if r["degradation"] == "real"}
    for md in REPORT.glob("results_*.md"):
        if md.name != "results_real_x4.md":
            assert not any(s in md.read_text() for s in real_sets), md.name
