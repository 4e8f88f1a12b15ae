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
the training loss is ``eps-MSE + 0.05 * L_DFC`` (loss term ``dfc``, registered by
:mod:`semsr.train.xpsr`). Heads are not used at inference.

:class:`DFCHeads` is a component (:mod:`semsr.core.components`): its config
records the head indices and input widths, so it is rebuilt from its folder
alone; :meth:`DFCHeads.from_controlnet` makes new heads for a ControlNet.

Features are captured with forward hooks that exist only inside
:meth:`DFCHeads.capture`, so a ControlNet outside that block runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import Component, register_component, register_to_config
from semsr.core.errors import SemsrError

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
        raise SemsrError(
            f"DFC: {len(levels)} residuals expected, ControlNet has "
            f"{len(controlnet.controlnet_down_blocks)} zero convolutions"
        )
    return levels


def _stride2_stages(controlnet: nn.Module) -> list[int]:
    blocks = controlnet.controlnet_cond_embedding.blocks
    return [i for i, conv in enumerate(blocks) if tuple(conv.stride) == (2, 2)]


@register_component
class DFCHeads(Component):
    """The DFC heads for one ControlNet architecture (see the module docstring).

    Args:
        latent_index: indices of the ControlNet down residuals with a latent head (the last of
            each resolution level), ascending.
        latent_in: input channels of each of those heads.
        mid_in: input channels of the mid-block head.
        pixel_index: indices of the stride-2 convolutions of the hint encoder with a pixel head.
        pixel_in: input channels of each pixel head.
        latent_channels: channels of the predicted latents.
    """

    @register_to_config
    def __init__(
        self,
        latent_index: list[int],
        latent_in: list[int],
        mid_in: int,
        pixel_index: list[int],
        pixel_in: list[int],
        latent_channels: int = 4,
    ) -> None:
        super().__init__()
        self.latent_index = [int(i) for i in latent_index]
        self.pixel_index = [int(i) for i in pixel_index]
        self.latent = nn.ModuleDict()
        for idx, ch in zip(self.latent_index, latent_in, strict=True):
            self.latent[f"down{idx}"] = nn.Conv2d(int(ch), latent_channels, 3, padding=1)
        self.latent["mid"] = nn.Conv2d(int(mid_in), latent_channels, 3, padding=1)
        self.pixel = nn.ModuleDict()
        for i, ch in zip(self.pixel_index, pixel_in, strict=True):
            self.pixel[f"pyr{i}"] = nn.Conv2d(int(ch), 3, 3, padding=1)

    @classmethod
    def from_controlnet(cls, controlnet: nn.Module, latent_channels: int = 4) -> DFCHeads:
        """New (randomly initialised) heads for ``controlnet``'s architecture."""
        levels = residual_levels(controlnet)
        last = {lvl: idx for idx, lvl in enumerate(levels)}  # last residual of each level
        latent_index = sorted(last.values())
        pixel_index = _stride2_stages(controlnet)
        blocks = controlnet.controlnet_cond_embedding.blocks
        return cls(
            latent_index=latent_index,
            latent_in=[int(controlnet.controlnet_down_blocks[i].in_channels) for i in latent_index],
            mid_in=int(controlnet.controlnet_mid_block.in_channels),
            pixel_index=pixel_index,
            pixel_in=[int(blocks[i].out_channels) for i in pixel_index],
            latent_channels=latent_channels,
        )

    @contextlib.contextmanager
    def capture(self, controlnet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Collect the head inputs of every ControlNet call inside the block into the yielded dict."""
        feats: dict[str, torch.Tensor] = {}
        handles = []

        def grab_input(key: str) -> Callable[[nn.Module, tuple], None]:
            def hook(_m: nn.Module, args: tuple) -> None:
                feats[key] = args[0]

            return hook

        def grab_output(key: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
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


def dfc_targets(
    preds: Mapping[str, torch.Tensor], hr_latent: torch.Tensor, hr_image: torch.Tensor
) -> dict[str, torch.Tensor]:
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
