"""The prior store of a training run (``data.priors``): opened once, checked against the pairs it describes."""

from __future__ import annotations

from semsr.core.errors import SemsrError
from semsr.priors.cache import PriorStore
from semsr.train.config import ExperimentConfig
from semsr.train.data import expand_path


def open_prior_store(cfg: ExperimentConfig) -> PriorStore | None:
    """The store of ``data.priors`` (None when not set); it needs ``data.pairs`` (one-line error otherwise):
    priors of LR images exist only for fixed LR files, not for degradations drawn on the fly."""
    if not cfg.data.priors:
        return None
    if not cfg.data.pairs:
        raise SemsrError(
            "data.priors needs data.pairs: LR priors are cached per LR file (semsr data make-pairs); "
            "LR images degraded on the fly have none"
        )
    return PriorStore(expand_path(str(cfg.data.priors)))
