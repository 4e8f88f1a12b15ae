"""Local-only loading of Stable Diffusion components, ControlNets and project checkpoints.

Everything here reads from a path the user gives; nothing ever contacts a model
hub: ``HF_HUB_OFFLINE`` is forced on and every ``from_pretrained`` call passes
``local_files_only=True``. Missing or incomplete paths raise
:class:`~semsr.core.errors.UnavailableError` naming the exact file that is missing.

Supported layouts:

- a diffusers Stable Diffusion folder (SD 1.5 / 2.1 or any config, e.g. the
  tiny test models): ``model_index.json``, ``vae/``, ``unet/``,
  ``scheduler/``, and either ``text_encoder/`` + ``tokenizer/`` (CLIP) or
  ``text_projection/`` (the offline MiniLM fallback, see :mod:`.text`);
- a single-file checkpoint (``.safetensors`` / ``.ckpt``) in the original LDM
  layout, loaded through diffusers' ``from_single_file`` with a *local*
  config folder (given, or found next to the file); pickles are loaded with
  ``torch.load(weights_only=True)``;
- a diffusers ControlNet folder (``config.json`` + weights).

semsr's own checkpoints (components and recipe checkpoint folders) are
:mod:`semsr.core.components`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from semsr.core.dtypes import resolve_dtype
from semsr.core.errors import SemsrError, UnavailableError, unsafe_pickle_message

DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def ensure_offline() -> None:
    """Force the Hugging Face libraries into offline mode (idempotent).

    Sets ``HF_HUB_OFFLINE=1`` (and the transformers/diffusers spellings) and,
    when ``huggingface_hub`` is already imported, flips its cached constant so
    the setting takes effect even after import.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    try:
        import huggingface_hub.constants as hub_constants  # flip the flag of an already imported hub

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        pass


ensure_offline()


def quiet_hf_logging() -> None:
    """Silence transformers/diffusers info logs and per-file progress bars during loading."""
    import diffusers.utils.logging as dlog  # heavy dependency, imported on use
    import transformers.utils.logging as tlog  # heavy dependency, imported on use

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


