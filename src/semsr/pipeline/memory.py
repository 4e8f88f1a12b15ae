"""Free device memory and the activation memory of an untiled denoising step (automatic latent tiling).

With the latent tile unset, a pipeline runs the whole latent in one model call
when that call fits in free memory, and 64-latent tiles otherwise. The rule::

    need = 1.5 * max(UNet+ControlNet step activations, VAE decode activations)
    untiled  <=>  need <= margin * free     (margin 0.8 on CUDA, 0.5 elsewhere)

``free`` is ``torch.cuda.mem_get_info`` on CUDA and ``MemAvailable`` of
``/proc/meminfo`` on the CPU (other devices: unknown, so tiled). The step
estimate counts, per UNet level ``i`` (``c_i`` channels over ``hw / 4**i``
latent pixels, batch ``N`` = the CFG branches): the skip connections the UNet
and the ControlNet hold (``layers_per_block + 1`` per level each), the peak of
a transformer block (``12 c_i`` values per token: q, k, v, out and the GEGLU
inner width) and, off CUDA, the attention scores ``heads * (hw / 4**i)**2``
(CUDA's flash/efficient SDPA kernels never hold them). The VAE decoder holds
about ``6 * block_out_channels[0]`` values per output pixel at its last level,
plus its mid-block attention scores off CUDA. The factor 1.5 covers allocator
fragmentation and what the estimate leaves out (time embeddings, hint encoder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

#: Fraction of the free memory an untiled step may use, on CUDA and elsewhere.
CUDA_MARGIN = 0.8
HOST_MARGIN = 0.5
#: Multiplier on the estimate (fragmentation, parts not counted).
SAFETY = 1.5


def _cfg(config: Any, name: str, default: Any) -> Any:
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def available_ram() -> int | None:
    """Bytes of host memory available to a new allocation (``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available RAM on the CPU, None otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return available_ram()
    return None


def unet_step_bytes(
    unet_config: Any,
    latent_hw: tuple[int, int],
    *,
    batch: int,
    dtype: torch.dtype,
    quadratic_attention: bool,
    controlnet: bool = True,
) -> int:
    """Estimated activation bytes of one untiled UNet (+ ControlNet) call on a ``(batch, C, *latent_hw)`` latent."""
    channels: Sequence[int] = _cfg(unet_config, "block_out_channels", (320, 640, 1280, 1280))
    layers = int(_cfg(unet_config, "layers_per_block", 2))
    heads = _cfg(unet_config, "attention_head_dim", 8)
    heads_seq = list(heads) if isinstance(heads, (list, tuple)) else [int(heads)] * len(channels)
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    hw = latent_hw[0] * latent_hw[1]
    skips = 0.0
    peak = 0.0
    for i, c in enumerate(channels):
        tokens = hw / 4**i
        skips += (layers + 1) * c * tokens
        level = 12 * c * tokens
        if quadratic_attention:
            level += heads_seq[min(i, len(heads_seq) - 1)] * tokens * tokens
        peak = max(peak, level)
    holders = 2 if controlnet else 1
    return int(batch * elem * (holders * skips + peak))


def vae_decode_bytes(
    vae_config: Any, latent_hw: tuple[int, int], *, batch: int, dtype: torch.dtype, quadratic_attention: bool
) -> int:
    """Estimated activation bytes of an untiled VAE decode of a ``(batch, 4, *latent_hw)`` latent."""
    channels: Sequence[int] = _cfg(vae_config, "block_out_channels", (128, 256, 512, 512))
    factor = 2 ** (len(channels) - 1)
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    hw = latent_hw[0] * latent_hw[1]
    values = 6 * channels[0] * hw * factor * factor
    if quadratic_attention:
        values = max(values, hw * hw + 4 * channels[-1] * hw)
    return int(batch * elem * values)


def untiled_fits(
    unet_config: Any,
    vae_config: Any,
    latent_hw: tuple[int, int],
    *,
    batch: int,
    dtype: torch.dtype,
    device: str | torch.device,
    free: int | None = None,
) -> bool:
    """Whether an untiled step and decode of ``latent_hw`` fit in ``free`` bytes (None: :func:`free_memory`).

    ``batch`` counts the CFG branches of a step (2 with guidance). See the module docstring for the rule.
    """
    device = torch.device(device)
    if free is None:
        free = free_memory(device)
    if free is None:
        return False
    quadratic = device.type != "cuda"
    need = max(
        unet_step_bytes(unet_config, latent_hw, batch=batch, dtype=dtype, quadratic_attention=quadratic),
        vae_decode_bytes(vae_config, latent_hw, batch=max(1, batch // 2), dtype=dtype, quadratic_attention=quadratic),
    )
    margin = CUDA_MARGIN if device.type == "cuda" else HOST_MARGIN
    return SAFETY * need <= margin * free
