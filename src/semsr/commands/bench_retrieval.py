"""``semsr bench-retrieval``: does the Reference-Finding Aligner help LR retrieval?

    semsr bench-retrieval --json r.json                         # bsds500 train images, hed-vgg, built DB cached
    semsr bench-retrieval --db /tmp/db --images ../shared/data/train/bsds500 --json r.json
    semsr bench-retrieval --save-aligner src/semsr/assets/weights/rfa/aligner-hed-vgg
    semsr bench-retrieval --aligner runs/rfa-aligner --json r.json   # an aligner trained by `semsr train`

Every image's HR version is in the database. For each query image the LR
(``--lr-size``, default 32x32 bicubic of the whole image) is used as a query —
raw (the embedder's vector of the LR) and aligned (the aligner's prediction) —
and the hit is its own HR entry in the top-1 / top-4 results.

Without ``--aligner`` the images are split by content hash into a training
part, on which an aligner is fitted quickly in memory (cached features; the
same step and loss as the ``rfa-aligner`` training task), and a held-out part.
``--aligner RUN`` scores the aligner of a ``semsr train`` run
(``RUN/final/aligner``) on the run's held-out images (``data.val_count``,
never trained on) and its training images (default images: the run's);
``--aligner FOLDER`` scores an aligner folder on all images.
Training images come from the offline corpus (default
``data_root()/train/bsds500``), never benchmark sets.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semsr.core.errors import SemsrError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench-retrieval", help="top-1/top-4 LR retrieval hit rate, raw vs aligned",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--images", type=Path, nargs="+", default=None,
                   help="HR training images (default: <data>/train/bsds500)")
    p.add_argument("--db", type=Path, default=None,
                   help="database holding those images (default: built/extended in the cache)")
    p.add_argument("--embedder", default=None,
                   help="embedder when the database is created (default: the aligner's, else hed-vgg)")
    p.add_argument("--lr-size", type=int, default=32, help="LR side (default 32, the seed's x16 setting)")
    p.add_argument("--holdout", type=float, default=0.25, help="held-out fraction (default 0.25)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--steps", type=int, default=400, help="aligner training steps (default 400)")
    p.add_argument("--lr", type=float, default=1e-3, help="aligner learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-aligner", type=Path, default=None, help="save the trained aligner to this folder")
    p.add_argument("--aligner", type=Path, default=None,
                   help="score this aligner instead of fitting one: a `semsr train` run folder (its held-out and "
                        "training images) or an aligner folder (all images)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON")
    p.set_defaults(func=run)


def _default_images() -> list[Path]:
    from semsr.core.paths import data_root

    root = data_root()
    if root is None or not (root / "train" / "bsds500").is_dir():
        raise SemsrError("no training images; pass --images (set SEMSR_DATA for the shared data)")
    return [root / "train" / "bsds500"]


def _aligner_source(path: Path) -> tuple[Path, object | None]:
    """``(aligner folder, run config or None)`` for ``--aligner`` (a run folder or an aligner folder)."""
    from semsr.train.config import load_config

    if (path / "config.json").is_file():
        return path, None
    if (path / "config.yaml").is_file() and (path / "final" / "aligner" / "config.json").is_file():
        return path / "final" / "aligner", load_config(path / "config.yaml")
    raise SemsrError("not an aligner folder (config.json + model.safetensors) nor a finished `semsr train` run "
                     "(config.yaml + final/aligner)", path)


def _run_splits(cfg) -> dict[str, list[Path]]:  # noqa: ANN001
    """A training run's ``{"heldout": validation images, "train": training images}``."""
    from semsr.train.data import list_images

    train, held = list_images(cfg.data, cfg.data.crop_size)
    return {"heldout": [it.path for it in held], "train": [it.path for it in train]}


def run(args: argparse.Namespace) -> int:
    from semsr.commands.index import _collect, _open_or_create
    from semsr.models.rfa import load_aligner
    from semsr.core.paths import cache_dir
    from semsr.priors.retrieval.embedders import embedder_from_spec
    from semsr.priors.retrieval.index import add_images, file_sha256
    from semsr.train.rfa import hit_rates, lr_pair_features, split_by_hash, train_aligner

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
    tty = sys.stderr.isatty()

    def progress(what: str):  # noqa: ANN202
        return lambda i, n: print(f"\r{what} {i}/{n}", end="" if i < n else "\n", file=sys.stderr) if tty else None

    result: dict = {}
    with _open_or_create(db_path, None if args.db and (args.db / "meta.sqlite").is_file() else spec, "auto") as db:
        emb = embedder_from_spec(db.embedder_spec)
        add_images(db, files, emb, progress=progress("HR database"))
        feats = lr_pair_features(db, files, emb, lr_size=args.lr_size, progress=progress("LR features"))
        if aligner_dir is None:
            if len(feats.sha) < 4:
                raise SemsrError(f"need at least 4 images in the database, have {len(feats.sha)}")
            train_idx, hold_idx = split_by_hash(feats.sha, args.holdout, args.seed)
            hr = torch.from_numpy(np.array(db.vectors(), dtype=np.float32))
            model, losses = train_aligner(feats.subset(train_idx), hr, steps=args.steps, lr=args.lr, seed=args.seed,
                                          embedder=db.embedder_spec)
            splits = {"heldout": hold_idx, "train": train_idx}
            result.update(steps=args.steps, loss_first=losses[0], loss_last=sum(losses[-20:]) / len(losses[-20:]))
        else:
            model = load_aligner(aligner_dir, db.embedder_spec)
            if run_files is None:
                splits = {"all": list(range(len(feats.sha)))}
            else:
                where = {sha: i for i, sha in enumerate(feats.sha)}
                splits = {name: sorted(where[s] for s in {file_sha256(f) for f in paths} if s in where)
                          for name, paths in run_files.items()}
            result["aligner"] = str(args.aligner)
        result = {"embedder": db.embedder_spec, "database": str(db_path), "database_size": len(db),
                  "lr_size": args.lr_size, **{f"{k}_pairs": len(v) for k, v in splits.items()}, **result}
        for name, idx in splits.items():
            if not idx:
                continue
            sub = feats.subset(idx)
            with torch.no_grad():
                aligned = F.normalize(model(sub.lr_tokens, sub.lr_vec), dim=-1)
            result[name] = {"raw": hit_rates(db, sub.lr_vec, sub.hr_vid), "aligned": hit_rates(db, aligned, sub.hr_vid)}
    if args.save_aligner is not None:
        model.save(args.save_aligner)
        result["aligner"] = str(args.save_aligner)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    how = (f"aligner {result['aligner']}" if aligner_dir is not None else
           f"aligner trained on {result['train_pairs']} pairs, L2 {result['loss_first']:.4f} -> {result['loss_last']:.4f}")
    print(f"retrieval of {args.lr_size}x{args.lr_size} LR queries among {result['database_size']} HR images "
          f"({result['embedder']}); {how}")
    print(f"{'split':10s} {'query':8s} {'top-1':>7s} {'top-4':>7s}")
    for split in ("heldout", "train", "all"):
        for q in ("raw", "aligned"):
            if split in result:
                r = result[split][q]
                print(f"{split:10s} {q:8s} {r['top1']:7.3f} {r['top4']:7.3f}")
    if args.json is not None:
        from semsr.eval.atomic import write_json

        write_json(args.json, result)
    return 0


def _aligner_embedder(folder: Path | None) -> str | None:
    """The embedder spec an aligner folder was trained for (``None`` if unrecorded)."""
    import json

    if folder is None:
        return None
    return json.loads((folder / "config.json").read_text()).get("embedder")
