"""Splitting a command's inputs across the processes of ``accelerate launch`` and merging their reports.

    accelerate launch --multi_gpu --num_processes 2 -m semsr.cli upscale -i DIR -o OUT --json report.json

Each process (rank ``r`` of ``w``, from the ``RANK`` / ``WORLD_SIZE`` variables the launcher sets)
takes the inputs ``r, r + w, r + 2w, ...`` of the sorted input list and builds its own model
(on a GPU machine: on its own GPU, ``LOCAL_RANK``, which :class:`accelerate.PartialState` makes the
current CUDA device). A process writes its part of the ``--json`` report as ``<report>.rank<r>``;
after every process is done (a barrier of the launcher's process group), rank 0 merges the parts
into the one report (results of all ranks, summary recounted) and deletes them. Started without a
launcher, a command runs as one process with one report, as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from semsr.core.errors import SemsrError
from semsr.core.io import atomic_write

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")


def _state() -> PartialState:
    """The launcher's process group; on a machine without CUDA, the CPU (gloo) one."""
    from accelerate import PartialState  # lazy: accelerate costs start-up time and only launched runs need it

    return PartialState(cpu=not torch.cuda.is_available())


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes (``rank`` 0 .. world-1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """The shard of this process: ``RANK`` / ``WORLD_SIZE`` of a launcher, else the only one (0 of 1)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            raise SemsrError("RANK / WORLD_SIZE are not integers (started by a launcher?)") from None
        if world < 1 or not 0 <= rank < world:
            raise SemsrError(f"bad process rank {rank} of {world} (RANK / WORLD_SIZE)")
        if world > 1:
            _state()  # joins the launcher's process group; sets this rank's CUDA device
        return cls(rank, world)

    @property
    def main(self) -> bool:
        """True on rank 0 (the process that writes merged results)."""
        return self.rank == 0

    def take(self, items: Sequence[T], key: Callable[[T], Any] = str) -> list[T]:
        """This process's share of ``items``: every ``world``-th of them sorted by ``key``, from ``rank``."""
        if self.world == 1:
            return list(items)
        return sorted(items, key=key)[self.rank :: self.world]

    def wait(self) -> None:
        """Block until every process gets here (no-op for one process)."""
        if self.world > 1:
            _state().wait_for_everyone()

    def part(self, report: Path) -> Path:
        """Where this process writes its part of ``report`` (``report`` itself for one process)."""
        return report if self.world == 1 else report.with_name(f"{report.name}.rank{self.rank}")

    def merge_reports(self, report: Path, summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        """After :meth:`wait`: on rank 0, merge the parts of ``report`` (:func:`merge_parts`) into ``report``."""
        if self.world == 1 or not self.main:
            return
        parts = [self.part_of(report, r) for r in range(self.world)]
        merged = merge_parts([json.loads(p.read_text()) for p in parts if p.is_file()], summarize)
        merged["processes"] = self.world
        with atomic_write(report) as tmp:
            tmp.write_text(json.dumps(merged, indent=2) + "\n")
        for p in parts:
            p.unlink(missing_ok=True)

    def part_of(self, report: Path, rank: int) -> Path:
        """The part of ``report`` written by ``rank``."""
        return Shard(rank, self.world).part(report)


def merge_parts(parts: list[dict[str, Any]], summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict:
    """One report from per-process reports: rank 0's header, every part's ``results`` (sorted by
    ``input``), ``interrupted`` if any part was, ``summary`` = ``summarize(results)``."""
    if not parts:
        raise SemsrError("no process wrote its part of the report")
    merged = dict(parts[0])
    results = sorted((r for p in parts for r in p.get("results", [])), key=lambda r: str(r.get("input")))
    merged["results"] = results
    if any("interrupted" in p for p in parts):
        merged["interrupted"] = any(bool(p.get("interrupted")) for p in parts)
    merged["summary"] = summarize(results)
    return merged
