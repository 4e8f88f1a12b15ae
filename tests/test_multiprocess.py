"""Multi-process runs under ``accelerate launch`` (2 CPU processes, gloo): inputs split, one merged report.

``semsr.commands.shard`` splits the inputs by ``RANK`` / ``WORLD_SIZE``; rank 0 merges the per-rank
report parts after a barrier. Launches start two Python processes each (``launch_semsr``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semsr.commands.shard import Shard, merge_parts
from train_helpers import launch_semsr, write_textures


def test_shard_take_splits_sorted_inputs_without_overlap():
    items = [f"f{i}" for i in (5, 0, 3, 1, 4, 2)]
    parts = [Shard(r, 2).take(items) for r in range(2)]
    assert parts == [["f0", "f2", "f4"], ["f1", "f3", "f5"]]
    assert Shard().take(items) == items


def test_merge_parts_recounts_and_keeps_every_result():
    parts = [
        {"method": "m", "interrupted": False, "results": [{"input": "b", "status": "ok"}], "summary": {"ok": 1}},
        {"method": "m", "interrupted": True, "results": [{"input": "a", "status": "failed"}], "summary": {}},
    ]
    merged = merge_parts(parts, lambda rs: {"n": len(rs)})
    assert [r["input"] for r in merged["results"]] == ["a", "b"]
    assert merged["summary"] == {"n": 2} and merged["interrupted"] is True


def test_upscale_two_processes_six_images_one_report(tmp_path: Path):
    src = write_textures(tmp_path / "in", count=6, size=(32, 24))
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = ("upscale", "-i", str(src), "-o", str(out), "-n", "bicubic", "-s", "2", "--json", str(report))
    launch_semsr(*args)
    assert len(list(out.iterdir())) == 6
    data = json.loads(report.read_text())
    assert data["processes"] == 2
    assert sorted(Path(r["input"]).name for r in data["results"]) == sorted(p.name for p in src.iterdir())
    assert data["summary"]["ok"] == 6
    assert list(tmp_path.glob("report.json.rank*")) == []  # parts merged and removed
    # a second launch skips every finished output (each rank its own share) and still reports all six
    launch_semsr(*args)
    data = json.loads(report.read_text())
    assert data["summary"]["skipped"] == 6 and len(data["results"]) == 6


def test_bench_two_processes_split_images_one_result(tmp_path: Path):
    src = write_textures(tmp_path / "hr", count=6, size=(32, 32))
    report = tmp_path / "bench.json"
    proc = launch_semsr(
        "bench",
        "--methods",
        "bicubic",
        "--datasets",
        str(src),
        "--metrics",
        "psnr",
        "--no-isolate",
        "--json",
        str(report),
    )
    # each process upscaled its 3 images into the shared cache; rank 0 scored all 6
    assert proc.stderr.count("bicubic: upscaling 3 image(s) (0 cached)") == 2
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["n_images"] == 6 and rows[0]["metrics"]["psnr"] > 10
    assert (
        proc.stdout.count("**x4, LR by bicubic degradation**") == 1
    )  # one report (quality + timing tables), from rank 0
