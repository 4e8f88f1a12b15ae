"""``semsr bench-irpad`` and ``semsr train-irpad``: the DaLPSR degradation estimator.

    semsr bench-irpad --json r.json                  # shipped weights, held-out synthetic set
    semsr bench-irpad --n 400 --contiguous           # parameters also inside the gaps between levels
    semsr train-irpad --out my-irpad                 # data_root()/train/bsds500 (training split)
    semsr train-irpad --hr /work/corpus/manifest.sqlite --out my-irpad

The synthetic degradation, the held-out split and the level intervals are
documented in :mod:`semsr.train.irpad` and :mod:`semsr.priors.irpad`.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from semsr.core.errors import SemsrError

TARGET = 0.90


def register(subparsers: argparse._SubParsersAction) -> None:
    b = subparsers.add_parser(
        "bench-irpad",
        help="per-type accuracy of the IRPAD degradation estimator on held-out synthetic data",
        description="Generate a synthetic degraded set (fixed seed) from held-out photographs, classify "
                    "the blur/noise/JPEG/downscale degree with IRPAD and report the per-type interval "
                    "accuracy (table, JSON) and confusion matrices (PNG).")
    b.add_argument("--weights", type=Path, default=None, help="IRPAD folder (default: the shipped weights)")
    b.add_argument("--hr", nargs="+", type=Path, default=None, metavar="DIR|MANIFEST",
                   help="photographs to degrade (default: the held-out split of data_root()/train/bsds500; "
                        "given sources are used whole)")
    b.add_argument("--n", type=int, default=2000, help="number of synthetic samples (default 2000)")
    b.add_argument("--seed", type=int, default=1234, help="generation seed (default 1234)")
    b.add_argument("--size", type=int, default=96, help="sample size in px (default 96)")
    b.add_argument("--context", type=int, default=192, metavar="N",
                   help="degrade a region of N px around each sample, then cut the sample out (default 192; at most the photo's short side)")
    b.add_argument("--contiguous", action="store_true",
                   help="sample parameters over whole ranges incl. the gaps between levels (nearest-level labels)")
    b.add_argument("--max-crops", type=int, default=16, help="analysis windows per image (default 16)")
    b.add_argument("--flips", type=int, default=None,
                   help="flips/transpositions averaged per window, 1-8 (default: the estimator's, 8)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    b.add_argument("--split", action="store_true",
                   help="also print each type's accuracy by true downscale (rows) x true noise level (columns); "
                        "always in the JSON")
    b.add_argument("--json", type=Path, default=None, help="write results as JSON")
    b.add_argument("--confusion", type=Path, default=None, metavar="PNG",
                   help="confusion-matrix figure (default: <json stem>_confusion.png, or irpad_confusion.png)")
    b.set_defaults(func=run_bench)

    t = subparsers.add_parser(
        "train-irpad",
        help="train the IRPAD degradation estimator on CPU (synthetic degradations)",
        description="Write a synthetic dataset of degraded crops (training split of the photographs) to disk, "
                    "train the multi-head IRPAD classifier on it and export model.safetensors + config.json.")
    t.add_argument("--hr", nargs="+", type=Path, default=None, metavar="DIR|MANIFEST",
                   help="training photographs: folders or corpus manifest.sqlite (default: "
                        "data_root()/train/bsds500); held-out photos are always excluded")
    t.add_argument("--out", type=Path, required=True, help="output folder for the weights")
    t.add_argument("--data-dir", type=Path, default=None,
                   help="dataset folder (default: <cache>/irpad/data-<n>-<size>-<seed>); reused when complete")
    t.add_argument("--n", type=int, default=48000, help="synthetic training samples (default 48000)")
    t.add_argument("--size", type=int, default=96, help="sample size in px (default 96)")
    t.add_argument("--context", type=int, default=192, metavar="N",
                   help="degrade a region of N px around each sample, then cut the sample out (default 192; at most the photo's short side)")
    t.add_argument("--min-texture", type=float, default=3.0, help="crop texture threshold (default 3.0)")
    t.add_argument("--seed", type=int, default=0, help="seed for data and training (default 0)")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--crop", type=int, default=None,
                   help="training (and analysis) window in px (default 64, with --init the initial model's)")
    t.add_argument("--channels", default="16,32,48,64,96", help="network widths (default 16,32,48,64,96)")
    t.add_argument("--no-highpass", action="store_true", help="do not feed the fixed high-pass residual")
    t.add_argument("--no-lines", action="store_true", help="do not feed the fixed 8-px line-gradient channels")
    t.add_argument("--init", type=Path, default=None, metavar="DIR",
                   help="continue training from these IRPAD weights (same levels; architecture taken from them)")
    t.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared CPU more threads mostly spin)")
    t.add_argument("--eval-n", type=int, default=0,
                   help="after training, report accuracy on this many held-out samples (not used for selection)")
    t.set_defaults(func=run_train)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def bench_photos(sources: list[Path] | None) -> tuple[list[Path], str]:
    """Photographs for the benchmark and a description of where they come from."""
    from semsr.train.irpad import default_sources, list_photos

    if sources:
        photos = list_photos(sources, held_out=True) + list_photos(sources, held_out=False)
        return sorted(set(photos)), ", ".join(str(s) for s in sources)
    src = default_sources()
    return list_photos(src, held_out=True), f"held-out split of {src[0]}"


def format_table(per_type: dict[str, float], target: float = TARGET) -> str:
    lines = [f"{'type':<10} {'accuracy':>8}  target {target:.2f}"]
    for t, a in per_type.items():
        lines.append(f"{t:<10} {a:>8.4f}  {'ok' if a >= target else 'BELOW'}")
    lines.append(f"{'mean':<10} {sum(per_type.values()) / len(per_type):>8.4f}")
    return "\n".join(lines)


def format_split(split: dict[str, list[list[float | None]]], names: dict[str, list[str]]) -> str:
    """Per type: accuracy by true downscale level (rows) x true noise level (columns), "-" for empty cells."""
    lines = []
    for t, rows in split.items():
        lines.append(f"{t} accuracy by downscale (rows) x noise: " + " ".join(f"{n:>8}" for n in names["noise"]))
        for d, row in zip(names["downscale"], rows):
            lines.append(f"  {d:<10}" + "".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in row))
    return "\n".join(lines)


def write_confusion_png(path: Path, confusion: dict[str, list[list[int]]], names: dict[str, list[str]],
                        per_type: dict[str, float], title: str = "") -> None:
    """Row-normalised confusion matrices (true x predicted), counts annotated, one panel per type."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from semsr.eval.atomic import write_bytes

    types = list(confusion)
    fig, axes = plt.subplots(1, len(types), figsize=(3.4 * len(types), 3.6), squeeze=False)
    for ax, t in zip(axes[0], types):
        c = np.asarray(confusion[t], dtype=np.float64)
        norm = c / np.maximum(c.sum(1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                ax.text(j, i, f"{int(c[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names[t])), names[t], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names[t])), names[t], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{t}: {per_type[t]:.3f}")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from semsr.eval.atomic import write_json
    from semsr.priors.irpad import IRPADEstimator, default_weights_dir, weights_fingerprint
    from semsr.train.irpad import accuracy, make_in_memory

    if args.n < 1:
        raise SemsrError("--n must be at least 1")
    if args.context < args.size:
        raise SemsrError(f"--context ({args.context}) must be at least --size ({args.size})")
    torch.set_num_threads(max(1, args.threads))
    folder = args.weights or default_weights_dir()
    if args.flips is None:
        from semsr.priors.irpad import DEFAULT_FLIPS

        args.flips = DEFAULT_FLIPS
    if not 1 <= args.flips <= 8:
        raise SemsrError("--flips must be between 1 and 8")
    estimator = IRPADEstimator(weights=folder, max_crops=args.max_crops, flips=args.flips)
    photos, where = bench_photos(args.hr)
    t0 = time.time()
    data = make_in_memory(photos, args.n, size=args.size, seed=args.seed, contiguous=args.contiguous,
                          held_out=args.hr is None, context=args.context)
    t_gen = time.time() - t0
    result = accuracy(estimator, data)
    t_eval = time.time() - t0 - t_gen
    per_type = result["per_type"]
    print(f"IRPAD {folder} on {args.n} synthetic samples ({args.size} px of {args.context}-px regions, "
          f"seed {args.seed}"
          f"{', contiguous' if args.contiguous else ''}) from {len(photos)} photos ({where})")
    print(format_table(per_type))
    names = {t: [lv.name for lv in lvs] for t, lvs in estimator.table.items()}
    if args.split:
        print(format_split(result["by_downscale_noise"], names))
    out: dict[str, Any] = {
        "per_type": per_type, "n": result["n"], "mean": result["mean"], "target": TARGET,
        "passed": all(a >= TARGET for a in per_type.values()), "confusion": result["confusion"],
        "by_downscale_noise": result["by_downscale_noise"], "levels": names,
        "weights": str(folder), "fingerprint": weights_fingerprint(Path(folder)), "seed": args.seed,
        "size": args.size, "context": args.context, "contiguous": args.contiguous, "flips": args.flips,
        "max_crops": args.max_crops,
        "photos": len(photos), "source": where,
        "seconds": {"generate": round(t_gen, 1), "classify": round(t_eval, 1)},
    }
    confusion = args.confusion
    if confusion is None:
        confusion = args.json.with_name(args.json.stem + "_confusion.png") if args.json else Path("irpad_confusion.png")
    write_confusion_png(confusion, result["confusion"], names, per_type,
                        title=f"IRPAD, {args.n} held-out synthetic samples (seed {args.seed})")
    out["confusion_png"] = str(confusion)
    print(f"confusion matrices: {confusion}")
    if args.json:
        write_json(args.json, out)
        print(f"results: {args.json}")
    return 0


def train_command(args: argparse.Namespace, sources: list[Path], data_dir: Path) -> str:
    """The full ``semsr train-irpad`` command line equivalent to ``args`` (every option spelled out)."""
    parts = ["semsr", "train-irpad", "--hr", *(str(s) for s in sources), "--out", str(args.out),
             "--data-dir", str(data_dir)]
    for flag in ("n", "size", "context", "min_texture", "seed", "epochs", "batch_size", "lr", "crop", "channels",
                 "threads"):
        parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    parts += [f for f, on in (("--no-highpass", args.no_highpass), ("--no-lines", args.no_lines)) if on]
    if args.init is not None:
        parts += ["--init", str(args.init)]
    return " ".join(shlex.quote(p) for p in parts)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from semsr.core.paths import cache_dir
    from semsr.priors.irpad import IRPADEstimator, load_irpad, save_irpad
    from semsr.train.irpad import (
        TrainSettings,
        accuracy,
        build_dataset,
        default_sources,
        list_photos,
        load_dataset,
        make_in_memory,
        train,
    )

    _setup_logging()
    torch.set_num_threads(max(1, args.threads))
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise SemsrError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
    init = load_irpad(args.init) if args.init is not None else None  # a wrong path fails before the data is built
    if args.crop is None:
        args.crop = init.config.crop if init is not None else 64
    if len(channels) < 2 or not 16 <= args.crop <= args.size or args.n < 100 or args.context < args.size:
        raise SemsrError("need >= 2 --channels, 16 <= --crop <= --size <= --context and --n >= 100")
    sources = args.hr or default_sources()
    photos = list_photos(sources, held_out=False)
    if not photos:
        raise SemsrError("no training photographs found", " ".join(map(str, sources)))
    data_dir = args.data_dir or cache_dir() / "irpad" / f"data-{args.n}-{args.size}-{args.seed}"
    command = train_command(args, sources, data_dir)
    logging.info("IRPAD: %d training photos -> %s", len(photos), data_dir)
    t0, c0 = time.time(), time.process_time()
    build_dataset(data_dir, photos, args.n, size=args.size, seed=args.seed, min_texture=args.min_texture,
                  context=args.context)
    data_time = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    logging.info("dataset ready (%.0f s wall)", data_time["wall_s"])
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             threads=args.threads, channels=channels, crop=args.crop,
                             highpass=not args.no_highpass, lines=not args.no_lines)
    model, record = train(load_dataset(data_dir), settings, log_fn=logging.info, init=init,
                          extra_record={"command": command, "dataset_build": data_time,
                                        "sources": [str(s) for s in sources]})
    save_irpad(model, args.out)
    logging.info("saved %s (training %.0f s wall, %.0f s cpu)", args.out, record["wall_s"], record["cpu_s"])
    if args.eval_n > 0:
        photos_ho = list_photos(sources, held_out=True)
        held = make_in_memory(photos_ho, args.eval_n, size=args.size, seed=1234, context=args.context)
        acc = accuracy(IRPADEstimator(model), held)
        print(format_table(acc["per_type"]))
    return 0
