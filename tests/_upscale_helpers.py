"""Helpers shared by the ``semsr upscale`` CLI tests (test_upscale_cli.py, test_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semsr.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``semsr *args`` in-process; return ``(exit_code, stdout, stderr)``."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def make_image(path: Path, w: int = 20, h: int = 12, mode: str = "RGB", seed: int = 0) -> Path:
    """Write a random ``w`` x ``h`` image (format from the suffix) and return its path."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)  # (H, W, 4) uint8 -> RGBA
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def files_in(folder: Path) -> list[str]:
    """Names of everything in ``folder`` (hidden temporary files included), sorted; [] if absent."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []
