"""Tiny random MMSR checkpoint for ``semsr dev tiny-models`` (see :mod:`semsr.testing.tiny`).

``mmsr``: an MMSR checkpoint folder (:func:`semsr.methods.mmsr.save_mmsr`) for
the tiny SD (``sd/``, written before it), laid out as a default training run
exports it: ``connector/`` (Multimodal Latent Connector, width 32 = the tiny
UNet's cross-attention width, 128 latents, caption + edge/depth/seg slots,
256-d VQ vectors), ``conv_in/`` (the UNet's conv_in widened 4 -> 8 channels),
``unet_attention/`` (the trainable copies of the UNet's cross-attentions, with
their output projections perturbed so that the copies, not the UNet's own
layers, visibly produce the output), ``vq_depth/`` and ``vq_seg/`` (tiny
DepthVQ / SegVQ, :func:`semsr.testing.tiny_priors.tiny_map_vq`) and the index
(shipped edge VQ for edges, Canny edges). The LR-latent half of conv_in gets
small random weights so the LR visibly changes the tiny model's output (a
freshly widened conv_in ignores it). Depth/seg models are the tiny ``depth/``
and ``seg/`` entries beside it, which :mod:`semsr.methods.mmsr` finds on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from semsr.core.errors import SemsrError
from semsr.fusion.mmlc import MultimodalLatentConnector
from semsr.fusion.mmsr_conditioning import MMSRConditioning
from semsr.methods.mmsr import save_mmsr
from semsr.models.vq import DepthVQ, SegVQ
from semsr.testing.tiny import register_tiny
from semsr.testing.tiny_priors import tiny_map_vq

TINY_CONNECTOR = {"num_latents": 128, "heads": 4, "cross_layers": 1, "self_layers": 1, "mlp_ratio": 2.0}


def write_tiny_mmsr(root: Path) -> None:
    """``root/mmsr``: connector + widened conv_in for ``root/sd``."""
    if not (root / "sd").exists():
        raise SemsrError("tiny 'mmsr' is built on tiny 'sd': write it first", root / "sd")
    unet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet", local_files_only=True)
    width = int(unet.config.cross_attention_dim)
    connector = MultimodalLatentConnector(width=width, text_width=width, **TINY_CONNECTOR)
    cond = MMSRConditioning.new(unet, connector, cross_attention=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(cond.conv_in.weight[:, cond.latent_channels :], std=0.05, generator=gen)
        for layer in cond.unet_attention.layers.values():
            layer.to_out[0].weight.add_(0.05 * torch.randn(layer.to_out[0].weight.shape, generator=gen))
    tokenizers = {"edge": None, "depth": tiny_map_vq(DepthVQ, 1), "seg": tiny_map_vq(SegVQ, 2)}
    save_mmsr(root / "mmsr", cond, modalities=connector.spatial, edge="canny", tokenizers=tokenizers)


register_tiny("mmsr", write_tiny_mmsr)
