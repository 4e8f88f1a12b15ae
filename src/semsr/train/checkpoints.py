"""Run-directory bookkeeping: full-state checkpoints and the JSON-lines log.

Layout of an output directory::

    config.yaml                 the resolved experiment config
    log.jsonl                   one JSON record per line ({"type": "train"|"val", "step": ...})
    curve.png                   training curve (semsr.train.curve)
    checkpoints/step_00000020/  the full training state (below) + trainer.json
    val/step_00000020.png       validation sample grids
    final/ (final_ema/)         trainable weights for inference

A checkpoint folder is written under a temporary name (:func:`staging_dir`,
known to every process) and moved into place when complete
(:func:`commit_checkpoint`, through :func:`semsr.core.io.atomic_move`), so a
kill during saving never leaves a half checkpoint that ``--resume`` would pick.

**Nothing in a checkpoint is unpickled.** Each piece of training state is a
*part*: a JSON skeleton ``<part>.json`` (numbers, strings, lists, dicts) whose
tensors live in ``<part>.safetensors`` (:func:`write_part`, :func:`read_part`).
The parts are ``model`` (trainable weights), ``optimizer``, ``scheduler``,
``ema``, ``scaler`` (fp16 loss scaling), ``train_state`` (step and sample
position: the data order is a function of it) and ``random_states_<rank>``
(Python, NumPy, torch and CUDA generators of each process). A folder holding
any other file (a ``.pkl``, a ``.bin``) is refused (:func:`check_known_files`):
semsr never wrote it. A part that cannot be read (truncated safetensors, broken
JSON, missing file) raises :class:`CorruptCheckpoint`; ``--resume`` then falls
back to the next older checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from semsr.core.errors import SemsrError
from semsr.core.io import atomic_move, atomic_write
from semsr.eval.atomic import write_text
from semsr.train.curve import read_log

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
MARKER = "trainer.json"
#: The parts of a checkpoint besides ``random_states_<rank>`` (see the module doc).
PARTS = ("model", "optimizer", "scheduler", "ema", "scaler", "train_state")
#: The parts every checkpoint has.
REQUIRED_PARTS = ("model", "optimizer", "scheduler", "train_state")
RNG_PART_RE = re.compile(r"^random_states_(\d+)$")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class CorruptCheckpoint(SemsrError):
    """A checkpoint file that cannot be read (truncated, not JSON/safetensors, missing)."""


# ---------------------------------------------------------------- parts: JSON skeleton + safetensors


def _split(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """``obj`` with every tensor replaced by ``{"__tensor__": key}`` (tensors collected into ``tensors``)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        elif ptr is not None:
            seen[ptr] = str(len(tensors))
        key = str(len(tensors))
        tensors[key] = t.contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _ITEMS} & set(obj)):
            return {k: _split(v, tensors, seen) for k, v in obj.items()}
        return {_ITEMS: [[_split(k, tensors, seen), _split(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_split(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_split(v, tensors, seen) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint part")


def _join(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    """Inverse of :func:`_split`; only JSON values and the three markers are accepted."""
    if isinstance(obj, list):
        return [_join(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            if obj[_TENSOR] not in tensors:
                raise CorruptCheckpoint(f"refers to tensor {obj[_TENSOR]!r}, which the .safetensors lacks", where)
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_join(v, tensors, where) for v in obj[_TUPLE])
        if set(obj) == {_ITEMS}:
            return {_join(k, tensors, where): _join(v, tensors, where) for k, v in obj[_ITEMS]}
        return {k: _join(v, tensors, where) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CorruptCheckpoint(f"unexpected JSON value {type(obj).__name__}", where)


def write_part(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` (nested dicts/lists/tuples of numbers, strings and tensors) as ``<name>.json``
    plus ``<name>.safetensors`` (only when it holds tensors), each atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, {})
    folder.mkdir(parents=True, exist_ok=True)
    if tensors:
        with atomic_write(folder / f"{name}.safetensors") as tmp:
            save_file(tensors, str(tmp))
    write_text(folder / f"{name}.json", json.dumps(skeleton) + "\n")


def read_part(folder: Path, name: str) -> Any:
    """The state :func:`write_part` wrote (tensors on CPU).

    Raises:
        CorruptCheckpoint: a missing, truncated or malformed file.
    """
    skeleton_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    try:
        skeleton = json.loads(skeleton_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpoint("missing (the checkpoint is incomplete)", skeleton_path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"unreadable JSON ({err})", skeleton_path) from None
    tensors: dict[str, torch.Tensor] = {}
    if tensor_path.exists():
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CorruptCheckpoint(f"unreadable safetensors ({str(err).splitlines()[0]})", tensor_path) from None
    return _join(skeleton, tensors, skeleton_path)


def check_known_files(folder: Path) -> None:
    """Refuse a checkpoint folder holding anything semsr does not write there (e.g. a ``.pkl``).

    Raises:
        SemsrError: naming the first unknown entry.
    """
    for entry in sorted(folder.iterdir()):
        stem, dot, ext = entry.name.rpartition(".")
        known = entry.name == MARKER or (
            entry.is_file() and dot and ext in ("json", "safetensors") and (stem in PARTS or RNG_PART_RE.match(stem))
        )
        if not known:
            raise SemsrError(
                f"unknown file {entry.name!r} in the checkpoint; semsr stores training state only as its own "
                "JSON/safetensors parts and never loads other files (a pickle could run code). Remove it, or "
                "start a new run",
                folder,
            )


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA generator states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators to a state from :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimiser steps."""
    return f"step_{step:08d}"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output/checkpoints`` as ``(step, folder)``, oldest first."""
    root = output / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = CHECKPOINT_RE.match(child.name)
            if m and (child / MARKER).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(output)
    return found[-1] if found else None


def staging_dir(output: Path, step: int, clear: bool = False) -> Path:
    """Temporary folder a checkpoint is written into before :func:`commit_checkpoint`.

    ``clear=True`` (main process only) removes leftovers of an interrupted save.
    """
    path = output / "checkpoints" / f".tmp_{checkpoint_name(step)}"
    if clear and path.exists():
        shutil.rmtree(path)
    return path


def remove_staging_dirs(output: Path) -> None:
    """Delete leftovers of interrupted saves and prunes: staging folders, replaced or pruned
    checkpoints, and ``step_*`` folders without the :data:`MARKER` (a prune or an older semsr
    killed half-way; a checkpoint is only ever committed with its marker)."""
    root = output / "checkpoints"
    if root.is_dir():
        for child in [*root.glob(".tmp_step_*"), *root.glob(".step_*.old.*")]:
            shutil.rmtree(child, ignore_errors=True)
        for child in root.glob("step_*"):
            if CHECKPOINT_RE.match(child.name) and child.is_dir() and not (child / MARKER).exists():
                shutil.rmtree(child, ignore_errors=True)


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder so that no partial copy is ever visible under its name.

    It is first renamed to a hidden ``.step_*.old.*`` name (which :func:`remove_staging_dirs`
    sweeps if a kill interrupts the deletion), then deleted.
    """
    doomed = folder.with_name(f".{folder.name}.old.prune")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def commit_checkpoint(output: Path, staging: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Mark ``staging`` complete, move it to its final name (replacing an older one) and prune old checkpoints."""
    write_text(staging / MARKER, json.dumps({"step": step, **meta}, indent=2) + "\n")
    final = atomic_move(staging, output / "checkpoints" / checkpoint_name(step))
    for _, old in list_checkpoints(output)[:-keep]:
        remove_checkpoint(old)
    return final


class RunLog:
    """Append-only JSON-lines log; each record is flushed as soon as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (one line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
        if not self.path.is_file():
            return
        kept = [r for r in read_log(self.path) if int(r.get("step", 0)) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def records(self) -> list[dict[str, Any]]:
        """All records written so far."""
        return read_log(self.path)
