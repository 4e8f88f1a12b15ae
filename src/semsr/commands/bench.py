"""``semsr bench``: run methods over benchmark sets, print the table, write JSON/CSV/report.

    semsr bench --methods bicubic --datasets Set5,Set14 --degradation bicubic --scale 4 --json r.json
    semsr bench --methods bicubic,realesrgan-x4plus --datasets Set5,RealSRSet \\
        --degradation realesrgan --report report/
    semsr bench --methods bicubic --datasets ~/my_hr_photos,lr:~/old_scans --metrics psnry,ssim,niqe
    semsr bench --methods default,default[steps=1],default[no_edge_prior],default[steps=8,seed=3],realesrgan-x4plus \\
        --datasets Set5 --limit 2

Method variants: an entry may carry options in brackets, NAME[KEY=VALUE,...]
(quote the list in the shell). A bare KEY means true; values are read by the
method's options class like the flags of `semsr upscale -n NAME` (which lists
them with -h), so a misspelt option is one line naming the closest one. The
entry's options override --method-opt; build options (checkpoint, stage1,
dtype...) configure how the method is built, run options (steps, seed,
no_edge_prior...) are passed on every image. Each entry is its own row
(``default[steps=1]``) and its own cache entry;
``default-diffusion[checkpoint=RUN/final]`` benches a training run.

Kinds: ``semsr bench KIND ...`` runs another benchmark (``semsr bench KIND -h``);
without a kind it is the SR benchmark described here.

Datasets are builtin names resolved under the data root (``SEMSR_DATA`` or
``--data-root``) or folder paths (``lr:PATH`` for folders without ground
truth). Full-reference metrics are computed only on sets with ground truth.
Results are cached under the semsr cache, so an interrupted or extended run
only computes what is missing; the cache key includes the method's options and
a fingerprint of its weight files (packaged weights, a checkpoint folder), so
retrained weights are never served from stale outputs (see :mod:`semsr.eval.runner`).

Under ``accelerate launch --num_processes N -m semsr.cli bench ...`` each process upscales every
N-th image (one model per process, into the shared result cache); rank 0 then computes the metrics
and writes the one table / JSON / CSV / report.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from semsr.commands.shard import Shard
from semsr.core.errors import SemsrError
from semsr.core.io import check_output_file, check_output_folder, sweep_temp_files
from semsr.core.paths import cache_dir
from semsr.eval import atomic
from semsr.eval.datasets import parse_datasets
from semsr.eval.lrsets import DEGRADATIONS
from semsr.eval.report import csv_text, markdown_tables, write_report
from semsr.eval.runner import BenchConfig, ResultCache, plan_methods, rows_to_json, run_bench, split_methods

#: Modules adding a kind of benchmark (``semsr bench KIND``): each defines ``register_kind(subparsers)``,
#: which adds its parser and sets ``func``. A module that does not exist (yet) is skipped.
KIND_MODULES: tuple[str, ...] = ("semsr.commands.bench_irpad", "semsr.commands.bench_retrieval")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _method_opt(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), value.strip()


def add_kinds(subparsers: argparse._SubParsersAction) -> None:
    """Let every module of :data:`KIND_MODULES` that exists add its kind."""
    for name in KIND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a kind not written yet
            if err.name != name:
                raise
            continue
        register_kind = getattr(module, "register_kind", None)
        if register_kind is not None:
            register_kind(subparsers)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark methods on SR test sets (tables, JSON, visual report); other kinds: semsr bench KIND",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--methods",
        metavar="LIST",
        help="(required) comma-separated method names (see `semsr models list`), each optionally with "
        "options in brackets: default,default[steps=1],default[no_edge_prior],default[steps=8,seed=3]",
    )
    p.add_argument(
        "--datasets",
        type=_split,
        help="(required) comma-separated: Set5, Set14, B100, Urban100, RealSRSet, a folder, or lr:FOLDER",
    )
    p.add_argument(
        "--degradation", default="bicubic", choices=DEGRADATIONS, help="how LR inputs are made (default bicubic)"
    )
    p.add_argument("-s", "--scale", type=int, default=4, help="scale factor (default 4)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images of each dataset")
    p.add_argument(
        "--metrics",
        type=_split,
        default=None,
        help="comma-separated metrics (default psnr,psnry,ssim,niqe); full-reference ones only where GT exists",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help='write {"rows": [...]} here')
    p.add_argument("--csv", type=Path, default=None, metavar="PATH", help="write the CSV table here")
    p.add_argument(
        "--report", type=Path, default=None, metavar="DIR", help="write HTML pages, crop grids and plots here"
    )
    p.add_argument(
        "--report-images", type=int, default=2, metavar="N", help="images shown per dataset in the report (default 2)"
    )
    p.add_argument(
        "--report-crop", type=int, default=96, metavar="PX", help="crop side in SR pixels (default 96, shown at 2x)"
    )
    p.add_argument(
        "--report-crops",
        type=int,
        default=1,
        metavar="N",
        help="crops per image in the report's grids: the N most detailed non-overlapping windows (default 1)",
    )
    p.add_argument(
        "-t",
        "--tile",
        type=int,
        default=512,
        help="LR tile size for methods that do not tile themselves; 0 = whole image (default 512)",
    )
    p.add_argument("--tile-pad", type=int, default=16, help="tile overlap in LR pixels (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the realesrgan degradation (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch/ncnn threads (method process and metrics)")
    p.add_argument(
        "--method-opt",
        type=_method_opt,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of every method, e.g. dtype=bf16 (repeatable; bracket options override it)",
    )
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="weights of deep metrics (lpips, dists, fid, clipiqa); default SEMSR_WEIGHTS",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="data folder (default: SEMSR_DATA, else a shared/data folder beside the repository)",
    )
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="run methods in this process (faster start; peak RSS then includes everything loaded)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)
    add_kinds(p.add_subparsers(dest="kind", metavar="KIND", required=False))


def run(args: argparse.Namespace) -> int:
    """The SR benchmark (``semsr bench`` without a kind)."""
    missing = [flag for flag, value in (("--methods", args.methods), ("--datasets", args.datasets)) if not value]
    if missing:
        raise SemsrError(f"the following arguments are required: {', '.join(missing)}")
    for name, value in (
        ("--limit", args.limit),
        ("--report-images", args.report_images),
        ("--report-crop", args.report_crop),
        ("--report-crops", args.report_crops),
    ):
        if value is not None and value < 1:
            raise SemsrError(f"{name} must be >= 1, got {value}")
    if args.scale < 1:
        raise SemsrError(f"--scale must be >= 1, got {args.scale}")
    if args.tile < 0 or args.tile_pad < 0:
        raise SemsrError("--tile and --tile-pad must be >= 0")
    config = BenchConfig(
        methods=split_methods(args.methods),
        datasets=parse_datasets(args.datasets, args.data_root),
        degradation=args.degradation,
        scale=args.scale,
        seed=args.seed,
        limit=args.limit,
        metrics=args.metrics,
        tile=args.tile,
        tile_pad=args.tile_pad,
        threads=args.threads,
        isolate=not args.no_isolate,
        method_opts=dict(args.method_opt),
        weights_dir=args.weights_dir,
    )

    if args.threads is not None:
        if args.threads < 1:
            raise SemsrError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)  # metric computation here; the method process gets it too

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    plan_methods(config)  # malformed entries and unknown methods: one line, before the cache is opened
    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path is not None:
            check_output_file(path, flag, create=False)
    if args.report is not None:
        check_output_folder(args.report, "--report", create=False)
    sweep_temp_files(cache_dir() / "bench", recursive=True)  # LR sets, SR outputs of killed runs
    shard = Shard.from_env()  # under `accelerate launch`: images split across processes, rank 0 reports
    with ResultCache() as cache:
        result = run_bench(config, progress, cache, part=(shard.rank, shard.world), wait=shard.wait)
        if not shard.main:
            return 0
        if args.report is not None:
            files = write_report(
                result,
                cache,
                args.report,
                args.report_images,
                args.report_crop,
                crops=args.report_crops,
                threads=args.threads,
            )
            progress(f"report: {len(files)} files in {args.report} (open {args.report / 'index.html'})")
    print(markdown_tables(result.rows))
    if args.json is not None:
        atomic.write_json(args.json, rows_to_json(result.rows))
    if args.csv is not None:
        atomic.write_text(args.csv, csv_text(result.rows))
    s = result.stats
    progress(
        f"upscaled {s.upscaled} (cached {s.upscale_cached}); metric values computed {s.metrics_computed} "
        f"(cached {s.metrics_cached})"
    )
    return 0
