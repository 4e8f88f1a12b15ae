"""Tiny random depth, segmentation and VQGAN models for ``semsr dev tiny-models``.

Real depth (DPT / Depth-Anything), segmentation (SegFormer / Mask2Former) and
VQGAN checkpoints cannot be fetched here, so the loading code of
:mod:`semsr.priors.depth_seg` and :class:`semsr.models.vq.DiffusersVQTokenizer`
is exercised on randomly initialised models of the same classes, written with
``save_pretrained`` exactly like the real folders (weights, ``config.json`` and
``preprocessor_config.json``). Registered writers (see :mod:`semsr.testing.tiny`):

- ``depth``: ``DepthAnythingForDepthEstimation`` (DINOv2 backbone) + DPT processor;
- ``depth-dpt``: ``DPTForDepthEstimation`` (ViT backbone) + DPT processor;
- ``seg``: ``SegformerForSemanticSegmentation`` (5 labels) + SegFormer processor;
- ``seg-mask2former``: ``Mask2FormerForUniversalSegmentation`` (Swin backbone);
- ``vqgan``: diffusers ``VQModel`` folder with a 16x16 latent grid at 32x32 input,
  codebook 1024 x 256 (the MMSR tokenizer sizes);
- ``vqgan-taming``: a VQGAN state dict in the taming-transformers / latent-diffusion
  layout (``encoder.down.0.block.0.norm1.weight``, ``quantize.embedding.weight``...,
  plus a ``loss.*`` tensor as training checkpoints carry), random values, saved as
  ``vqgan-taming/vqgan.safetensors``: 32x32 input -> 16x16 grid, codebook 1024 x 256,
  attention at the 16x16 level as taming's ``attn_resolutions``;
- ``vq-depth`` / ``vq-seg``: semsr's own :class:`~semsr.models.vq.DepthVQ` (1 channel) and
  :class:`~semsr.models.vq.SegVQ` (3 channels), 64x64 maps -> 16x16 tokens, codebook 64 x 256.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import VQModel
from safetensors.torch import save_file

from semsr.models.vq import DepthVQ, EdgeVQ, SegVQ
from semsr.testing.tiny import register_tiny

_LABELS = {0: "background", 1: "sky", 2: "building", 3: "person", 4: "tree"}


def _label_maps() -> dict:
    return {"num_labels": len(_LABELS), "id2label": dict(_LABELS), "label2id": {v: k for k, v in _LABELS.items()}}


def _dpt_processor(size: int, keep_aspect_ratio: bool):
    """DPT image processor as the real checkpoints configure it (Depth-Anything keeps the aspect
    ratio with sides a multiple of 14; DPT-Large resizes to a fixed square)."""
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil  # heavy dependency

    return DPTImageProcessorPil(
        size={"height": size, "width": size},
        keep_aspect_ratio=keep_aspect_ratio,
        ensure_multiple_of=14 if keep_aspect_ratio else 1,
        do_pad=False,
    )


def write_tiny_depth_anything(root: Path) -> None:
    """``root/depth``: Depth-Anything (DINOv2 backbone, 4 layers, width 32)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config  # heavy dependency

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    DepthAnythingForDepthEstimation(cfg).save_pretrained(root / "depth")
    _dpt_processor(56, keep_aspect_ratio=True).save_pretrained(root / "depth")


def write_tiny_dpt(root: Path) -> None:
    """``root/depth-dpt``: DPT (ViT-hybrid-free, 4 layers, width 32)."""
    from transformers import DPTConfig, DPTForDepthEstimation  # heavy dependency

    cfg = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 16, 16],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
    )
    DPTForDepthEstimation(cfg).save_pretrained(root / "depth-dpt")
    _dpt_processor(64, keep_aspect_ratio=False).save_pretrained(root / "depth-dpt")


def write_tiny_segformer(root: Path) -> None:
    """``root/seg``: SegFormer with 2 encoder stages and 5 labels."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation  # heavy dependency
    from transformers.models.segformer import image_processing_pil_segformer as pil  # heavy dependency

    cfg = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        **_label_maps(),
    )
    SegformerForSemanticSegmentation(cfg).save_pretrained(root / "seg")
    pil.SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(root / "seg")


def write_tiny_mask2former(root: Path) -> None:
    """``root/seg-mask2former``: Mask2Former (Swin backbone, 4 queries, 5 labels)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig  # heavy dependency
    from transformers.models.mask2former import image_processing_pil_mask2former as pil  # heavy dependency

    swin = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=swin,
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_queries=4,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        common_stride=4,
        **_label_maps(),
    )
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(root / "seg-mask2former")
    pil.Mask2FormerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(root / "seg-mask2former")


