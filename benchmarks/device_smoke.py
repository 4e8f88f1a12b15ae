"""Does every method, and training with validation, run on a device? One small call each on the tiny models.

Builds every registered method (diffusion recipes from the tiny random models, ``tiny://`` paths as
the tests use them; restorers from their packaged weights) on ``--device``, runs one small upscale
each, then runs ``semsr train`` for 2 steps of ``configs/tiny.yaml`` with validation (on synthetic
textures, so no data folder is needed; the trainer picks the GPU when there is one). Prints a
pass/fail/skip row with its seconds as it goes, writes ``--json``, exits 1 if any row failed.
A row whose optional package or packaged weights are missing is *skipped* with the reason.

``--guard`` runs the methods on a simulated second device on the CPU
(:mod:`semsr.testing.device_guard`): an op mixing a device tensor with a host one fails the row,
as it would on a GPU. The tests run it that way.

Usage::

    python benchmarks/device_smoke.py --device cuda --json smoke.json
    python benchmarks/device_smoke.py --device cpu --guard --only sd-controlnet xpsr --no-train
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from semsr.cli import main as semsr_main
from semsr.core.errors import SemsrError, UnavailableError
from semsr.methods import REGISTRY, build, resolve
from semsr.models.rrdbnet import RRDBConfig, RRDBNet, save_pth
from semsr.testing.device_guard import VIRTUAL_DEVICE, DeviceGuard
from semsr.testing.tiny import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
_SD = {"base": "tiny://sd"}

#: Build and run options of the diffusion methods on the tiny models (``{db}``, ``{pth}``: made here).
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "sd-controlnet": {**_SD, "controlnet": "tiny://controlnet", "guidance_scale": 2.0},
    "xpsr": {**_SD, "checkpoint": "tiny://xpsr", "vlm": "tiny://vlm", "irpad": "tiny://irpad-untrained"},
    "dalpsr": {
        **_SD,
        "checkpoint": "tiny://dalpsr",
        "tagger": "tiny://tagger",
        "irpad": "tiny://irpad-untrained",
        "no_vlm": True,
    },
    "mmsr": {
        **_SD,
        "checkpoint": "tiny://mmsr",
        "depth_model": "tiny://depth",
        "seg_model": "tiny://seg",
        "modalities": "caption,edge,depth,seg",
        "guidance_scale": 2.0,
    },
    "coser": {**_SD, "checkpoint": "tiny://coser", "clip": "tiny://clip-vision", "reference_steps": 2},
    "rfa": {**_SD, "controlnet": "tiny://controlnet", "checkpoint": "tiny://rfa", "db": "{db}", "num_references": 2},
    "default-diffusion": {"irpad": "tiny://irpad-untrained"},
    "realesrgan-pth": {"weights": "{pth}"},
}
#: Input side per method (RFA is a x16 recipe).
INPUT_SIDE = {"rfa": 4}
RUN_STEPS = 2


def _skip_reason(err: BaseException) -> str | None:
    """The reason to skip (a missing optional package or packaged weights), or None for a failure."""
    if isinstance(err, ImportError):
        return f"missing package: {err}"
    text = str(err)
    if isinstance(err, UnavailableError) and ("pip install" in text or "not installed" in text):
        return text.splitlines()[0]
    return None


def _resolve(value: Any, extra: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, path in extra.items():
            value = value.replace("{" + key + "}", path)
        if value.startswith("tiny://"):
            return str(resolve_model_path(value))
    return value


def method_names(only: list[str] | None) -> list[str]:
    """Registered methods (aliases left out: they build one of these), or ``only``."""
    names = [spec.name for spec in REGISTRY.specs() if spec.name != "default"]
    return [n for n in names if n in only] if only else names


def run_method(name: str, device: str, extra: dict[str, str], guard: bool) -> dict[str, Any]:
    """Build ``name`` on ``device`` and run one small upscale; returns the row's details."""
    spec = resolve(name)
    values = {k: _resolve(v, extra) for k, v in TINY_OPTIONS.get(name, {}).items()}
    if spec.diffusion:
        if name not in TINY_OPTIONS:
            raise SemsrError(f"no tiny options for the diffusion method {name!r}: add it to TINY_OPTIONS")
        values.setdefault("steps", RUN_STEPS)
    values["device"] = str(VIRTUAL_DEVICE) if guard else device
    known = set(spec.options.names())
    values = {k: v for k, v in values.items() if k in known}
    options = spec.parse(values)
    side = INPUT_SIDE.get(name, 16)
    lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with DeviceGuard() if guard else _nothing() as mode:
        method = build(name, options)
        x = mode.put(lr) if guard else lr.to(device)
        out = method(x, options)
    images = out.images
    expect = (1, 3, side * int(method.scale), side * int(method.scale))
    if tuple(images.shape) != expect or not bool(torch.isfinite(images.float()).all()):
        raise RuntimeError(f"output {tuple(images.shape)} (expected {expect}) or not finite")
    return {"output_device": str(images.device), "shape": list(images.shape)}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run_cli_upscale(work: Path, device: str, guard: bool) -> dict[str, Any]:
    """``semsr upscale -n sd-controlnet --device DEV`` on a small synthetic picture (the CLI's own path)."""
    src, out = work / "cli-in.png", work / "cli-out"
    Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)).save(src)
    sd, controlnet = resolve_model_path("tiny://sd"), resolve_model_path("tiny://controlnet")
    argv = ["upscale", "-i", str(src), "-o", str(out), "-n", "sd-controlnet", "--base", str(sd)]
    argv += ["--controlnet", str(controlnet), "--steps", "2", "--device", str(VIRTUAL_DEVICE) if guard else device]
    with DeviceGuard() if guard else _nothing():
        rc = semsr_main(argv)
    written = sorted(out.glob("*.png")) if out.is_dir() else []
    if rc != 0 or not written:
        raise RuntimeError(f"semsr upscale exited with {rc} and wrote {len(written)} images")
    return {"size": list(Image.open(written[0]).size)}


def run_train(work: Path, extra: dict[str, str]) -> dict[str, Any]:
    """``semsr train --config configs/tiny.yaml`` for 2 steps with validation at step 2."""
    out = work / "train-run"
    rc = semsr_main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--output",
            str(out),
            "--max-steps",
            "2",
            f"data.hr=[{extra['textures']}]",
            "data.limit=0",
            "data.val_count=1",
            "train.grad_accum=1",
            "validation.every=2",
            "validation.count=1",
            "validation.steps=2",
            "checkpoint.every=0",
        ]
    )
    if rc != 0:
        raise RuntimeError(f"semsr train exited with {rc}")
    vals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"val"' in line]
    if not vals:
        raise RuntimeError("training ran but no validation was logged")
    return {"validation": vals[-1].get("metrics", {}), "cuda": torch.cuda.is_available()}


def write_textures(folder: Path, count: int = 6, size: int = 96) -> Path:
    """``count`` smooth random RGB textures (PNG) to train and index on."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(count):
        img = np.stack(
            [0.5 + 0.3 * np.sin(rng.uniform(0.05, 0.4) * xx + rng.uniform(0.05, 0.4) * yy + c) for c in range(3)], -1
        )
        img += 0.1 * rng.standard_normal(img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def _setup(work: Path) -> dict[str, str]:
    """Synthetic textures, a tiny retrieval database of them and a small RRDBNet .pth."""
    textures = write_textures(work / "textures")
    db = work / "db"
    rc = semsr_main(
        [
            "index",
            "build",
            "--images",
            str(textures),
            "--out",
            str(db),
            "--embedder",
            f"clip:{resolve_model_path('tiny://clip-vision')}",
        ]
    )
    pth = work / "rrdb.pth"
    save_pth(RRDBNet(RRDBConfig(num_block=1, num_feat=8, num_grow_ch=4, scale=4)), pth)
    extra = {"textures": str(textures), "pth": str(pth)}
    if rc == 0:
        extra["db"] = str(db)
    return extra


def _row(rows: list[dict[str, Any]], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        detail, status, reason = fn(), "pass", ""
    except Exception as err:  # every failure is a row, never the end of the run
        reason = _skip_reason(err)
        status = "skip" if reason else "fail"
        if not reason:
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            detail = {"traceback": traceback.format_exc(limit=-4)}
        else:
            detail = {}
    seconds = time.perf_counter() - t0
    rows.append({"name": name, "status": status, "seconds": round(seconds, 3), "reason": reason, **detail})
    print(f"{name:<40} {status:<5} {seconds:7.2f}s  {reason}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="these methods only (default: all)")
    parser.add_argument("--no-train", action="store_true", help="skip the training row")
    parser.add_argument("--guard", action="store_true", help="simulated device on the CPU (see the docstring)")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    print(f"{'row':<40} {'state':<5} {'seconds':>8}  device {args.device}{' (guard)' if args.guard else ''}")
    with tempfile.TemporaryDirectory(prefix="semsr-smoke-") as tmp:
        work = Path(tmp)
        extra = _setup(work)
        for name in method_names(args.only):
            _row(rows, f"upscale {name}", lambda n=name: run_method(n, args.device, extra, args.guard))
        if not args.only or "cli" in args.only:
            _row(rows, "cli upscale -n sd-controlnet", lambda: run_cli_upscale(work, args.device, args.guard))
        if not args.no_train:
            _row(rows, "train configs/tiny.yaml (2 steps + val)", lambda: run_train(work, extra))
    failed = [r["name"] for r in rows if r["status"] == "fail"]
    total = time.perf_counter() - t_all
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {total:.1f}s")
    if args.json is not None:
        report = {"device": args.device, "guard": args.guard, "seconds": round(total, 2), "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
