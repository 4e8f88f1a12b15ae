"""``semsr priors``: extract priors (edges, depth, segmentation, captions...) from images.

    semsr priors -i photo.png                              # canny + hed -> priors/photo_canny.png ...
    semsr priors -i $SEMSR_DATA/benchmarks/Set5 --modalities canny,hed -o out
    semsr priors -i lr/ --modalities depth,seg --depth-model ~/models/dpt --seg-model ~/models/segformer
    semsr priors --list                                    # what can be extracted here

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

from semsr.commands.upscale import collect_inputs
from semsr.core.errors import InputError, SemsrError
from semsr.core.fingerprint import image_key
from semsr.core.io import atomic_write, read_image
from semsr.eval.atomic import write_json, write_png
from semsr.priors.base import (
    PriorProvider,
    ProviderSpec,
    cached,
    picture_tensor,
    provider_specs,
    resolve_provider,
    spatial_to_uint8,
)

DEFAULT_MODALITIES = "canny,hed"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "priors",
        help="extract priors (edges, depth, segmentation, ...) from images",
        description="Extract priors from an image, a folder of images or a glob, write spatial maps as PNG "
        "and everything (with metadata) into a JSON index. `semsr priors --list` shows the "
        "available priors.",
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
