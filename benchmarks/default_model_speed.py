"""Wall time, CPU time and peak RSS of the default model (``default-diffusion``) on one LR image.

The speed row of the default: ``semsr upscale`` of the bundled sample photo resized to
``--size`` (or ``--image``), end to end in a fresh process per run (start-up, loading, stage 1,
refiner, writing the PNG), with the default settings and each ``--dtypes`` entry (``auto``: what
``--dtype auto`` resolves to on this CPU, printed). The target (256² -> 1024² in 8 s on 2 cores,
peak RSS 1.5 GiB) is read from it. Each row is split with the ``--json`` report of the run:

* ``start-up``: process start, imports and argument parsing (and exit): total - image;
* ``load``: building the method (weights read from disk);
* ``stage1``, ``refiner`` (priors + denoise) and ``write`` (the PNG): the method's stage timings;

``cpu s`` is the child's user + system CPU time (the honest figure on a shared machine), peak
RSS its maximum resident set. With ``--repeats N`` each row is the run with the least CPU time (every
run's wall seconds are kept in the JSON). ``--slow-exit`` adds a row per dtype run with
``SEMSR_SLOW_EXIT=1`` (the interpreter's usual exit), alternating with the default rows' runs.
``--steps N ...`` adds in-process rows (stage 1 alone, the method per step count).

It also counts the stage-1 network's floating-point operations at the input size (torch's
``FlopCounterMode`` on the meta device) and times a 4096² fp32 matmul
(:func:`semsr.core.machine.matmul_gflops`), so the stage-1 column can be read as GFLOP/s against
what dense kernels reach on this CPU.

Prints the CPU model, its native bf16 flags and the load average before and after beside the
table; ``--json PATH`` writes the rows. Weights: the shipped ones
(``semsr/assets/weights/default-sr``), ``--checkpoint``, or a fresh untrained model of
``configs/default.yaml``'s architecture when none are shipped.

    python benchmarks/default_model_speed.py --size 256 --threads 2 --dtypes fp32 auto --json speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from semsr import methods
from semsr.core.io import read_image, to_8bit
from semsr.core.machine import cpu_flags, cpu_model, matmul_gflops
from semsr.core.paths import assets_dir
from semsr.methods.default_diffusion import packaged_weights
from semsr.models.default_sr import DefaultSR, save_default_sr
from semsr.ops.imresize import imresize

_REFINER = ("priors", "denoise")


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def loadavg() -> list[str]:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.is_file() else []


def load_input(path: str | None, size: int) -> torch.Tensor:
    """``(1, 3, size, size)`` in [0, 1]: the photo (default: the bundled sample) resized with MATLAB bicubic."""
    pic = read_image(Path(path) if path else assets_dir() / "sample.png")
    x = torch.from_numpy(to_8bit(pic.rgb).copy()).permute(2, 0, 1)[None].float() / 255.0
    return imresize(x, size=(size, size)).clamp(0, 1)


def upscale_command(src: Path, out: Path, report: Path, checkpoint: str | None, threads: int, dtype: str) -> list[str]:
    """The ``semsr upscale`` command line of one row (default method settings)."""
    return [
        sys.executable,
        "-m",
        "semsr",
        "upscale",
        "-i",
        str(src),
        "-o",
        str(out),
        "--method",
        "default",
        *(["--checkpoint", checkpoint] if checkpoint else []),
        "--threads",
        str(threads),
        "--dtype",
        dtype,
        "--no-progress",
        "--overwrite",
        "--json",
        str(report),
    ]


def cli_run(src: Path, checkpoint: str | None, threads: int, dtype: str, slow_exit: bool = False) -> dict:
    """One fresh ``semsr upscale`` process on ``src``: wall and CPU seconds, peak RSS and the stage split
    (``slow_exit``: with ``SEMSR_SLOW_EXIT=1``)."""
    env = {**os.environ, "SEMSR_SLOW_EXIT": "1" if slow_exit else "0"}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = upscale_command(src, Path(tmp) / "out.png", report, checkpoint, threads, dtype)
        t0 = time.perf_counter()
        pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env).pid
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"semsr upscale failed ({status}): {' '.join(cmd)}")
        rep = json.loads(report.read_text())
    result = rep["results"][0]
    stages, load = result.get("stages") or {}, rep.get("load_seconds") or 0.0
    image = result["seconds"] - load
    return {
        "dtype": dtype,
        "exit": "slow" if slow_exit else "quick",
        "resolved": rep["precision"]["dtype"],
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "startup": seconds - result["seconds"],
        "load": load,
        "stage1": stages.get("stage1", 0.0),
        "refiner": sum(stages.get(k, 0.0) for k in _REFINER),
        "write": stages.get("write", 0.0),
        "other": image - sum(v for k, v in stages.items() if k != "steps"),
        "steps": int(stages.get("steps", 0)),
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "command": " ".join(
            [
                *(["SEMSR_SLOW_EXIT=1"] if slow_exit else []),
                "semsr",
                *upscale_command(Path("{input}"), Path("{out}"), Path("{report}"), checkpoint, threads, dtype)[3:],
            ]
        ),
    }


def stage1_flops(checkpoint: str | None, side: int) -> int:
    """Floating-point operations of the default model's stage-1 network on a ``(1, 3, side, side)`` input,
    counted on the meta device (nothing computed); 0 when the stage-1 method is not a torch network."""
    spec = methods.resolve("default-diffusion")
    model = getattr(spec.build(spec.parse({"checkpoint": checkpoint})).stage1, "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        copy.deepcopy(model).to("meta")(torch.empty(1, 3, side, side, device="meta"))
    return counter.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="LR side (output is 4x)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "auto"], help="--dtype of the fresh-process rows")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the one with the least CPU time is shown")
    p.add_argument("--steps", type=int, nargs="*", default=[], help="in-process rows: the method with N steps")
    p.add_argument("--checkpoint", help="default-model folder (default: the shipped weights, else a fresh model)")
    p.add_argument("--image", help="input photo (default: the bundled sample), resized to --size")
    p.add_argument("--slow-exit", action="store_true", help="also time each dtype with SEMSR_SLOW_EXIT=1")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ck = args.checkpoint
    if ck is None and not (packaged_weights() / "model_index.json").is_file():
        ck = tempfile.mkdtemp(prefix="default-sr-")
        torch.manual_seed(0)
        save_default_sr(DefaultSR(), ck)
    x = load_input(args.image, args.size)
    side = x.shape[-1]
    load_before = loadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"input{side}.png"
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(src)
        for dtype in args.dtypes:
            exits = (False, True) if args.slow_exit else (False,)
            runs: dict[bool, list[dict]] = {slow: [] for slow in exits}
            for _ in range(max(1, args.repeats)):
                for slow in exits:  # alternating, so both see the same machine state
                    runs[slow].append(cli_run(src, ck, args.threads, dtype, slow))
            for done in runs.values():
                best = min(done, key=lambda r: r["cpu_seconds"])
                seconds = [r["seconds"] for r in done]
                rows.append({**best, "runs": len(done), "runs_seconds": seconds, "loadavg": loadavg()})
    in_process = []
    if args.steps:
        spec = methods.resolve("default-diffusion")
        method = spec.build(spec.parse({"checkpoint": ck}))
        t0 = time.perf_counter()
        method.stage1(x)
        in_process.append({"what": "stage1 only", "steps": 0, "seconds": time.perf_counter() - t0})
        for steps in args.steps:
            t0 = time.perf_counter()
            method(x, spec.parse({"checkpoint": ck, "steps": steps}))
            in_process.append({"what": "default-diffusion", "steps": steps, "seconds": time.perf_counter() - t0})
    stage1_gflop = stage1_flops(ck, side) / 1e9
    bf16 = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "bf16_flags": bf16,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "torch": torch.__version__,
        "matmul_gflops_fp32": matmul_gflops(torch.float32),
    }
    what = f"{side}² → {4 * side}² end to end (`semsr upscale`, fresh process)"
    print(f"{what}, threads {args.threads}")
    print(f"CPU {machine['cpu']} ({machine['cores']} cores), native bf16 flags {' '.join(bf16) or 'none'}, ", end="")
    print(f"load average before {' '.join(load_before)}, after {' '.join(machine['loadavg_after'])}")
    print(
        f"stage 1: {stage1_gflop:.0f} GFLOP at {side}² input; a 4096² fp32 matmul here: "
        f"{machine['matmul_gflops_fp32']:.0f} GFLOP/s"
    )
    cols = ("dtype", "steps", "total s", "cpu s", "start-up", "load", "stage1", "GFLOP/s", "refiner", "write")
    print(f"{cols[0]:>23}" + "".join(f"{c:>13}" for c in cols[1:]) + f"{'peak RSS GiB':>13}")
    for r in rows:
        dt = r["dtype"] if r["dtype"] == r["resolved"] else f"{r['dtype']}->{r['resolved']}"
        dt += " slow-exit" if r["exit"] == "slow" else ""
        r["stage1_gflops"] = stage1_gflop / r["stage1"] if r["stage1"] else 0.0
        keys = ("seconds", "cpu_seconds", "startup", "load", "stage1", "stage1_gflops", "refiner", "write")
        vals = [r[k] for k in keys]
        print(f"{dt:>23}{r['steps']:>13}" + "".join(f"{v:>13.2f}" for v in vals) + f"{r['peak_rss_gib']:>13.2f}")
    for r in in_process:
        print(f"in process: {r['what']} steps {r['steps']}: {r['seconds']:.2f} s (peak RSS {rss_gib():.2f} GiB)")
    print("command:", rows[-1]["command"] if rows else "")
    if args.json:
        out = {"what": what, "size": side, "threads": args.threads, "machine": machine, "rows": rows}
        out["stage1_gflop"] = stage1_gflop
        Path(args.json).write_text(json.dumps({**out, "in_process": in_process}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
