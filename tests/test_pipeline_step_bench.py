"""benchmarks/pipeline_step.py runs start to finish on the tiny models (the code its GPU run uses)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from semsr.pipeline.sd_controlnet import controlnet_unet_forward
from semsr.testing.tiny import tiny_controlnet, tiny_unet

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
    assert res["flops"]["flops_per_step"] > res["flops"]["attention_flops"] > 0 and "GFLOP/s" in proc.stdout


def _bench_module():
    spec = importlib.util.spec_from_file_location("pipeline_step_bench", ROOT / "benchmarks" / "pipeline_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_count_on_meta_equals_the_count_of_a_real_step() -> None:
    """The meta-device count equals FlopCounterMode on the computed tiny step, whose attention (not counted by
    torch on the CPU) is summed from the real SDPA calls' shapes; the meta count has no double-counted matmuls."""
    bench = _bench_module()
    meta = bench.worker_flops("tiny")
    torch.manual_seed(0)
    unet = tiny_unet()
    controlnet = tiny_controlnet(unet)
    calls: list[tuple[int, ...]] = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append((q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]))
        return real_sdpa(q, k, v, *args, **kwargs)

    counter = FlopCounterMode(display=False)
    x, ctx, hint = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.rand(2, 3, 128, 128)
    with torch.inference_mode(), mock.patch.object(F, "scaled_dot_product_attention", sdpa), counter:
        controlnet_unet_forward(unet, controlnet, x, torch.tensor(500), ctx, hint)
    attention = sum(4 * b * h * lq * lk * d for b, h, lq, lk, d in calls)
    assert calls and meta["attention_flops"] == attention
    assert meta["flops_per_step"] == counter.get_total_flops() + attention


def test_scaling_mode_runs_on_tiny_models_tiled_and_automatic(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_step.py"), "--size", "tiny", "--device", "cpu"]
    cmd += ["--scaling", "64,128", "--scaling-tile", "8", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for size in (64, 128):
        tiled, auto = res[f"scaling_{size}_tiled"], res[f"scaling_{size}_auto"]
        assert "error" not in tiled and tiled["output"] == f"{size}x{size}"
        assert tiled["latent_tile"] == (8 if size == 128 else 0)  # a 64² output is an 8² latent: one tile
        assert "error" not in auto and auto["latent_tile"] == 0  # the tiny model always fits
        assert tiled["estimated_seconds_20_steps"] > 0 and tiled["peak_rss_mb"] > 0
    assert "scaling with output size" in proc.stdout


@pytest.mark.slow
def test_pipeline_compile_end_to_end_rows_on_tiny_models(tmp_path: Path) -> None:
    """The CUDA run's ``--e2e-compile`` rows (here ``default``: inductor on the CPU) at tiny size."""
    out = tmp_path / "c.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_step.py"), "--size", "tiny", "--device", "cpu"]
    cmd += ["--configs", "", "--e2e-sizes", "64", "--e2e-steps", "2", "--e2e-compile", "default", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    row = res["e2e_64_default"]
    assert "error" not in row and row["compile"] == "default" and row["warmup_seconds"] > 0
    assert "pipeline compile modes" in proc.stdout


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


def test_token_merging_and_attention_rows_run_on_tiny_models(tmp_path: Path) -> None:
    """The ToMe / attention-variant step rows and the ToMe end-to-end quality run, at tiny size."""
    out = tmp_path / "t.json"
    configs = "bf16-hintcache,bf16-tome50,bf16-tome50-all,bf16-sdpa-math,bf16-slice,bf16-cl-hintcache"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_step.py"), "--size", "tiny", "--device", "cpu"]
    cmd += ["--configs", configs, "--e2e-sizes", "", "--reps", "1", "--json", str(out)]
    cmd += ["--tome-quality", "64", "--tome-ratios", "0.5", "--tome-steps", "2", "--e2e-dtype", "fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in configs.split(","):
        assert "error" not in res[key] and res[key]["seconds_per_step"] > 0, res[key]
    for key in ("bf16-tome50", "bf16-tome50-all"):  # merged: compared with the exact output of the same inputs
        assert res[key]["tome_merged_calls_unet"] > 0 and 20 < res[key]["psnr_vs_exact_db"] < float("inf")
    assert res["bf16-hintcache"]["tome_merged_calls_unet"] == 0 and "psnr_vs_exact_db" not in res["bf16-hintcache"]
    q = res["tome_quality_64"]
    assert "error" not in q and q["0.0"]["seconds_per_step"] > 0
    assert 30 < q["0.5"]["psnr_db"] < float("inf") and 0.9 < q["0.5"]["ssim"] < 1
    assert "token merging end to end" in proc.stdout


@pytest.mark.slow
def test_freeze_rows_run_on_tiny_models(tmp_path: Path) -> None:
    """Inductor freezing with and without token merging (minutes of compiling on 2 cores)."""
    out = tmp_path / "f.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_step.py"), "--size", "tiny", "--device", "cpu"]
    cmd += ["--configs", "bf16-freeze,bf16-freeze-tome50", "--e2e-sizes", "", "--reps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("bf16-freeze", "bf16-freeze-tome50"):
        assert "error" not in res[key] and res[key]["psnr_vs_exact_db"] > 20, res[key]
    assert res["bf16-freeze-tome50"]["tome_merged_calls_unet"] > 0
