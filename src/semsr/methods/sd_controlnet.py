"""``sd-controlnet``: Stable Diffusion + an SR ControlNet, bring your own weights.

The pipeline is :class:`~semsr.pipeline.sd_controlnet.SDControlNetSR`; this
preset adds its defaults (XPSR's negative prompt, 20 DDPM steps, CFG 4.5) and
registers it.
"""

from __future__ import annotations

from dataclasses import dataclass

from semsr.core.dtypes import apply_threads
from semsr.core.method import MethodSpec
from semsr.core.options import option
from semsr.methods import register
from semsr.pipeline.options import ControlNetSROptions, guidance_option, require_paths, steps_option
from semsr.pipeline.sd_controlnet import DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, DEFAULT_STEPS, SDControlNetSR


@dataclass(kw_only=True, frozen=True)
class SDControlNetOptions(ControlNetSROptions):
    """Options of ``sd-controlnet``."""

    negative_prompt: str = option(DEFAULT_NEGATIVE, help="negative prompt")
    steps: int = steps_option(DEFAULT_STEPS)
    guidance_scale: float = guidance_option(DEFAULT_GUIDANCE)


def build(options: SDControlNetOptions) -> SDControlNetSR:
    """Factory of ``sd-controlnet``: ``base`` SD folder or single file, ``controlnet`` folder (optional)."""
    require_paths(
        "sd-controlnet",
        options,
        ("base", "a Stable Diffusion checkpoint (a diffusers SD folder or a .safetensors/.ckpt file)"),
    )
    apply_threads(options.threads)
    return SDControlNetSR.from_pretrained(
        options.base,
        options.controlnet,
        base_config=options.base_config,
        **options.placement(),
        options_class=SDControlNetOptions,
    )


register(
    MethodSpec(
        name="sd-controlnet",
        factory=build,
        options=SDControlNetOptions,
        scale=4,
        summary="Stable Diffusion + SR ControlNet (bring your own SD and ControlNet; local paths only)",
        diffusion=True,
        weight_paths=("base", "controlnet"),
    )
)
