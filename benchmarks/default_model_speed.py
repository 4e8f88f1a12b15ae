"""Wall time and peak RSS of the default model (``default-diffusion``) on one LR image.

Times, on the bundled sample photo resized to ``--size`` (or ``--image``):

* ``semsr upscale`` end to end in a fresh process (start-up, loading, priors, sampling,
  writing the PNG) with the default settings (``--dtype`` optional) -- the row
  "256² → 1024² end to end (`semsr upscale`, fresh process)" that the speed target (8 s on
  2 cores, peak RSS 1.5 GiB) is read from; peak RSS is that process's;
* in this process: the stage-1 restorer alone and the method for each ``--steps``
  (peak RSS here is this process's peak so far).

Weights: the shipped ones (``semsr/assets/weights/default-sr``), ``--checkpoint``, or a
fresh untrained model of ``configs/default.yaml``'s architecture when none are shipped.
Prints the CPU model, its native bf16 flags and the load average beside the table;
``--json PATH`` writes the rows.

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


def load_input(path: str | None, size: int) -> torch.Tensor:
    """``(1, 3, size, size)`` in [0, 1]: the photo (default: the bundled sample) resized with MATLAB bicubic."""
    from semsr.core.io import read_image, to_8bit
    from semsr.core.paths import assets_dir
    from semsr.ops.imresize import imresize

    pic = read_image(Path(path) if path else assets_dir() / "sample.png")
    x = torch.from_numpy(to_8bit(pic.rgb).copy()).permute(2, 0, 1)[None].float() / 255.0
    return imresize(x, size=(size, size)).clamp(0, 1)


def cli_run(x: torch.Tensor, checkpoint: str, threads: int, dtype: str | None = None) -> dict:
    """Wall time and peak RSS of ``semsr upscale`` on ``x`` in a child process (default method settings;
    ``dtype``: ``--dtype`` of the run, i.e. the stage-1 precision)."""
    import subprocess
    import sys

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "input.png"
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(src)
        cmd = [
            sys.executable,
            "-m",
            "semsr",
            "upscale",
            "-i",
            str(src),
            "-o",
            str(Path(tmp) / "out"),
            "--method",
            "default-diffusion",
            "--checkpoint",
            checkpoint,
            "--threads",
            str(threads),
            "--no-progress",
            *(["--dtype", dtype] if dtype else []),
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    steps = json.loads((Path(checkpoint) / "model_index.json").read_text()).get("meta", {}).get("default_steps", 4)
    side = x.shape[-1]
    what = f"{side}² → {4 * side}² end to end (`semsr upscale`, fresh process)"
    return {"what": what, "dtype": dtype or "default", "steps": steps, "seconds": seconds, "peak_rss_gib": child_peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="LR side (output is 4x)")
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", help="default-model folder (default: the shipped weights, else a fresh model)")
    p.add_argument("--image", help="input photo (default: the bundled sample), resized to --size")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="--dtype of the fresh-process run (stage-1 precision)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from semsr import methods
    from semsr.core.machine import cpu_flags, cpu_model
    from semsr.methods.default_diffusion import packaged_weights
    from semsr.models.default_sr import DefaultSR, save_default_sr

    ck = args.checkpoint
    if ck is None and (packaged_weights() / "model_index.json").is_file():
        ck = str(packaged_weights())
    if ck is None:
        ck = tempfile.mkdtemp(prefix="default-sr-")
        torch.manual_seed(0)
        save_default_sr(DefaultSR(), ck)
    x, rows = load_input(args.image, args.size), []
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    rows.append(cli_run(x, ck, args.threads, args.dtype))
    spec = methods.resolve("default-diffusion")
    method = spec.build(spec.parse({"checkpoint": ck}))
    t0 = time.perf_counter()
    method.stage1(x)
    rows.append({"what": "stage1 only", "steps": 0, "seconds": time.perf_counter() - t0, "peak_rss_gib": rss_gib()})
    for steps in args.steps:
        options = spec.parse({"checkpoint": ck, "steps": steps})
        t0 = time.perf_counter()
        y = method(x, options).images
        rows.append(
            {
                "what": "default-diffusion",
                "steps": steps,
                "seconds": time.perf_counter() - t0,
                "peak_rss_gib": rss_gib(),
            }
        )
    bf16 = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    machine = {"cpu": cpu_model(), "bf16_flags": bf16, "loadavg_before": load}
    print(f"input {args.size}x{args.size} -> {tuple(y.shape[-2:])}, threads {args.threads}")
    print(f"CPU {machine['cpu']}, native bf16 flags {bf16 or 'none'}, load average before {' '.join(load)}")
    print(f"{'what':<58}{'steps':>6}{'seconds':>10}{'peak RSS GiB':>14}")
    for r in rows:
        print(f"{r['what']:<58}{r['steps']:>6}{r['seconds']:>10.1f}{r['peak_rss_gib']:>14.2f}")
    if args.json:
        out = {"size": args.size, "threads": args.threads, "machine": machine, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
