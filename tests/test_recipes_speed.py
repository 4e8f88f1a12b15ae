"""``benchmarks/recipes_speed.py``: every recipe at tiny size on CPU (the same code the GPU run uses), and every
recipe's full-size task built on the ``meta`` device (``benchmarks/recipes_full.py``): shapes and parameter counts,
no memory, every trainable tensor on the task's device."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "recipes_speed.py"
RECIPES = ["sd-controlnet", "xpsr", "dalpsr", "mmsr", "coser", "rfa", "default"]
MEASURED = ["infer_s", "infer_peak_mb", "train_s", "train_peak_mb", "train_ckpt_s", "train_ckpt_peak_mb"]

_spec = importlib.util.spec_from_file_location("recipes_full", REPO / "benchmarks" / "recipes_full.py")
recipes_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes_full)

#: Published sizes (millions of parameters) of the frozen parts the meta builds must reproduce.
PUBLISHED = {
    "sd15": {"unet": 859.52, "vae": 83.65, "text": 123.06},  # SD-1.5 UNet, KL-f8 VAE, CLIP ViT-L/14 text
    "sd21": {"unet": 865.91, "vae": 83.65, "text": 340.39},  # SD-2.1-base UNet, OpenCLIP ViT-H/14 text (23 layers)
}
#: Trainable parameters (millions) of each recipe's full-size task (docs/benchmarks/recipes.md); ControlNet from an
#: SD-1.5 UNet is 361.28 M (the published ControlNet size).
TRAINABLE = {
    "sd-controlnet": 361.28,
    "xpsr": 868.18,
    "dalpsr": 489.03,
    "mmsr": 128.18,
    "coser": 874.93,
    "rfa": 162.13,
    "default": 5.86,
}


def _run(recipes: str, out: Path, data: Path, timeout: float, *extra: str) -> dict:
    env = {**os.environ, "SEMSR_DATA": str(data), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--recipes", recipes, "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    table = [line for line in proc.stdout.splitlines() if " | " in line]
    assert table[0].startswith("recipe | status | infer_s")
    assert len(table) == 1 + len(report["rows"])  # one table row per recipe
    return report


def _check_measured(row: dict) -> None:
    assert row["status"] == "ok", row
    for key in MEASURED:
        assert row[key] > 0, (row["recipe"], key)
    assert row["trainable_m"] > 0 and row["infer_steps"] == 2 and row["train_batch"] == 2


def test_tiny_benchmark_measures_every_recipe(tmp_path: Path, data_dir: Path) -> None:
    """All seven recipes, in one process (``--in-process``); RFA with a reference database built on the fly."""
    report = _run(",".join(RECIPES), tmp_path / "r.json", data_dir, 240, "--in-process")
    assert report["size"] == "tiny" and report["device"] == "cpu" and report["cpu"]
    rows = {r["recipe"]: r for r in report["rows"]}
    assert list(rows) == RECIPES
    for row in rows.values():
        _check_measured(row)
    assert rows["rfa"]["prepare_s"] > 0  # the database


@pytest.mark.slow
def test_tiny_benchmark_runs_every_recipe_in_its_own_process(tmp_path: Path, data_dir: Path) -> None:
    report = _run(",".join(RECIPES), tmp_path / "r.json", data_dir, timeout=900)
    for row in report["rows"]:
        _check_measured(row)


@pytest.mark.parametrize("recipe", RECIPES)
def test_full_size_task_builds_on_the_meta_device(recipe: str) -> None:
    """The task's own code builds every frozen and trainable module at full size on ``meta``: a constructor that
    makes a host tensor, or moves a module to the host, fails here as it would on a GPU."""
    task = recipes_full.meta_task(recipe)
    meta = torch.device("meta")
    for name, module in recipes_full.task_parts(task).items():
        if name in ("vq_edge",):  # the shipped edge VQ: real weights, loaded on the host by design
            continue
        stray = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device != meta]
        assert not stray, (recipe, name, stray[:5])
    counts = recipes_full.parameter_counts(task)
    layout = recipes_full.SD_LAYOUT.get(recipe)
    for part, millions in PUBLISHED.get(layout, {}).items():
        assert counts[part] == pytest.approx(millions, rel=1e-3), (recipe, part)
    assert counts["trainable_grad"] == pytest.approx(TRAINABLE[recipe], rel=0.05), counts


def test_full_size_prior_models_have_their_published_sizes() -> None:
    """The random full-size prior models the benchmark writes (built on ``meta`` here)."""

    def millions(module: torch.nn.Module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    with torch.device("meta"):
        assert millions(recipes_full.clip_vision_model(recipes_full.CLIP_VIT_H14_VISION)) == pytest.approx(630.8, 1e-3)
        assert millions(recipes_full.clip_vision_model(recipes_full.CLIP_VIT_L14_VISION)) == pytest.approx(303.2, 1e-3)
        assert millions(recipes_full.depth_anything_small()) == pytest.approx(24.8, 1e-2)  # the paper's 24.8 M
        assert millions(recipes_full.mask2former_swin_large_ade()) == pytest.approx(216, 1e-2)  # the paper's 216 M
        assert millions(recipes_full.realesrgan_x4plus()) == pytest.approx(16.7, 1e-2)
        depth = recipes_full.map_vq("depth")
    assert depth.config.codebook_size == 1024 and depth.config.embed_dim == 256
