"""The prior-provider interface every prior (text, spatial, embedding, tags) uses.

A *provider* extracts one prior from one image::

    provider = get_provider("canny")                 # registry lookup, options as kwargs
    result = provider(image)                         # image: (1, 3, H, W) float in [0, 1]
    result.kind, result.value, result.meta

Every provider has

- ``name``: registry name (``"canny"``, ``"hed"``, ``"depth"``...);
- ``version``: a string that changes whenever the output for the same image
  would change (code revision *and* options such as thresholds or the model
  folder); it is part of the cache key;
- ``kind``: one of :data:`KINDS`;
- ``__call__(image) -> PriorResult``.

Results are cached on disk by :class:`CachedProvider`, keyed by the image
content hash (:func:`image_key`) + provider name + version.

New providers register a :class:`ProviderSpec` with :func:`register_provider`
from a module listed in ``_BUILTIN`` (imported lazily, so keep those modules
import-cheap: import transformers/h5py inside the factory). A spec lists its
user options (:class:`ProviderOption`), from which ``semsr priors`` builds its
command-line flags, so a new provider needs no change to the command.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from semsr.core.errors import InputError, UnavailableError
from semsr.core.fingerprint import image_key
from semsr.core.io import Picture, atomic_write
from semsr.core.paths import cache_dir, weights_dir
from semsr.core.registry import Registry

PriorKind = Literal["text", "spatial", "embedding", "tags"]
KINDS: tuple[str, ...] = ("text", "spatial", "embedding", "tags")


@dataclass(frozen=True)
class PriorResult:
    """One prior extracted from one image.

    Attributes:
        kind: one of :data:`KINDS`.
        value: by kind --
            ``text``: ``str``;
            ``spatial``: ``Tensor (1, C, H, W)`` float in [0, 1] at the image's
            size (C = 1 for edges/depth, 3 for colourised segmentation);
            ``embedding``: float ``Tensor`` ``(1, D)`` or ``(1, N, D)``;
            ``tags``: ``tuple[str, ...]``.
        meta: JSON-serialisable extra information (thresholds used, label
            names, scores...).
    """

    kind: str
    value: str | torch.Tensor | tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown prior kind {self.kind!r}; expected one of {KINDS}")
        ok = {
            "text": isinstance(self.value, str),
            "tags": isinstance(self.value, tuple) and all(isinstance(t, str) for t in self.value),
            "spatial": isinstance(self.value, torch.Tensor) and self.value.ndim == 4 and self.value.shape[0] == 1,
            "embedding": isinstance(self.value, torch.Tensor)
            and self.value.ndim in (2, 3)
            and self.value.shape[0] == 1,
        }[self.kind]
        if not ok:
            raise TypeError(f"bad value for a {self.kind!r} prior: {type(self.value).__name__}")


@runtime_checkable
class PriorProvider(Protocol):
    """What every prior provider provides (see the module docstring)."""

    name: str
    version: str
    kind: str

    def __call__(self, image: torch.Tensor) -> PriorResult:
        """Extract the prior from ``image`` ``(1, 3, H, W)`` float in [0, 1]."""
        ...


@dataclass(frozen=True)
class ProviderOption:
    """A user option of a provider, exposed by ``semsr priors`` as a flag.

    Attributes:
        name: keyword argument of the provider factory (``"model"``).
        flag: command-line flag (``"--depth-model"``); providers may share a
            flag when it means the same thing to each of them.
        help: one-line help text.
        type: converter for the flag's string value (``str``, ``float``, ``int``).
    """

    name: str
    flag: str
    help: str
    type: Callable[[str], Any] = str


#: The ``--device`` option shared by the neural providers.
DEVICE_OPTION = ProviderOption("device", "--device", "torch device for neural priors (default: cpu)")


@dataclass
class ProviderSpec:
    """Registry entry: how to build a provider and what to tell users about it."""

    name: str
    factory: Callable[..., PriorProvider]
    kind: str
    summary: str = ""
    options: tuple[ProviderOption, ...] = ()


# Modules that register providers when imported (keep them import-cheap).
_BUILTIN: tuple[str, ...] = (
    "semsr.priors.edges",
    "semsr.priors.depth_seg",
    "semsr.priors.tagger",
    "semsr.priors.vlm",
    "semsr.priors.irpad",
    "semsr.priors.clip_embed",
)
_PROVIDERS: Registry[ProviderSpec] = Registry(_BUILTIN, "prior")
_REGISTRY = _PROVIDERS.entries


def register_provider(spec: ProviderSpec) -> ProviderSpec:
    """Add ``spec`` to the registry (a later registration replaces an earlier one)."""
    if spec.kind not in KINDS:
        raise ValueError(f"unknown prior kind {spec.kind!r}")
    return _PROVIDERS.add(spec.name, spec)


def provider_specs() -> list[ProviderSpec]:
    """All registered provider specs, in registration order."""
    return _PROVIDERS.specs()


def resolve_provider(name: str) -> ProviderSpec:
    """Return the spec for ``name``; raise a one-line :class:`SemsrError` if unknown."""
    return _PROVIDERS.resolve(name)


def get_provider(name: str, **opts: Any) -> PriorProvider:
    """Build provider ``name`` with factory options ``opts`` (model path, device, thresholds...)."""
    return resolve_provider(name).factory(**opts)


def model_folder(path: str | Path | None, default_name: str, missing: str) -> Path:
    """A provider's local model folder (written by ``save_pretrained``): ``path``, or
    ``weights_dir()/default_name`` when None. Raises :class:`UnavailableError` ``missing``
    (on the folder, marked ``(default)`` when it was not given) unless it holds ``config.json``."""
    folder = Path(path).expanduser() if path is not None else weights_dir() / default_name
    if not (folder / "config.json").is_file():
        raise UnavailableError(missing, folder if path is not None else f"{folder} (default)")
    return folder


# --------------------------------------------------------------------- caching


def check_image(image: torch.Tensor) -> None:
    """Raise :class:`InputError` unless ``image`` is ``(1, 3, H, W)`` floating point."""
    if not (
        isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[:2] == (1, 3) and image.is_floating_point()
    ):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"a prior provider takes one RGB image (1, 3, H, W) float in [0, 1], got {shape}")


@dataclass(frozen=True)
class PriorRecord:
    """Where one cached prior lives; passed to a :class:`PriorSink` after a store."""

    image_key: str
    provider: str
    version: str
    kind: str
    path: Path


class PriorSink(Protocol):
    """Something that wants to know about stored priors (e.g. a corpus manifest)."""

    def add_prior(self, record: PriorRecord) -> None:
        """Record that ``record.path`` holds the prior of ``record.image_key``."""
        ...


def save_result(result: PriorResult, path: Path) -> None:
    """Write ``result`` atomically: ``.safetensors`` for tensors, ``.json`` otherwise."""
    if isinstance(result.value, torch.Tensor):
        meta = {"kind": result.kind, "meta": json.dumps(dict(result.meta))}
        tensor = result.value.detach().cpu().contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            save_file({"value": tensor}, str(tmp), metadata=meta)
    else:
        value = list(result.value) if result.kind == "tags" else result.value
        text = json.dumps({"kind": result.kind, "value": value, "meta": dict(result.meta)}, ensure_ascii=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def load_result(path: Path) -> PriorResult:
    """Read a result written by :func:`save_result`."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            value = f.get_tensor("value")
        return PriorResult(meta["kind"], value, json.loads(meta.get("meta", "{}")))
    data = json.loads(path.read_text(encoding="utf-8"))
    value = tuple(data["value"]) if data["kind"] == "tags" else data["value"]
    return PriorResult(data["kind"], value, data.get("meta", {}))


