"""Precomputed XPSR training prompts: one JSON-lines file, read by the ``xpsr`` training task.

XPSR's released training reads prompts that were computed once, before training: the high-level
caption of each HR image, the low-level (quality) answer for its LR image, and the quality answer
for the HR image itself (used when the HR image replaces the LR hint, 10 % of the samples). The
task reads them from the file named by ``model.options.prompts``, one line per HR image::

    {"key": "0801.png", "high": "<caption of the HR image>", "low": "<quality answer for the LR image>",
     "low_gt": "<quality answer for the HR image>"}

``key`` names a training image by the trailing part of its path (``sub/0801.png`` or ``0801.png``)
or its stem (``0801``), case-insensitively. A training image without a record is a one-line error
before the first step; ``low_gt`` is required only while the GT-hint trick is on.

Making the file with the VLM prior and semsr's own commands (``VLM``: a local VLM folder)::

    semsr priors -i HR/ --modalities caption,quality --vlm VLM -o prompts-hr   # caption + quality of HR
    semsr degrade -i HR/ -o LR/ --seed 0                                        # one LR per HR image
    semsr priors -i LR/ --modalities quality --vlm VLM -o prompts-lr            # quality of each LR
    python -m semsr.train.xpsr_prompts prompts-hr/priors.json prompts-lr/priors.json -o prompts.jsonl

The last step (:func:`records_from_priors`) joins the two ``semsr priors`` indexes by file stem.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semsr.core.errors import InputError, SemsrError
from semsr.core.io import atomic_write_bytes

#: Fields of a record; ``low_gt`` only while the GT-hint trick is on.
FIELDS = ("high", "low", "low_gt")


def _norm(key: str) -> str:
    return str(key).strip().replace("\\", "/").strip("/").lower()


def path_keys(path: str | Path) -> list[str]:
    """The keys that name ``path``: its trailing path parts, longest first, then its stem."""
    parts = [p for p in _norm(str(path)).split("/") if p]
    return ["/".join(parts[i:]) for i in range(len(parts))] + ([Path(parts[-1]).stem] if parts else [])


class XPSRPromptFile:
    """The records of a prompts file (module docstring), looked up by training image path."""

    def __init__(self, records: dict[str, dict[str, str]], source: Path) -> None:
        self.records = records
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> XPSRPromptFile:
        """Read a JSON-lines prompts file; a malformed line is a one-line error naming it."""
        path = Path(path).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise InputError(f"cannot read the XPSR prompts file ({err.strerror or err})", path) from None
        records: dict[str, dict[str, str]] = {}
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"line {n} is not JSON ({err.msg})", path) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise InputError(f"line {n} needs a string 'key'", path)
            bad = [f for f in FIELDS if f in rec and not isinstance(rec[f], str)]
            if bad or not isinstance(rec.get("high"), str) or not isinstance(rec.get("low"), str):
                raise InputError(f"line {n} needs string fields 'high' and 'low' (and 'low_gt' if given)", path)
            records[_norm(rec["key"])] = {f: rec[f] for f in FIELDS if f in rec}
        return cls(records, path)

    def get(self, image: str | Path, need: Sequence[str] = ("high", "low")) -> dict[str, str]:
        """The record of training image ``image`` holding the fields ``need``; one-line error if none."""
        for key in path_keys(image):
            rec = self.records.get(key)
            if rec is not None:
                missing = [f for f in need if f not in rec]
                if missing:
                    raise SemsrError(f"the prompts of {Path(image).name} have no '{missing[0]}'", self.source)
                return rec
        raise SemsrError(f"no prompts for training image {Path(image).name}", self.source)


def _text(entry: dict[str, Any], name: str, index: Path) -> str:
    prior = entry.get("priors", {}).get(name)
    if not isinstance(prior, dict) or not isinstance(prior.get("value"), str):
        raise InputError(f"{entry.get('input')}: no '{name}' text prior (run semsr priors with it)", index)
    return prior["value"]


def _read_index(index: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(index).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"not a readable semsr priors index ({err})", index) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError("not a semsr priors index (no 'images' list)", index)
    return data["images"]


def records_from_priors(hr_index: str | Path, lr_index: str | Path) -> list[dict[str, str]]:
    """Prompt records from two ``semsr priors`` indexes: ``caption`` + ``quality`` of the HR images and
    ``quality`` of their LR images, joined by file stem (every HR image needs its LR)."""
    hr_index, lr_index = Path(hr_index), Path(lr_index)
    lows = {Path(e["input"]).stem.lower(): _text(e, "quality", lr_index) for e in _read_index(lr_index)}
    records = []
    for entry in _read_index(hr_index):
        name = Path(entry["input"]).name
        low = lows.get(Path(name).stem.lower())
        if low is None:
            raise InputError(f"no LR entry for {name}", lr_index)
        high, low_gt = _text(entry, "caption", hr_index), _text(entry, "quality", hr_index)
        records.append({"key": name, "high": high, "low": low, "low_gt": low_gt})
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m semsr.train.xpsr_prompts HR_INDEX LR_INDEX -o FILE`` (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m semsr.train.xpsr_prompts", description=__doc__.splitlines()[0])
    p.add_argument("hr_index", type=Path, help="semsr priors index of the HR images (caption, quality)")
    p.add_argument("lr_index", type=Path, help="semsr priors index of their LR images (quality)")
    p.add_argument("-o", "--output", type=Path, required=True, help="JSON-lines prompts file to write")
    args = p.parse_args(argv)
    try:
        records = records_from_priors(args.hr_index, args.lr_index)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_bytes(args.output, text.encode("utf-8"))
    except SemsrError as err:
        print(f"semsr: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"{len(records)} records -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
