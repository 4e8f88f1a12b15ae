"""MMSR's spatial modality tokens: LR image -> edge / depth / seg maps -> 16x16 VQ tokens -> codebook vectors.

Maps come from the prior-provider registry (``canny`` or ``hed`` for
``edge``, ``depth``, ``seg``; see :mod:`semsr.priors.edges` and
:mod:`semsr.priors.depth_seg`) and are extracted from the LR image
bicubic-upsampled to the output size (the size at which thin Canny edges are
drawn; depth/seg models resize to their own input anyway). At inference they
go through the on-disk prior cache; training calls the providers directly
(every degraded LR is new). A :class:`~semsr.models.vq.SpatialTokenizer`
(the shipped edge VQ by default, or a diffusers VQGAN folder) turns each map
into ``(grid*grid, embed_dim)`` = ``(256, 256)`` codebook vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import SemsrError
from semsr.models.vq import SpatialTokenizer, load_tokenizer
from semsr.priors.base import cached, get_provider

#: Provider name of each spatial modality (``edge`` may also use ``hed``).
DEFAULT_PROVIDERS: dict[str, str] = {"edge": "canny", "depth": "depth", "seg": "seg"}
EDGE_PROVIDERS = ("canny", "hed")
#: Providers that run a network, built on the tokens' ``device``.
DEVICE_PROVIDERS = ("depth", "seg", "hed")


class ModalityTokens:
    """Spatial modalities of images as codebook vectors.

    Args:
        modalities: spatial modality names (subset of ``edge``, ``depth``, ``seg``).
        tokenizer: VQ tokenizer (default: the shipped edge VQ, used for every modality).
        provider_opts: per modality, options of its provider (e.g. ``{"depth": {"model": PATH}}``).
        edge: provider of the ``edge`` modality, ``canny`` (default, as the paper) or ``hed``.
        use_cache: go through the on-disk prior cache.
        device: where the tokenizer and the network providers (:data:`DEVICE_PROVIDERS`) run.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        tokenizer: SpatialTokenizer | None = None,
        provider_opts: Mapping[str, Mapping[str, Any]] | None = None,
        edge: str = "canny",
        use_cache: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        if edge not in EDGE_PROVIDERS:
            raise SemsrError(f"unknown edge detector {edge!r}; use one of {', '.join(EDGE_PROVIDERS)}")
        unknown = [m for m in modalities if m not in DEFAULT_PROVIDERS]
        if unknown:
            raise SemsrError(f"unknown spatial modalities {unknown}; known: {', '.join(DEFAULT_PROVIDERS)}")
        self.modalities = list(modalities)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None, device=str(device))
        names = {**DEFAULT_PROVIDERS, "edge": edge}
        opts = provider_opts or {}
        self.providers = {}
        for m in self.modalities:
            kwargs = dict(opts.get(m, {}))
            if names[m] in DEVICE_PROVIDERS:
                kwargs.setdefault("device", str(device))
            provider = get_provider(names[m], **kwargs)
            self.providers[m] = cached(provider) if use_cache else provider

    @property
    def embed_dim(self) -> int:
        return int(self.tokenizer.embed_dim)

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
        vectors = {}
        for m, value in maps.items():
            ids = self.tokenizer.encode(value)
            vectors[m] = self.tokenizer.embed(ids).float().cpu()
        return vectors, maps

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
