"""``semsr index``: build, grow, inspect, search and merge a reference database.

    semsr index build --images path/to/hr-images --out /tmp/db      # offline hed-vgg embedder
    semsr index build --images DIR --out DB --embedder clip:~/models/clip-vit-l --kind hnsw
    semsr index add --db DB --images MORE                                       # incremental, de-duplicated
    semsr index info --db DB
    semsr index search IMAGE --db DB -k 4 --json
    accelerate launch -m semsr.cli index build --images DIR --out DB            # sharded over processes
    semsr index build --images DIR --out DB --shard 1/4                         # one shard by hand ...
    semsr index merge --out DB DB.shards/*                                      # ... merged later

A database is a folder (see :mod:`semsr.priors.retrieval.index`). ``build`` on
an existing database adds only images whose content is new. Under
``accelerate launch`` (WORLD_SIZE > 1) each process builds
``<out>.shards/<rank>-of-<world>`` and the main process merges them into
``<out>`` when all are done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from semsr.core.components import load_component
from semsr.core.errors import SemsrError
from semsr.models.rfa import ReferenceFindingAligner, aligner_dir, check_embedder
from semsr.priors.retrieval.embedders import embedder_from_spec
from semsr.priors.retrieval.index import (
    ReferenceDB,
    add_images,
    list_image_files,
    load_rgb,
    merge_databases,
    shard_files,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="reference image database (FAISS + SQLite) for retrieval",
        description="Build and query a reference database of HR images for retrieval.",
    )
    sub = p.add_subparsers(dest="index_command", metavar="INDEX_COMMAND")

    b = sub.add_parser("build", help="create (or extend) a database from a folder of images")
    b.add_argument("--images", required=True, nargs="+", type=Path, help="image folder(s) or file(s)")
    b.add_argument("--out", required=True, type=Path, help="database folder")
    b.add_argument(
        "--embedder",
        default="hed-vgg",
        help="hed-vgg (offline, default), hed-vgg:SIZE or clip:FOLDER (local CLIP vision model)",
    )
    b.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "flat", "hnsw", "ivfpq"],
        help="FAISS index kind (auto: exact flat when small, HNSW, then IVF-PQ when large)",
    )
    b.add_argument(
        "--shard",
        default=None,
        metavar="RANK/WORLD",
        help="build only shard RANK of WORLD (merge the shards with `semsr index merge`)",
    )
    b.set_defaults(func=run_build)

    a = sub.add_parser("add", help="add images to an existing database (content already present is skipped)")
    a.add_argument("--db", required=True, type=Path, help="database folder")
    a.add_argument("--images", required=True, nargs="+", type=Path, help="image folder(s) or file(s)")
    a.set_defaults(func=run_add)

    i = sub.add_parser("info", help="summary of a database")
    i.add_argument("--db", required=True, type=Path, help="database folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run_info)

    s = sub.add_parser("search", help="the K database images nearest to an image")
    s.add_argument("image", type=Path, help="query image")
    s.add_argument("--db", required=True, type=Path, help="database folder")
    s.add_argument("-k", type=int, default=4, help="number of results (default 4)")
    s.add_argument(
        "--aligner",
        default=None,
        help="embed the query with a Reference-Finding Aligner folder (for LR queries; `semsr train` final/aligner); "
        "'default' = the shipped one for the database's embedder",
    )
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=run_search)

    m = sub.add_parser("merge", help="merge shard databases into one")
    m.add_argument("shards", nargs="+", type=Path, help="shard database folders")
    m.add_argument("--out", required=True, type=Path, help="merged database folder (created or extended)")
    m.add_argument("--kind", default=None, choices=["auto", "flat", "hnsw", "ivfpq"], help="index kind")
    m.set_defaults(func=run_merge)

    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _collect(paths: list[Path]) -> list[Path]:
    """The image files under ``paths`` (folders, recursively, or files); an error when there are none."""
    files: list[Path] = []
    for p in paths:
        files += list_image_files(p)
    if not files:
        raise SemsrError("no images found", " ".join(map(str, paths)))
    return files


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        return rank, world
    try:
        rank, world = (int(v) for v in text.split("/"))
    except ValueError:
        raise SemsrError(f"--shard must look like RANK/WORLD (e.g. 0/4), got {text!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise SemsrError(f"--shard rank must be in 0..WORLD-1, got {text!r}")
    return rank, world


def _fill(db_path: Path, files: list[Path], embedder_spec: str | None, kind: str = "auto") -> dict:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    with _open_or_create(db_path, embedder_spec, kind) as db:
        emb = embedder_from_spec(db.embedder_spec)

        def report(path: Path, err: Exception) -> None:
            print(f"semsr: warning: {err}", file=sys.stderr)

        def progress(i: int, n: int) -> None:
            if sys.stderr.isatty():
                print(f"\rembedding {i}/{n}", end="" if i < n else "\n", file=sys.stderr)

        counts = add_images(db, files, emb, on_error=report, progress=progress)
        counts["total"] = len(db)
    return counts


def _open_or_create(path: Path, embedder_spec: str | None, kind: str) -> ReferenceDB:
    """The database at ``path`` (its embedder checked against ``embedder_spec``), or a new one with it."""
    if (path / "meta.sqlite").is_file():
        db = ReferenceDB(path)
        if embedder_spec is not None and embedder_from_spec(embedder_spec).spec != db.embedder_spec:
            db.close()
            raise SemsrError(
                f"database was built with embedder {db.embedder_spec!r}; use the same --embedder or a new --out", path
            )
        if kind != "auto" and kind != (db.meta("kind") or "auto"):
            db.set_kind(kind)
        return db
    spec = embedder_from_spec(embedder_spec).spec
    return ReferenceDB(path, create=True, embedder=spec, kind=kind)


def run_build(args: argparse.Namespace) -> int:
    files = _collect(args.images)
    rank, world = _parse_shard(args.shard)
    if world == 1:
        counts = _fill(args.out, files, args.embedder, args.kind)
        print(
            f"{args.out}: {counts['added']} added, {counts['duplicates']} duplicates skipped, "
            f"{counts['failed']} failed; {counts['total']} images"
        )
        return 1 if counts["failed"] and not counts["total"] else 0
    shard_dir = args.out.with_name(args.out.name + ".shards") / f"{rank:05d}-of-{world:05d}"
    counts = _fill(shard_dir, shard_files(files, rank, world), args.embedder, args.kind)
    print(f"{shard_dir}: {counts['added']} added, {counts['duplicates']} duplicates, {counts['failed']} failed")
    if args.shard is not None:  # manual sharding: the user merges later
        return 0
    from accelerate import PartialState  # optional heavy dependency

    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        shards = [args.out.with_name(args.out.name + ".shards") / f"{r:05d}-of-{world:05d}" for r in range(world)]
        merged = merge_databases(args.out, shards, kind=args.kind)
        print(f"{args.out}: merged {world} shards, {merged['added']} added, {merged['duplicates']} duplicates")
    state.wait_for_everyone()
    return 0


def run_add(args: argparse.Namespace) -> int:
    if not (args.db / "meta.sqlite").is_file():
        raise SemsrError("not a reference database; create it with `semsr index build`", args.db)
    counts = _fill(args.db, _collect(args.images), None)
    print(
        f"{args.db}: {counts['added']} added, {counts['duplicates']} duplicates skipped, "
        f"{counts['failed']} failed; {counts['total']} images"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    with ReferenceDB(args.db) as db:
        info = db.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:14s} {v}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise SemsrError(f"-k must be at least 1, got {args.k}")
    with ReferenceDB(args.db) as db:
        img = load_rgb(args.image)
        query = _query_vector(img, db.embedder_spec, args.aligner)
        hits = db.search(query, args.k)[0]
    if args.json:
        print(
            json.dumps(
                {"query": str(args.image), "db": str(args.db), "k": args.k, "results": [h.as_dict() for h in hits]},
                indent=2,
            )
        )
    else:
        for h in hits:
            print(f"{h.rank:3d}  {h.score:.4f}  {h.entry.path}")
    return 0


def _query_vector(img: torch.Tensor, embedder_spec: str, aligner: str | None) -> np.ndarray:
    """Search vector ``(1, D)`` of ``img`` ``(1, 3, H, W)``: its embedding, or the aligner's prediction."""
    emb = embedder_from_spec(embedder_spec)
    if aligner is None:
        with torch.inference_mode():
            return emb.embed(img).numpy()
    folder = aligner_dir(aligner, embedder_spec)
    model = load_component(ReferenceFindingAligner, folder)
    check_embedder(model, emb, folder)
    with torch.inference_mode():
        return model.query(emb, img).numpy()


def run_merge(args: argparse.Namespace) -> int:
    counts = merge_databases(args.out, args.shards, kind=args.kind)
    print(f"{args.out}: {counts['added']} added, {counts['duplicates']} duplicates skipped")
    return 0
