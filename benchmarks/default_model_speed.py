"""Wall time and peak RSS of the default model (``default-diffusion``) on one LR image.

Times the stage-1 restorer alone and the whole method (stage 1 + priors + sampling)
for each step count, on a fresh (untrained, architecture of ``configs/default.yaml``)
model or ``--checkpoint``. Prints a table; ``--json PATH`` writes the rows.

    python benchmarks/default_model_speed.py --size 256 --steps 1 4 --threads 2 --json speed.json
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="LR side (output is 4x)")
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", help="default-model folder (default: a fresh model)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from semsr.methods import get_method
    from semsr.models.default_sr import DefaultSR, DefaultSRConfig

    ck = args.checkpoint
    if ck is None:
        ck = tempfile.mkdtemp(prefix="default-sr-")
        torch.manual_seed(0)
        DefaultSR(DefaultSRConfig()).save(ck)
    method = get_method("default-diffusion", checkpoint=ck)
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = []
    t0 = time.perf_counter()
    method.pipeline.stage1(x)
    rows.append({"what": "stage1 only", "steps": 0, "seconds": time.perf_counter() - t0, "peak_rss_gib": rss_gib()})
    for steps in args.steps:
        t0 = time.perf_counter()
        y = method(x, steps=steps)
        rows.append({"what": "default-diffusion", "steps": steps, "seconds": time.perf_counter() - t0,
                     "peak_rss_gib": rss_gib()})
    print(f"input {args.size}x{args.size} -> {tuple(y.shape[-2:])}, threads {args.threads}")
    print(f"{'what':<20}{'steps':>6}{'seconds':>10}{'peak RSS GiB':>14}")
    for r in rows:
        print(f"{r['what']:<20}{r['steps']:>6}{r['seconds']:>10.1f}{r['peak_rss_gib']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
