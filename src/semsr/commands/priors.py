"""``semsr priors``: extract priors (edges, depth, segmentation, captions...) from images.

    semsr priors -i photo.png                              # canny + hed -> priors/photo_canny.png ...
    semsr priors -i $SEMSR_DATA/benchmarks/Set5 --modalities canny,hed -o out
    semsr priors -i lr/ --modalities depth,seg --depth-model ~/models/dpt --seg-model ~/models/segformer
    semsr priors --list                                    # what can be extracted here
    semsr priors build --recipe xpsr --pairs PAIRS -o STORE --vlm VLM --device cuda   # training priors

``semsr priors build`` computes every prior a recipe's training reads, once per image, into one
prior store (:mod:`semsr.priors.cache`; training reads it with ``data.priors: STORE``). The images
are the HR and LR files of a pairs folder (``--pairs``, from ``semsr data make-pairs``) or HR
images (``-i``; HR priors only). What each recipe needs (:data:`RECIPE_PRIORS`): ``xpsr`` the
caption and quality answer of each HR image and the quality answer of each LR file; ``dalpsr``
the caption of each HR image and IRPAD's description of each LR file; ``mmsr`` the edge (canny),
depth and segmentation maps of each LR file bicubic-upsampled to its HR size (the size at which
training extracts them; a crop of the map is what training tokenizes); ``rfa`` the ``--db`` database
embedder's embedding of each HR image and LR file, its tokens of each LR file and database image, and
the ``--num-refs`` references retrieved for each LR file (through ``--aligner``); ``coser`` the pooled
CLIP embedding (``--clip``) and CLIP neighbours of each HR image and the frozen cognitive encoder's
(``--cognitive``) embedding of each LR file. Images are processed in
batches of ``--batch-size``, each batch committed at once; a killed build is resumed by running it
again (priors already stored are not recomputed). Under ``accelerate launch`` every process takes
its share of the images and writes into the same store (:mod:`semsr.commands.shard`).

The command is generic over the provider registry (:mod:`semsr.priors.base`):
every registered provider can be named in ``--modalities`` and its options
(``ProviderSpec.options``) appear as flags here. Spatial priors are written as
PNG ``<out>/<stem>_<name>.png`` (grey for 1-channel maps, RGB for colourised
ones), embeddings as ``<out>/<stem>_<name>.npy``; text and tag priors, the thresholds and other metadata of every prior go
into the JSON index (``<out>/priors.json`` unless ``--json``). Results are
cached (``semsr.core.paths.cache_dir()/priors``), so a re-run is fast; ``--no-cache``
recomputes. A bad input is reported and the run goes on; the exit code is
non-zero when any input failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from semsr.commands.shard import Shard
from semsr.commands.upscale import collect_inputs
from semsr.core.errors import InputError, SemsrError
from semsr.core.fingerprint import image_key
from semsr.core.io import atomic_write, read_image
from semsr.eval.atomic import write_json, write_png
from semsr.pipeline.latent_sr import make_hint
from semsr.priors.base import (
    PriorProvider,
    PriorResult,
    ProviderSpec,
    cached,
    picture_tensor,
    provider_specs,
    resolve_provider,
    spatial_to_uint8,
)
from semsr.priors.cache import PriorStore, image_id
from semsr.priors.clip_embed import COSER_NEIGHBOURS, RFA_REFS
from semsr.priors.retrieval.embedders import embedder_from_spec
from semsr.priors.retrieval.index import ReferenceDB, file_sha256
from semsr.priors.retrieval.references import ReferenceTokens
from semsr.testing.tiny import resolve_model_path
from semsr.train.pairs import read_pairs
from semsr.train.rfa import aligner_fingerprint, load_aligner, resolve_embedder_spec

DEFAULT_MODALITIES = "canny,hed"


#: Per recipe: the priors of each image kind (``hr``: HR files, ``lr``: LR files, ``lr_up``: LR files
#: bicubic-upsampled to their HR size, ``db``: the images of the ``--db`` reference database), by provider
#: name. ``rfa`` also stores ``rfa-refs`` per LR file and ``coser`` ``coser-neighbours`` per HR image
#: (:func:`rfa_references`, :func:`coser_neighbours`).
RECIPE_PRIORS: dict[str, dict[str, tuple[str, ...]]] = {
    "xpsr": {"hr": ("caption", "quality"), "lr": ("quality",)},
    "dalpsr": {"hr": ("caption",), "lr": ("irpad",)},
    "mmsr": {"lr_up": ("canny", "depth", "seg")},
    "rfa": {"hr": ("rfa-embed",), "lr": ("rfa-embed", "rfa-tokens"), "db": ("rfa-tokens",)},
    "coser": {"hr": ("coser-clip",), "lr": ("coser-cognitive",)},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "priors",
        help="extract priors (edges, depth, segmentation, ...) from images",
        description="Extract priors from an image, a folder of images or a glob, write spatial maps as PNG "
        "and everything (with metadata) into a JSON index. `semsr priors --list` shows the "
        "available priors.",
    )
    p.add_argument(
        "action", nargs="?", choices=["build"], help="build: compute a recipe's training priors into a prior store"
    )
    p.add_argument("-i", "--input", nargs="+", metavar="FILE|DIR", help="input image(s), folder(s) or glob(s)")
    p.add_argument("-o", "--output", type=Path, default=Path("priors"), help="output folder (default: ./priors)")
    p.add_argument(
        "--modalities",
        default=DEFAULT_MODALITIES,
        help=f"comma-separated priors to extract (default: {DEFAULT_MODALITIES}; see --list)",
    )
    p.add_argument("--json", type=Path, default=None, help="JSON index path (default: <output>/priors.json)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of using the prior cache")
    p.add_argument("--list", action="store_true", help="list the available priors and exit")
    b = p.add_argument_group("priors build")
    b.add_argument("--recipe", choices=sorted(RECIPE_PRIORS), help="the recipe whose training priors to build")
    b.add_argument("--pairs", type=Path, help="pairs folder of semsr data make-pairs (its HR and LR files)")
    b.add_argument("--batch-size", type=int, default=8, help="images per committed batch (default: 8)")
    b.add_argument("--db", type=Path, help="rfa: the reference database (semsr index build) to retrieve from")
    b.add_argument("--aligner", help="rfa: the rfa-aligner run's final/aligner (or default) that makes the query")
    b.add_argument("--no-aligner", action="store_true", help="rfa: query with the raw LR embedding")
    b.add_argument(
        "--num-refs", type=int, default=4, help="rfa: references stored per LR file (default: 4, the enhancer's)"
    )
    b.add_argument(
        "--neighbours", type=int, default=32, help="coser: CLIP neighbours stored per HR image (default: 32)"
    )
    group = p.add_argument_group("prior options")
    seen: set[str] = set()
    for spec in provider_specs():
        for opt in spec.options:
            if opt.flag in seen:
                continue
            seen.add(opt.flag)
            group.add_argument(
                opt.flag, dest=_dest(opt.flag), type=opt.type, default=None, help=opt.help, metavar=opt.name.upper()
            )
    p.set_defaults(func=run)


def _dest(flag: str) -> str:
    return "prior_" + flag.lstrip("-").replace("-", "_")


def provider_options(args: argparse.Namespace, spec: ProviderSpec) -> dict[str, Any]:
    """The factory keyword arguments of ``spec`` that were given on the command line."""
    opts = {}
    for opt in spec.options:
        value = getattr(args, _dest(opt.flag), None)
        if isinstance(value, str) and value.startswith("tiny://"):
            value = str(resolve_model_path(value))
        if value is not None:
            opts[opt.name] = value
    return opts


def _print_list() -> None:
    for spec in provider_specs():
        flags = " ".join(o.flag for o in spec.options)
        print(f"{spec.name:<12} {spec.kind:<10} {spec.summary}" + (f"  [{flags}]" if flags else ""))


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())


def run(args: argparse.Namespace) -> int:
    if args.list:
        _print_list()
        return 0
    if args.action == "build":
        return build(args)
    if not args.input:
        raise SemsrError("no input: give -i FILE|DIR (or --list)")
    names = [n.strip() for n in args.modalities.split(",") if n.strip()]
    if not names:
        raise SemsrError("--modalities is empty")
    files, unmatched = collect_inputs(args.input)
    for pattern in unmatched:
        print(f"semsr: warning: {pattern}: no file matches", file=sys.stderr)
    if not files:
        raise InputError("no input images found", " ".join(args.input))
    specs = [resolve_provider(n) for n in dict.fromkeys(names)]
    providers: list[PriorProvider] = []
    for spec in specs:  # build all first: a missing model fails before any work
        provider = spec.factory(**provider_options(args, spec))
        providers.append(provider if args.no_cache else cached(provider))

    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path: Path = args.json or out_dir / "priors.json"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    failed = 0
    for src in files:
        try:
            image = picture_tensor(read_image(src))
            entry: dict[str, Any] = {
                "input": str(src),
                "width": int(image.shape[-1]),
                "height": int(image.shape[-2]),
                "image_key": image_key(image),
                "priors": {},
            }
            for prov in providers:
                result = prov(image)
                item: dict[str, Any] = {"kind": result.kind, "version": prov.version, "meta": dict(result.meta)}
                if result.kind == "spatial":
                    target = out_dir / f"{src.stem}_{prov.name}.png"
                    write_png(target, spatial_to_uint8(result.value))  # type: ignore[arg-type]
                    item["file"] = _relative(target, index_path.parent)
                    item["channels"] = int(result.value.shape[1])  # type: ignore[union-attr]
                elif result.kind == "embedding":
                    target = out_dir / f"{src.stem}_{prov.name}.npy"
                    with atomic_write(target) as tmp, open(tmp, "wb") as fh:
                        np.save(fh, result.value.detach().cpu().numpy())  # type: ignore[union-attr]
                    item["file"] = _relative(target, index_path.parent)
                    item["shape"] = list(result.value.shape)  # type: ignore[union-attr]
                else:
                    item["value"] = list(result.value) if result.kind == "tags" else result.value
                entry["priors"][prov.name] = item
            entries.append(entry)
            print(f"{src}: " + ", ".join(entry["priors"]), flush=True)
        except SemsrError as err:
            failed += 1
            if len(files) == 1:
                raise
            print(f"semsr: error: {err}", file=sys.stderr)
    write_json(
        index_path,
        {
            "providers": {p.name: {"kind": p.kind, "version": p.version} for p in providers},
            "images": entries,
        },
    )
    return 1 if failed else 0


def _build_images(
    args: argparse.Namespace, need: dict[str, tuple[str, ...]]
) -> dict[str, list[tuple[Path, Path | None]]]:
    """Per image kind (``hr`` / ``lr`` / ``lr_up`` / ``db``) the ``(file, its HR file)`` to process."""
    if args.pairs is not None:
        pairs = read_pairs(args.pairs)
        hrs = list(pairs)
        lrs = [(lr, hr) for hr, lr_files in pairs.items() for lr in lr_files]
    elif args.input:
        files, unmatched = collect_inputs(args.input)
        for pattern in unmatched:
            print(f"semsr: warning: {pattern}: no file matches", file=sys.stderr)
        hrs, lrs = files, []
    else:
        raise SemsrError("priors build needs --pairs PAIRS (or -i HR images for HR priors only)")
    if not args.pairs and any(k in ("lr", "lr_up") for k in need):
        raise SemsrError(
            f"recipe {args.recipe} needs priors of LR files: give --pairs (from semsr data make-pairs); "
            "LR images degraded on the fly during training have no file to cache priors for"
        )
    images: dict[str, list[tuple[Path, Path | None]]] = {"hr": [(h, None) for h in hrs], "lr": lrs, "lr_up": lrs}
    if "db" in need:
        with ReferenceDB(args.db) as db:
            images["db"] = [(Path(e.path), None) for e in db.entries()]
    return images


def _load(kind: str, path: Path, hr: Path | None) -> torch.Tensor:
    """``(1, 3, H, W)`` in [0, 1]: the image, or (``lr_up``) the LR bicubic-upsampled to its HR size."""
    image = picture_tensor(read_image(path))
    if kind != "lr_up":
        return image
    assert hr is not None
    with Image.open(hr) as im:
        w, h = im.size
    s = w // image.shape[-1]
    return make_hint(image, (image.shape[-2] * s, image.shape[-1] * s))


def _recipe_options(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """The recipe's priors per image kind, checked against the recipe's flags (rfa: ``--db``, its embedder;
    coser: ``--clip``, and ``--cognitive`` for the LR priors)."""
    need = dict(RECIPE_PRIORS[args.recipe])
    if args.recipe == "rfa":
        if args.db is None:
            raise SemsrError("priors build --recipe rfa needs --db (the reference database, semsr index build)")
        if not args.no_aligner and not args.aligner:
            raise SemsrError("priors build --recipe rfa needs --aligner (final/aligner or default) or --no-aligner")
        if args.no_aligner and args.aligner:
            raise SemsrError("--aligner and --no-aligner contradict each other")
        if args.num_refs < 1:
            raise SemsrError(f"--num-refs must be >= 1, got {args.num_refs}")
        with ReferenceDB(args.db) as db:
            spec = db.embedder_spec
        given = getattr(args, _dest("--embedder"), None)
        if given and resolve_embedder_spec(str(given)) != spec:
            raise SemsrError(f"--embedder {given} differs from the database's embedder {spec}", args.db)
        setattr(args, _dest("--embedder"), spec)
    if args.recipe == "coser":
        if args.neighbours < 1:
            raise SemsrError(f"--neighbours must be >= 1, got {args.neighbours}")
        if not getattr(args, _dest("--cognitive"), None):
            print(
                "semsr: note: no --cognitive: the cognitive embeddings of the LR files are not stored "
                "(training then needs model.options.lr_embedding: crop)",
                file=sys.stderr,
            )
            need.pop("lr")
    return need


def build(args: argparse.Namespace) -> int:
    """``semsr priors build`` (module docstring); 0 when every image has its priors, 1 when some failed."""
    if args.recipe is None:
        raise SemsrError("priors build needs --recipe (one of " + ", ".join(sorted(RECIPE_PRIORS)) + ")")
    if args.batch_size < 1:
        raise SemsrError(f"--batch-size must be >= 1, got {args.batch_size}")
    shard = Shard.from_env()
    need = _recipe_options(args)
    images = _build_images(args, need)
    store = PriorStore(args.output, create=True)
    providers: dict[str, PriorProvider] = {}
    for name in dict.fromkeys(n for names in need.values() for n in names):  # a missing model fails first
        spec = resolve_provider(name)
        providers[name] = spec.factory(**provider_options(args, spec))
    counts = {"computed": 0, "kept": 0, "failed": 0}
    for kind, names in need.items():
        done = {n: store.done(n) for n in names}
        todo: list[tuple[Path, Path | None, list[str]]] = []
        for path, hr in shard.take(images[kind], key=lambda item: str(item[0])):
            missing = [n for n in names if image_id(path) not in done[n]]
            counts["kept"] += len(names) - len(missing)
            if missing:
                todo.append((path, hr, missing))
        for start in range(0, len(todo), args.batch_size):
            rows = []
            batched = [n for n in names if hasattr(providers[n], "many")]  # one model pass for the batch
            loaded: list[tuple[Path, torch.Tensor, list[str]]] = []
            for path, hr, missing in todo[start : start + args.batch_size]:
                try:
                    image = _load(kind, path, hr)
                    rows += [(path, n, providers[n](image)) for n in missing if n not in batched]
                    loaded.append((path, image, missing))
                except SemsrError as err:
                    counts["failed"] += 1
                    print(f"semsr: error: {err}", file=sys.stderr)
            for name in batched:
                group = [(path, image) for path, image, missing in loaded if name in missing]
                rows += _batched_rows(providers[name], name, group, counts)
            counts["computed"] += store.put_many(rows)
            print(f"{kind}: {min(start + args.batch_size, len(todo))}/{len(todo)} images", flush=True)
    if args.recipe == "rfa":
        lrs = shard.take(images["lr"], key=lambda item: str(item[0]))
        _add_counts(counts, rfa_references(store, lrs, args))
    store.close()
    print(
        f"rank {shard.rank}/{shard.world}: computed {counts['computed']}, kept {counts['kept']}, "
        f"failed {counts['failed']} priors -> {args.output}",
        flush=True,
    )
    shard.wait()
    if shard.main:
        if args.recipe == "coser":  # needs every HR embedding: after all processes are done
            with PriorStore(args.output) as main_store:
                made = coser_neighbours(main_store, [p for p, _ in images["hr"]], args.neighbours, args.batch_size)
            print(f"coser-neighbours: computed {made['computed']}, kept {made['kept']}", flush=True)
            counts["failed"] += made["failed"]
        summary = PriorStore(args.output).describe()
        print("store: " + ", ".join(f"{k} {v}" for k, v in summary["priors"].items()) + f"; {summary['bytes']} bytes")
    return 1 if counts["failed"] else 0


def _batched_rows(
    provider: PriorProvider, name: str, group: list[tuple[Path, torch.Tensor]], counts: dict[str, int]
) -> list[tuple[Path, str, PriorResult]]:
    """``(file, prior, result)`` rows of ``group`` from one ``provider.many`` call; when that fails, image by
    image, so one bad image fails alone (counted in ``counts``)."""
    if not group:
        return []
    try:
        results = provider.many([image for _, image in group])  # type: ignore[attr-defined]
        return [(path, name, result) for (path, _), result in zip(group, results, strict=True)]
    except SemsrError:
        rows = []
        for path, image in group:
            try:
                rows.append((path, name, provider(image)))
            except SemsrError as err:
                counts["failed"] += 1
                print(f"semsr: error: {err}", file=sys.stderr)
        return rows


def _add_counts(counts: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        counts[key] += value


def rfa_references(store: PriorStore, lrs: list[tuple[Path, Path | None]], args: argparse.Namespace) -> dict[str, int]:
    """Store ``rfa-refs`` of each LR file in ``lrs`` that has none: the ``--num-refs`` database images retrieved
    with its stored ``rfa-embed`` / ``rfa-tokens`` (through ``--aligner``, or raw under ``--no-aligner``), its
    HR file's database entry skipped (as training's ``exclude_self``), best first, as store image ids.

    The query is built from the whole LR image's embedding (what training reads from the store)."""
    counts = {"computed": 0, "kept": 0, "failed": 0}
    done = store.done(RFA_REFS)
    todo = [(lr, hr) for lr, hr in lrs if image_id(lr) not in done]
    counts["kept"] = len(lrs) - len(todo)
    if not todo:
        return counts
    db = ReferenceDB(args.db)
    embedder = embedder_from_spec(db.embedder_spec)
    aligner = None if args.no_aligner else load_aligner(args.aligner, embedder).float().eval()
    refs = ReferenceTokens(db, embedder, aligner, args.num_refs)
    meta = {
        "db": str(Path(args.db).resolve()),
        "aligner": aligner_fingerprint(None if aligner is None else args.aligner, db.embedder_spec),
        "num_refs": args.num_refs,
        "exclude_self": True,
        "embedder": db.embedder_spec,
    }
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        rows = []
        for lr, hr in batch:
            try:
                vec = torch.from_numpy(np.array(store.array(lr, "rfa-embed")))[None]
                tok = torch.from_numpy(np.array(store.array(lr, "rfa-tokens")))[None]
                (hits,) = refs.search(tok, vec, [file_sha256(hr) if hr is not None else None])
                if len(hits) < args.num_refs:
                    raise SemsrError(f"the database has only {len(hits)} references for this image", lr)
                ids = tuple(image_id(h.entry.path) for h in hits)
                rows.append((lr, RFA_REFS, PriorResult("tags", ids, {**meta, "scores": [h.score for h in hits]})))
            except SemsrError as err:
                counts["failed"] += 1
                print(f"semsr: error: {err}", file=sys.stderr)
        counts["computed"] += store.put_many(rows)
        print(f"{RFA_REFS}: {min(start + args.batch_size, len(todo))}/{len(todo)} images", flush=True)
    db.close()
    return counts


