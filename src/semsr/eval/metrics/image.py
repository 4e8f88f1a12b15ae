"""Reading images for evaluation without losing the grey/colour distinction.

The published PSNR/SSIM tables treat single-channel images (e.g.
``Set14/bridge.png``) differently from colour ones: MATLAB scripts skip
``rgb2ycbcr`` for them. :func:`load_eval_image` therefore returns ``C = 1`` for
grey files and ``C = 3`` for colour files, exactly as stored (an RGB file whose
channels happen to be equal stays RGB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from semsr.core.errors import InputError
from semsr.core.io import IMAGE_EXTENSIONS

_GREY_MODES = {"1": "L", "L": "L", "LA": "L", "I": "I", "I;16": "I", "I;16B": "I", "I;16L": "I"}


def load_eval_image(path: str | Path) -> torch.Tensor:
    """Read an image file as ``(1, C, H, W)`` float32 in [0, 1].

    ``C = 1`` for grey files (8 or 16 bit), ``C = 3`` otherwise (alpha is
    dropped, palette/CMYK converted to RGB). EXIF orientation is applied.
    Raises :class:`~semsr.core.errors.InputError` for unreadable files.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            mode = _GREY_MODES.get(im.mode)
            if mode == "I":
                arr = np.asarray(im.convert("I"), dtype=np.float64) / 65535.0
            elif mode == "L":
                arr = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"cannot read image ({err})", path) from None
    t = torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.unsqueeze(0).contiguous()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a folder", folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
