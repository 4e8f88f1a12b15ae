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

Full size: every recipe at the published sizes with random weights (:mod:`recipes_full`). A random
SD-1.5 (``sd-controlnet``, ``xpsr``, ``dalpsr``, ``rfa``) and a random SD-2.1-base (``mmsr``, ``coser``)
are written once per run to a temporary folder as fp16 safetensors (about 2 GB each, the two in parallel;
the tasks load SD from a folder) with the tiny CLIP tokenizer. Each recipe's worker writes its other
models before it builds the task (``prepare_s``): MMSR's Depth-Anything-small, Mask2Former Swin-L and
DepthVQ/SegVQ; CoSeR's CLIP ViT-H/14 tower, cognitive encoder and a pool of a few random images; RFA's
CLIP ViT-L/14 tower, aligner, enhancer and a reference database of a few random images (``semsr index
build``); the default model's stage 1 is a random Real-ESRGAN x4plus-shaped RRDBNet. Trainable parts are
built by the task at full size with random init. XPSR/DaLPSR run without their VLM / IRPAD prompt models
(``no_vlm``: empty prompts; prompts are precomputed in real training); RFA without excluding the training
image from retrieval (the batches are random tensors). At ``--size tiny`` ``rfa`` gets a database of a
few random images with the tiny CLIP embedder the same way.

``--meta`` builds every selected recipe's training task at full size on the ``meta`` device instead
(no memory, no weights; :func:`recipes_full.meta_task`) and prints the parameter counts per part.

Budgets: each recipe has a time limit (``--budget``, default on CUDA per recipe, :data:`CUDA_BUDGET`;
on CPU 300 s) and the whole run one (``--total``, default on CUDA 470 s, so that a GPU run ends inside
8 minutes; a recipe that would start with less than a minute left is reported as ``not_run``). The
warm-up SR before the timed one uses at most 2 steps (same shapes, so the kernels are ready).

