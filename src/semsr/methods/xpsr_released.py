"""XPSR's published weight folders, loaded as they are (no conversion step).

A released XPSR checkpoint folder (``checkpoint-N`` in XPSR's training runs) holds two diffusers
model folders written by ``save_pretrained``::

    <folder>/unet/config.json, diffusion_pytorch_model.safetensors        whole SD-1.5 UNet + pixel_attentions
    <folder>/controlnet/config.json, diffusion_pytorch_model.safetensors  ControlNet + attentions_lowlevel,
                                                                          attentions_connect, conv_degradation,
                                                                          conv_degradation_mid,
                                                                          controlnet_cond_embedding.to_rgbs

Each tensor is routed by name to its home in semsr (:func:`route`):

- UNet ``*.pixel_attentions.*`` -> :class:`~semsr.fusion.sfa.SFAFusion` (same key);
  every other UNet key -> diffusers ``UNet2DConditionModel``;
- ControlNet ``*.attentions_lowlevel.*`` / ``*.attentions_connect.*`` -> ``SFAFusion`` (same key);
  ``conv_degradation.*``, ``conv_degradation_mid.*``, ``controlnet_cond_embedding.to_rgbs.*`` ->
  :class:`~semsr.fusion.dfc.DFCHeads` (``released`` head set, training only, same key);
  every other ControlNet key -> diffusers ``ControlNetModel``.

Loading is strict: any released tensor without a home, or any semsr tensor the files do not fill,
fails with one line naming the file and the tensor(s). Only safetensors files are read.

The released inference script's image handling (``preset="released"`` of ``xpsr``, the default for a
released folder) is here too, on 8-bit images as the script does it::

    LR --PIL bicubic x s--> if the shorter side < 512: PIL bilinear to 512 --> PIL bicubic to a multiple of 8
       = hint (H, W)  ... sampling ...  decoded image rounded to 8 bits
    --AdaIN (sqrt(var + 1e-5), unbiased var) vs the hint, truncated to 8 bits--> PIL bicubic to (s*h, s*w)
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from semsr.core.errors import UnavailableError
from semsr.core.loading import check_keys, partial_allowed
from semsr.fusion.dfc import DFCHeads
from semsr.fusion.sfa import CONNECT, LOWLEVEL, PIXEL, SFAFusion

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
#: ControlNet key prefixes of the Degradation-Free Constraint heads (released names).
DFC_PREFIXES = ("conv_degradation.", "conv_degradation_mid.", "controlnet_cond_embedding.to_rgbs.")

#: The released test config's negative prompt (high-level branch).
RELEASED_NEGATIVE = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
#: The released test config's ``added_prompt``, appended to the caption after a space.
RELEASED_ADDED_PROMPT = "clean, high-resolution, 8k, high quality, clear text."
#: The released script's ``process_size``: a hint whose shorter side is smaller is enlarged to it.
RELEASED_PROCESS_SIZE = 512
#: The released script's ``added_noise_level``: the noised LR latent is noised again to this timestep.
RELEASED_ADDED_NOISE_LEVEL = 800
#: The released script's latent tile (``latent_tiled_size``) and overlap (``latent_tiled_overlap``).
RELEASED_LATENT_TILE = 320
RELEASED_TILE_OVERLAP = 8
#: The released script's VAE tiles: encoder 1024 pixels, decoder 224 latent pixels.
RELEASED_VAE_ENCODER_TILE = 1024
RELEASED_VAE_DECODER_TILE = 224


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> 8-bit RGB PIL image (rounded)."""
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div_(255)


