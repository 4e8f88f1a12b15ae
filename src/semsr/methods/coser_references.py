"""CoSeR's reference images on disk: reading a user's reference and the cache of generated ones.

Generating a reference costs a full SD sampling run, so generated references
are kept in ``<cache>/coser-references/<key>.png``, keyed per input image (its
content, :func:`~semsr.core.fingerprint.image_key`) and per everything the
generation depends on (model files, :func:`~semsr.core.fingerprint.fingerprint`;
prompts, steps, seed...). References are 8-bit images, so an entry read back
is identical to the generated tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semsr.core.errors import SemsrError
from semsr.core.fingerprint import image_key
from semsr.core.io import atomic_write_bytes, encode_picture, picture_from_array, read_image
from semsr.core.paths import cache_dir

#: Sub-folder of the semsr cache holding generated references.
CACHE_FOLDER = "coser-references"


def read_reference(path: str | Path) -> torch.Tensor:
    """A reference image file -> ``(1, 3, H, W)`` float in [0, 1] (alpha dropped, grey -> RGB)."""
    pic = read_image(path)
    top = float(np.iinfo(pic.rgb.dtype).max)
    return torch.from_numpy(np.ascontiguousarray(pic.rgb)).permute(2, 0, 1)[None].float() / top


class ReferenceCache:
    """Generated references on disk (``<folder>/<key>.png``); ``folder`` defaults to ``<cache>/coser-references``
    (resolved on each use, so it follows ``SEMSR_CACHE``)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._folder = None if folder is None else Path(folder)

    @property
    def folder(self) -> Path:
        return self._folder if self._folder is not None else cache_dir() / CACHE_FOLDER

    @staticmethod
    def key(image: torch.Tensor, settings: dict[str, Any]) -> str:
        """Key of one input ``(3, h, w)`` in [0, 1] under ``settings`` (model identity and generation options)."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        digest.update(image_key(image[None]).encode())
        return digest.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        """The cached reference ``(3, H, W)`` of ``key``, or None (missing or unreadable: regenerate)."""
        path = self.folder / f"{key}.png"
        if not path.is_file():
            return None
        try:
            return read_reference(path)[0]
        except SemsrError:
            return None

    def put(self, key: str, image: torch.Tensor) -> None:
        """Store ``image`` ``(3, H, W)`` in [0, 1] as an 8-bit PNG (atomically)."""
        arr = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
        atomic_write_bytes(self.folder / f"{key}.png", encode_picture(picture_from_array(arr), "png"))
