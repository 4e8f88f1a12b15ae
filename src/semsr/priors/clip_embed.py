"""CLIP-type embedding priors of the RFA and CoSeR recipes (what ``semsr priors build --recipe rfa|coser`` stores).

``rfa-embed`` / ``rfa-tokens``
    The RFA embedder's (``--embedder``: ``hed-vgg`` or ``clip:FOLDER``, the reference database's) unit
    global embedding ``(1, D)`` and its tokens ``(1, N, T)`` of the whole image
    (:mod:`semsr.priors.retrieval.embedders`). One embedder pass gives both: the two providers share it
    and the result of the last image.

``coser-clip``
    CoSeR's reference-pool embedding: the CLIP vision tower's pooled embedding ``(1, Hc)`` of the centre
    square of the image (``--clip``; :func:`centre_square`, :meth:`CLIPVisionTower.pooled
    <semsr.models.cognitive.CLIPVisionTower.pooled>`), by which training ranks the other training images.

``coser-cognitive``
    The frozen stage-1 cognitive encoder's (``--cognitive`` + ``--clip``) embedding ``(1, Te, D)`` of the
    whole LR image (shrunk to the encoder's ``max_lr_side``, as at inference).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from semsr.core.errors import SemsrError
from semsr.core.fingerprint import fingerprint
from semsr.models.cognitive import CLIPVisionTower, load_clip_vision, load_cognitive_encoder
from semsr.models.rfa import encode
from semsr.priors.base import DEVICE_OPTION, PriorResult, ProviderOption, ProviderSpec, check_image, register_provider
from semsr.priors.retrieval.embedders import Embedder, embedder_from_spec

_REVISION = "clip-embed-1"
#: The neighbour priors (tags: store image ids, best first) ``semsr priors build`` adds: ``rfa`` per LR
#: file (its retrieved references), ``coser`` per HR image (its CLIP neighbours).
RFA_REFS, COSER_NEIGHBOURS = "rfa-refs", "coser-neighbours"
#: CoSeR's embedding priors: the reference-pool embedding (HR images), the cognitive embedding (LR files).
COSER_CLIP, COSER_COGNITIVE = "coser-clip", "coser-cognitive"

EMBEDDER_OPTION = ProviderOption(
    "embedder", "--embedder", "RFA embedder: hed-vgg or clip:FOLDER (default: the --db database's)"
)
CLIP_OPTION = ProviderOption("clip", "--clip", "CLIP vision folder (CoSeR: the one its cognitive encoder uses)")
COGNITIVE_OPTION = ProviderOption("cognitive", "--cognitive", "CoSeR stage-1 checkpoint (or its cognitive/ folder)")


def centre_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> its centre square resized to ``(B, 3, size, size)`` (bicubic, antialiased)."""
    side = min(image.shape[-2:])
    top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
    sq = image[..., top : top + side, left : left + side].float()
    return F.interpolate(sq, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


@torch.no_grad()
def pool_embeddings(clip: CLIPVisionTower, images: torch.Tensor) -> torch.Tensor:
    """CoSeR's reference-pool embeddings ``(B, Hc)`` of images ``(B, 3, size, size)`` (:func:`centre_square`)."""
    device = next(clip.parameters()).device
    return clip.pooled(images.to(device)).float().cpu()


def _device_of(module: object) -> torch.device:
    try:
        return next(module.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class _SharedEncoder:
    """One embedder per spec, and the ``(vec, tokens)`` of the last image it saw (the two RFA providers
    ask for the same image one after the other)."""

    def __init__(self, spec: str, device: str) -> None:
        shared = embedder_from_spec(spec)  # memoised per spec on the CPU: moved as a copy, never in place
        self.embedder: Embedder = (
            shared if torch.device(device) == torch.device("cpu") else copy.deepcopy(shared).to(device)
        )  # type: ignore[attr-defined]
        emb = self.embedder
        #: the square side the embedder resizes every image to (batching resizes first, the same way)
        self.side = int(getattr(emb, "size", 0) or emb.tower.image_size)  # type: ignore[attr-defined]
        self._last: tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vec (1, D), tokens (1, N, T))`` of one image ``(1, 3, H, W)`` (on the host)."""
        return self.many([image])[0]

    @torch.no_grad()
    def many(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`__call__` of each image, in one embedder pass (each first resized to the embedder's square
        side as the embedder itself does, which makes its own resize an identity)."""
        if self._last is not None and len(self._last[0]) == len(images):
            if all(a is b for a, b in zip(self._last[0], images, strict=True)):
                return self._last[1]
        square = images[0].float() if len(images) == 1 else torch.cat([_square(i, self.side) for i in images])
        vec, tok = encode(self.embedder, square.to(_device_of(self.embedder)))
        out = [(v[None].float().cpu(), t[None].float().cpu()) for v, t in zip(vec, tok, strict=True)]
        self._last = (list(images), out)
        return out


def _square(image: torch.Tensor, side: int) -> torch.Tensor:
    """``(1, 3, H, W)`` -> ``(1, 3, side, side)``: the embedders' own resize (bicubic, antialiased, clamped)."""
    return F.interpolate(image.float(), size=(side, side), mode="bicubic", align_corners=False, antialias=True).clamp(
        0, 1
    )


_ENCODERS: dict[tuple[str, str], _SharedEncoder] = {}


class _RFAProvider:
    """Base of ``rfa-embed`` / ``rfa-tokens`` (module docstring)."""

    name = ""
    kind = "embedding"

    def __init__(self, embedder: str | None = None, device: str = "cpu") -> None:
        if not embedder:
            raise SemsrError(f"prior {self.name} needs --embedder (hed-vgg or clip:FOLDER; the database's)")
        key = (str(embedder), str(device))
        if key not in _ENCODERS:
            _ENCODERS[key] = _SharedEncoder(str(embedder), str(device))
        self.encoder = _ENCODERS[key]
        spec = self.encoder.embedder.spec
        folder = spec.split(":", 1)[1] if spec.startswith("clip:") else None
        self.version = f"{_REVISION};{spec};{fingerprint([folder]) if folder else 'builtin'}"
        self.spec = spec


class RFAEmbedProvider(_RFAProvider):
    """Embedding prior ``rfa-embed``: the unit global embedding ``(1, D)`` of the whole image."""

    name = "rfa-embed"

    def __call__(self, image: torch.Tensor) -> PriorResult:
        return self.many([image])[0]

    def many(self, images: list[torch.Tensor]) -> list[PriorResult]:
        """The prior of each image ``(1, 3, H, W)``, in one embedder pass."""
        for image in images:
            check_image(image)
        return [PriorResult("embedding", v, {"embedder": self.spec}) for v, _ in self.encoder.many(images)]


class RFATokensProvider(_RFAProvider):
    """Embedding prior ``rfa-tokens``: the embedder tokens ``(1, N, T)`` of the whole image."""

    name = "rfa-tokens"

    def __call__(self, image: torch.Tensor) -> PriorResult:
        return self.many([image])[0]

    def many(self, images: list[torch.Tensor]) -> list[PriorResult]:
        """The prior of each image ``(1, 3, H, W)``, in one embedder pass (shared with ``rfa-embed``)."""
        for image in images:
            check_image(image)
        return [PriorResult("embedding", t, {"embedder": self.spec}) for _, t in self.encoder.many(images)]


def _clip_folder(clip: str | Path | None, what: str) -> Path:
    if not clip:
        raise SemsrError(f"prior {what} needs --clip (the CLIP vision folder)")
    return Path(clip).expanduser()


class CoSeRClipProvider:
    """Embedding prior ``coser-clip``: the pooled CLIP embedding ``(1, Hc)`` of the image's centre square."""

    name = "coser-clip"
    kind = "embedding"

    def __init__(self, clip: str | Path | None = None, device: str = "cpu") -> None:
        folder = _clip_folder(clip, self.name)
        self.clip = load_clip_vision(folder, require_processor=True).to(device)
        self.version = f"{_REVISION};{fingerprint([folder])}"

    def __call__(self, image: torch.Tensor) -> PriorResult:
        return self.many([image])[0]

    def many(self, images: list[torch.Tensor]) -> list[PriorResult]:
        """The prior of each image ``(1, 3, H, W)``, in one CLIP pass."""
        for image in images:
            check_image(image)
        squares = torch.cat([centre_square(image, self.clip.image_size) for image in images])
        return [PriorResult("embedding", e[None]) for e in pool_embeddings(self.clip, squares)]


def cognitive_fingerprint(path: str | Path) -> str:
    """Fingerprint of a cognitive encoder's weights: its ``cognitive/`` component in a checkpoint folder, or
    the component folder itself (both spellings of one encoder give one fingerprint)."""
    path = Path(path).expanduser()
    return fingerprint([path / "cognitive" if (path / "cognitive").is_dir() else path])


class CoSeRCognitiveProvider:
    """Embedding prior ``coser-cognitive``: the frozen cognitive encoder's ``(1, Te, D)`` of the whole image."""

    name = "coser-cognitive"
    kind = "embedding"

    def __init__(
        self, cognitive: str | Path | None = None, clip: str | Path | None = None, device: str = "cpu"
    ) -> None:
        folder = _clip_folder(clip, self.name)
        if not cognitive:
            raise SemsrError(f"prior {self.name} needs --cognitive (the coser-cognitive run's final/ checkpoint)")
        path = Path(cognitive).expanduser()
        self.encoder = load_cognitive_encoder(path, folder).float().eval().requires_grad_(False).to(device)
        self.meta = {"cognitive": cognitive_fingerprint(path), "clip": fingerprint([folder])}
        self.version = f"{_REVISION};{self.meta['cognitive']};{self.meta['clip']}"

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> PriorResult:
        check_image(image)
        device = _device_of(self.encoder)
        return PriorResult("embedding", self.encoder.embed(image.float().to(device)).float().cpu(), self.meta)


register_provider(
    ProviderSpec(
        name="rfa-embed",
        factory=RFAEmbedProvider,
        kind="embedding",
        summary="RFA embedder's unit global embedding (1, D) of the whole image",
        options=(EMBEDDER_OPTION, DEVICE_OPTION),
    )
)
register_provider(
    ProviderSpec(
        name="rfa-tokens",
        factory=RFATokensProvider,
        kind="embedding",
        summary="RFA embedder's tokens (1, N, T) of the whole image",
        options=(EMBEDDER_OPTION, DEVICE_OPTION),
    )
)
register_provider(
    ProviderSpec(
        name="coser-clip",
        factory=CoSeRClipProvider,
        kind="embedding",
        summary="CoSeR reference-pool embedding: pooled CLIP (1, Hc) of the centre square",
        options=(CLIP_OPTION, DEVICE_OPTION),
    )
)
register_provider(
    ProviderSpec(
        name="coser-cognitive",
        factory=CoSeRCognitiveProvider,
        kind="embedding",
        summary="CoSeR frozen cognitive encoder's embedding (1, Te, D) of the whole LR image",
        options=(COGNITIVE_OPTION, CLIP_OPTION, DEVICE_OPTION),
    )
)
