"""DaLPSR (degradation-aligned language prompts) on SD + SR ControlNet, and the ``dalpsr`` method.

One stage, two prompts through cross-attention in the ControlNet (the
:class:`~semsr.methods.xpsr.TwoPromptSR` pipeline; the checkpoint's
``sfa/config.json`` says how the two cross-attentions are combined — the tiny
and trained DaLPSR checkpoints use ``serial``: semantic, then degradation)::

    degradation prompt  = IRPAD's per-type interval description   (semsr.priors.irpad, shipped weights)
    semantic prompt     = VLM caption steered by tagger labels    (--vlm, --tagger; semsr.priors.vlm/tagger)
                          without a VLM: user prompt (+ tags)     (one note on stderr)

Sampling as XPSR (DDPM 20 steps, CFG 4.5 with XPSR's negatives, LR-latent
start, AdaIN colour fix); the IRPAD text replaces the VLM quality answer.
"""
from __future__ import annotations

from typing import Any

from semsr.methods import MethodSpec, register
from semsr.methods.xpsr import TwoPromptMethod, build_two_prompt_method, shared_cli_options
from semsr.pipeline.colorfix import COLOUR_FIXES


def build(base: str | None = None, checkpoint: str | None = None, vlm: str | None = None, *,
          tagger: str | None = None, irpad: str | None = None, **kwargs: Any) -> TwoPromptMethod:
    """Factory of ``dalpsr``: ``base`` SD, ``checkpoint`` folder, optional ``vlm`` and ``tagger`` folders."""
    return build_two_prompt_method(
        "dalpsr", base=base, checkpoint=checkpoint,
        priors_opts={"vlm": vlm, "tagger": tagger, "low_source": "irpad", "irpad_weights": irpad,
                     "use_tags_with_vlm": True}, **kwargs)


register(MethodSpec(
    name="dalpsr",
    factory=build,
    scale=4,
    summary="DaLPSR: IRPAD degradation prompt + tag-steered VLM semantic prompt through cross-attention "
            "(--base SD, --checkpoint folder, optional --vlm and --tagger)",
    extra={"cli_options": shared_cli_options() + [
        {"flags": ["--tagger"], "target": "build", "metavar": "DIR",
         "help": "dalpsr: RAM-style tagger folder whose tags steer the semantic prompt"},
    ], "colour_fixes": list(COLOUR_FIXES), "suggests_priors": True},
))
