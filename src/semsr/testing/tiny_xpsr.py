"""Tiny random XPSR / DaLPSR checkpoints for ``semsr dev tiny-models`` (see :mod:`semsr.testing.tiny`).

``xpsr`` and ``dalpsr``: checkpoint folders (:func:`semsr.core.components.save_checkpoint`,
recipes ``xpsr`` / ``dalpsr``) for the tiny SD (``root/sd``, written before) with the components

- ``controlnet``: diffusers ControlNet (non-zero zero-convs);
- ``sfa``: :class:`~semsr.fusion.sfa.SFAFusion`; ``xpsr`` in ``parallel`` mode with the
  UNet's conditional attention (``pixel_attentions`` in the up-blocks), ``dalpsr`` in ``serial``
  mode without it; the conditional attention's output projections (zero when new) get small
  random weights so it visibly acts;
- ``dfc``: the Degradation-Free Constraint heads (the paper's set; training only).

``irpad-untrained``: a random IRPAD component folder for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from semsr.core.components import save_checkpoint
from semsr.core.errors import SemsrError
from semsr.fusion.dfc import DFCHeads
from semsr.fusion.sfa import SFAFusion
from semsr.priors.irpad import IRPADNet
from semsr.testing.tiny import register_tiny, tiny_controlnet


def write_two_prompt_checkpoint(folder: Path, sd: Path, recipe: str, mode: str, conditional_attention: bool) -> Path:
    """Write the ``recipe`` checkpoint ``folder`` (``controlnet``, ``sfa``, ``dfc``) for the SD folder ``sd``."""
    if not (sd / "unet").is_dir():
        raise SemsrError("tiny XPSR/DaLPSR checkpoints are built on tiny 'sd': write it first", sd)
    unet = UNet2DConditionModel.from_pretrained(sd / "unet", local_files_only=True)
    controlnet = tiny_controlnet(unet)
    fusion = SFAFusion.from_models(controlnet, unet if conditional_attention else None, mode=mode)
    with torch.no_grad():
        for name, param in fusion.named_parameters():
            if ".pixel_attentions." in name and ".proj_out." in name:
                torch.nn.init.normal_(param, std=0.05)
    dfc = DFCHeads.from_controlnet(controlnet)
    return save_checkpoint(folder, recipe, {"controlnet": controlnet, "sfa": fusion, "dfc": dfc})


register_tiny("xpsr", lambda root: write_two_prompt_checkpoint(root / "xpsr", root / "sd", "xpsr", "parallel", True))
register_tiny(
    "dalpsr", lambda root: write_two_prompt_checkpoint(root / "dalpsr", root / "sd", "dalpsr", "serial", False)
)


def write_untrained_irpad(root: Path) -> None:
    """``root/irpad-untrained``: a randomly initialised IRPAD in the shipped on-disk format
    (for tests and tiny training configs that must not depend on the trained weights)."""
    IRPADNet().eval().save_pretrained(root / "irpad-untrained", safe_serialization=True)


register_tiny("irpad-untrained", write_untrained_irpad)
