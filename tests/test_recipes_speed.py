"""``benchmarks/recipes_speed.py`` at tiny size on CPU: the same code the GPU run uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "recipes_speed.py"
MEASURED = ["infer_s", "infer_peak_mb", "train_s", "train_peak_mb", "train_ckpt_s", "train_ckpt_peak_mb"]


def _run(recipes: str, out: Path, data: Path, timeout: float) -> dict:
    env = {**os.environ, "SEMSR_DATA": str(data), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--recipes", recipes, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert proc.stdout.splitlines()[0].startswith("recipe | status | infer_s")
    assert len(proc.stdout.splitlines()) == 1 + len(report["rows"])  # one table row per recipe
    return report


def _check_measured(row: dict) -> None:
    assert row["status"] == "ok", row
    for key in MEASURED:
        assert row[key] > 0, (row["recipe"], key)
    assert row["trainable_m"] > 0 and row["infer_steps"] == 2 and row["train_batch"] == 2


def test_tiny_benchmark_measures_xpsr_and_reports_skips(tmp_path: Path, data_dir: Path) -> None:
    report = _run("xpsr,rfa", tmp_path / "r.json", data_dir, timeout=120)
    assert report["size"] == "tiny" and report["device"] == "cpu" and report["cpu"]
    xpsr, rfa = report["rows"]
    _check_measured(xpsr)
    assert rfa["status"] == "skipped" and "database" in rfa["reason"]


@pytest.mark.slow
def test_tiny_benchmark_runs_every_buildable_recipe(tmp_path: Path, data_dir: Path) -> None:
    report = _run("sd-controlnet,xpsr,dalpsr,mmsr,coser,rfa,default", tmp_path / "r.json", data_dir, timeout=900)
    rows = {r["recipe"]: r for r in report["rows"]}
    for recipe in ("sd-controlnet", "xpsr", "dalpsr", "mmsr", "coser", "default"):
        _check_measured(rows[recipe])
    assert rows["rfa"]["status"] == "skipped"
