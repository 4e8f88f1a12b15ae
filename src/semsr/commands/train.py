"""``semsr train``: run (or resume) a training experiment described by a YAML file.

Examples::

    semsr train --config configs/tiny.yaml --max-steps 20 --output run
    semsr train --config configs/tiny.yaml --max-steps 40 --output run --resume
    semsr train --config configs/tiny.yaml optim.lr=1e-4 train.grad_accum=4
    accelerate launch --multi_gpu --num_processes 2 -m semsr.cli train --config configs/tiny.yaml --output run2

Without a GPU the processes join a gloo group (CPU data parallelism);
``torchrun --nproc_per_node 2 -m semsr.cli train ...`` works the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semsr.train.config import load_config
from semsr.train.trainer import Trainer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a recipe (ControlNet/adapters) from a YAML experiment config",
        description="Train with Hugging Face Accelerate. Single process by default; launch with "
        "`accelerate launch --multi_gpu --num_processes N -m semsr.cli train ...` for data parallelism "
        "(gloo on CPU-only machines). "
        "Writes config.yaml, log.jsonl, curve.png, checkpoints/ and final/ into --output.",
    )
    parser.add_argument("--config", "-c", required=True, type=Path, help="experiment YAML (e.g. configs/tiny.yaml)")
    parser.add_argument("--output", "-o", type=Path, default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --output (same step, same data order)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides with dotted keys, e.g. optim.lr=1e-4 data.batch_size=4",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(args.config, overrides)
    output = args.output if args.output is not None else Path("runs") / cfg.name
    result = Trainer(cfg, output, resume=args.resume).fit()
    if not result.is_main_process:
        return 0
    if result.losses:
        print(f"step {result.step}: loss {result.losses[-1]:.5f}; run directory {result.output}")
    else:
        print(
            f"nothing to do: already at step {result.step} (train.max_steps={cfg.train.max_steps}); "
            f"run directory {result.output}"
        )
    return 0
