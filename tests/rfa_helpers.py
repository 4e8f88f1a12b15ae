"""Shared pieces of the RFA tests (tests/test_rfa.py, tests/test_rfa_train.py)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr.commands.bench_retrieval import register_kind


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tensors are tiny and the 2 cores are shared (oversubscription costs ~5x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_blocks(folder: Path, count: int, blocks: int = 4, px: int = 16, seed: int = 0, prefix: str = "") -> Path:
    """``count`` PNGs of random ``blocks x blocks`` colour blocks, ``px`` pixels each (distinct images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = np.kron(rng.random((blocks, blocks, 3)), np.ones((px, px, 1)))
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder


def bench_retrieval(argv: list[str]) -> int:
    """``semsr bench retrieval ARGV``: the kind's parser (``register_kind``) on a parser of its own."""
    parser = argparse.ArgumentParser(prog="semsr bench")
    register_kind(parser.add_subparsers(dest="kind"))
    args = parser.parse_args(["retrieval", *argv])
    return int(args.func(args) or 0)
