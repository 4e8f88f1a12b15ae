"""Published Stable Diffusion 1.5 component configurations, as code (no download).

These are the architecture hyper-parameters of SD 1.5 (``unet/config.json``,
``vae/config.json``, ``text_encoder/config.json``, ``scheduler``); with them
real-size models can be built with random weights, e.g. for speed and memory
benchmarks (``benchmarks/pipeline_step.py``).
"""

from __future__ import annotations

from typing import Any

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# CLIP ViT-L/14 text tower
SD15_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def random_sd15(*, with_text_encoder: bool = True) -> dict[str, Any]:
    """SD-1.5-size ``unet``, ``vae`` (and CLIP ``text_encoder``) with random weights (fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy dependency, imported on use

    parts: dict[str, Any] = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD15_VAE)}
    if with_text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel  # heavy dependency, imported on use

        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    return parts
