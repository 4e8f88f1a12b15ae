"""What a method tells front ends about its priors: what it used (after a run) and what it would use (before one).

This is the method side of the contract :mod:`semsr.api` and the web demo
(:mod:`semsr.ui`) read:

- ``SROutput.priors`` (:class:`semsr.core.outputs.SROutput`): the priors the
  method actually used for the first image of the batch (the API and the demo
  run one image at a time), compacted with :func:`semsr.core.outputs.compact`;
- ``method.suggest_priors(x)`` (:class:`semsr.core.method.SuggestsPriors`): ``x`` is
  ``(1, 3, H, W)`` float in [0, 1]; returns the priors the method would
  extract, computed with its own (cached) providers only -- no diffusion, no
  model it has not loaded already;
- the run option :data:`PRIORS_IN_PROMPT`: "the prompt fields hold the
  extracted text priors (possibly edited)": a method that normally *adds*
  extracted text to the user prompt (XPSR/DaLPSR's caption and tags,
  default-diffusion's IRPAD description) then uses the prompt as given.

Keys of a suggestion that name a run option (``prompt``, ``negative_prompt``,
``low_prompt``) are meant for editable fields: passing them back as run
options with ``priors_in_prompt=True`` reproduces the method's default
conditioning. The other keys are for display. Shared key names:

=====================  =====================================================
``prompt``             the positive text encoded (after a run) / suggested
``negative_prompt``    the negative text
``user_prompt``        what the user typed, when the method combined it with priors
``caption``            a VLM caption; ``quality``: a VLM quality answer
``degradation``        IRPAD's degradation description
``tags``               tagger labels (``tuple[str, ...]``)
``modalities``         modality names used (MMSR); maps as ``(1, C, H, W)`` tensors under their name
``reference*``         reference images ``(1, 3, H, W)``; ``reference_paths``/``reference_source``
=====================  =====================================================
"""

from __future__ import annotations

from typing import Any

#: Run option: the prompt (and other suggested fields) already hold the extracted text priors.
PRIORS_IN_PROMPT = "priors_in_prompt"
#: Display key of the low-level text of XPSR/DaLPSR by where it came from.
LOW_LEVEL_KEYS = {"irpad": "degradation", "vlm": "quality"}


def first(value: Any) -> Any:
    """The first image's entry of a per-image list (a plain value stays as is)."""
    return value[0] if isinstance(value, (list, tuple)) and value and not isinstance(value, str) else value


def text_conditions_priors(cond: Any, high: bool = True, low: bool = True) -> dict[str, Any]:
    """Display priors of one :class:`~semsr.priors.prompts.TextConditions` (XPSR / DaLPSR).

    With ``high``: ``caption`` when the semantic prompt is a VLM caption
    alone, else ``semantic_prompt``, and the tags; with ``low``: the
    low-level text as ``degradation`` (IRPAD) or ``quality`` (VLM). Leave a
    part out when the run did not use it (the user's text replaced it).
    ``sources`` says where the parts shown came from.
    """
    sources = {k: v for k, v in cond.sources.items() if (k == "high" and high) or (k == "low" and low)}
    out: dict[str, Any] = {}
    if high:
        out["caption" if sources.get("high") == "vlm" else "semantic_prompt"] = cond.high
        out["tags"] = tuple(cond.tags)
    if low:
        out[LOW_LEVEL_KEYS.get(sources.get("low", ""), "low_level_prompt")] = cond.low
    out["sources"] = sources
    return out
