"""Metrics the community reports that semsr cannot compute yet: MUSIQ and MANIQA.

Their networks are not implemented here and their weights are not obtainable
offline. Building them raises :class:`~semsr.core.errors.UnavailableError` with
the reason (weights missing, or weights present but no implementation) so
reports show them as unavailable instead of silently dropping them.
"""

from __future__ import annotations

from pathlib import Path

from semsr.core.errors import UnavailableError
from semsr.core.weights import user_weight_roots
from semsr.eval.metrics.base import Metric


class _NotImplementedIQA(Metric):
    """Base of no-reference metrics whose architecture semsr does not implement."""

    higher_better = True
    needs_gt = False
    kind = "deep"
    paper = ""

    def __init__(self, weights_dir: str | Path | None = None, **_: object) -> None:
        roots = user_weight_roots(weights_dir)
        found = [p for r in roots if r.is_dir() for p in sorted(r.glob(f"{self.name}*"))]
        if not found:
            raise UnavailableError(
                f"{self.name}: weights not found ({self.paper} checkpoints are not obtainable offline; "
                f"searched {', '.join(str(r) for r in roots)}) and the network is not implemented in semsr"
            )
        raise UnavailableError(f"{self.name}: the {self.paper} network is not implemented in semsr", found[0])


class MUSIQ(_NotImplementedIQA):
    name = "musiq"
    summary = "MUSIQ (not implemented)"
    paper = "MUSIQ (Ke et al. 2021)"


class MANIQA(_NotImplementedIQA):
    name = "maniqa"
    summary = "MANIQA (not implemented)"
    paper = "MANIQA (Yang et al. 2022)"
