"""XPSR's Degradation-Free Constraint (DFC): heads that map ControlNet features to the clean HR image.

Two kinds of single-layer heads (3x3 convolutions), attached to a diffusers
``ControlNetModel`` during training only:

- **latent heads**: the ControlNet encoder feature that enters each zero
  convolution last at every resolution level (``(B, C_i, h/2^i, w/2^i)``) and
  the mid-block feature -> 4-channel latents ``z_hat``; target: the HR latent
  ``(B, 4, h, w)`` area-resized to each head's size;
- **pixel heads**: every stride-2 stage of the hint (pyramid) encoder
  ``controlnet_cond_embedding`` (after its SiLU) -> RGB ``x_hat``; target: the
  HR image in [0, 1] area-resized to each stage's size (``H/2, H/4, H/8`` for SD).

``L_DFC = sum_i mean|x_hr,i - x_hat_i| + sum_j mean|z_hr,j - z_hat_j|`` (XPSR eq. 3);
the training loss is ``eps-MSE + 0.05 * L_DFC`` (loss term ``dfc``, registered in
:mod:`semsr.train.losses` by importing this module). Heads are not used at inference.

Features are captured with forward hooks that exist only inside
:meth:`DFCHeads.capture`, so a ControlNet outside that block runs unchanged.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError
from semsr.train.losses import _require, register_loss

CHECKPOINT_KIND = "xpsr-dfc"
#: XPSR's weight of the DFC term.
DFC_WEIGHT = 0.05


def residual_levels(controlnet: nn.Module) -> list[int]:
    """Resolution level of each ControlNet down residual (``conv_in`` output, then each down block's
    resnets and downsampler), in the order of ``controlnet.controlnet_down_blocks``."""
    levels = [0]
    for i, block in enumerate(controlnet.down_blocks):
        levels += [i] * len(block.resnets)
        if getattr(block, "downsamplers", None):
            levels.append(i + 1)
    if len(levels) != len(controlnet.controlnet_down_blocks):
        raise SemsrError(f"DFC: {len(levels)} residuals expected, ControlNet has "
                         f"{len(controlnet.controlnet_down_blocks)} zero convolutions")
    return levels


def _stride2_stages(controlnet: nn.Module) -> list[int]:
    blocks = controlnet.controlnet_cond_embedding.blocks
    return [i for i, conv in enumerate(blocks) if tuple(conv.stride) == (2, 2)]


class DFCHeads(nn.Module):
    """The DFC heads for one ControlNet architecture (see the module docstring)."""

    def __init__(self, controlnet: nn.Module, latent_channels: int = 4) -> None:
        super().__init__()
        levels = residual_levels(controlnet)
        last = {lvl: idx for idx, lvl in enumerate(levels)}  # last residual of each level
        self.latent_index = sorted(last.values())
        self.latent = nn.ModuleDict()
        for idx in self.latent_index:
            ch = controlnet.controlnet_down_blocks[idx].in_channels
            self.latent[f"down{idx}"] = nn.Conv2d(ch, latent_channels, 3, padding=1)
        self.latent["mid"] = nn.Conv2d(controlnet.controlnet_mid_block.in_channels, latent_channels, 3, padding=1)
        self.pixel_index = _stride2_stages(controlnet)
        self.pixel = nn.ModuleDict()
        for i in self.pixel_index:
            ch = controlnet.controlnet_cond_embedding.blocks[i].out_channels
            self.pixel[f"pyr{i}"] = nn.Conv2d(ch, 3, 3, padding=1)

    @contextlib.contextmanager
    def capture(self, controlnet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Collect the head inputs of every ControlNet call inside the block into the yielded dict."""
        feats: dict[str, torch.Tensor] = {}
        handles = []

        def grab_input(key: str):  # noqa: ANN202
            def hook(_m: nn.Module, args: tuple) -> None:
                feats[key] = args[0]
            return hook

        def grab_output(key: str):  # noqa: ANN202
            def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
                feats[key] = F.silu(out)
            return hook

        for idx in self.latent_index:
            handles.append(controlnet.controlnet_down_blocks[idx].register_forward_pre_hook(grab_input(f"down{idx}")))
        handles.append(controlnet.controlnet_mid_block.register_forward_pre_hook(grab_input("mid")))
        for i in self.pixel_index:
            handles.append(controlnet.controlnet_cond_embedding.blocks[i].register_forward_hook(grab_output(f"pyr{i}")))
        try:
            yield feats
        finally:
            for h in handles:
                h.remove()

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Captured features -> ``{"latent/<k>": (B, 4, h_k, w_k), "pixel/<k>": (B, 3, H_k, W_k)}``."""
        out = {}
        for key, head in self.latent.items():
            out[f"latent/{key}"] = head(feats[key].to(head.weight.dtype))
        for key, head in self.pixel.items():
            out[f"pixel/{key}"] = head(feats[key].to(head.weight.dtype))
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": CHECKPOINT_KIND, "latent_heads": list(self.latent), "pixel_heads": list(self.pixel)}

    def save(self, folder: str | Path) -> Path:
        """``folder/config.json`` + ``folder/model.safetensors``."""
        from safetensors.torch import save_file

        from semsr.core.loading import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".model.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp),
                  metadata={"format": "pt"})
        tmp.replace(folder / "model.safetensors")
        atomic_write_bytes(folder / "config.json", (json.dumps(self.config(), indent=2) + "\n").encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path, controlnet: nn.Module) -> DFCHeads:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise UnavailableError("not a DFC checkpoint (needs config.json + model.safetensors)", folder)
        heads = cls(controlnet)
        heads.load_state_dict(load_file(str(folder / "model.safetensors")))
        return heads


def dfc_targets(preds: Mapping[str, torch.Tensor], hr_latent: torch.Tensor,
                hr_image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The resized HR latent ``(B, 4, h, w)`` / image ``(B, 3, H, W)`` in [0, 1] for every head prediction."""
    out = {}
    for key, pred in preds.items():
        src = hr_latent if key.startswith("latent/") else hr_image
        size = tuple(pred.shape[-2:])
        out[key] = src if tuple(src.shape[-2:]) == size else F.interpolate(src.float(), size=size, mode="area")
    return out


def dfc_loss(preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum over heads of mean |target - pred|`` (XPSR eq. 3)."""
    if not preds:
        raise SemsrError("DFC: no head predictions")
    return sum(F.l1_loss(preds[k].float(), targets[k].float()) for k in preds)  # type: ignore[return-value]


@register_loss("dfc")
def dfc(outputs: Mapping[str, Any]) -> torch.Tensor:
    """Loss term ``dfc``: needs task outputs ``dfc_pred`` and ``dfc_target`` (dicts of tensors)."""
    _require(outputs, "dfc", "dfc_pred", "dfc_target")
    return dfc_loss(outputs["dfc_pred"], outputs["dfc_target"])
