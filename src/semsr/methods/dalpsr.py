"""DaLPSR (degradation-aligned language prompts) on SD + SR ControlNet, and the ``dalpsr`` method.

One stage, two prompts through cross-attention (the
:class:`~semsr.methods.xpsr.TwoPromptSR` pipeline with ``unet_prompts="both"``):
the denoising UNet cross-attends to both prompts, ``cat([c_sem, c_deg], tokens)``
(the paper: "both prompts condition the denoising U-Net"); in the ControlNet the
checkpoint's ``sfa`` component says how the two cross-attentions are combined
(the tiny and trained DaLPSR checkpoints use ``serial``: semantic, then degradation)::

    degradation prompt  = IRPAD's per-type interval description   (semsr.priors.irpad, shipped weights)
    semantic prompt     = VLM caption steered by tagger labels    (--vlm, --tagger; semsr.priors.vlm/tagger)
                          without a VLM: user prompt (+ tags)     (one note on stderr)

Sampling as XPSR (DDPM 20 steps, CFG 4.5 with XPSR's negatives, LR-latent
start, AdaIN colour fix); the IRPAD text replaces the VLM quality answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from semsr.core.method import MethodSpec
from semsr.core.options import option
from semsr.methods import register
from semsr.methods.xpsr import TwoPromptSR, XPSROptions, build_two_prompt
from semsr.priors.prompts import TextPriors

#: The UNet's cross-attention context: semantic and degradation prompt (:func:`semsr.methods.xpsr.unet_context`).
DALPSR_UNET_PROMPTS = "both"


@dataclass(kw_only=True, frozen=True)
class DaLPSROptions(XPSROptions):
    """Options of ``dalpsr``: XPSR's plus the tagger whose tags steer the semantic prompt."""

    tagger: Path | None = option(
        None, stage="build", metavar="DIR", help="RAM-style tagger folder whose tags steer the semantic prompt"
    )


def build(options: DaLPSROptions) -> TwoPromptSR:
    """Factory of ``dalpsr``: ``base`` SD, ``checkpoint`` folder, optional ``vlm`` and ``tagger`` folders."""
    return build_two_prompt(
        "dalpsr",
        options,
        lambda: TextPriors(
            vlm=options.vlm,
            tagger=options.tagger,
            low_source="irpad",
            no_vlm=options.no_vlm,
            irpad_weights=options.irpad,
            use_tags_with_vlm=True,
            device=str(options.device),
        ),
        unet_prompts=DALPSR_UNET_PROMPTS,
    )


register(
    MethodSpec(
        name="dalpsr",
        factory=build,
        options=DaLPSROptions,
        scale=4,
        summary="DaLPSR: IRPAD degradation prompt + tag-steered VLM semantic prompt through cross-attention "
        "(--base SD, --checkpoint folder, optional --vlm and --tagger)",
        suggests_priors=True,
        diffusion=True,
        weight_paths=("base", "checkpoint", "vlm", "tagger", "irpad"),
        bundled_paths=("irpad",),
    )
)