def script_hint(
    lr: torch.Tensor, scale: int, *, process_size: int = RELEASED_PROCESS_SIZE, multiple: int = 8
) -> Image.Image:
    """The released script's ControlNet image of one LR image ``(3, h, w)`` in [0, 1]: 8-bit, PIL bicubic
    ``scale`` x; if its shorter side is below ``process_size``, PIL bilinear so that side is ``process_size``
    (the other ``int(process_size * long / short)``); then PIL bicubic to a multiple of ``multiple``."""
    img = to_pil(lr)
    img = img.resize((img.width * scale, img.height * scale), Image.BICUBIC)
    if min(img.size) < process_size:
        w, h = img.size
        short, long = min(w, h), max(w, h)
        other = int(process_size * long / short)
        img = img.resize((process_size, other) if w <= h else (other, process_size), Image.BILINEAR)
    return img.resize((img.width // multiple * multiple, img.height // multiple * multiple), Image.BICUBIC)


def script_adain(image: Image.Image, reference: Image.Image, eps: float = 1e-5) -> Image.Image:
    """The released colour fix on 8-bit images: per channel, ``image``'s mean / std (``sqrt(var + eps)``,
    unbiased variance) set to ``reference``'s, clamped, then truncated to 8 bits."""
    x, ref = from_pil(image).flatten(1), from_pil(reference).flatten(1)
    mean_x, std_x = x.mean(1, keepdim=True), (x.var(1, keepdim=True) + eps).sqrt()
    mean_r, std_r = ref.mean(1, keepdim=True), (ref.var(1, keepdim=True) + eps).sqrt()
    out = ((x - mean_x) / std_x * std_r + mean_r).clamp_(0, 1)
    arr = out.mul(255).to(torch.uint8).reshape(3, image.height, image.width)  # truncation, as released
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def is_released_layout(folder: str | Path) -> bool:
    """True when ``folder`` has XPSR's released ``unet/`` and ``controlnet/`` diffusers folders."""
    folder = Path(folder)
    return all((folder / sub / "config.json").is_file() for sub in ("unet", "controlnet"))


def route(part: str, key: str) -> str:
    """Home of the released tensor ``key`` of ``part`` (``"unet"`` or ``"controlnet"``):
    ``"unet"``, ``"controlnet"``, ``"sfa"`` or ``"dfc"``."""
    if part == "unet":
        return "sfa" if f".{PIXEL}." in key else "unet"
    if f".{LOWLEVEL}." in key or f".{CONNECT}." in key:
        return "sfa"
    if key.startswith(DFC_PREFIXES):
        return "dfc"
    return "controlnet"


def _config(folder: Path, cls: type) -> dict[str, Any]:
    """The diffusers config of ``folder`` restricted to the keys ``cls`` accepts (the released configs
    carry XPSR-only switches such as ``use_rrdb`` / ``up_use_lowlevel_prompt`` that select the new
    layers; semsr builds those layers itself)."""
    path = folder / "config.json"
    if not path.is_file():
        raise UnavailableError("missing config.json of the released XPSR folder", folder)
    raw = json.loads(path.read_text())
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in raw.items() if k in accepted}


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS
    if not path.is_file():
        other = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
        hint = f" (found {', '.join(other)}; only safetensors files are read)" if other else ""
        raise UnavailableError(f"missing {WEIGHTS}{hint}", folder)
    return path


@dataclass
class ReleasedXPSR:
    """The modules of a released XPSR folder and the file each came from."""

    unet: Any
    controlnet: Any
    sfa: SFAFusion
    dfc: DFCHeads
    sources: dict[str, str] = field(default_factory=dict)


def build_released_xpsr(folder: str | Path, *, device: str | torch.device = "cpu") -> ReleasedXPSR:
    """Empty (randomly or ``meta``-initialised) semsr modules shaped by the released configs of ``folder``."""
    folder = Path(folder)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_config(folder / "unet", UNet2DConditionModel))
        cfg = _config(folder / "controlnet", ControlNetModel)
        controlnet = ControlNetModel.from_config(cfg)
        sfa = SFAFusion.from_models(controlnet, unet, mode="parallel")
        dfc = DFCHeads.from_controlnet(controlnet, heads="released")
    return ReleasedXPSR(unet=unet, controlnet=controlnet, sfa=sfa, dfc=dfc)


def home_keys(model: ReleasedXPSR) -> dict[str, dict[str, set[str]]]:
    """Per released part (``unet``, ``controlnet``): per home, the keys semsr expects from that part."""
    sfa_keys = set(model.sfa.state_dict())
    return {
        "unet": {"unet": set(model.unet.state_dict()), "sfa": {k for k in sfa_keys if f".{PIXEL}." in k}},
        "controlnet": {
            "controlnet": set(model.controlnet.state_dict()),
            "sfa": {k for k in sfa_keys if f".{PIXEL}." not in k},
            "dfc": set(model.dfc.state_dict()),
        },
    }


def released_keys(folder: str | Path, part: str) -> list[str]:
    """Tensor names of the released ``part`` file (header only)."""
    with safe_open(str(_weights_file(Path(folder) / part)), framework="pt") as f:
        return list(f.keys())


def load_released_xpsr(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, partial: bool | None = None
) -> ReleasedXPSR:
    """Load a released XPSR folder strictly into semsr's modules (module docstring).

    Raises:
        UnavailableError: one line naming the released file and the tensors without a home / left unfilled.
    """
    folder = Path(folder)
    model = build_released_xpsr(folder)
    homes = home_keys(model)
    modules = {"unet": model.unet, "controlnet": model.controlnet, "sfa": model.sfa, "dfc": model.dfc}
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for part in ("unet", "controlnet"):
        path = _weights_file(folder / part)
        tensors = load_file(str(path))
        expected = set().union(*homes[part].values())
        unexpected = [k for k in tensors if route(part, k) not in homes[part] or k not in homes[part][route(part, k)]]
        missing = expected - set(tensors)
        check_keys(path, f"released XPSR {part}", missing=missing, unexpected=unexpected, partial=partial)
        for key, value in tensors.items():
            home = route(part, key)
            if home in homes[part] and key in homes[part][home]:
                states[home][key] = value
                model.sources[f"{home}" if home != "sfa" else f"sfa ({part} side)"] = str(path)
    for name, module in modules.items():
        module.load_state_dict(states[name], strict=not partial_allowed(partial))
        if dtype != torch.float32:
            module.to(dtype=dtype)
        module.eval()
    for home, source in sorted(model.sources.items()):
        log.info("released XPSR %s <- %s", home, source)
    return model
