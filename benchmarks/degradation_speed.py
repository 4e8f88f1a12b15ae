"""Speed of the Real-ESRGAN degradation model on CPU (512x512 HR crops).

    python benchmarks/degradation_speed.py [--json r.json] [--threads 1] [--repeats 5]

Times each building block on one ``(1, 3, 512, 512)`` image — USM sharpening,
a 21x21 blur through :func:`filter2d` (FFT) against a direct grouped
``conv2d``, JPEG, Gaussian and Poisson noise — and the whole second-order
pipeline per image (median over seeds, so over the random paths), and prints
a table (milliseconds, median of ``--repeats`` runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from semsr.data.degradations import (
        RealESRGANDegradation,
        add_gaussian_noise,
        add_poisson_noise,
        filter2d,
        gaussian_kernel,
        jpeg_compress,
        usm_sharpen,
    )

    s = args.size
    x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    k = torch.from_numpy(gaussian_kernel(21, 2.0, 1.0, 0.5)).float()
    padded = F.pad(x, (10, 10, 10, 10), mode="reflect").reshape(3, 1, s + 20, s + 20)
    deg = RealESRGANDegradation()
    seeds = iter(range(10**6))
    rows = {
        "usm_sharpen": timed(lambda: usm_sharpen(x), args.repeats),
        "blur21_fft (filter2d)": timed(lambda: filter2d(x, k), args.repeats),
        "blur21_direct_conv2d": timed(lambda: F.conv2d(padded, k.view(1, 1, 21, 21)), args.repeats),
        "jpeg q50": timed(lambda: jpeg_compress(x, 50.0), args.repeats),
        "gaussian_noise": timed(lambda: add_gaussian_noise(x, 10.0), args.repeats),
        "poisson_noise": timed(lambda: add_poisson_noise(x, 1.0), args.repeats),
        "pipeline (per image, median over seeds)": timed(lambda: deg(x, seed=next(seeds)), max(args.repeats, 20)),
    }
    print(f"{'operation':<42}{'ms':>10}   ({s}x{s}, {args.threads} thread(s))")
    for name, ms in rows.items():
        print(f"{name:<42}{ms:>10.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"size": s, "threads": args.threads, "ms": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
