"""Tiny random MMSR checkpoint for ``semsr dev tiny-models`` (see :mod:`semsr.testing.tiny`).

``mmsr``: an MMSR checkpoint folder (:func:`semsr.methods.mmsr.save_mmsr`) for
the tiny SD (``sd/``, written before it): ``connector/`` (Multimodal Latent
Connector, width 32 = the tiny UNet's cross-attention width, 128 latents,
caption + edge/depth/seg slots, 256-d VQ vectors as the shipped edge VQ
produces), ``conv_in/`` (the UNet's conv_in widened 4 -> 8 channels) and the
index (shipped edge VQ for every spatial modality, Canny edges). The LR-latent
half of conv_in gets small random weights so the LR visibly changes the tiny
model's output (a freshly widened conv_in ignores it). Depth/seg models are
the tiny ``depth/`` and ``seg/`` entries beside it, which
:mod:`semsr.methods.mmsr` finds on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from semsr.core.errors import SemsrError
from semsr.fusion.mmlc import MultimodalLatentConnector
from semsr.fusion.mmsr_conditioning import MMSRConditioning
from semsr.methods.mmsr import save_mmsr
from semsr.testing.tiny import register_tiny

TINY_CONNECTOR = {"num_latents": 128, "heads": 4, "cross_layers": 1, "self_layers": 1, "mlp_ratio": 2.0}


def write_tiny_mmsr(root: Path) -> None:
    """``root/mmsr``: connector + widened conv_in for ``root/sd``."""
    if not (root / "sd").exists():
        raise SemsrError("tiny 'mmsr' is built on tiny 'sd': write it first", root / "sd")
    unet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet", local_files_only=True)
    width = int(unet.config.cross_attention_dim)
    connector = MultimodalLatentConnector(width=width, text_width=width, **TINY_CONNECTOR)
    cond = MMSRConditioning.new(unet, connector)
    with torch.no_grad():
        torch.nn.init.normal_(cond.conv_in.weight[:, cond.latent_channels :], std=0.05)
    save_mmsr(root / "mmsr", cond, modalities=connector.spatial, edge="canny", tokenizer=None)


register_tiny("mmsr", write_tiny_mmsr)
