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

import contextlib
import contextvars
import json
import logging
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from semsr.core.dtypes import resolve_dtype
from semsr.core.errors import SemsrError, UnavailableError, unsafe_pickle_message
from semsr.core.single_file import single_file_key_mismatch

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

log = logging.getLogger("semsr.loading")

#: Whether loaders accept weight files whose tensors do not match the model (see :func:`partial_loading`).
_PARTIAL: contextvars.ContextVar[bool] = contextvars.ContextVar("semsr_partial_load", default=False)
_SHOWN_KEYS = 3


@contextlib.contextmanager
def partial_loading(enabled: bool = True) -> Iterator[None]:
    """Within the block, loaders called without ``partial=`` accept missing/unexpected tensors (with a warning).

    ``semsr.api`` wraps a method's factory in it with the method's ``partial_load`` option, so a
    recipe's own ``load_checkpoint`` calls follow the user's choice without passing it along.
    """
    token = _PARTIAL.set(bool(enabled))
    try:
        yield
    finally:
        _PARTIAL.reset(token)


def partial_allowed(partial: bool | None = None) -> bool:
    """``partial`` when given, else the value set by :func:`partial_loading` (default False: strict)."""
    return _PARTIAL.get() if partial is None else bool(partial)


def _first(keys: Collection[str]) -> str:
    shown = sorted(keys)[:_SHOWN_KEYS]
    more = f", ... {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def check_keys(
    source: str | Path,
    what: str,
    *,
    missing: Collection[str] = (),
    unexpected: Collection[str] = (),
    mismatched: Collection[str] = (),
    partial: bool | None = None,
) -> None:
    """Fail (or, for a partial load, warn) when the tensors of a weight file do not match the model.

    Args:
        source: the weight file (or folder) the tensors came from; named in the message.
        what: what was loaded (``"ControlNet"``, ``"UNet"``...).
        missing: model tensors the file lacks (they keep their initial values).
        unexpected: file tensors the model has no place for (ignored).
        mismatched: tensors whose shapes differ (never loaded).
        partial: accept the mismatch with a warning listing every key; None: :func:`partial_allowed`.

    Raises:
        UnavailableError: one line naming ``source``, the counts and the first few keys of each kind.
    """
    missing, unexpected, mismatched = sorted(set(missing)), sorted(set(unexpected)), sorted(set(mismatched))
    if not (missing or unexpected or mismatched):
        return
    kinds = [
        (len(keys), label, keys)
        for keys, label in ((unexpected, "unexpected"), (missing, "missing"), (mismatched, "mis-shaped"))
        if keys
    ]
    if partial_allowed(partial):
        listing = "; ".join(f"{label}: {', '.join(keys)}" for _, label, keys in kinds)
        log.warning("%s: partial load of the %s weights (%s)", source, what, listing)
        return
    summary = "; ".join(f"{n} {label} tensor{'s' if n != 1 else ''} ({_first(keys)})" for n, label, keys in kinds)
    raise UnavailableError(
        f"{what} weights do not match the model: {summary}; pass --partial-load (partial=True) to load anyway",
        source,
    )


def check_loading_info(info: dict[str, Any], source: str | Path, what: str, partial: bool | None = None) -> None:
    """:func:`check_keys` on the ``loading_info`` of diffusers'/transformers' ``from_pretrained``."""
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]
    check_keys(
        source,
        what,
        missing=list(info.get("missing_keys") or ()),
        unexpected=list(info.get("unexpected_keys") or ()),
        mismatched=mismatched,
        partial=partial,
    )


