"""``semsr bench irpad``: accuracy of the IRPAD degradation estimator on held-out synthetic data.

    semsr bench irpad --json r.json                  # shipped weights, held-out synthetic set
    semsr bench irpad --n 400 --contiguous           # parameters also inside the gaps between levels
    semsr bench irpad --degradation realesrgan       # Real-ESRGAN second-order LR (DaLPSR's training data)

``--degradation irpad`` (default) is IRPAD's own first-order generator;
``realesrgan`` degrades HR squares with Real-ESRGAN's second-order pipeline and
labels the LR images in IRPAD's label space (:mod:`semsr.train.irpad_realesrgan`).

The synthetic degradation, the held-out split and the level intervals are
documented in :mod:`semsr.train.irpad` and :mod:`semsr.priors.irpad` (training:
``semsr train --config configs/irpad.yaml``).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semsr.core.errors import SemsrError
from semsr.core.fingerprint import fingerprint
from semsr.eval.atomic import write_bytes, write_json
from semsr.priors.irpad import DEFAULT_FLIPS, IRPADEstimator, default_weights_dir
from semsr.train.irpad import accuracy, default_sources, list_photos, make_in_memory
from semsr.train.irpad_realesrgan import accuracy_by_final_order, make_realesrgan_set

#: Per-type accuracy the estimator is expected to reach (``passed`` in the JSON).
TARGET = 0.90


def register_kind(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``irpad`` kind to ``semsr bench``'s sub-parsers (sets ``func``)."""
    b = subparsers.add_parser(
        "irpad",
        help="per-type accuracy of the IRPAD degradation estimator on held-out synthetic data",
        description="Generate a synthetic degraded set (fixed seed) from held-out photographs, classify "
        "the blur/noise/JPEG/downscale degree with IRPAD and report the per-type interval "
        "accuracy (table, JSON) and confusion matrices (PNG).",
    )
    b.add_argument("--weights", type=Path, default=None, help="IRPAD folder (default: the shipped weights)")
    b.add_argument(
        "--hr",
        nargs="+",
        type=Path,
        default=None,
        metavar="DIR|MANIFEST",
        help="photographs to degrade (default: the held-out split of data_root()/train/bsds500; "
        "given sources are used whole)",
    )
    b.add_argument(
        "--degradation",
        choices=("irpad", "realesrgan"),
        default="irpad",
        help="irpad: IRPAD's first-order generator (default); realesrgan: Real-ESRGAN's second-order pipeline "
        "(the LR DaLPSR trains on), labelled in IRPAD's label space",
    )
    b.add_argument(
        "--hr-size",
        type=int,
        default=320,
        metavar="N",
        help="realesrgan: HR square in px, the LR sample is N/4 (default 320)",
    )
    b.add_argument("--n", type=int, default=2000, help="number of synthetic samples (default 2000)")
    b.add_argument("--seed", type=int, default=1234, help="generation seed (default 1234)")
    b.add_argument("--size", type=int, default=96, help="sample size in px (default 96)")
    b.add_argument(
        "--context",
        type=int,
        default=192,
        metavar="N",
        help="degrade a region of N px around each sample, then cut the sample out (default 192; "
        "at most the photo's short side)",
    )
    b.add_argument(
        "--contiguous",
        action="store_true",
        help="sample parameters over whole ranges incl. the gaps between levels (nearest-level labels)",
    )
    b.add_argument("--max-crops", type=int, default=16, help="analysis windows per image (default 16)")
    b.add_argument(
        "--flips",
        type=int,
        default=None,
        help=f"flips/transpositions averaged per window, 1-8 (default: the estimator's, {DEFAULT_FLIPS})",
    )
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    b.add_argument(
        "--split",
        action="store_true",
        help="also print each type's accuracy by true downscale (rows) x true noise level (columns); "
        "always in the JSON",
    )
    b.add_argument("--json", type=Path, default=None, help="write results as JSON")
    b.add_argument(
        "--confusion",
        type=Path,
        default=None,
        metavar="PNG",
        help="confusion-matrix figure (default: <json stem>_confusion.png, or irpad_confusion.png)",
    )
    b.set_defaults(func=run_bench)


def bench_photos(sources: list[Path] | None) -> tuple[list[Path], str]:
    """Photographs for the benchmark and a description of where they come from."""
    if sources:
        photos = list_photos(sources, held_out=True) + list_photos(sources, held_out=False)
        return sorted(set(photos)), ", ".join(str(s) for s in sources)
    src = default_sources()
    return list_photos(src, held_out=True), f"held-out split of {src[0]}"


def format_table(per_type: dict[str, float], target: float = TARGET) -> str:
    """Accuracy per type against ``target``, and the mean."""
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


