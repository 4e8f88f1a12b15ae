"""benchmarks/default_model_speed.py runs start to finish at a tiny input size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_speed_rows_with_the_slow_exit_and_the_stage1_flop_count(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "default_model_speed.py"), "--size", "32", "--threads", "1"]
    cmd += ["--dtypes", "fp32", "--slow-exit", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [r["exit"] for r in res["rows"]] == ["quick", "slow"]
    for row in res["rows"]:
        assert row["resolved"] == "fp32" and row["stage1"] > 0 and len(row["runs_seconds"]) == 1
        assert row["stage1_gflops"] == res["stage1_gflop"] / row["stage1"]
    assert res["rows"][1]["command"].startswith("SEMSR_SLOW_EXIT=1 semsr upscale")
    # RRDBNet x4plus: about 36 MFLOP per input pixel (2350 GFLOP at 256²)
    assert 30 < res["stage1_gflop"] < 45 and res["machine"]["matmul_gflops_fp32"] > 0
    assert "slow-exit" in proc.stdout and "GFLOP/s" in proc.stdout
