"""Published Stable Diffusion 1.5 and 2.1-base component configurations, as code (no download).

These are the architecture hyper-parameters of SD 1.5 and SD 2.1-base (``unet/config.json``,
``vae/config.json``, ``text_encoder/config.json``, ``scheduler``); with them
real-size models can be built with random weights, e.g. for speed and memory
benchmarks (``benchmarks/pipeline_step.py``, ``benchmarks/recipes_speed.py``).
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


#: SD 2.1-base (512 px, epsilon prediction): the SD-1.5 layout with linear attention projections,
#: per-level head dims and 1024-wide cross-attention (OpenCLIP ViT-H/14 text).
SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}

SD21_VAE: dict[str, Any] = dict(SD15_VAE)

# OpenCLIP ViT-H/14 text tower (SD 2.x uses its penultimate layer; 23 of the 24 layers are kept)
SD21_TEXT_ENCODER: dict[str, Any] = {
    **SD15_TEXT_ENCODER,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

SD21_SCHEDULER: dict[str, Any] = dict(SD15_SCHEDULER)

#: Per layout: (unet, vae, text encoder, scheduler) configs.
SD_LAYOUTS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER, SD15_SCHEDULER),
    "sd21": (SD21_UNET, SD21_VAE, SD21_TEXT_ENCODER, SD21_SCHEDULER),
}


def random_sd(layout: str = "sd15", *, with_text_encoder: bool = True) -> dict[str, Any]:
    """Real-size ``unet``, ``vae`` (and CLIP ``text_encoder``) of ``layout`` (``sd15`` or ``sd21``) with
    random weights (fp32), on torch's current default device (``with torch.device("meta"):`` builds
    them without memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy dependency, imported on use

    unet, vae, text, _ = SD_LAYOUTS[layout]
    parts: dict[str, Any] = {"unet": UNet2DConditionModel(**unet), "vae": AutoencoderKL(**vae)}
    if with_text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel  # heavy dependency, imported on use

        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text))
    return parts


def random_sd15(*, with_text_encoder: bool = True) -> dict[str, Any]:
    """SD-1.5-size ``unet``, ``vae`` (and CLIP ``text_encoder``) with random weights (fp32)."""
    return random_sd("sd15", with_text_encoder=with_text_encoder)