def load_matching(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str | Path,
    what: str,
    *,
    partial: bool | None = None,
) -> torch.nn.Module:
    """``module.load_state_dict(state)`` that fails with one line (:func:`check_keys`) on any key mismatch.

    A partial load copies every tensor whose name and shape match and warns about the rest.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    check_keys(source, what, missing=missing, unexpected=unexpected, mismatched=mismatched, partial=partial)
    module.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    return module


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
    cls: Any,
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    what: str | None = None,
    partial: bool | None = None,
) -> Any:
    """Load a diffusers ``ModelMixin`` subclass from a local folder (config.json + weights).

    Strict: missing or unexpected tensors fail with one line (:func:`check_keys`) unless ``partial``.
    """
    folder = Path(folder)
    what = what or cls.__name__
    variant = _check_component(folder, DIFFUSERS_WEIGHTS, what)
    weights, _ = _find_weights(folder, DIFFUSERS_WEIGHTS, what)
    try:
        model, info = cls.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True, variant=variant, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise UnavailableError(f"cannot load {what}: {_one_line(err)}", folder) from err
    check_loading_info(info, folder / weights, what, partial)
    return own_memory(model)


#: Byte alignment the CPU allocator gives tensors (and the kernels expect for their usual paths).
WEIGHT_ALIGNMENT = 64


def own_memory(module: Any) -> Any:
    """Give every CPU parameter and buffer of ``module`` that is not :data:`WEIGHT_ALIGNMENT`-aligned its own memory.

    ``from_pretrained`` on safetensors files can leave tensors as views into the file's buffer at arbitrary
    byte offsets. On AVX-512 CPUs the oneDNN/MKL kernels take different paths for unaligned operands, so the
    same weights gave results that differed in the last bits from one process to the next; a copy (the
    allocator aligns it) makes results reproducible. Tied weights stay tied (a parameter is one object).
    Returns ``module``.
    """
    if not isinstance(module, torch.nn.Module):
        return module
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % WEIGHT_ALIGNMENT:
                tensor.data = tensor.data.clone()
    return module


def strict_from_pretrained(
    cls: Any, folder: str | Path, *, what: str | None = None, partial: bool | None = None, **kwargs: Any
) -> Any:
    """``cls.from_pretrained(folder, local_files_only=True, **kwargs)`` (diffusers or transformers) that fails
    with one line naming the folder when the weights miss or add tensors (:func:`check_keys`).

    A transformers folder saved from a larger model (its ``config.json`` names other ``architectures``,
    e.g. a full ``CLIPModel`` loaded as ``CLIPVisionModel``) may hold the other parts: unexpected tensors
    outside the loaded model's own top-level modules are not reported (:func:`other_parts_dropped`).
    """
    folder = Path(folder)
    what = what or cls.__name__
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise UnavailableError(f"cannot load {what}: {_one_line(err)}", folder) from err
    check_loading_info(other_parts_dropped(model, folder, info), folder, what, partial)
    return own_memory(model)


def other_parts_dropped(model: Any, folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """``info`` without the unexpected keys of the *other* parts of a larger checkpoint.

    Only when ``folder/config.json`` names ``architectures`` that do not include the loaded class
    (a tower or base model loaded from a composite/with-head checkpoint); keys under the model's own
    top-level modules stay reported, so a stray tensor inside the model still fails.
    """
    config = folder / "config.json"
    arch = _read_json(config).get("architectures") if config.is_file() else None
    if not arch or type(model).__name__ in arch:
        return info
    roots = {k.split(".")[0] for k in model.state_dict()}
    kept = [k for k in info.get("unexpected_keys") or () if k.split(".")[0] in roots]
    return {**info, "unexpected_keys": kept}


def load_transformers_model(
    cls: Any,
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    what: str | None = None,
    partial: bool | None = None,
) -> Any:
    """Load a transformers ``PreTrainedModel`` subclass from a local folder (strict, see :func:`check_keys`;
    the other parts of a larger checkpoint are allowed, see :func:`other_parts_dropped`)."""
    folder = Path(folder)
    what = what or cls.__name__
    _check_component(folder, TRANSFORMERS_WEIGHTS, what)
    weights, _ = _find_weights(folder, TRANSFORMERS_WEIGHTS, what)
    try:
        model, info = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UnavailableError(f"cannot load {what}: {_one_line(err)}", folder) from err
    check_loading_info(other_parts_dropped(model, folder, info), folder / weights, what, partial)
    return own_memory(model)


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
    """The first line of ``err``; with the next one when it only introduces it (``"Error(s) in ...:"``)."""
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not text:
        return type(err).__name__
    if text[0].endswith(":") and len(text) > 1:
        return f"{text[0]} {text[1]}"
    return text[0]


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


def load_sd(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "fp32",
    config: str | Path | None = None,
    partial: bool | None = None,
    with_unet: bool = True,
) -> SDComponents:
    """Load Stable Diffusion components from a diffusers folder or a single file.

    Args:
        path: an SD folder (with ``model_index.json``) or a ``.safetensors`` /
            ``.ckpt`` single-file checkpoint.
        dtype: weights dtype (``"fp32"``, ``"bf16"``, ``"fp16"`` or torch dtype).
        config: for single files only: a local diffusers SD folder providing
            the component configs and tokenizer. When omitted, a folder next
            to the file is used: the file's own folder if it holds
            ``model_index.json``, else ``<file without suffix>/``.
        partial: accept weight files with missing or unexpected tensors (warning); None: the
            :func:`partial_loading` setting (strict by default, see :func:`check_keys`).
        with_unet: False leaves ``unet`` None (a recipe that brings its whole UNet, e.g. SeeSR's released one);
            a folder then needs no ``unet/``.
    """
    path = Path(path).expanduser()
    torch_dtype = resolve_dtype(dtype)
    quiet_hf_logging()
    if path.is_dir():
        return _load_sd_folder(path, torch_dtype, partial, with_unet=with_unet)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UnavailableError(
                f"not a Stable Diffusion checkpoint (expected a folder or one of {', '.join(SINGLE_FILE_SUFFIXES)})",
                path,
            )
        comps = _load_sd_single_file(
            path, torch_dtype, None if config is None else Path(config).expanduser(), partial=partial
        )
        if not with_unet:
            comps.unet = None
        return comps
    raise UnavailableError("no such Stable Diffusion folder or file", path)


def _load_sd_folder(folder: Path, dtype: torch.dtype, partial: bool | None, *, with_unet: bool = True) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy dependency, imported on use
    from transformers import CLIPTextModel  # heavy dependency, imported on use

    require(folder / "model_index.json", "model_index.json (not a diffusers Stable Diffusion folder)")
    sched_file = require(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    vae = load_diffusers_model(AutoencoderKL, folder / "vae", dtype=dtype, what="VAE", partial=partial)
    unet = None
    if with_unet:
        unet = load_diffusers_model(UNet2DConditionModel, folder / "unet", dtype=dtype, what="UNet", partial=partial)
    text_encoder = tokenizer = projection = None
    if (folder / "text_encoder").exists():
        text_encoder = load_transformers_model(
            CLIPTextModel, folder / "text_encoder", dtype=dtype, what="text encoder", partial=partial
        )
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


def _load_sd_single_file(path: Path, dtype: torch.dtype, config: Path | None, *, partial: bool | None) -> SDComponents:
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
    _check_single_file_keys(path, config, has_text, partial)
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


def load_controlnet(path: str | Path, *, dtype: str | torch.dtype = "fp32", partial: bool | None = None) -> Any:
    """Load a diffusers ``ControlNetModel`` from a local folder (``config.json`` + weights).

    Strict unless ``partial``: a folder with tensors the ControlNet lacks (e.g. a recipe's fusion modules
    saved beside it) or without some of its tensors fails with one line (:func:`check_keys`).
    """
    from diffusers import ControlNetModel  # heavy dependency, imported on use

    path = Path(path).expanduser()
    quiet_hf_logging()
    if not path.exists():
        raise UnavailableError("no such ControlNet folder", path)
    if not path.is_dir():
        raise UnavailableError("a ControlNet must be a diffusers folder (config.json + weights)", path)
    return load_diffusers_model(ControlNetModel, path, dtype=resolve_dtype(dtype), what="ControlNet", partial=partial)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UnavailableError(f"unreadable JSON: {_one_line(err)}", path) from err


def _check_single_file_keys(path: Path, config: Path, has_text: bool, partial: bool | None) -> None:
    """Compare the tensors of a single file with modules built (on the meta device) from ``config``.

    Runs before diffusers converts the file, which drops unknown tensors silently and cannot
    build a module with a missing one.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy dependency, imported on use
    from transformers import CLIPTextConfig, CLIPTextModel  # heavy dependency, imported on use

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_read_json(config / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_read_json(config / "vae" / "config.json"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")) if has_text else None
    missing, unexpected = single_file_key_mismatch(_file_keys(path), unet=unet, vae=vae, text_encoder=text)
    check_keys(path, "Stable Diffusion", missing=missing, unexpected=unexpected, partial=partial)


def _file_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint (safetensors header, or the state dict of a pickle)."""
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(load_state_dict_file(path))


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