def _slug(text: str) -> str:
    """A file-name-safe, collision-free rendering of ``text``."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40]
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class CachedProvider:
    """Wrap a provider so each (image content, name, version) is computed once.

    Entries live in ``<root>/<name>/<version slug>/<key[:2]>/<key>.{safetensors,json}``
    where ``root`` defaults to ``semsr.core.paths.cache_dir() / "priors"``. When a
    ``sink`` (e.g. the corpus manifest) is given it is told about each entry,
    freshly computed or found in the cache.

    Attributes:
        hits / misses: counts of cache hits and computations, for callers and tests.
    """

    def __init__(self, provider: PriorProvider, root: Path | None = None, sink: PriorSink | None = None) -> None:
        self.provider = provider
        self.root = Path(root) if root is not None else cache_dir() / "priors"
        self.sink = sink
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def version(self) -> str:
        return self.provider.version

    @property
    def kind(self) -> str:
        return self.provider.kind

    def entry_path(self, key: str) -> Path:
        """Cache file for image key ``key`` (the suffix depends on the provider kind)."""
        suffix = ".safetensors" if self.kind in ("spatial", "embedding") else ".json"
        return self.root / _slug(self.name) / _slug(self.version) / key[:2] / f"{key}{suffix}"

    def __call__(self, image: torch.Tensor) -> PriorResult:
        """Same contract as the wrapped provider: ``(1, 3, H, W)`` in [0, 1] -> result."""
        key = image_key(image)
        path = self.entry_path(key)
        result = None
        if path.is_file():
            try:
                result = load_result(path)
                self.hits += 1
            except Exception:  # a damaged or foreign entry (any reader error): recompute
                result = None
        if result is None:
            result = self.provider(image)
            if result.kind != self.kind:
                raise TypeError(f"provider {self.name!r} declared kind {self.kind!r} but returned {result.kind!r}")
            save_result(result, path)
            self.misses += 1
        if self.sink is not None:
            self.sink.add_prior(PriorRecord(key, self.name, self.version, self.kind, path))
        return result


def cached(provider: PriorProvider, root: Path | None = None, sink: PriorSink | None = None) -> CachedProvider:
    """Return ``provider`` wrapped in a :class:`CachedProvider` (see there)."""
    return CachedProvider(provider, root=root, sink=sink)


# ------------------------------------------------------------ spatial helpers


def spatial_to_uint8(value: torch.Tensor) -> np.ndarray:
    """Spatial map ``(1, C, H, W)`` in [0, 1] -> ``uint8`` array ``(H, W)`` (C = 1) or ``(H, W, 3)``."""
    if value.ndim != 4 or value.shape[0] != 1 or value.shape[1] not in (1, 3):
        raise ValueError(f"expected a (1, 1|3, H, W) map, got {tuple(value.shape)}")
    arr = (value[0].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def picture_tensor(pic: Picture) -> torch.Tensor:
    """:class:`semsr.core.io.Picture` -> ``(1, 3, H, W)`` float32 in [0, 1] (alpha dropped)."""
    scale = 65535.0 if pic.rgb.dtype == np.uint16 else 255.0
    return torch.from_numpy(pic.rgb.astype(np.float32) / scale).permute(2, 0, 1)[None].contiguous()
