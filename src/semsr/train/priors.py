"""The prior store of a training run (``data.priors``): opened once, checked against the pairs it describes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from semsr.core.errors import SemsrError
from semsr.priors.cache import PriorStore, image_id
from semsr.train.config import DataConfig, ExperimentConfig
from semsr.train.data import ImageItem, expand_path, list_images
from semsr.train.pairs import read_pairs, split_pairs

#: ``model.options.lr_embedding`` of the rfa-sr and coser-sr tasks: ``image`` (the stored embedding of the
#: whole LR file, for every crop of it; needs ``data.priors``) or ``crop`` (each random LR crop embedded
#: in the loop, the papers' way; loads the embedding model).
LR_EMBEDDINGS = ("image", "crop")


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


def lr_embedding_mode(cfg: ExperimentConfig, store: PriorStore | None, value: object) -> str:
    """``model.options.lr_embedding`` checked: ``image`` by default with a store, ``crop`` without one."""
    mode = str(value) if value is not None else ("image" if store is not None else "crop")
    if mode not in LR_EMBEDDINGS:
        raise SemsrError(f"model.options.lr_embedding must be image or crop, got {mode!r}")
    if mode == "image" and store is None:
        raise SemsrError("model.options.lr_embedding: image reads the LR embeddings from data.priors (not set)")
    return mode


def training_items(data: DataConfig) -> list[ImageItem]:
    """The HR items the trainer's dataset trains on, in its order: those of ``data.pairs`` when set, else of
    ``data.hr`` / ``data.manifest``."""
    if data.pairs:
        return split_pairs(read_pairs(data.pairs), data)[0]
    return list_images(data, data.crop_size)[0]


def training_lr_files(data: DataConfig) -> list[Path]:
    """Every LR file of the training images of ``data.pairs``."""
    pairs = read_pairs(data.pairs)
    return [lr for item in split_pairs(pairs, data)[0] for lr in pairs[item.path]]


def require_priors(store: PriorStore, images: Iterable[str | Path], priors: Iterable[str]) -> None:
    """One-line :class:`SemsrError` naming the first image that lacks one of ``priors`` (checked before
    training starts, so a missing prior does not stop a run at some later step)."""
    names = list(priors)
    done = {p: store.done(p) for p in names}
    for image in images:
        for prior in names:
            if image_id(image) not in done[prior]:
                raise SemsrError(
                    f"prior store {store.root} has no '{prior}' of this image (run semsr priors build for it)", image
                )
