"""Speed and memory of the restorers on CPU: PyTorch RRDBNet variants vs the ncnn runtime.

Every (config, size) runs in its own subprocess, so the peak RSS reported is
that configuration's alone (it includes the interpreter, torch and the loaded
weights). Time (wall and process CPU) is the best of ``--repeats`` runs
after one small warm-up call; the model load time is reported separately.
"vs ncnn" (RRDB configs only) is ncnn's wall time divided by the config's (> 1: faster).
On a shared machine, compare CPU seconds too: wall time includes waiting. The RRDB configs also report
the max / mean absolute difference of their output from the ncnn runtime's
output on the same image (the reference implementation of the blob).

Usage::

    python benchmarks/restorers.py --sizes 128 --json bench.json
    python benchmarks/restorers.py --sizes 128 512 --configs torch-fp32-cl ncnn

The input is a centre crop of Set5 ``baby.png`` (512x512) from the data root,
or a synthetic picture when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name -> (method, build options as JSON-able dict, description)
CONFIGS: dict[str, tuple[str, dict, str]] = {
    "bicubic": ("bicubic", {}, "MATLAB bicubic x4 (semsr.ops.imresize)"),
    "torch-fp32": ("realesrgan-x4plus", {"dtype": "fp32", "channels_last": False}, "RRDBNet fp32, NCHW"),
    "torch-fp32-cl": ("realesrgan-x4plus", {"dtype": "fp32", "channels_last": True}, "RRDBNet fp32, channels_last"),
    "torch-bf16-cl": (
        "realesrgan-x4plus",
        {"dtype": "bf16", "channels_last": True},
        "RRDBNet bf16 weights, channels_last",
    ),
    "torch-fp16-cl": (
        "realesrgan-x4plus",
        {"dtype": "fp16", "channels_last": True, "device": "cuda"},
        "RRDBNet fp16 weights, channels_last (CUDA only: fp16 is refused on CPU)",
    ),
    "torch-auto-cl": (
        "realesrgan-x4plus",
        {"dtype": "auto", "channels_last": True},
        "RRDBNet dtype auto (bf16 on CPUs with native bf16, else fp32), channels_last",
    ),
    "torch-default": ("realesrgan-x4plus", {}, "RRDBNet with semsr's defaults (dtype auto)"),
    "ncnn": ("ncnn:realesrgan-x4plus", {}, "ncnn runtime, same blob"),
    "realcugan-4x": ("realcugan-4x", {}, "Real-CUGAN SE 4x, ncnn runtime"),
}
DEFAULT_CONFIGS = ("bicubic", "torch-fp32", "torch-fp32-cl", "torch-bf16-cl", "torch-auto-cl", "ncnn", "realcugan-4x")
RRDB_CONFIGS = {k for k, v in CONFIGS.items() if v[0] in ("realesrgan-x4plus", "ncnn:realesrgan-x4plus")}


def load_image(size: int) -> np.ndarray:
    """``(3, size, size)`` float32 in [0, 1]: Set5 baby centre crop (or synthetic)."""
    from semsr.core.paths import data_root

    root = data_root()
    path = root / "benchmarks" / "Set5" / "baby.png" if root else None
    if path is not None and path.is_file():
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        if min(img.shape[:2]) >= size:
            top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
            return np.ascontiguousarray(img[top : top + size, left : left + size].transpose(2, 0, 1))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx + 3 * yy), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.5 * xx * yy])
    return np.clip(base + 0.03 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)


def worker(config: str, size: int, threads: int, repeats: int, out_npy: str | None) -> dict:
    """Run one config in this process; returns its measurements."""
    import torch

    torch.set_num_threads(threads)
    method_name, opts, _ = CONFIGS[config]
    x = torch.from_numpy(load_image(size))[None]
    t0 = time.perf_counter()
    if method_name.startswith("ncnn:"):
        from semsr.methods.restorers import NcnnRestorer
        from semsr.models import catalog
        from semsr.models.ncnn_runtime import NcnnNet

        info = catalog.get_info(method_name[len("ncnn:") :])
        param, bin_ = info.paths()
        run = NcnnRestorer(config, 4, NcnnNet(param, bin_, info.extra["input"], info.extra["output"], threads=threads))
    else:
        from semsr import methods

        run = methods.build(method_name, {"threads": threads, **opts})
    load_s = time.perf_counter() - t0
    run(x[..., :16, :16])  # warm-up (kernel selection, lazy init)
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        y = run(x).images
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if out_npy:
        np.save(out_npy, y[0].numpy())
    return {
        "config": config,
        "size": size,
        "threads": threads,
        "seconds": min(times),
        "seconds_all": times,
        "cpu_seconds": min(cpu_times),
        "load_seconds": load_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_shape": list(y.shape),
        # the precision the method runs in (what ``auto`` resolved to on this machine)
        "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            getattr(run, "dtype", None), "-"
        ),
    }


def run_all(configs: list[str], sizes: list[int], threads: int, repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="semsr-bench-") as tmp:
        for size in sizes:
            outputs: dict[str, str] = {}
            for config in configs:
                npy = os.path.join(tmp, f"{config}-{size}.npy") if config in RRDB_CONFIGS else None
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    config,
                    "--sizes",
                    str(size),
                    "--threads",
                    str(threads),
                    "--repeats",
                    str(repeats),
                ]
                if npy:
                    cmd += ["--out-npy", npy]
                print(f"[{config} @ {size}x{size}] ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    rows.append({"config": config, "size": size, "error": err})
                    print(f"  failed: {err}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["description"] = CONFIGS[config][2]
                if CONFIGS[config][1].get("dtype", "auto") == "auto" and row.get("dtype", "-") != "-":
                    row["description"] += f" -> resolved to {row['dtype']}"
                rows.append(row)
                if npy:
                    outputs[config] = npy
            _add_diffs(rows, outputs, size)
    return rows


def _add_diffs(rows: list[dict], outputs: dict[str, str], size: int) -> None:
    """Max/mean |output - ncnn output| (and max |output - torch-fp32-cl output|) for the RRDB configs of one size."""
    if "torch-fp32-cl" in outputs:
        fp32 = np.load(outputs["torch-fp32-cl"])
        for row in rows:
            if row.get("size") == size and row["config"] in outputs:
                row["max_abs_diff_vs_fp32"] = float(np.abs(np.load(outputs[row["config"]]) - fp32).max())
    if "ncnn" not in outputs:
        return
    ref = np.load(outputs["ncnn"])
    for row in rows:
        if row.get("size") == size and row["config"] in outputs:
            diff = np.abs(np.load(outputs[row["config"]]) - ref)
            row["max_abs_diff_vs_ncnn"] = float(diff.max())
            row["mean_abs_diff_vs_ncnn"] = float(diff.mean())


def markdown(rows: list[dict]) -> str:
    ncnn_s = {r["size"]: r["seconds"] for r in rows if r["config"] == "ncnn" and "seconds" in r}
    fp32_s = {r["size"]: r["seconds"] for r in rows if r["config"] == "torch-fp32-cl" and "seconds" in r}
    lines = [
        "| config | input | dtype | seconds | CPU seconds | vs ncnn | vs fp32-cl | peak RSS (MiB) | max abs diff vs ncnn "
        "| mean abs diff | max abs diff vs fp32-cl | what |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['size']}x{r['size']} | | failed: {r['error']} | | | | | | | | |")
            continue
        same_blob = r["config"] in RRDB_CONFIGS and r["size"] in ncnn_s
        ratio = f"{ncnn_s[r['size']] / r['seconds']:.2f}x" if same_blob else "-"
        mad = f"{r['max_abs_diff_vs_ncnn']:.2e}" if "max_abs_diff_vs_ncnn" in r else "-"
        mean = f"{r['mean_abs_diff_vs_ncnn']:.2e}" if "mean_abs_diff_vs_ncnn" in r else "-"
        vs32 = (
            f"{fp32_s[r['size']] / r['seconds']:.2f}x" if r["config"] in RRDB_CONFIGS and r["size"] in fp32_s else "-"
        )
        d32 = f"{r['max_abs_diff_vs_fp32']:.2e}" if "max_abs_diff_vs_fp32" in r else "-"
        lines.append(
            f"| {r['config']} | {r['size']}x{r['size']} | {r.get('dtype', '-')} | {r['seconds']:.3f} | "
            f"{r['cpu_seconds']:.2f} | {ratio} | {vs32} | {r['peak_rss_mib']:.0f} | {mad} | {mean} | {d32} | "
            f"{r['description']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="input sides (default 128 512)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per config (best is reported)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out-npy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.threads, args.repeats, args.out_npy)))
        return 0
    rows = run_all(args.configs, args.sizes, args.threads, args.repeats)
    print(f"threads={args.threads}, repeats={args.repeats} (best shown), load {os.getloadavg()[0]:.1f} at the end")
    print(markdown(rows))
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