def write_tiny_vqgan(root: Path) -> None:
    """``root/vqgan``: diffusers ``VQModel``, 2 levels (32x32 input -> 16x16 grid), codebook 1024 x 256."""
    VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=1024,
        vq_embed_dim=256,
        norm_num_groups=8,
        sample_size=32,
    ).save_pretrained(root / "vqgan")


def taming_vqgan_state(
    *,
    ch: int = 32,
    ch_mult: tuple[int, ...] = (1, 2),
    num_res_blocks: int = 1,
    attn_levels: tuple[int, ...] = (1,),
    in_channels: int = 3,
    out_ch: int = 3,
    z_channels: int = 8,
    n_embed: int = 1024,
    embed_dim: int = 256,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of taming-transformers' ``VQModel`` (its
    ``Encoder`` / ``Decoder`` of ``taming/modules/diffusionmodules/model.py``, ``VectorQuantizer2``,
    ``quant_conv``, ``post_quant_conv``), levels ``attn_levels`` with attention blocks."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.05

    def norm(name: str, c: int) -> None:
        state[f"{name}.weight"] = 1.0 + 0.1 * torch.randn(c, generator=g)
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    levels = len(ch_mult)
    conv("encoder.conv_in", in_channels, ch, 3)
    block_in = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
            if i in attn_levels:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    for net in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        if net == "decoder":
            conv("decoder.conv_in", z_channels, c, 3)
        resnet(f"{net}.mid.block_1", c, c)
        attn(f"{net}.mid.attn_1", c)
        resnet(f"{net}.mid.block_2", c, c)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, z_channels, 3)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
            if i in attn_levels:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, out_ch, 3)
    conv("quant_conv", z_channels, embed_dim, 1)
    conv("post_quant_conv", embed_dim, z_channels, 1)
    state["quantize.embedding.weight"] = torch.randn(n_embed, embed_dim, generator=g)
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=g)  # training-only
    return state


def write_tiny_vqgan_taming(root: Path) -> None:
    """``root/vqgan-taming/vqgan.safetensors``: see :func:`taming_vqgan_state`."""
    (root / "vqgan-taming").mkdir(parents=True, exist_ok=True)
    save_file(taming_vqgan_state(), str(root / "vqgan-taming" / "vqgan.safetensors"))


def tiny_map_vq(cls: type[EdgeVQ], seed: int) -> EdgeVQ:
    """A tiny random semsr tokenizer of class ``cls`` (64x64 maps, 16x16 tokens, codebook 64 x 256);
    its codebook is set from the encoder outputs of random maps (as training's first batch does)."""
    channels = 3 if cls is SegVQ else 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vq = cls(in_channels=channels, channels=(8, 16), image_size=64, codebook_size=64, embed_dim=256)
        vq(torch.rand(4, channels, 64, 64), vq.new_ema(fresh=True), torch.Generator().manual_seed(seed))
    return vq.eval()


def write_tiny_depth_vq(root: Path) -> None:
    """``root/vq-depth``: :func:`tiny_map_vq` of :class:`~semsr.models.vq.DepthVQ`."""
    tiny_map_vq(DepthVQ, 1).save_pretrained(root / "vq-depth", safe_serialization=True)


def write_tiny_seg_vq(root: Path) -> None:
    """``root/vq-seg``: :func:`tiny_map_vq` of :class:`~semsr.models.vq.SegVQ`."""
    tiny_map_vq(SegVQ, 2).save_pretrained(root / "vq-seg", safe_serialization=True)


register_tiny("depth", write_tiny_depth_anything)
register_tiny("depth-dpt", write_tiny_dpt)
register_tiny("seg", write_tiny_segformer)
register_tiny("seg-mask2former", write_tiny_mask2former)
register_tiny("vqgan", write_tiny_vqgan)
register_tiny("vqgan-taming", write_tiny_vqgan_taming)
register_tiny("vq-depth", write_tiny_depth_vq)
register_tiny("vq-seg", write_tiny_seg_vq)
