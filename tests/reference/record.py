"""Record the reference outputs of :mod:`tests.reference.cases`.

    python -m tests.reference.record            # -> tests/data/reference/{outputs.safetensors, meta.json}
    python tests/reference/record.py --out /tmp/ref --reverse   # another folder, cases in reverse order

Writes every tensor under the key ``<case>/<name>`` (``case`` = ``method/<name>`` or ``train/<name>``)
into ``outputs.safetensors`` and the string results, the case definitions and the machine
(torch version, ``torch.backends.cpu.get_cpu_capability()``, CPU model, threads) into ``meta.json``.
Runs with one torch thread; the tiny models are written into a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``tests.reference`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from tests.reference import cases as C

DEFAULT_OUT = C.REPO / "tests" / "data" / "reference"
THREADS = 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "threads": THREADS,
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def case_definition(key: str) -> dict[str, Any]:
    case = C.CASES[key]
    return {"type": type(case).__name__, **_jsonable(dataclasses.asdict(case))}


def record(out: Path, keys: list[str], log=print, update: str | None = None) -> dict[str, Any]:
    """Record ``keys`` into ``out``; with ``update`` (a reason), replace only those cases in the existing
    recording and note the reason under ``meta["rerecorded"]`` (every other case keeps its tensors)."""
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(THREADS)
    tensors: dict[str, torch.Tensor] = {}
    strings: dict[str, str] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="semsr-ref-record-") as tmp:
        tiny = C.write_tiny(Path(tmp) / "tiny")
        for key in keys:
            t0 = time.perf_counter()
            result = C.run_case(key, tiny, Path(tmp))
            seconds[key] = round(time.perf_counter() - t0, 2)
            for name, value in result.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{key}/{name}"] = value.detach().cpu().contiguous()
                else:
                    strings[f"{key}/{name}"] = str(value)
            log(f"{key}: {seconds[key]:.1f} s, {len(result)} values")
    order = sorted(C.CASES, key=list(C.CASES).index)
    meta = {
        "machine": machine(),
        "cases": {k: case_definition(k) for k in order if k in keys},
        "strings": dict(sorted(strings.items())),
        "seconds": seconds,
    }
    if update is not None:
        old_meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        old = load_file(str(out / "outputs.safetensors"))
        mine = tuple(f"{k}/" for k in keys)
        tensors = {**{k: v for k, v in old.items() if not k.startswith(mine)}, **tensors}
        strings = {**{k: v for k, v in old_meta["strings"].items() if not k.startswith(mine)}, **strings}
        cases = {**old_meta["cases"], **meta["cases"]}
        meta = {
            **old_meta,
            "cases": {k: cases[k] for k in order if k in cases},
            "strings": dict(sorted(strings.items())),
            "seconds": {**old_meta["seconds"], **seconds},
            "rerecorded": {**old_meta.get("rerecorded", {}), **{k: update for k in keys}},
            # the machine each re-recorded case comes from (the bit-identical check compares against it)
            "case_machines": {**old_meta.get("case_machines", {}), **{k: meta["machine"] for k in keys}},
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "outputs.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--only", nargs="*", help="case keys (method/<name>, train/<name>); default: all")
    ap.add_argument("--reverse", action="store_true", help="run the cases in reverse order (order-independence check)")
    ap.add_argument(
        "--update",
        metavar="REASON",
        help="replace only the --only cases in the existing recording, noting REASON in meta.json",
    )
    args = ap.parse_args(argv)
    keys = list(args.only or C.CASES)
    unknown = [k for k in keys if k not in C.CASES]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")
    if args.reverse:
        keys.reverse()
    t0 = time.perf_counter()
    if args.update and not args.only:
        ap.error("--update needs --only")
    record(args.out, keys, update=args.update)
    print(f"recorded {len(keys)} cases into {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
