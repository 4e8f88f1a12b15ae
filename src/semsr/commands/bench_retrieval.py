"""``semsr bench retrieval``: does the Reference-Finding Aligner help LR retrieval?

    semsr bench retrieval --json r.json                         # bsds500 train images, hed-vgg, built DB cached
    semsr bench retrieval --db /tmp/db --images path/to/hr-images --json r.json
    semsr bench retrieval --save-aligner src/semsr/assets/weights/rfa/aligner-hed-vgg
    semsr bench retrieval --aligner runs/rfa-aligner --json r.json   # an aligner trained by `semsr train`

Every image's HR version is in the database. For each query image the LR
(``--lr-size``, default 32x32 bicubic of the whole image) is used as a query —
raw (the embedder's vector of the LR) and aligned (the aligner's prediction) —
and the hit is its own HR entry in the top-1 / top-4 results.

Without ``--aligner`` the images are split by content hash into a training
part, on which an aligner is trained with the ``rfa-aligner`` task of
``semsr train`` (the trainer's ``(HR crop, bicubic LR)`` pairs, LR crops of
``--lr-size``; ``--steps``, ``--lr``, ``--seed``; batch, warm-up and cosine
schedule as ``configs/rfa-aligner.yaml``), and a held-out part.
``--aligner RUN`` scores the aligner of a ``semsr train`` run
(``RUN/final/aligner``) on the run's held-out images (``data.val_count``,
never trained on) and its training images (default images: the run's);
``--aligner FOLDER`` scores an aligner folder on all images.
Training images come from the offline corpus (default
``data_root()/train/bsds500``), never benchmark sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from semsr.commands.index import _collect, _open_or_create
from semsr.core.components import load_component
from semsr.core.errors import SemsrError
from semsr.core.paths import cache_dir, data_root
from semsr.eval.atomic import write_json
from semsr.models.rfa import ReferenceFindingAligner, check_embedder
from semsr.priors.retrieval.embedders import Embedder, embedder_from_spec
from semsr.priors.retrieval.index import ReferenceDB, add_images, file_sha256
from semsr.train.config import ExperimentConfig, config_from_dict, load_config
from semsr.train.data import list_images
from semsr.train.rfa import PairFeatures, hit_rates, lr_pair_features, split_by_hash
from semsr.train.trainer import Trainer

#: Largest SR factor of the training crops (the paper's x16: 512-px crops for 32x32 LR).
MAX_TRAIN_SCALE = 16
#: Micro-batch and most warm-up steps of the aligner training (as configs/rfa-aligner.yaml).
TRAIN_BATCH = 8
WARMUP_STEPS = 20


def register_kind(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``retrieval`` kind to ``semsr bench`` (``subparsers`` of the bench parser)."""
    p = subparsers.add_parser(
        "retrieval",
        help="top-1/top-4 LR retrieval hit rate, raw vs aligned",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--images", type=Path, nargs="+", default=None, help="HR training images (default: <data>/train/bsds500)"
    )
    p.add_argument(
        "--db", type=Path, default=None, help="database holding those images (default: built/extended in the cache)"
    )
    p.add_argument(
        "--embedder", default=None, help="embedder when the database is created (default: the aligner's, else hed-vgg)"
    )
    p.add_argument("--lr-size", type=int, default=32, help="LR side (default 32, the paper's x16 setting)")
    p.add_argument("--holdout", type=float, default=0.25, help="held-out fraction (default 0.25)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--steps", type=int, default=400, help="aligner training steps (default 400)")
    p.add_argument("--lr", type=float, default=1e-3, help="aligner learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-aligner", type=Path, default=None, help="save the trained aligner to this folder")
    p.add_argument(
        "--aligner",
        type=Path,
        default=None,
        help="score this aligner instead of training one: a `semsr train` run folder (its held-out and "
        "training images) or an aligner folder (all images)",
    )
    p.add_argument("--json", type=Path, default=None, help="write results as JSON")
    p.set_defaults(func=run)


def _default_images() -> list[Path]:
    root = data_root()
    if root is None or not (root / "train" / "bsds500").is_dir():
        raise SemsrError("no training images; pass --images (set SEMSR_DATA for the shared data)")
    return [root / "train" / "bsds500"]


