"""Atomic writes of benchmark files (text, JSON, uint8 PNG) on top of :func:`semsr.core.io.atomic_write`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from semsr.core.io import atomic_write
from semsr.core.io import atomic_write_bytes as write_bytes


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` array as PNG atomically."""
    if array.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8, got {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
