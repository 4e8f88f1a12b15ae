"""Seconds per optimiser step and peak memory of ``semsr train`` on the tiny config.

    python benchmarks/train_step.py [--steps 12] [--variants fp32,bf16,accum4] [--json r.json]

Each variant runs ``configs/tiny.yaml`` (tiny random SD + ControlNet, 64-px
crops of BSDS500 training images, Real-ESRGAN degradation, batch 2) without
validation in its own subprocess, for ``--steps`` optimiser steps. Reported:
median seconds per optimiser step over the steps after the first two (from
the run's ``log.jsonl``), samples per second, total wall time of the run
(imports and model loading included) and the peak RSS of the largest process.
The ``ddp2`` variant runs two processes under ``accelerate launch
--multi_gpu`` (gloo on CPU) with batch 1 each, the same global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["train.mixed_precision=bf16"],
    "accum4": ["train.grad_accum=4"],
    "ddp2": ["data.batch_size=1"],
}


def run_variant(name: str, steps: int, workdir: Path) -> dict:
    out = workdir / name
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--output",
        str(out),
        "--max-steps",
        str(steps),
        "validation.every=0",
        "checkpoint.every=0",
        *VARIANTS[name],
    ]
    if name == "ddp2":
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "semsr.cli",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "semsr.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a fresh wrapper per variant, so RUSAGE_CHILDREN covers only this variant's processes
    wrapper = (
        "import json, resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    if status["rc"] != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    peak_mb = status["maxrss_kb"] / 1024.0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    secs = [r["sec"] for r in train[2:]] or [r["sec"] for r in train]
    per_step = statistics.median(secs)
    samples_per_step = train[-1]["samples"] / train[-1]["step"]
    return {
        "variant": name,
        "steps": len(train),
        "sec_per_step": round(per_step, 4),
        "samples_per_sec": round(samples_per_step / per_step, 2),
        "process_wall_s": round(wall, 1),
        "peak_rss_mb_per_process": round(peak_mb, 1),
        "final_loss": round(train[-1]["loss"], 5),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", default="fp32,bf16,accum4,ddp2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run_variant(name, args.steps, Path(tmp)))
            print(f"done {name}", file=sys.stderr)
    cols = list(rows[0])
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
