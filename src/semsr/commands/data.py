"""``semsr data``: assemble the offline training corpus and inspect its manifest.

Examples::

    semsr data build-corpus --out corpus --sources bsds500,lxqt,palapeli
    semsr data build-corpus --out corpus --max-side 2048        # all sources
    semsr data summary corpus

``build-corpus`` fetches each source (Debian packages by ``apt-get download`` +
``dpkg -x``, the scikit-image wheel by ``pip download --no-deps``; cached
under ``<cache>/corpus``), extracts the photographs (also from ``.edj`` and
``.rcc`` containers), applies EXIF orientation, downscales GCompris photos 2x
and anything longer than ``--max-side``, and writes them under
``OUT/<source>/`` — JPEGs that need no change are copied byte for byte, the
rest become PNG — with ``OUT/manifest.sqlite`` recording package, version,
path inside the package, container member, sizes and licence for each file.
Images identical to a benchmark image (Set5/Set14/B100/Urban100) are refused.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from semsr.core.errors import InputError, SemsrError
from semsr.core.io import IMAGE_EXTENSIONS, atomic_write_bytes
from semsr.core.paths import cache_dir, data_root
from semsr.data.corpus.crops import DEFAULT_CROP, DEFAULT_MIN_TEXTURE, load_rgb_uint8, sample_crop_boxes, texture_score
from semsr.data.corpus.manifest import Manifest, content_hash
from semsr.data.corpus.sources import DEFAULT_SOURCES, SOURCES, Candidate, iter_source, normalise_licence
from semsr.train.config import load_config
from semsr.train.data import expand_path, list_images, make_degrader
from semsr.train.pairs import make_pairs

BENCHMARKS = ("Set5", "Set14", "B100", "Urban100")
MANIFEST_NAME = "manifest.sqlite"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="training corpus: build it, inspect its manifest")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    b = sub.add_parser("build-corpus", help="fetch and extract the offline training photographs")
    b.add_argument("--out", required=True, help="corpus folder (images + manifest.sqlite)")
    b.add_argument(
        "--sources",
        default=",".join(DEFAULT_SOURCES),
        help=f"comma-separated sources (default: all of {','.join(DEFAULT_SOURCES)})",
    )
    b.add_argument("--max-side", type=int, default=0, help="downscale images whose longer side exceeds N (0: keep)")
    b.add_argument("--cache", help="download/unpack cache (default: <semsr cache>/corpus)")
    b.add_argument("--json", metavar="PATH", help="also write the manifest summary as JSON")
    b.set_defaults(func=run_build)
    c = sub.add_parser("make-crops", help="cut textured HR crops from a corpus into a crop corpus (own manifest)")
    c.add_argument("corpus", help="corpus folder made by build-corpus")
    c.add_argument("--out", required=True, help="crop folder (PNG crops + manifest.sqlite)")
    c.add_argument("--size", type=int, default=DEFAULT_CROP, help=f"crop size (default {DEFAULT_CROP})")
    c.add_argument("--per-image", type=int, default=4, help="crops per image (default 4)")
    c.add_argument(
        "--min-texture",
        type=float,
        default=DEFAULT_MIN_TEXTURE,
        help=f"reject crops whose mean luma gradient is below this (default {DEFAULT_MIN_TEXTURE})",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--sources", help="comma-separated sources to use (default: all in the manifest)")
    c.set_defaults(func=run_crops)
    m = sub.add_parser(
        "make-pairs", help="write K deterministic degraded LR images per HR image (paired training data)"
    )
    m.add_argument("--out", required=True, help="pairs folder (lr/*.png + pairs.jsonl)")
    m.add_argument("--config", help="training config: its data.hr/data.manifest, data.scale and degradation")
    m.add_argument("--hr", action="append", default=[], help="HR image folder (repeatable; {data} expands)")
    m.add_argument(
        "--degradation",
        choices=["realesrgan", "bicubic"],
        help="degradation (default: the config's, else realesrgan second order)",
    )
    m.add_argument("-s", "--scale", type=int, help="downscale factor (default: the config's data.scale, else 4)")
    m.add_argument("--per-image", type=int, default=4, help="LR variants per HR image (default 4)")
    m.add_argument("--seed", type=int, default=0, help="seed of the degradations (default 0)")
    m.set_defaults(func=run_make_pairs)
    s = sub.add_parser("summary", help="print the manifest summary of a corpus folder")
    s.add_argument("corpus", help="corpus folder or manifest.sqlite")
    s.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    s.set_defaults(func=run_summary)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


# ----------------------------------------------------------------------------- conversion


def benchmark_hashes(cache: Path) -> set[str]:
    """Content hashes of every benchmark image under the data root (empty when absent).

    Remembered in ``cache/benchmark_hashes.json`` by file name, size and mtime.
    """
    root = data_root()
    if root is None:
        return set()
    memo_path = cache / "benchmark_hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    fresh = {}
    for name in BENCHMARKS:
        folder = root / "benchmarks" / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            st = f.stat()
            key = f"{name}/{f.name}:{st.st_size}:{st.st_mtime_ns}"
            if key not in memo:
                with Image.open(f) as im:
                    memo[key] = content_hash(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
            fresh[key] = memo[key]
    if fresh:
        cache.mkdir(parents=True, exist_ok=True)
        _write(memo_path, json.dumps(fresh, indent=0).encode())
    return set(fresh.values())


def convert(c: Candidate, max_side: int) -> tuple[bytes, str, np.ndarray, dict]:
    """Decode, orient, downscale; returns ``(file bytes, extension, pixels, notes)``."""
    raw = c.load()
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except OSError as err:
        raise InputError(f"cannot decode {c.member or c.path_in_package} ({err})") from None
    fmt = im.format
    notes: dict = {"source_format": fmt, "source_size": list(im.size)}
    orientation = im.getexif().get(0x0112, 1)
    changed = orientation not in (None, 1)
    if changed:
        notes["exif_orientation_applied"] = int(orientation)
        im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":
        changed = True
        notes["converted_from_mode"] = im.mode
        im = im.convert("RGB")
    if c.downscale > 1:
        im = im.reduce(c.downscale)
        changed = True
        notes["downscaled"] = c.downscale
    if max_side and max(im.size) > max_side:
        f = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.LANCZOS)
        changed = True
        notes["resized_to_max_side"] = max_side
    pixels = np.asarray(im)
    if fmt == "JPEG" and not changed:
        return raw, ".jpg", pixels, notes
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), ".png", pixels, notes


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def build_corpus(out: Path, sources: list[str], max_side: int = 0, cache: Path | None = None, log=print) -> dict:
    """Fetch ``sources`` into ``out``; returns the manifest summary."""
    cache = cache or cache_dir() / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    refused = benchmark_hashes(cache)
    stats = {}
    with Manifest(out / MANIFEST_NAME) as manifest:
        for source in sources:
            added = skipped = kept = 0
            for c in iter_source(source, cache):
                licence = normalise_licence(c.licence)
                stem_dir = out / source
                existing = [manifest.find_path(f"{source}/{c.name}{ext}") for ext in (".jpg", ".png")]
                rec = next((r for r in existing if r is not None), None)
                if (
                    rec is not None
                    and (out / rec.path).exists()
                    and rec.source_bytes == c.source_bytes
                    and rec.member == c.member
                    and rec.extra.get("max_side", 0) == max_side
                ):
                    if (rec.licence, rec.licence_origin) != (licence, c.licence_origin):
                        manifest.update_licence(rec.content_hash, licence, c.licence_origin)
                    kept += 1
                    continue
                data, ext, pixels, notes = convert(c, max_side)
                key = content_hash(pixels)
                if key in refused:
                    log(f"  refused {source}/{c.name}: identical to a benchmark image")
                    skipped += 1
                    continue
                rel = f"{source}/{c.name}{ext}"
                for stale in existing:  # an earlier conversion of this photo (other size or format)
                    if stale is not None:
                        manifest.remove_image(stale.content_hash)
                        if stale.path != rel:
                            (out / stale.path).unlink(missing_ok=True)
                _write(stem_dir / f"{c.name}{ext}", data)
                manifest.add_image(
                    path=rel,
                    content_hash=key,
                    width=pixels.shape[1],
                    height=pixels.shape[0],
                    file_bytes=len(data),
                    source=source,
                    package=c.package,
                    package_version=c.package_version,
                    path_in_package=c.path_in_package,
                    member=c.member,
                    source_bytes=c.source_bytes,
                    licence=licence,
                    licence_origin=c.licence_origin,
                    extra={**notes, "max_side": max_side},
                )
                added += 1
            stats[source] = {"added": added, "unchanged": kept, "refused": skipped}
            log(f"{source}: {added} added, {kept} unchanged, {skipped} refused")
        summary = manifest.summary()
    summary["last_build"] = stats
    return summary


def format_summary(summary: dict) -> str:
    """A fixed-width table of a manifest summary."""
    lines = [f"{'source':<14}{'images':>7}{'MPix':>9}{'MiB':>9}{'min side':>9}{'max side':>9}  licences"]
    for name, s in summary["sources"].items():
        lic = ", ".join(f"{k} x{v}" for k, v in s["licences"].items())
        lines.append(
            f"{name:<14}{s['images']:>7}{s['megapixels']:>9.1f}{s['bytes'] / 2**20:>9.1f}"
            f"{s['min_side']:>9}{s['max_side']:>9}  {lic}"
        )
    total_mp = sum(s["megapixels"] for s in summary["sources"].values())
    total_b = sum(s["bytes"] for s in summary["sources"].values())
    lines.append(f"{'total':<14}{summary['images']:>7}{total_mp:>9.1f}{total_b / 2**20:>9.1f}")
    if summary.get("priors"):
        lines.append("priors: " + ", ".join(f"{k} x{v}" for k, v in summary["priors"].items()))
    return "\n".join(lines)


def _emit(summary: dict, json_path: str | None) -> None:
    print(format_summary(summary))
    if json_path:
        atomic_write_bytes(Path(json_path), (json.dumps(summary, indent=1) + "\n").encode())


def run_build(args: argparse.Namespace) -> int:
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise SemsrError(f"unknown source(s) {unknown}; known: {', '.join(SOURCES)}")
    if args.max_side < 0:
        raise SemsrError(f"--max-side must be >= 0, got {args.max_side}")
    out = Path(args.out)
    root = data_root()
    if root is not None and out.resolve().is_relative_to((root / "benchmarks").resolve()):
        raise SemsrError("refusing to write a training corpus inside the benchmark folder", out)
    summary = build_corpus(out, sources, args.max_side, Path(args.cache) if args.cache else None)
    _emit(summary, args.json)
    return 0


def make_crops(
    corpus: Path,
    out: Path,
    size: int,
    per_image: int,
    min_texture: float,
    seed: int,
    sources: list[str] | None = None,
    log=print,
) -> dict:
    """Cut ``per_image`` textured ``size``-crops from each corpus image (smaller images are skipped).

    Crops get their own content hashes (so priors are cached per crop) and
    inherit the provenance and licence of their image; ``extra`` records the
    parent hash, the box and the texture score. Positions depend only on
    ``(seed, parent hash)``, so re-running reproduces the same crops.
    """
    src = Manifest(corpus / MANIFEST_NAME, readonly=True)
    out.mkdir(parents=True, exist_ok=True)
    made = skipped = used = 0
    with src, Manifest(out / MANIFEST_NAME) as dst:
        for rec in src.images():
            if sources and rec.source not in sources:
                continue
            used += 1
            if min(rec.width, rec.height) < size:
                skipped += 1
                continue
            img = load_rgb_uint8(corpus / rec.path)
            rng = np.random.default_rng([seed, int(rec.content_hash[:15], 16)])
            for i, (top, left) in enumerate(sample_crop_boxes(img, size, per_image, rng, min_texture)):
                patch = np.ascontiguousarray(img[top : top + size, left : left + size])
                buf = io.BytesIO()
                Image.fromarray(patch).save(buf, format="PNG", compress_level=6)
                rel = f"{rec.source}/{Path(rec.path).stem}_{i}.png"
                _write(out / rel, buf.getvalue())
                dst.add_image(
                    path=rel,
                    content_hash=content_hash(patch),
                    width=size,
                    height=size,
                    file_bytes=len(buf.getvalue()),
                    source=rec.source,
                    package=rec.package,
                    package_version=rec.package_version,
                    path_in_package=rec.path_in_package,
                    member=rec.member,
                    source_bytes=rec.source_bytes,
                    licence=rec.licence,
                    licence_origin=rec.licence_origin,
                    split=rec.split,
                    extra={
                        "parent": rec.content_hash,
                        "parent_path": rec.path,
                        "box": [top, left, size],
                        "texture": round(texture_score(patch), 3),
                    },
                )
                made += 1
        log(f"{made} crops from {used - skipped} images; {skipped} images smaller than {size} skipped")
        return dst.summary()


def run_crops(args: argparse.Namespace) -> int:
    corpus = Path(args.corpus)
    if not (corpus / MANIFEST_NAME).exists():
        raise InputError("no corpus manifest here (run `semsr data build-corpus` first)", corpus)
    if args.size < 8 or args.per_image < 1:
        raise SemsrError("--size must be >= 8 and --per-image >= 1")
    sources = [s.strip() for s in args.sources.split(",")] if args.sources else None
    summary = make_crops(corpus, Path(args.out), args.size, args.per_image, args.min_texture, args.seed, sources)
    _emit(summary, None)
    return 0


def run_make_pairs(args: argparse.Namespace) -> int:
    """``semsr data make-pairs``: HR images from ``--hr``/``--config``, degradation from the flags or the config."""
    degradation: dict = {}
    scale, files = 4, []
    if args.config:
        cfg = load_config(args.config)
        degradation, scale = dict(cfg.degradation), cfg.data.scale
        if not args.hr:
            train, val = list_images(cfg.data, 1)
            files = [item.path for item in train + val]
    if args.degradation and args.degradation != degradation.get("type", "realesrgan"):
        degradation = {"type": args.degradation}
    scale = args.scale or scale
    if args.scale and degradation.get("scale") not in (None, args.scale):
        degradation = {**degradation, "scale": args.scale}
    for folder in args.hr:
        root = expand_path(folder)
        if not root.is_dir():
            raise InputError("HR folder not found", root)
        files += [p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise SemsrError("no HR images: pass --hr FOLDER or --config with data.hr / data.manifest")
    kind = degradation.get("type", "realesrgan")
    counts = make_pairs(
        files,
        Path(args.out),
        degrade=make_degrader(degradation, scale),
        degradation=kind,
        scale=scale,
        per_image=args.per_image,
        seed=args.seed,
    )
    print(
        f"{counts['images']} HR images x {args.per_image} ({kind}, x{scale}): {counts['written']} LR written, "
        f"{counts['kept']} kept from an earlier run, {counts['failed']} images failed -> {Path(args.out) / 'pairs.jsonl'}"
    )
    return 1 if counts["failed"] else 0


def run_summary(args: argparse.Namespace) -> int:
    path = Path(args.corpus)
    path = path / MANIFEST_NAME if path.is_dir() else path
    if not path.exists():
        raise InputError("no corpus manifest here", path)
    with Manifest(path, readonly=True) as m:
        _emit(m.summary(), args.json)
    return 0