The JSON (``--json``) is rewritten after every recipe: ``{"device", "size", "cpu", "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from semsr.core.machine import cpu_model, peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipes_full  # the benchmark's sibling module (full-size random models)

REPO = Path(__file__).resolve().parent.parent
RECIPES = ["sd-controlnet", "xpsr", "dalpsr", "mmsr", "coser", "rfa", "default"]
CONFIG = {"sd-controlnet": "tiny", "xpsr": "xpsr", "dalpsr": "dalpsr", "mmsr": "mmsr", "coser": "coser"}
CONFIG |= {"rfa": "rfa", "default": "default"}
#: The recipes' default sampling steps (their inference options).
DEFAULT_STEPS = {"sd-controlnet": 20, "xpsr": 20, "dalpsr": 20, "mmsr": 50, "coser": 50, "rfa": 20, "default": 20}
#: (size, recipe) pairs that are reported as skipped, with the reason (none at present).
SKIP_REASON: dict[tuple[str, str], str] = {}
#: Seconds per recipe on CUDA (``--budget`` overrides): model writing, loading, 2 SRs and 4 training steps.
CUDA_BUDGET = {"sd-controlnet": 60, "xpsr": 70, "dalpsr": 70, "mmsr": 110, "coser": 110, "rfa": 90, "default": 45}
COLUMNS = ["recipe", "status", "infer_s", "infer_peak_mb", "train_s", "train_peak_mb", "train_ckpt_s"]
COLUMNS += ["train_ckpt_peak_mb", "trainable_m", "prepare_s", "wall_s"]


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


def recipe_config(
    recipe: str, size: str, sd_folder: str | None, overrides: dict[str, Any] | None = None, crop: int = 0
) -> Any:
    """The experiment config of ``recipe`` at ``size`` (validation off; XPSR/DaLPSR without prompt models);
    ``overrides``: dotted keys (``model.options.db``...) set on the YAML; ``crop``: ``data.crop_size`` (0: the
    config's)."""
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
        if recipe in recipes_full.SD_LAYOUT:
            raw["model"]["pretrained"] = sd_folder
        opts.pop("conditioning_channels", None)
        raw["data"]["hr"], raw["data"]["manifest"] = [], None
    if crop:
        raw["data"]["crop_size"] = crop
    for key, value in (overrides or {}).items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(raw, ["validation.every=0"])


def prepare(recipe: str, size: str, folder: Path, crop: int) -> dict[str, Any]:
    """Write what ``recipe`` loads besides SD into ``folder`` (full size: :func:`recipes_full.write_recipe_models`;
    tiny ``rfa``: a reference database); returns the config overrides."""
    if size == "full":
        return recipes_full.write_recipe_models(recipe, folder, crop)
    if recipe == "rfa":
        return recipes_full.write_tiny_rfa_db(folder)
    return {}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build one recipe's task and measure it (see the module docstring); returns the row."""
    import torch  # the worker's dependency, imported in the worker process only

    from semsr.train.losses import combine_losses
    from semsr.train.tasks import build_task
    from semsr.train.trainer import apply_memory_options

    device = torch.device(args.device)
    torch.manual_seed(0)
    tiny = args.size == "tiny"
    t0 = time.perf_counter()
    crop = args.crop or (0 if tiny else 512)
    overrides = prepare(args.worker, args.size, Path(args.tmp) / args.worker, crop)
    prepare_s = round(time.perf_counter() - t0, 1)
    cfg = recipe_config(args.worker, args.size, args.sd, overrides, crop)
    task = build_task(cfg)
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16" else torch.float32
    if args.worker == "default" and not tiny:
        task.stage1 = recipes_full.random_stage1(device, dtype)
    task.setup(device, dtype)
    trainable = task.trainable.to(device)
    if args.trainable_dtype == "bf16":  # CPU memory saver: bf16 master weights and gradients
        trainable = trainable.to(torch.bfloat16)
    meter = Meter(device)
    row: dict[str, Any] = {"recipe": args.worker, "status": "ok", "prepare_s": prepare_s}
    row["trainable_m"] = round(sum(p.numel() for p in trainable.parameters() if p.requires_grad) / 1e6, 3)
    out = args.out or (64 if tiny else 512)
    steps = args.steps or (2 if tiny else DEFAULT_STEPS[args.worker])
    crop = cfg.data.crop_size
    batch_size = args.batch or (2 if tiny else 4)
    scale = cfg.data.scale
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    row["dtype"], row["optimizer"] = "bf16" if dtype == torch.bfloat16 else "fp32", args.optimizer
    row["trainable_dtype"] = args.trainable_dtype

    # inference
    copy = _weights_copy(trainable)
    lr = torch.rand(1, 3, out // scale, out // scale, generator=torch.Generator().manual_seed(0)).to(device)
    for timed in (False, True):
        meter.start()
        task.sample(copy, lr, ["a photo"], steps if timed else min(steps, 2), 1.0, seed=0)
        if timed:
            row["infer_s"], row["infer_peak_mb"] = meter.stop()
    row["infer_steps"], row["infer_out"] = steps, out
    del copy
    gc.collect()  # the pipeline's references to the copy (e.g. AiA blocks installed in the frozen UNet)
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
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=1e-6)
    else:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=["tiny", "full"], default=None, help="default: full on cuda, tiny on cpu")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {RECIPES}")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds per recipe (default: cuda per recipe, cpu 300)"
    )
    parser.add_argument("--total", type=float, default=None, help="seconds for the whole run (default: cuda 470)")
    parser.add_argument("--steps", type=int, default=0, help="sampling steps (0: the recipe's default; tiny: 2)")
    parser.add_argument("--out", type=int, default=0, help="SR output size in pixels (0: 512; tiny: 64)")
    parser.add_argument("--crop", type=int, default=0, help="training crop in pixels (0: 512; tiny: the config's)")
    parser.add_argument("--batch", type=int, default=0, help="training batch (0: 4; tiny: 2)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="frozen weights (cuda: bf16, cpu: fp32)"
    )
    parser.add_argument(
        "--trainable-dtype", choices=["fp32", "bf16"], default="fp32", help="trainable weights (bf16: CPU memory)"
    )
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: no optimiser state")
    for layout, name in (("sd15", "SD-1.5"), ("sd21", "SD-2.1-base")):
        parser.add_argument(f"--{layout}", default=None, help=f"an {name} folder to use instead of a random one")
    parser.add_argument("--in-process", action="store_true", help="run the recipes in this process (no limits)")
    parser.add_argument("--meta", action="store_true", help="full-size builds on the meta device: parameter counts")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sd", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = args.size or ("full" if args.device.startswith("cuda") else "tiny")
    args.size = size
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return 0
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    if args.meta:
        return meta_report(recipes, args.json)
    cuda = args.device.startswith("cuda")
    total = args.total or (470.0 if cuda else float("inf"))
    report: dict[str, Any] = {"device": args.device, "size": size, "cpu": cpu_model(), "rows": []}
    start = time.perf_counter()
    print(" | ".join(COLUMNS), flush=True)
    with tempfile.TemporaryDirectory(prefix="semsr-recipes-speed-") as tmp:
        layouts = sorted({recipes_full.SD_LAYOUT[r] for r in recipes if r in recipes_full.SD_LAYOUT})
        given = {layout: getattr(args, layout) for layout in layouts if getattr(args, layout)}
        layouts = [layout for layout in layouts if layout not in given]
        sds = {layout: str(Path(folder).resolve()) for layout, folder in given.items()}
        if size == "full" and layouts:
            t0 = time.perf_counter()
            sds |= write_sds(layouts, Path(tmp))
            report["random_sd_write_s"] = round(time.perf_counter() - t0, 1)
            print(
                f"random {', '.join(layouts)} written in {report['random_sd_write_s']} s", file=sys.stderr, flush=True
            )
        for recipe in recipes:
            sd = sds.get(recipes_full.SD_LAYOUT.get(recipe, ""))
            left = total - (time.perf_counter() - start)
            budget = min(args.budget or (CUDA_BUDGET[recipe] if cuda else 300.0), left)
            if budget < 60 and left < total:
                row = {"recipe": recipe, "status": "not_run", "reason": f"total budget ({total:.0f} s) spent"}
            elif args.in_process:
                row = run_in_process(recipe, args, size, sd, tmp)
            else:
                row = run_recipe(recipe, args, size, budget, sd, tmp)
            report["rows"].append(row)
            _print_row(row)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n")
    report["wall_s"] = round(time.perf_counter() - start, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["rows"]) else 1


