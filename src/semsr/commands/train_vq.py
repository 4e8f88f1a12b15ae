"""``semsr train-vq``: train the small edge-map VQ tokenizer on CPU (see :mod:`semsr.train.vq`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-vq",
        help="train the edge-map VQ tokenizer (16x16 tokens, codebook 1024, dim 256)",
        description="Train semsr's small VQ tokenizer on Canny/HED maps of the BSDS500 training images "
                    "(downscaled like LR inputs), evaluate it on held-out maps and write OUT.safetensors, "
                    "OUT.json (config) and OUT.report.json (scores).",
    )
    p.add_argument("--out", type=Path, required=True, help="output stem, e.g. src/semsr/assets/weights/vq_edges")
    p.add_argument("--data", type=Path, default=None,
                   help="folder of training images (default: <SEMSR_DATA>/train/bsds500)")
    p.add_argument("--modalities", default="canny,hed", help="comma-separated edge priors (default: canny,hed)")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps (default 1000)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--lr-scale", type=float, default=0.5,
                   help="downscale factor applied to images before extracting maps (default 0.5)")
    p.add_argument("--holdout", type=int, default=40, help="last N images held out for evaluation (default 40)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy machine one thread wastes less time spinning)")
    p.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from semsr.train.vq import VQTrainConfig, train_edge_vq

    cfg = VQTrainConfig(
        data=args.data, out=args.out, modalities=tuple(m.strip() for m in args.modalities.split(",") if m.strip()),
        lr_scale=args.lr_scale, holdout=args.holdout, steps=args.steps, batch=args.batch, lr=args.lr,
        seed=args.seed, threads=args.threads, time_limit=args.time_limit,
    )
    train_edge_vq(cfg, log=lambda s: print(s, flush=True))
    return 0