def coser_neighbours(store: PriorStore, hrs: list[Path], top: int, batch: int = 256) -> dict[str, int]:
    """Store ``coser-neighbours`` of each HR image in ``hrs`` that has none: the ``top`` other images of
    ``hrs`` most similar by their stored ``coser-clip`` embeddings (cosine), best first, as store image ids.

    Training narrows each list to its training images (and, with class folders, to the same class); an
    image added to the corpus later is not in the lists of images stored before it (rebuild the store)."""
    counts = {"computed": 0, "kept": 0, "failed": 0}
    done = store.done(COSER_NEIGHBOURS)
    todo = [i for i, p in enumerate(hrs) if image_id(p) not in done]
    counts["kept"] = len(hrs) - len(todo)
    if not todo:
        return counts
    try:
        emb = torch.stack([torch.from_numpy(np.array(store.array(p, "coser-clip"))).float() for p in hrs])
    except SemsrError as err:
        print(f"semsr: error: {err}", file=sys.stderr)
        counts["failed"] = len(todo)
        return counts
    emb = torch.nn.functional.normalize(emb, dim=-1)
    ids = [image_id(p) for p in hrs]
    k = min(int(top), len(hrs) - 1)
    for start in range(0, len(todo), max(1, batch)):
        rows_idx = todo[start : start + max(1, batch)]
        sims = emb[rows_idx] @ emb.T
        sims[torch.arange(len(rows_idx)), torch.tensor(rows_idx)] = -float("inf")  # never the image itself
        best = sims.topk(k, dim=1) if k > 0 else None
        rows = []
        for r, i in enumerate(rows_idx):
            picked = best.indices[r].tolist() if best is not None else []
            scores = best.values[r].tolist() if best is not None else []
            value = tuple(ids[j] for j in picked)
            rows.append((hrs[i], COSER_NEIGHBOURS, PriorResult("tags", value, {"pool": len(hrs), "scores": scores})))
        counts["computed"] += store.put_many(rows)
    return counts