def require(path: str | Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise UnavailableError naming it and what it is."""
    p = Path(path)
    if not p.exists():
        raise UnavailableError(f"missing {what}", p)
    return p


def _find_weights(folder: Path, names: Iterable[str], what: str) -> tuple[str, str | None]:
    """Find the weight file in ``folder``; returns ``(file name, variant or None)``.

    Accepts the plain names and diffusers' variant spelling
    (``diffusion_pytorch_model.fp16.safetensors``).
    """
    names = tuple(names)
    for name in names:
        if (folder / name).is_file():
            return name, None
    for name in names:
        stem, dot, ext = name.partition(".")
        for variant in ("fp16", "bf16", "fp32"):
            cand = f"{stem}.{variant}.{ext}"
            if (folder / cand).is_file():
                return cand, variant
    raise UnavailableError(f"missing {what} weights (looked for {', '.join(names)})", folder / names[0])


def _check_component(folder: Path, weights: Iterable[str], what: str, config_name: str = "config.json") -> str | None:
    """Check that ``folder`` has a config and a weights file; return the variant."""
    require(folder, f"{what} folder")
    require(folder / config_name, f"{what} config")
    _, variant = _find_weights(folder, weights, what)
    return variant


def load_diffusers_model(
    cls: Any, folder: str | Path, *, dtype: torch.dtype = torch.float32, what: str | None = None
) -> Any:
    """Load a diffusers ``ModelMixin`` subclass from a local folder (config.json + weights)."""
    folder = Path(folder)
    what = what or cls.__name__
    variant = _check_component(folder, DIFFUSERS_WEIGHTS, what)
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, variant=variant)
    except (OSError, ValueError, RuntimeError) as err:
        raise UnavailableError(f"cannot load {what}: {_one_line(err)}", folder) from err


def load_transformers_model(
    cls: Any, folder: str | Path, *, dtype: torch.dtype = torch.float32, what: str | None = None
) -> Any:
    """Load a transformers ``PreTrainedModel`` subclass from a local folder."""
    folder = Path(folder)
    what = what or cls.__name__
    _check_component(folder, TRANSFORMERS_WEIGHTS, what)
    try:
        return cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UnavailableError(f"cannot load {what}: {_one_line(err)}", folder) from err


def load_clip_tokenizer(folder: str | Path) -> Any:
    """Load a CLIP tokenizer (``vocab.json`` + ``merges.txt``) from a local folder."""
    from transformers import CLIPTokenizer  # heavy dependency, imported on use

    folder = Path(folder)
    require(folder, "tokenizer folder")
    if not (folder / "tokenizer.json").is_file():
        require(folder / "vocab.json", "tokenizer vocabulary")
        require(folder / "merges.txt", "tokenizer merges")
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UnavailableError(f"cannot load tokenizer: {_one_line(err)}", folder) from err


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@dataclass
class SDComponents:
    """The pieces of a Stable Diffusion checkpoint the SR pipeline uses.

    Attributes:
        vae: ``AutoencoderKL`` (image <-> latent, factor ``2**(len(block_out_channels)-1)``).
        unet: ``UNet2DConditionModel``.
        text_encoder: ``CLIPTextModel`` or None when the checkpoint has none.
        tokenizer: the CLIP tokenizer or None.
        scheduler_config: the ``scheduler/scheduler_config.json`` dict.
        source: the path loaded from.
        text_projection: folder of a saved MiniLM projection (see :mod:`.text`) or None.
    """

    vae: Any
    unet: Any
    text_encoder: Any | None
    tokenizer: Any | None
    scheduler_config: dict[str, Any]
    source: Path
    text_projection: Path | None = None


def load_sd(path: str | Path, *, dtype: str | torch.dtype = "fp32", config: str | Path | None = None) -> SDComponents:
    """Load Stable Diffusion components from a diffusers folder or a single file.

    Args:
        path: an SD folder (with ``model_index.json``) or a ``.safetensors`` /
            ``.ckpt`` single-file checkpoint.
        dtype: weights dtype (``"fp32"``, ``"bf16"``, ``"fp16"`` or torch dtype).
        config: for single files only: a local diffusers SD folder providing
            the component configs and tokenizer. When omitted, a folder next
            to the file is used: the file's own folder if it holds
            ``model_index.json``, else ``<file without suffix>/``.
    """
    path = Path(path).expanduser()
    torch_dtype = resolve_dtype(dtype)
    quiet_hf_logging()
    if path.is_dir():
        return _load_sd_folder(path, torch_dtype)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UnavailableError(
                f"not a Stable Diffusion checkpoint (expected a folder or one of {', '.join(SINGLE_FILE_SUFFIXES)})",
                path,
            )
        return _load_sd_single_file(path, torch_dtype, None if config is None else Path(config).expanduser())
    raise UnavailableError("no such Stable Diffusion folder or file", path)


def _load_sd_folder(folder: Path, dtype: torch.dtype) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy dependency, imported on use
    from transformers import CLIPTextModel  # heavy dependency, imported on use

    require(folder / "model_index.json", "model_index.json (not a diffusers Stable Diffusion folder)")
    sched_file = require(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    vae = load_diffusers_model(AutoencoderKL, folder / "vae", dtype=dtype, what="VAE")
    unet = load_diffusers_model(UNet2DConditionModel, folder / "unet", dtype=dtype, what="UNet")
    text_encoder = tokenizer = projection = None
    if (folder / "text_encoder").exists():
        text_encoder = load_transformers_model(CLIPTextModel, folder / "text_encoder", dtype=dtype, what="text encoder")
        tokenizer = load_clip_tokenizer(folder / "tokenizer")
    elif (folder / "text_projection").exists():
        projection = folder / "text_projection"
    return SDComponents(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=_read_json(sched_file),
        source=folder,
        text_projection=projection,
    )


def find_single_file_config(path: Path) -> Path | None:
    """Return a local diffusers config folder for the single file ``path``, if one sits beside it."""
    for cand in (path.parent, path.with_suffix("")):
        if (cand / "model_index.json").is_file():
            return cand
    return None


def _load_sd_single_file(path: Path, dtype: torch.dtype, config: Path | None) -> SDComponents:
    from diffusers import StableDiffusionPipeline  # heavy dependency, imported on use

    if config is None:
        config = find_single_file_config(path)
        if config is None:
            raise UnavailableError(
                "single-file checkpoint needs a local diffusers config folder (model_index.json, "
                "unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs); none found next to it: "
                "pass config=DIR (CLI: --base-config DIR)",
                path,
            )
    require(config / "model_index.json", "model_index.json of the single-file config folder")
    for sub, fname in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        require(config / sub / fname, f"{sub} config of the single-file config folder")
    has_text = (config / "text_encoder").exists()
    if has_text:
        require(config / "text_encoder" / "config.json", "text encoder config of the single-file config folder")
        require(config / "tokenizer", "tokenizer of the single-file config folder")
    kwargs: dict[str, Any] = {}
    if not has_text:
        kwargs.update(text_encoder=None, tokenizer=None)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **kwargs,
        )
    except Exception as err:
        if isinstance(err, SemsrError):
            raise
        msg = _one_line(err)
        if "weights_only" in msg or "Unpickler" in msg:
            msg = "the .ckpt holds non-tensor pickled objects and is not loaded unsafely; convert it to .safetensors"
        raise UnavailableError(f"cannot load single-file checkpoint: {msg}", path) from err
    projection = config / "text_projection" if (config / "text_projection").exists() else None
    return SDComponents(
        vae=pipe.vae,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
        source=path,
        text_projection=projection,
    )


def load_controlnet(path: str | Path, *, dtype: str | torch.dtype = "fp32") -> Any:
    """Load a diffusers ``ControlNetModel`` from a local folder (``config.json`` + weights)."""
    from diffusers import ControlNetModel  # heavy dependency, imported on use

    path = Path(path).expanduser()
    quiet_hf_logging()
    if not path.exists():
        raise UnavailableError("no such ControlNet folder", path)
    if not path.is_dir():
        raise UnavailableError("a ControlNet must be a diffusers folder (config.json + weights)", path)
    return load_diffusers_model(ControlNetModel, path, dtype=resolve_dtype(dtype), what="ControlNet")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UnavailableError(f"unreadable JSON: {_one_line(err)}", path) from err


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Safely read a state dict: safetensors, or a pickle with ``torch.load(weights_only=True)``."""
    path = Path(path).expanduser()
    require(path, "weights file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UnavailableError(
            f"cannot load weights safely: {unsafe_pickle_message(err) or _one_line(err)}", path
        ) from err
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnavailableError("weights file does not hold a state dict", path)
    return obj
