"""What a method tells front ends about its priors: what it used (after a run) and what it would use (before one).

This is the method side of the contract :mod:`semsr.api` and the web demo
(:mod:`semsr.ui`) read:

- ``method.last_priors`` (:data:`semsr.api.PRIORS_ATTRIBUTE`): set by
  ``__call__`` to the priors the method actually used for the first image of
  the batch (the API and the demo run one image at a time);
- ``method.suggest_priors(x)`` (:data:`semsr.api.SUGGEST_HOOK`): ``x`` is
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

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from semsr.core.errors import SemsrError

#: Run option: the prompt (and other suggested fields) already hold the extracted text priors.
PRIORS_IN_PROMPT = "priors_in_prompt"
#: Display key of the low-level text of XPSR/DaLPSR by where it came from.
LOW_LEVEL_KEYS = {"irpad": "degradation", "vlm": "quality"}


def compact(priors: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``None`` and empty collections; lists of strings become tuples; tensors go to the CPU (detached)."""
    out: dict[str, Any] = {}
    for key, value in priors.items():
        if value is None or (isinstance(value, (tuple, list, dict)) and not value):
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        elif isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        out[key] = value
    return out


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


class PriorReporter:
    """Mixin giving a method ``last_priors``, :meth:`report_priors` and the ``suggest_priors`` hook.

    A method calls :meth:`report_priors` at the end of ``__call__`` and
    implements :meth:`prior_suggestion`.
    """

    last_priors: Mapping[str, Any] = MappingProxyType({})

    def report_priors(self, **priors: Any) -> dict[str, Any]:
        """Set ``last_priors`` to ``priors`` (compacted, see :func:`compact`); returns it."""
        self.last_priors = compact(priors)
        return self.last_priors

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        """Priors for ``x`` ``(1, 3, H, W)`` in [0, 1] before a run (see the module docstring)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise SemsrError(f"expected a (1, 3, H, W) image tensor, got shape {tuple(x.shape)}")
        with torch.no_grad():
            return compact(self.prior_suggestion(x[:1].float().clamp(0, 1)))

    def prior_suggestion(self, x: torch.Tensor) -> dict[str, Any]:
        """What :meth:`suggest_priors` returns for one image ``(1, 3, H, W)`` in [0, 1] (before compaction)."""
        raise NotImplementedError