def write_sds(layouts: list[str], tmp: Path) -> dict[str, str]:
    """Write a random SD folder per layout (``sd15``/``sd21``) under ``tmp``, in parallel subprocesses."""
    procs = {}
    for layout in layouts:
        code = f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import recipes_full as r; "
        code += f"r.write_sd({layout!r}, __import__('pathlib').Path({str(tmp)!r}) / {layout!r})"
        procs[layout] = subprocess.Popen([sys.executable, "-c", code])
    for layout, proc in procs.items():
        if proc.wait():
            raise RuntimeError(f"writing the random {layout} folder failed ({proc.returncode})")
    return {layout: str(tmp / layout) for layout in layouts}


def meta_report(recipes: list[str], out: Path | None) -> int:
    """Build each recipe at full size on the meta device; print and (``out``) write the parameter counts."""
    import torch  # the meta build's dependency

    rows = []
    for recipe in recipes:
        t0 = time.perf_counter()
        task = recipes_full.meta_task(recipe)
        stray = [
            name
            for name, t in [*task.trainable.named_parameters(), *task.trainable.named_buffers()]
            if t.device != torch.device("meta")
        ]
        row = {"recipe": recipe, "millions": recipes_full.parameter_counts(task), "off_meta": stray}
        row["build_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"{recipe}: {row['millions']}" + (f" off meta: {stray[:5]}" if stray else ""), flush=True)
    if out:
        out.write_text(json.dumps({"device": "meta", "size": "full", "rows": rows}, indent=2) + "\n")
    return 0 if not any(r["off_meta"] for r in rows) else 1


def _worker_args(recipe: str, args: argparse.Namespace, size: str, sd: str | None, tmp: str) -> list[str]:
    cmd = ["--worker", recipe, "--device", args.device, "--size", size, "--steps", str(args.steps)]
    cmd += ["--out", str(args.out), "--crop", str(args.crop), "--batch", str(args.batch), "--tmp", tmp]
    cmd += ["--optimizer", args.optimizer, "--trainable-dtype", args.trainable_dtype] + (
        ["--dtype", args.dtype] if args.dtype else []
    )
    return cmd + (["--sd", sd] if sd else [])


def run_in_process(recipe: str, args: argparse.Namespace, size: str, sd: str | None, tmp: str) -> dict[str, Any]:
    """Run one recipe's worker in this process (``--in-process``); its row (status ok|skipped|error)."""
    reason = SKIP_REASON.get((size, recipe))
    if reason:
        return {"recipe": recipe, "status": "skipped", "reason": reason}
    sub = argparse.Namespace(**{**vars(args), "worker": recipe, "size": size, "sd": sd, "tmp": tmp})
    t0 = time.perf_counter()
    try:
        row = worker(sub)
    except Exception as err:  # one failing recipe is a row, the next one runs
        return {"recipe": recipe, "status": "error", "error": f"{type(err).__name__}: {err}"[:300]}
    return {**row, "wall_s": round(time.perf_counter() - t0, 1)}


def run_recipe(
    recipe: str, args: argparse.Namespace, size: str, budget: float, sd: str | None, tmp: str
) -> dict[str, Any]:
    """Run one recipe's worker subprocess under ``budget`` seconds; its row (status ok|skipped|timeout|error)."""
    reason = SKIP_REASON.get((size, recipe))
    if reason:
        return {"recipe": recipe, "status": "skipped", "reason": reason}
    print(f"{recipe}: running (limit {budget:.0f} s)", file=sys.stderr, flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *_worker_args(recipe, args, size, sd, tmp)]
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
        if proc.returncode < 0:  # a signal: -9 is most often the kernel's out-of-memory killer
            last = f"killed by signal {-proc.returncode} (9: e.g. out of memory) after: {last.strip()}"
        return {"recipe": recipe, "status": "error", "error": last[:300], "rc": proc.returncode, "wall_s": wall}
    return {**json.loads(rows[-1]), "wall_s": wall}


if __name__ == "__main__":
    sys.exit(main())
