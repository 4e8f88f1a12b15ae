"""Tiny random CoSeR components for ``semsr dev tiny-models`` (see :mod:`semsr.testing.tiny`).

- ``clip-vision``: a 2-layer ``CLIPVisionModel`` (width 32, 32 px input, 8 px
  patches -> 17 tokens) and its ``CLIPImageProcessor``, saved with
  ``save_pretrained`` like a real CLIP folder;
- ``coser``: a CoSeR checkpoint folder for the tiny SD
  (:func:`~semsr.core.components.save_checkpoint`: ``model_index.json`` +
  ``cognitive/``, SRResNet pre-SR + Q-Former adapter with Te = 50 queries,
  width 32, and ``aia/``, AiA blocks + LR/reference ControlNet branches). The
  AiA zero layers and the branches' zero-initialised hint embeddings get small
  random weights so the LR and the reference visibly change the tiny model's
  output (a freshly initialised AiA would be an exact no-op, and a fresh
  ControlNet branch would not read its hint).

``coser`` reads ``sd/`` and ``clip-vision/`` written before it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from semsr.core.components import save_checkpoint
from semsr.core.errors import SemsrError
from semsr.fusion.aia import AiAFusion
from semsr.models.cognitive import RECIPE, build_cognitive_encoder, load_clip_vision
from semsr.testing.tiny import register_tiny

TINY_CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
TINY_QFORMER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
TINY_PRE_SR = {"kind": "srresnet", "num_feat": 8, "num_block": 1, "scale": 4}


def write_tiny_clip_vision(root: Path) -> None:
    """``root/clip-vision``: ``CLIPVisionModel`` + ``CLIPImageProcessor`` (OpenAI mean/std, 32 px crops)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel  # heavy dependency, imported on use
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # heavy, on use

    folder = root / "clip-vision"
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).save_pretrained(folder, safe_serialization=True)
    size = TINY_CLIP_VISION["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder
    )


def write_tiny_coser(root: Path) -> None:
    """``root/coser``: a CoSeR checkpoint (``cognitive`` + ``aia``) for ``root/sd`` and ``root/clip-vision``."""
    for need in ("sd", "clip-vision"):
        if not (root / need).exists():
            raise SemsrError(f"tiny 'coser' is built on tiny '{need}': write it first", root / need)
    unet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet", local_files_only=True)
    clip = load_clip_vision(root / "clip-vision")
    encoder = build_cognitive_encoder(
        clip, text_width=int(unet.config.cross_attention_dim), pre_sr=TINY_PRE_SR, qformer=TINY_QFORMER
    )
    fusion = AiAFusion.from_unet(unet)
    with torch.no_grad():
        for block in fusion.blocks.values():
            for layer in (block.ref_zero, block.lr_zero):
                torch.nn.init.normal_(layer.weight, std=0.2)
        for branch in (fusion.lr_branch, fusion.ref_branch):
            torch.nn.init.normal_(branch.controlnet_cond_embedding.conv_out.weight, std=0.2)
    save_checkpoint(root / "coser", RECIPE, {"cognitive": encoder, "aia": fusion})


register_tiny("clip-vision", write_tiny_clip_vision)
register_tiny("coser", write_tiny_coser)