def _aligner_source(path: Path) -> tuple[Path, ExperimentConfig | None]:
    """``(aligner folder, run config or None)`` for ``--aligner`` (a run folder or an aligner folder)."""
    if (path / "config.json").is_file():
        return path, None
    if (path / "config.yaml").is_file() and (path / "final" / "aligner" / "config.json").is_file():
        return path / "final" / "aligner", load_config(path / "config.yaml")
    raise SemsrError(
        "not an aligner folder (config.json + weights) nor a finished `semsr train` run (config.yaml + final/aligner)",
        path,
    )


def _run_splits(cfg: ExperimentConfig) -> dict[str, list[Path]]:
    """A training run's ``{"heldout": validation images, "train": training images}``."""
    train, held = list_images(cfg.data, cfg.data.crop_size)
    return {"heldout": [it.path for it in held], "train": [it.path for it in train]}


def _aligner_embedder(folder: Path | None) -> str | None:
    """The embedder spec an aligner folder was trained for (``None`` if unrecorded)."""
    if folder is None:
        return None
    return json.loads((folder / "config.json").read_text()).get("embedder")


def aligner_run_config(
    files: Sequence[Path], folder: Path, embedder_spec: str, *, lr_size: int, steps: int, lr: float, seed: int
) -> ExperimentConfig:
    """The ``rfa-aligner`` experiment on ``files``: they are linked into ``folder`` (its ``data.hr``);
    crops of ``lr_size`` x the largest factor (at most :data:`MAX_TRAIN_SCALE`) that fits every image."""
    folder.mkdir(parents=True, exist_ok=True)
    sides = []
    for i, path in enumerate(files):
        os.symlink(Path(path).resolve(), folder / f"{i:06d}{Path(path).suffix.lower()}")
        with Image.open(path) as im:
            sides.append(min(im.size))
    if not sides:
        raise SemsrError("no training images")
    scale = max(1, min(MAX_TRAIN_SCALE, min(sides) // lr_size))
    return config_from_dict(
        {
            "name": "bench-retrieval-aligner",
            "task": "rfa-aligner",
            "seed": seed,
            "model": {"options": {"embedder": embedder_spec}},
            "data": {
                "hr": [str(folder)],
                "val_count": 0,
                "limit": 0,
                "crop_size": lr_size * scale,
                "scale": scale,
                "batch_size": TRAIN_BATCH,
                "num_workers": 0,
            },
            "degradation": {"type": "bicubic"},
            "optim": {"lr": lr, "weight_decay": 1e-2, "max_grad_norm": 1.0},
            "schedule": {"name": "cosine", "warmup_steps": min(WARMUP_STEPS, steps // 10)},
            "train": {"max_steps": steps, "mixed_precision": "no", "ema_decay": 0.0, "log_every": 10},
            "losses": {"rfa_align_l2": 1.0},
            "validation": {"every": 0},
            "checkpoint": {"every": 0, "keep": 1},
        }
    )


def train_aligner(
    files: Sequence[Path], embedder_spec: str, *, lr_size: int, steps: int, lr: float, seed: int
) -> tuple[ReferenceFindingAligner, list[float]]:
    """Train an aligner on ``files`` with the ``rfa-aligner`` task (in a temporary run folder);
    returns the aligner and the per-step losses."""
    with tempfile.TemporaryDirectory(prefix="semsr-bench-retrieval-") as tmp:
        cfg = aligner_run_config(
            files, Path(tmp) / "images", embedder_spec, lr_size=lr_size, steps=steps, lr=lr, seed=seed
        )
        result = Trainer(cfg, Path(tmp) / "run").fit()
        model = load_component(ReferenceFindingAligner, Path(tmp) / "run" / "final" / "aligner")
    return model, result.losses


def _progress(what: str) -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None
    return lambda i, n: print(f"\r{what} {i}/{n}", end="" if i < n else "\n", file=sys.stderr)


def _scores(
    db: ReferenceDB, feats: PairFeatures, model: ReferenceFindingAligner, splits: dict[str, list[int]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {"raw": hit rates, "aligned": hit rates}}`` of the LR queries of each split."""
    out = {}
    for name, idx in splits.items():
        if not idx:
            continue
        sub = feats.subset(idx)
        with torch.no_grad():
            aligned = F.normalize(model(sub.lr_tokens, sub.lr_vec), dim=-1)
        out[name] = {"raw": hit_rates(db, sub.lr_vec, sub.hr_vid), "aligned": hit_rates(db, aligned, sub.hr_vid)}
    return out


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.perf_counter()
    aligner_dir, run_cfg = _aligner_source(args.aligner) if args.aligner is not None else (None, None)
    run_files = _run_splits(run_cfg) if run_cfg is not None else None
    if args.images:
        files = _collect(args.images)
    elif run_files is not None:
        files = sorted(set(run_files["heldout"] + run_files["train"]))
    else:
        files = _collect(_default_images())
    if args.limit:
        files = files[: args.limit]
    spec = embedder_from_spec(args.embedder or _aligner_embedder(aligner_dir) or "hed-vgg").spec
    db_path = args.db or cache_dir() / "retrieval" / "bench-db" / spec.replace(":", "-").replace("/", "_")[-120:]

    result: dict = {}
    with _open_or_create(db_path, None if args.db and (args.db / "meta.sqlite").is_file() else spec, "auto") as db:
        emb: Embedder = embedder_from_spec(db.embedder_spec)
        add_images(db, files, emb, progress=_progress("HR database"))
        feats = lr_pair_features(db, files, emb, lr_size=args.lr_size, progress=_progress("LR features"))
        if aligner_dir is None:
            if len(feats.sha) < 4:
                raise SemsrError(f"need at least 4 images in the database, have {len(feats.sha)}")
            train_idx, hold_idx = split_by_hash(feats.sha, args.holdout, args.seed)
            by_sha = {file_sha256(f): f for f in files}
            model, losses = train_aligner(
                [by_sha[feats.sha[i]] for i in train_idx],
                db.embedder_spec,
                lr_size=args.lr_size,
                steps=args.steps,
                lr=args.lr,
                seed=args.seed,
            )
            splits = {"heldout": hold_idx, "train": train_idx}
            tail = losses[-20:] or [float("nan")]
            result.update(
                steps=args.steps, loss_first=losses[0] if losses else float("nan"), loss_last=sum(tail) / len(tail)
            )
        else:
            model = load_component(ReferenceFindingAligner, aligner_dir)
            check_embedder(model, emb, aligner_dir)
            if run_files is None:
                splits = {"all": list(range(len(feats.sha)))}
            else:
                where = {sha: i for i, sha in enumerate(feats.sha)}
                splits = {
                    name: sorted(where[s] for s in {file_sha256(f) for f in paths} if s in where)
                    for name, paths in run_files.items()
                }
            result["aligner"] = str(args.aligner)
        result = {
            "embedder": db.embedder_spec,
            "database": str(db_path),
            "database_size": len(db),
            "lr_size": args.lr_size,
            **{f"{k}_pairs": len(v) for k, v in splits.items()},
            **result,
            **_scores(db, feats, model, splits),
        }
    if args.save_aligner is not None:
        model.save_pretrained(args.save_aligner, safe_serialization=True)
        result["aligner"] = str(args.save_aligner)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    how = (
        f"aligner {result['aligner']}"
        if aligner_dir is not None
        else f"aligner trained on {result['train_pairs']} pairs, L2 {result['loss_first']:.4f} -> {result['loss_last']:.4f}"
    )
    print(
        f"retrieval of {args.lr_size}x{args.lr_size} LR queries among {result['database_size']} HR images "
        f"({result['embedder']}); {how}"
    )
    print(f"{'split':10s} {'query':8s} {'top-1':>7s} {'top-4':>7s}")
    for split in ("heldout", "train", "all"):
        for q in ("raw", "aligned"):
            if split in result:
                r = result[split][q]
                print(f"{split:10s} {q:8s} {r['top1']:7.3f} {r['top4']:7.3f}")
    if args.json is not None:
        write_json(args.json, result)
    return 0