def write_confusion_png(
    path: Path,
    confusion: dict[str, list[list[int]]],
    names: dict[str, list[str]],
    per_type: dict[str, float],
    title: str = "",
) -> None:
    """Row-normalised confusion matrices (true x predicted), counts annotated, one panel per type."""
    import matplotlib  # optional heavy dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional heavy dependency, only for the figure

    types = list(confusion)
    fig, axes = plt.subplots(1, len(types), figsize=(3.4 * len(types), 3.6), squeeze=False)
    for ax, t in zip(axes[0], types):
        c = np.asarray(confusion[t], dtype=np.float64)
        norm = c / np.maximum(c.sum(1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{int(c[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
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
    """``semsr bench irpad``: generate the held-out set, classify it, print and write the results."""
    if args.n < 1:
        raise SemsrError("--n must be at least 1")
    if args.context < args.size:
        raise SemsrError(f"--context ({args.context}) must be at least --size ({args.size})")
    torch.set_num_threads(max(1, args.threads))
    folder = args.weights or default_weights_dir()
    flips = DEFAULT_FLIPS if args.flips is None else args.flips
    if not 1 <= flips <= 8:
        raise SemsrError("--flips must be between 1 and 8")
    estimator = IRPADEstimator(weights=folder, max_crops=args.max_crops, flips=flips)
    realesrgan = args.degradation == "realesrgan"
    if realesrgan and (args.hr_size < 32 or args.hr_size % 4):
        raise SemsrError(f"--hr-size must be a multiple of 4 and at least 32, got {args.hr_size}")
    photos, where = bench_photos(args.hr)
    t0 = time.time()
    if realesrgan:
        data = make_realesrgan_set(photos, args.n, hr_size=args.hr_size, seed=args.seed)
    else:
        data = make_in_memory(
            photos,
            args.n,
            size=args.size,
            seed=args.seed,
            contiguous=args.contiguous,
            held_out=args.hr is None,
            context=args.context,
        )
    t_gen = time.time() - t0
    result = accuracy(estimator, data)
    t_eval = time.time() - t0 - t_gen
    per_type = result["per_type"]
    if realesrgan:
        print(
            f"IRPAD {folder} on {args.n} Real-ESRGAN second-order LR samples ({args.hr_size // 4} px from "
            f"{args.hr_size}-px HR squares, seed {args.seed}) from {len(photos)} photos ({where})"
        )
    else:
        print(
            f"IRPAD {folder} on {args.n} synthetic samples ({args.size} px of {args.context}-px regions, "
            f"seed {args.seed}"
            f"{', contiguous' if args.contiguous else ''}) from {len(photos)} photos ({where})"
        )
    print(format_table(per_type))
    by_order = accuracy_by_final_order(data, result["predictions"]) if realesrgan else None
    if by_order:
        for order, r in by_order.items():
            accs = ", ".join(f"{t} {a:.3f}" for t, a in r["per_type"].items())
            print(f"  final order {order} (n={r['n']}): {accs}")
    names = {t: [lv.name for lv in lvs] for t, lvs in estimator.table.items()}
    if args.split:
        print(format_split(result["by_downscale_noise"], names))
    out: dict[str, Any] = {
        "per_type": per_type,
        "n": result["n"],
        "mean": result["mean"],
        "target": TARGET,
        "passed": all(a >= TARGET for a in per_type.values()),
        "confusion": result["confusion"],
        "by_downscale_noise": result["by_downscale_noise"],
        "levels": names,
        "weights": str(folder),
        "fingerprint": fingerprint([Path(folder)]),
        "seed": args.seed,
        "degradation": args.degradation,
        "size": args.hr_size // 4 if realesrgan else args.size,
        "context": args.context,
        "contiguous": args.contiguous,
        "flips": flips,
        "max_crops": args.max_crops,
        "photos": len(photos),
        "source": where,
        "seconds": {"generate": round(t_gen, 1), "classify": round(t_eval, 1)},
    }
    if realesrgan:
        out["hr_size"] = args.hr_size
        out["by_final_order"] = by_order
        out["label_values"] = {
            t: [round(float(v), 3) for v in np.percentile(data.params[:, j], [10, 50, 90])]
            for j, t in enumerate(data.meta["types"])
        }
        out["label_values"]["noise_std"] = [
            round(float(v), 3) for v in np.percentile(data.meta["noise_std"], [10, 50, 90])
        ]
    confusion = args.confusion
    if confusion is None:
        confusion = args.json.with_name(args.json.stem + "_confusion.png") if args.json else Path("irpad_confusion.png")
    write_confusion_png(
        confusion,
        result["confusion"],
        names,
        per_type,
        title=f"IRPAD, {args.n} held-out {'Real-ESRGAN LR' if realesrgan else 'synthetic'} samples (seed {args.seed})",
    )
    out["confusion_png"] = str(confusion)
    print(f"confusion matrices: {confusion}")
    if args.json:
        write_json(args.json, out)
        print(f"results: {args.json}")
    return 0
