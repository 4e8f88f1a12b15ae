"""Inference and training-step speed and peak memory of every recipe, built with random weights.

    python benchmarks/recipes_speed.py --device cuda --json gpu.json          # full size on a GPU (< 8 min)
    python benchmarks/recipes_speed.py --size tiny --json tiny.json          # the same code, tiny models, CPU
    python benchmarks/recipes_speed.py --size tiny --recipes xpsr,default    # a subset

Each recipe runs in its own subprocess (a per-recipe time limit, ``--budget`` seconds; a recipe over it
is reported as ``timeout`` and the next one starts). A recipe is its training task
(:mod:`semsr.train.tasks`, the model options of ``configs/<recipe>.yaml``; ``configs/<recipe>-tiny.yaml``
at ``--size tiny``), so the measured modules are the ones ``semsr train`` trains:

- ``infer``: one SR through the task's inference pipeline (``task.sample``, the recipe's pipeline with
  the trainable weights) to ``--out`` pixels (default 512; tiny: 64) with the recipe's default steps
  (``--steps`` overrides; tiny: 2) and guidance 1 (one model call per step), after one warm-up SR;
  seconds and peak memory.
- ``train``: one optimiser step (forward, loss, backward, AdamW) on a random batch of ``--batch`` crops
  of ``--crop`` pixels (default 4 x 512; tiny: 2 x the tiny config's crop), after one warm-up step;
  ``train_ckpt``: the same with ``train.gradient_checkpointing`` (:func:`semsr.train.trainer.apply_memory_options`).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset before each measurement) and the
process's VmHWM on CPU (reset through ``/proc/self/clear_refs`` where the kernel allows). On CUDA the
frozen modules are bf16 and the trainable ones fp32 under bf16 autocast (the configs'
``mixed_precision: bf16``); times are taken between ``torch.cuda.synchronize()`` calls.

Full size: the SD-1.5 recipes (``sd-controlnet``, ``xpsr``, ``dalpsr``) use a random SD-1.5
(:mod:`semsr.pipeline.sd_configs`) written once per run to a temporary folder as fp16 safetensors
(about 2 GB; the tasks load SD from a folder) with the tiny CLIP tokenizer; their trainable parts
(ControlNet, SFA, DFC heads) are built by the task at that size. XPSR/DaLPSR run without their VLM /
IRPAD prompt models (``no_vlm``: empty prompts; prompts are precomputed in real training). ``mmsr``,
``coser``, ``rfa`` and ``default`` need trained stage-1 models or an SD-2.1 layout that is not built
here at full size: their full-size rows say so (``skipped``) instead of measuring something else.
At ``--size tiny`` ``rfa`` needs a reference database and is skipped the same way.

The JSON (``--json``) is rewritten after every recipe: ``{"device", "size", "cpu", "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from semsr.core.machine import cpu_model, peak_rss_mb

REPO = Path(__file__).resolve().parent.parent
RECIPES = ["sd-controlnet", "xpsr", "dalpsr", "mmsr", "coser", "rfa", "default"]
CONFIG = {"sd-controlnet": "tiny", "xpsr": "xpsr", "dalpsr": "dalpsr", "mmsr": "mmsr", "coser": "coser"}
CONFIG |= {"rfa": "rfa", "default": "default"}
FULL = {"sd-controlnet", "xpsr", "dalpsr"}
#: The recipes' default sampling steps (their inference options).
DEFAULT_STEPS = {"sd-controlnet": 20, "xpsr": 20, "dalpsr": 20, "mmsr": 50, "coser": 50, "rfa": 20, "default": 20}
SKIP_REASON = {
    ("full", "mmsr"): "needs trained DepthVQ/SegVQ and an SD-2.1 layout; not built at full size",
    ("full", "coser"): "needs the stage-1 cognitive encoder and CLIP ViT-H; not built at full size",
    ("full", "rfa"): "needs the stage-1 aligner/enhancer runs and a reference database; not built at full size",
    ("full", "default"): "needs the shipped stage-1 restorer weights; not built at full size",
    ("tiny", "rfa"): "needs a reference database (semsr index build); not built here",
}
COLUMNS = ["recipe", "status", "infer_s", "infer_peak_mb", "train_s", "train_peak_mb", "train_ckpt_s"]
COLUMNS += ["train_ckpt_peak_mb", "trainable_m", "wall_s"]


# ----------------------------------------------------------------------------- worker (own process)


class Meter:
    """Seconds and peak memory (MB) of one measured block on ``device``."""

    def __init__(self, device: Any) -> None:
        import torch  # the worker's dependency, imported in the worker process only

        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        if self.cuda:
            self.torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        peak = self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_rss_mb()
        return round(seconds, 4), round(peak, 1)


def write_random_sd15(folder: Path) -> Path:
    """A diffusers SD-1.5 folder with random weights (fp16 safetensors) and the tiny CLIP tokenizer."""
    import torch  # the worker's dependency, imported in the worker process only

    from semsr.pipeline.sd_configs import SD15_SCHEDULER, random_sd15
    from semsr.testing.tiny import resolve_model_path

    folder.mkdir(parents=True, exist_ok=True)
    for name, model in random_sd15().items():
        model.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
    shutil.copytree(resolve_model_path("tiny://sd") / "tokenizer", folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def recipe_config(recipe: str, size: str, sd_folder: str | None) -> Any:
    """The experiment config of ``recipe`` at ``size`` (validation off; XPSR/DaLPSR without prompt models)."""
    import yaml  # the worker's dependency, imported in the worker process only

    from semsr.train.config import config_from_dict

    name = CONFIG[recipe] + ("" if size == "full" or recipe == "sd-controlnet" else "-tiny")
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    opts = raw.setdefault("model", {}).setdefault("options", {}) or {}
    raw["model"]["options"] = opts
    if recipe in ("xpsr", "dalpsr"):
        for key in ("vlm", "prompts", "tagger", "irpad"):
            opts.pop(key, None)
        opts["no_vlm"] = True
        opts["low_source"] = "vlm"  # with no_vlm: empty low-level prompts (no IRPAD model)
    if size == "full":
        raw["model"]["pretrained"] = sd_folder
        opts.pop("conditioning_channels", None)
        raw["data"]["hr"], raw["data"]["manifest"] = [], None
    return config_from_dict(raw, ["validation.every=0"])


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build one recipe's task and measure it (see the module docstring); returns the row."""
    import torch  # the worker's dependency, imported in the worker process only

    from semsr.train.losses import combine_losses
    from semsr.train.tasks import build_task
    from semsr.train.trainer import apply_memory_options

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = recipe_config(args.worker, args.size, args.sd)
    task = build_task(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    task.setup(device, dtype)
    trainable = task.trainable.to(device)
    meter = Meter(device)
    row: dict[str, Any] = {"recipe": args.worker, "status": "ok"}
    row["trainable_m"] = round(sum(p.numel() for p in trainable.parameters() if p.requires_grad) / 1e6, 3)
    tiny = args.size == "tiny"
    out = args.out or (64 if tiny else 512)
    steps = args.steps or (2 if tiny else DEFAULT_STEPS[args.worker])
    crop = args.crop or (cfg.data.crop_size if tiny else 512)
    batch_size = args.batch or (2 if tiny else 4)
    scale = cfg.data.scale
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    # inference
    copy = _weights_copy(trainable)
    lr = torch.rand(1, 3, out // scale, out // scale, generator=torch.Generator().manual_seed(0)).to(device)
    for timed in (False, True):
        meter.start()
        task.sample(copy, lr, ["a photo"], steps, 1.0, seed=0)
        if timed:
            row["infer_s"], row["infer_peak_mb"] = meter.stop()
    row["infer_steps"], row["infer_out"] = steps, out
    del copy
    print(f"  {args.worker}: inference {row['infer_s']} s", file=sys.stderr, flush=True)

    # training
    g = torch.Generator().manual_seed(1)
    batch = {
        "hr": torch.rand(batch_size, 3, crop, crop, generator=g),
        "lr": torch.rand(batch_size, 3, crop // scale, crop // scale, generator=g),
        "prompt": ["a photo"] * batch_size,
        "seed": torch.arange(batch_size),
        "position": torch.arange(batch_size),
        "path": [f"{i}.png" for i in range(batch_size)],
    }
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step() -> None:
        with autocast:
            loss, _ = combine_losses(cfg.losses, task.compute(trainable, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for key, checkpointing in (("train", False), ("train_ckpt", True)):
        apply_memory_options(task, gradient_checkpointing=checkpointing, attention="default")
        step()  # warm-up (AdamW state allocated)
        meter.start()
        step()
        row[f"{key}_s"], row[f"{key}_peak_mb"] = meter.stop()
        print(f"  {args.worker}: {key} {row[f'{key}_s']} s", file=sys.stderr, flush=True)
    row["train_batch"], row["train_crop"] = batch_size, crop
    return row


def _weights_copy(model: Any) -> Any:
    """A frozen copy of the trainable module (the inference pipelines cast and freeze what they get)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- main


def _print_row(row: dict[str, Any]) -> None:
    print(" | ".join(str(row.get(c, "")) for c in COLUMNS), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=["tiny", "full"], default=None, help="default: full on cuda, tiny on cpu")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {RECIPES}")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds per recipe (default: cuda 75, cpu 300)")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps (0: the recipe's default; tiny: 2)")
    parser.add_argument("--out", type=int, default=0, help="SR output size in pixels (0: 512; tiny: 64)")
    parser.add_argument("--crop", type=int, default=0, help="training crop in pixels (0: 512; tiny: the config's)")
    parser.add_argument("--batch", type=int, default=0, help="training batch (0: 4; tiny: 2)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sd", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or ("full" if args.device.startswith("cuda") else "tiny")
    args.size = size
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return 0
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    budget = args.budget or (75.0 if args.device.startswith("cuda") else 300.0)
    report: dict[str, Any] = {"device": args.device, "size": size, "cpu": cpu_model(), "rows": []}
    print(" | ".join(COLUMNS), flush=True)
    with tempfile.TemporaryDirectory(prefix="semsr-recipes-speed-") as tmp:
        sd = None
        if size == "full" and any(r in FULL for r in recipes):
            t0 = time.perf_counter()
            code = f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import recipes_speed as r; "
            code += f"r.write_random_sd15(__import__('pathlib').Path({tmp!r}) / 'sd15')"
            subprocess.run([sys.executable, "-c", code], check=True)
            sd = str(Path(tmp) / "sd15")
            report["random_sd15_write_s"] = round(time.perf_counter() - t0, 1)
            print(f"random SD-1.5 written in {report['random_sd15_write_s']} s", file=sys.stderr, flush=True)
        for recipe in recipes:
            row = run_recipe(recipe, args, size, budget, sd)
            report["rows"].append(row)
            _print_row(row)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["rows"]) else 1


def run_recipe(recipe: str, args: argparse.Namespace, size: str, budget: float, sd: str | None) -> dict[str, Any]:
    """Run one recipe's worker subprocess under ``budget`` seconds; its row (status ok|skipped|timeout|error)."""
    reason = SKIP_REASON.get((size, recipe))
    if reason:
        return {"recipe": recipe, "status": "skipped", "reason": reason}
    print(f"{recipe}: running (limit {budget:.0f} s)", file=sys.stderr, flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", recipe, "--device", args.device]
    cmd += ["--size", size, "--steps", str(args.steps), "--out", str(args.out), "--crop", str(args.crop)]
    cmd += ["--batch", str(args.batch)] + (["--sd", sd] if sd else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"recipe": recipe, "status": "timeout", "wall_s": round(time.perf_counter() - t0, 1)}
    wall = round(time.perf_counter() - t0, 1)
    sys.stderr.write(proc.stderr[-800:] if proc.returncode else "")
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not rows:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"recipe": recipe, "status": "error", "error": last[:300], "wall_s": wall}
    return {**json.loads(rows[-1]), "wall_s": wall}


if __name__ == "__main__":
    sys.exit(main())
