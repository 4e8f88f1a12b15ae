"""MMSR's spatial modality tokens: LR image -> edge / depth / seg maps -> 16x16 VQ tokens -> codebook vectors.

Maps come from the prior-provider registry (``canny`` or ``hed`` for
``edge``, ``depth``, ``seg``; see :mod:`semsr.priors.edges` and
:mod:`semsr.priors.depth_seg`) and are extracted from the LR image
bicubic-upsampled to the output size (the size at which thin Canny edges are
drawn; depth/seg models resize to their own input anyway). At inference they
go through the on-disk prior cache; training calls the providers directly
(every degraded LR is new). Each modality has its own
:class:`~semsr.models.vq.SpatialTokenizer` (edge: the shipped edge VQ by default;
depth: a DepthVQ; seg: a SegVQ or any RGB VQGAN, never a grey tokenizer, which would
merge classes of equal grey value; or one VQGAN for all, as the paper) that turns
its map into ``(grid*grid, embed_dim)`` = ``(256, 256)`` codebook vectors.
Depth, segmentation and HED models run on ``device``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import SemsrError
from semsr.models.vq import SpatialTokenizer, check_modality_tokenizer, load_tokenizer
from semsr.priors.base import cached, get_provider

#: Provider name of each spatial modality (``edge`` may also use ``hed``).
DEFAULT_PROVIDERS: dict[str, str] = {"edge": "canny", "depth": "depth", "seg": "seg"}
EDGE_PROVIDERS = ("canny", "hed")
#: Providers that run a neural model (on the method's device).
NEURAL_PROVIDERS = ("depth", "seg", "hed")


class ModalityTokens:
    """Spatial modalities of images as codebook vectors.

    Args:
        modalities: spatial modality names (subset of ``edge``, ``depth``, ``seg``).
        tokenizers: per modality its VQ tokenizer (checked with
            :func:`~semsr.models.vq.check_modality_tokenizer`); ``edge`` defaults to the shipped edge VQ,
            a missing ``depth`` / ``seg`` one is an error.
        provider_opts: per modality, options of its provider (e.g. ``{"depth": {"model": PATH}}``).
        edge: provider of the ``edge`` modality, ``canny`` (default, as the paper) or ``hed``.
        use_cache: go through the on-disk prior cache.
        device: torch device of the depth / segmentation / HED models (their ``device`` option).
        extract: build the providers; False: only the tokenizers (maps come from elsewhere, e.g. a
            prior store, and go through :meth:`embed`).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        tokenizers: Mapping[str, SpatialTokenizer],
        provider_opts: Mapping[str, Mapping[str, Any]] | None = None,
        edge: str = "canny",
        use_cache: bool = True,
        device: str | torch.device = "cpu",
        extract: bool = True,
    ) -> None:
        if edge not in EDGE_PROVIDERS:
            raise SemsrError(f"unknown edge detector {edge!r}; use one of {', '.join(EDGE_PROVIDERS)}")
        unknown = [m for m in modalities if m not in DEFAULT_PROVIDERS]
        if unknown:
            raise SemsrError(f"unknown spatial modalities {unknown}; known: {', '.join(DEFAULT_PROVIDERS)}")
        self.modalities = list(modalities)
        self.tokenizers: dict[str, SpatialTokenizer] = {}
        for m in self.modalities:
            tok = tokenizers.get(m)
            if tok is None and m == "edge":
                tok = load_tokenizer(None, device=device)
            if tok is None:
                raise SemsrError(f"modality {m} has no tokenizer")
            check_modality_tokenizer(m, tok, getattr(tok, "path", m))
            self.tokenizers[m] = tok
        names = {**DEFAULT_PROVIDERS, "edge": edge}
        opts = provider_opts or {}
        self.providers = {}
        self.provider_names = {m: names[m] for m in self.modalities}
        for m in self.modalities if extract else ():
            kwargs = dict(opts.get(m, {}))
            if names[m] in NEURAL_PROVIDERS:
                kwargs.setdefault("device", str(device))
            provider = get_provider(names[m], **kwargs)
            self.providers[m] = cached(provider) if use_cache else provider

    def maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] -> per modality ``(B, C, H, W)`` maps in [0, 1]."""
        out: dict[str, torch.Tensor] = {}
        for m, provider in self.providers.items():
            out[m] = torch.cat([provider(img[None].float().cpu().clamp(0, 1)).value for img in images])
        return out

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(B, 3, H, W)`` in [0, 1] -> ``(vectors, maps)``: per modality the codebook vectors
        ``(B, grid*grid, embed_dim)`` float32 and the maps they encode ``(B, C, H, W)`` in [0, 1]."""
        maps = self.maps(images)
        return self.embed(maps), maps

    def embed(self, maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per modality ``(B, C, H, W)`` maps in [0, 1] -> codebook vectors ``(B, grid*grid, embed_dim)`` float32."""
        vectors = {}
        for m, value in maps.items():
            tok = self.tokenizers[m]
            vectors[m] = tok.embed(tok.encode(value)).float().cpu()
        return vectors

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] -> per modality codebook vectors ``(B, grid*grid, embed_dim)`` float32."""
        return self.encode(images)[0]


def find_model_folder(name: str, given: str | Path | None, near: Sequence[Path]) -> Path | None:
    """A transformers folder for modality ``name``: ``given``, else ``<p>/<name>`` for ``p`` in ``near``
    (e.g. the checkpoint folder and its parent), else None."""
    if given is not None:
        return Path(given).expanduser()
    for folder in near:
        cand = Path(folder) / name
        if (cand / "config.json").is_file():
            return cand
    return None
