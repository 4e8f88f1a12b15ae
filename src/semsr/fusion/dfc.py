"""XPSR's Degradation-Free Constraint (DFC): heads that map ControlNet features to the clean HR image.

Single-layer heads (3x3 convolutions), attached to a diffusers ``ControlNetModel`` during training only:

- **latent heads** ``conv_degradation.<k>``: the output of the ControlNet's zero convolution ``k``
  (``controlnet_down_blocks[k]``, ``(B, C_k, h_k, w_k)``, before the conditioning scale, as released)
  -> 4-channel latent ``z_hat``; ``conv_degradation_mid`` does the same for the mid-block residual.
  Which residuals get one (:data:`LATENT_HEADS`):

  - ``"paper"`` (default; XPSR eq. 3 sums over ``j = 1..3``): the last residual of each of the (up
    to) three lowest-resolution levels — for SD the ``h/2``, ``h/4``, ``h/8`` levels, residuals 5, 8
    and 11 — and no mid head;
  - ``"released"``: every down residual and the mid block (13 heads for SD), as XPSR's released code.

- **pixel heads** ``controlnet_cond_embedding.to_rgbs.<i>``: every stride-2 stage ``i`` of the hint
  (pyramid) encoder ``controlnet_cond_embedding`` (after its SiLU) -> RGB ``x_hat`` (3 for SD, paper and
  released alike).

Targets (as released): the HR latent ``(B, 4, h, w)`` (scaled, as the UNet sees it) and the HR image
mapped to ``[-1, 1]``, each resized **bilinearly** to the head's size.
``L_DFC = sum_i mean|x_hr,i - x_hat_i| + sum_j mean|z_hr,j - z_hat_j|``; the training loss is
``eps-MSE + 0.05 * L_DFC`` (loss term ``dfc``, registered by :mod:`semsr.train.xpsr`). Heads are not
used at inference.

Submodule names are the released state-dict keys (``conv_degradation.5.0.weight``,
``conv_degradation_mid.0.weight``, ``controlnet_cond_embedding.to_rgbs.0.weight``), so released heads
load by name. :class:`DFCHeads` is a component (:mod:`semsr.core.components`): its config records the
head indices and widths, so it is rebuilt from its folder alone; :meth:`DFCHeads.from_controlnet` makes
new heads for a ControlNet. Features are captured with forward hooks that exist only inside
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
#: Latent-head sets: the paper's three (default) or every residual + mid as released.
LATENT_HEADS = ("paper", "released")


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


def latent_head_indices(controlnet: nn.Module, heads: str = "paper") -> tuple[list[int], bool]:
    """``(residual indices with a latent head, whether the mid block has one)`` for ``heads``."""
    levels = residual_levels(controlnet)
    if heads == "released":
        return list(range(len(levels))), True
    if heads != "paper":
        raise SemsrError(f"unknown DFC latent heads {heads!r}; use one of {', '.join(LATENT_HEADS)}")
    last = {lvl: idx for idx, lvl in enumerate(levels)}  # last residual of each level
    return sorted(last.values())[-3:], False


def _stride2_stages(controlnet: nn.Module) -> list[int]:
    blocks = controlnet.controlnet_cond_embedding.blocks
    return [i for i, conv in enumerate(blocks) if tuple(conv.stride) == (2, 2)]


def _head(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(int(channels), out, 3, padding=1))


@register_component
class DFCHeads(Component):
    """The DFC heads for one ControlNet architecture (see the module docstring).

    Args:
        latent_index: indices of the ControlNet down residuals with a latent head, ascending.
        latent_in: input channels of each of those heads.
        mid_in: input channels of the mid-block head (``None``: no mid head).
        pixel_index: indices of the stride-2 convolutions of the hint encoder with a pixel head.
        pixel_in: input channels of each pixel head.
        latent_channels: channels of the predicted latents.
    """

    @register_to_config
    def __init__(
        self,
        latent_index: list[int],
        latent_in: list[int],
        mid_in: int | None,
        pixel_index: list[int],
        pixel_in: list[int],
        latent_channels: int = 4,
    ) -> None:
        super().__init__()
        self.latent_index = [int(i) for i in latent_index]
        self.pixel_index = [int(i) for i in pixel_index]
        self.conv_degradation = nn.ModuleDict(
            {str(k): _head(ch, latent_channels) for k, ch in zip(self.latent_index, latent_in, strict=True)}
        )
        self.conv_degradation_mid = _head(mid_in, latent_channels) if mid_in is not None else None
        self.controlnet_cond_embedding = nn.Module()
        self.controlnet_cond_embedding.to_rgbs = nn.ModuleDict(
            {str(n): nn.Conv2d(int(ch), 3, 3, padding=1) for n, ch in enumerate(pixel_in)}
        )
        if len(pixel_in) != len(self.pixel_index):
            raise SemsrError("DFC: pixel_index and pixel_in differ in length")

    @classmethod
    def from_controlnet(cls, controlnet: nn.Module, heads: str = "paper", latent_channels: int = 4) -> DFCHeads:
        """New (randomly initialised) heads for ``controlnet``'s architecture; ``heads``: :data:`LATENT_HEADS`."""
        latent_index, mid = latent_head_indices(controlnet, heads)
        pixel_index = _stride2_stages(controlnet)
        blocks = controlnet.controlnet_cond_embedding.blocks
        return cls(
            latent_index=latent_index,
            latent_in=[int(controlnet.controlnet_down_blocks[i].out_channels) for i in latent_index],
            mid_in=int(controlnet.controlnet_mid_block.out_channels) if mid else None,
            pixel_index=pixel_index,
            pixel_in=[int(blocks[i].out_channels) for i in pixel_index],
            latent_channels=latent_channels,
        )

    @contextlib.contextmanager
    def capture(self, controlnet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Collect the head inputs of every ControlNet call inside the block into the yielded dict."""
        feats: dict[str, torch.Tensor] = {}

        def grab(key: str, act: bool) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
            def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
                feats[key] = F.silu(out) if act else out

            return hook

        handles = [
            controlnet.controlnet_down_blocks[k].register_forward_hook(grab(f"latent/{k}", False))
            for k in self.latent_index
        ]
        if self.conv_degradation_mid is not None:
            handles.append(controlnet.controlnet_mid_block.register_forward_hook(grab("latent/mid", False)))
        stages = controlnet.controlnet_cond_embedding.blocks
        handles += [stages[i].register_forward_hook(grab(f"pixel/{n}", True)) for n, i in enumerate(self.pixel_index)]
        try:
            yield feats
        finally:
            for h in handles:
                h.remove()

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Captured features -> ``{"latent/<k>" | "latent/mid": (B, 4, h_k, w_k), "pixel/<i>": (B, 3, H_i, W_i)}``."""
        heads: dict[str, nn.Module] = {f"latent/{k}": head for k, head in self.conv_degradation.items()}
        if self.conv_degradation_mid is not None:
            heads["latent/mid"] = self.conv_degradation_mid
        heads |= {f"pixel/{n}": head for n, head in self.controlnet_cond_embedding.to_rgbs.items()}
        out = {}
        for key, head in heads.items():
            out[key] = head(feats[key].to(next(head.parameters()).dtype))
        return out


def dfc_targets(
    preds: Mapping[str, torch.Tensor], hr_latent: torch.Tensor, hr_image: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The targets of every head prediction, as released: the HR latent ``(B, 4, h, w)`` and the HR image
    ``(B, 3, H, W)`` given in [0, 1] and mapped to [-1, 1], each resized bilinearly to the prediction's size."""
    image = hr_image.float() * 2 - 1
    out = {}
    for key, pred in preds.items():
        src = hr_latent.float() if key.startswith("latent/") else image
        size = tuple(pred.shape[-2:])
        out[key] = src if tuple(src.shape[-2:]) == size else F.interpolate(src, size=size, mode="bilinear")
    return out


def dfc_loss(preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum over heads of mean |target - pred|`` (XPSR eq. 3)."""
    if not preds:
        raise SemsrError("DFC: no head predictions")
    return sum(F.l1_loss(preds[k].float(), targets[k].float()) for k in preds)  # type: ignore[return-value]
