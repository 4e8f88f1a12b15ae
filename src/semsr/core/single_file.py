"""Export diffusers SD components to the original single-file (LDM) checkpoint layout.

Community SD checkpoints are single ``.safetensors`` / ``.ckpt`` files in the
layout of the original latent-diffusion code (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``). diffusers reads
that layout with ``from_single_file``; this module writes it, so the tiny
test models (and users who fine-tune here) get a real single-file variant, and
:func:`single_file_key_mismatch` checks a loaded file's keys against the modules.
The mapping is the inverse of diffusers' LDM -> diffusers conversion for SD 1.x
UNets, the KL VAE and the CLIP (not OpenCLIP) text encoder.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from semsr.core.io import atomic_write_bytes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_MODEL_PREFIX = "text_model."  # transformers 5 drops it from CLIPTextModel keys; LDM files have it

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str, n: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def _rename_head(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """Map one diffusers ``UNet2DConditionModel`` state-dict key to its LDM name."""
    lpb = int(config["layers_per_block"])
    fixed = _rename_head(key, _UNET_FIXED)
    if fixed != key:
        return fixed
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{rest.removeprefix('conv.')}"
        idx = b * (lpb + 1) + j + 1
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_rename_head(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        has_attn = "CrossAttn" in config["up_block_types"][b]
        if kind == "upsamplers":
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.{rest}"
        idx = b * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{idx}.1.{rest}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def vae_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """Map one diffusers ``AutoencoderKL`` state-dict key to its LDM name."""
    n = len(config["block_out_channels"])
    part, rest = _split(key, 1)
    side = part[0]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    rest = _rename_head(rest, _VAE_FIXED)
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
    if m:
        direction, b, kind, j, tail = m[1], int(m[2]), m[3], int(m[4]), m[5]
        level = b if direction == "down" else n - 1 - b
        if kind == "resnets":
            return f"{side}.{direction}.{level}.block.{j}.{_rename_head(tail, {'conv_shortcut': 'nin_shortcut'})}"
        sampler = "downsample" if direction == "down" else "upsample"
        return f"{side}.{direction}.{level}.{sampler}.{tail}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest)
    if m:
        kind, j, tail = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{_rename_head(tail, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{side}.mid.attn_1.{_rename_head(tail, _VAE_ATTN)}"
    return f"{side}.{rest}"


def _ldm_items(*, unet: Any, vae: Any, text_encoder: Any | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(LDM key, tensor)`` of every weight of the given modules (tensors as the modules hold them)."""
    ucfg = dict(unet.config)
    for key, value in unet.state_dict().items():
        yield UNET_PREFIX + unet_key_to_ldm(key, ucfg), value
    vcfg = dict(vae.config)
    for key, value in vae.state_dict().items():
        new = vae_key_to_ldm(key, vcfg)
        if ".mid.attn_1." in new and value.ndim == 2:  # LDM uses 1x1 convs for VAE attention
            value = value[:, :, None, None]
        yield VAE_PREFIX + new, value
    if text_encoder is not None:
        for key, value in text_encoder.state_dict().items():
            if not key.startswith(CLIP_MODEL_PREFIX):
                key = CLIP_MODEL_PREFIX + key
            yield CLIP_PREFIX + key, value


def to_ldm_state_dict(*, unet: Any, vae: Any, text_encoder: Any | None = None) -> dict[str, torch.Tensor]:
    """Build the single-file state dict (LDM key names) from diffusers/transformers modules."""
    items = _ldm_items(unet=unet, vae=vae, text_encoder=text_encoder)
    return {k: v.detach().to("cpu").contiguous() for k, v in items}


#: LDM keys of a single file that hold no weights of the UNet, VAE or text encoder (training state, buffers).
IGNORED_LDM_KEYS = (CLIP_PREFIX + CLIP_MODEL_PREFIX + "embeddings.position_ids", VAE_PREFIX + "loss.")


def single_file_key_mismatch(
    file_keys: Iterable[str], *, unet: Any, vae: Any, text_encoder: Any | None = None
) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` LDM keys of a single-file checkpoint against the loaded modules.

    Only the UNet and VAE sections (``model.diffusion_model.*``, ``first_stage_model.*``) and, when
    the file has one and a ``text_encoder`` is given, the CLIP section (``cond_stage_model.transformer.*``)
    are compared; other keys (noise-schedule buffers, EMA copies, an OpenCLIP encoder) are not weights
    of these modules and are left alone, as are :data:`IGNORED_LDM_KEYS`.
    """
    keys = set(file_keys)
    with_text = text_encoder is not None and any(k.startswith(CLIP_PREFIX) for k in keys)
    expected = {k for k, _ in _ldm_items(unet=unet, vae=vae, text_encoder=text_encoder if with_text else None)}
    sections = (UNET_PREFIX, VAE_PREFIX) + ((CLIP_PREFIX,) if with_text else ())
    present = {k for k in keys if k.startswith(sections) and not k.startswith(IGNORED_LDM_KEYS)}
    return sorted(expected - present), sorted(present - expected)


def save_single_file(path: str | Path, *, unet: Any, vae: Any, text_encoder: Any | None = None) -> Path:
    """Write an LDM single-file checkpoint: ``.safetensors``, or ``.ckpt`` (``{"state_dict": ...}``)."""
    path = Path(path)
    state = to_ldm_state_dict(unet=unet, vae=vae, text_encoder=text_encoder)
    if path.suffix == ".safetensors":
        data = save(state, metadata={"format": "pt"})
    else:
        buf = io.BytesIO()
        torch.save({"state_dict": state}, buf)
        data = buf.getvalue()
    atomic_write_bytes(path, data)
    return path
