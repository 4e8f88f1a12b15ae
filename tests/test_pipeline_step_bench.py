"""benchmarks/pipeline_step.py runs start to finish on the tiny models (the code its GPU run uses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_step_benchmark_runs_on_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_step.py"), "--size", "tiny", "--device", "cpu"]
    cmd += ["--configs", "fp32", "--e2e-sizes", "64", "--e2e-steps", "2", "--reps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "error" not in res["fp32"] and res["fp32"]["seconds_per_step"] > 0
    assert res["fp32"]["device"] == "cpu" and res["fp32"]["size"] == "tiny"
    e2e = res["e2e_64"]
    assert "error" not in e2e and e2e["steps"] == 2 and e2e["output"] == "64x64" and e2e["peak_rss_mb"] > 0
    assert res["machine"]["device"] == "cpu" and isinstance(res["machine"]["cpu_bf16"], bool)
    assert "ms/step" in proc.stdout and "end-to-end" in proc.stdout


def test_pipeline_step_hint_cache_configs_run_on_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_step.py"), "--size", "tiny", "--device", "cpu"]
    cmd += ["--configs", "fp32-hintcache,bf16-hintcache", "--e2e-sizes", "", "--reps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("fp32-hintcache", "bf16-hintcache"):
        assert "error" not in res[key] and res[key]["seconds_per_step"] > 0
        assert res[key]["max_abs_diff_to_first_call"] == 0.0  # the cached embedding gives the same output
