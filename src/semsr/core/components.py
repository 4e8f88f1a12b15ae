"""The component contract and the one checkpoint layout.

**Components.** Every trainable part of semsr (fusion modules, connectors,
encoders, heads, adapters, the default model) is a :class:`Component`: a
diffusers ``ModelMixin`` + ``ConfigMixin`` whose ``__init__`` arguments are
recorded with ``@register_to_config``. So every part saves and loads the same
way (``config.json`` + ``diffusion_pytorch_model.safetensors``), dtype and
device moves are the usual ``.to``, and diffusers' and semsr's parts mix
freely in one folder. Components register their class with
:func:`register_component`; loading only ever instantiates registered classes
(or the diffusers/transformers classes named in :data:`FOREIGN_CLASSES`), so a
checkpoint names classes but never carries code, and weights are read from
safetensors only (nothing is unpickled).

**Checkpoint folders.** A recipe's checkpoint is one folder with an index
file, ``model_index.json``, naming its components, like a diffusers pipeline
folder::

    {"_class_name": "xpsr", "_semsr_version": "0.1.0",
     "controlnet": ["diffusers", "ControlNetModel"],
     "sfa": ["semsr", "SFAFusion"],
     "meta": {...recipe settings...}}

and one sub-folder per component. :func:`save_checkpoint` writes it
(atomically: a finished folder or none), :func:`load_checkpoint` reads it back.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.io import atomic_folder
from semsr.core.loading import check_loading_info, own_memory
from semsr.core.version import __version__

__all__ = [
    "INDEX_FILE",
    "Component",
    "CheckpointIndex",
    "load_checkpoint",
    "load_component",
    "read_index",
    "register_component",
    "register_to_config",
    "save_checkpoint",
]

INDEX_FILE = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
C = TypeVar("C", bound=type)

#: Classes of other libraries a checkpoint may name: ``(library, class name)`` -> module path.
FOREIGN_CLASSES: dict[tuple[str, str], str] = {
    ("diffusers", "ControlNetModel"): "diffusers",
    ("diffusers", "UNet2DConditionModel"): "diffusers",
    ("diffusers", "AutoencoderKL"): "diffusers",
    ("diffusers", "VQModel"): "diffusers",
}
_SEMSR: dict[str, type] = {}


class Component(ModelMixin, ConfigMixin):
    """Base of semsr's trainable parts (see the module docstring).

    Subclasses decorate ``__init__`` with ``@register_to_config`` and register
    the class with :func:`register_component`. ``save_pretrained(folder)`` /
    ``Class.from_pretrained(folder)`` are diffusers'; prefer
    :func:`load_component`, which checks the folder and fails with one line.
    """

    config_name = "config.json"  # type: ignore[assignment]  # diffusers declares it None on the mixin


def register_component(cls: C) -> C:
    """Class decorator: allow ``cls`` to be named in checkpoint indexes (as ``["semsr", cls.__name__]``)."""
    _SEMSR[cls.__name__] = cls
    return cls


def component_class(library: str, name: str) -> type:
    """The class a checkpoint names, from the registered or allow-listed ones only."""
    if library == "semsr" and name in _SEMSR:
        return _SEMSR[name]
    module = FOREIGN_CLASSES.get((library, name))
    if module is None:
        known = sorted([f"semsr.{n}" for n in _SEMSR] + [f"{lib}.{n}" for lib, n in FOREIGN_CLASSES])
        raise UnavailableError(f"unknown component class {library}.{name} (known: {', '.join(known)})")
    return getattr(importlib.import_module(module), name)


def load_component(
    cls: type, folder: str | Path, *, dtype: torch.dtype | None = None, partial: bool | None = None
) -> Any:
    """Load one component folder (``config.json`` + safetensors weights) as ``cls``, in eval mode.

    Strict: weights with missing or unexpected tensors fail with one line naming the file and the
    first keys, unless ``partial`` (None: :func:`semsr.core.loading.partial_loading`'s setting).
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise UnavailableError(f"not a {cls.__name__} folder (no config.json)", folder)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        raise UnavailableError(f"not a {cls.__name__} folder (no .safetensors weights)", folder)
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "output_loading_info": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if issubclass(cls, Component):
        kwargs["low_cpu_mem_usage"] = False  # build real tensors: some components hold computed buffers
    try:
        model, info = cls.from_pretrained(folder, **kwargs)  # type: ignore[attr-defined]  # a ModelMixin class
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        lines = str(err).strip().splitlines()
        raise UnavailableError(
            f"cannot load {cls.__name__}: {lines[0] if lines else type(err).__name__}", folder
        ) from err
    weights = folder / WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else folder
    check_loading_info(info, weights, cls.__name__, partial)
    return own_memory(model).eval()


def _library_of(module: Any) -> tuple[str, str]:
    cls = type(module)
    if cls.__name__ in _SEMSR and _SEMSR[cls.__name__] is cls:
        return "semsr", cls.__name__
    for (lib, name), _mod in FOREIGN_CLASSES.items():
        if cls.__name__ == name and cls.__module__.split(".")[0] == lib:
            return lib, name
    raise SemsrError(f"{cls.__module__}.{cls.__name__} is not a registered component class")


@dataclass
class CheckpointIndex:
    """The index of a checkpoint folder.

    Attributes:
        recipe: the recipe the checkpoint is for (``"xpsr"``, ``"mmsr"``...).
        components: component name -> ``(library, class name)``.
        meta: recipe settings stored beside the components (JSON values).
        version: semsr version that wrote it.
    """

    recipe: str
    components: dict[str, tuple[str, str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    version: str = ""


def read_index(folder: str | Path, recipe: str | None = None) -> CheckpointIndex:
    """Read ``folder/model_index.json``; with ``recipe``, check that the checkpoint is for it."""
    folder = Path(folder).expanduser()
    path = folder / INDEX_FILE
    if not path.is_file():
        what = f"a {recipe} checkpoint folder" if recipe else "a semsr checkpoint folder"
        raise UnavailableError(f"not {what} (no {INDEX_FILE})", folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UnavailableError(f"unreadable checkpoint index: {err}", path) from err
    if not isinstance(data, dict) or "_class_name" not in data:
        raise UnavailableError("not a semsr checkpoint index (no _class_name)", path)
    found = str(data["_class_name"])
    if recipe is not None and found != recipe:
        raise UnavailableError(f"this is a {found} checkpoint, not a {recipe} one", folder)
    comps = {
        k: (str(v[0]), str(v[1]))
        for k, v in data.items()
        if not k.startswith("_") and k != "meta" and isinstance(v, list) and len(v) == 2 and v[0] is not None
    }
    return CheckpointIndex(found, comps, dict(data.get("meta") or {}), str(data.get("_semsr_version", "")))


def save_checkpoint(
    folder: str | Path, recipe: str, components: Mapping[str, Any], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a checkpoint folder: each component with ``save_pretrained`` plus the index.

    The folder is assembled beside ``folder`` and moved into place
    (:func:`semsr.core.io.atomic_folder`), so a reader sees a complete checkpoint
    or the previous one (which is replaced).
    """
    folder = Path(folder).expanduser()
    with atomic_folder(folder) as tmp:
        index: dict[str, Any] = {"_class_name": recipe, "_semsr_version": __version__}
        for name, module in components.items():
            if module is None:
                continue
            index[name] = list(_library_of(module))
            module.save_pretrained(tmp / name, safe_serialization=True)
        index["meta"] = dict(meta or {})
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def load_checkpoint(
    folder: str | Path,
    recipe: str,
    *,
    names: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    partial: bool | None = None,
) -> tuple[dict[str, Any], CheckpointIndex]:
    """``({name: component}, index)`` of a checkpoint folder (only ``names`` when given).

    Every component loads strictly unless ``partial`` (see :func:`load_component`).
    """
    folder = Path(folder).expanduser()
    index = read_index(folder, recipe)
    wanted = list(index.components) if names is None else list(names)
    missing = [n for n in wanted if n not in index.components]
    if missing:
        raise UnavailableError(f"the {recipe} checkpoint has no {missing[0]!r} component", folder / INDEX_FILE)
    out = {}
    for name in wanted:
        lib, cls_name = index.components[name]
        out[name] = load_component(component_class(lib, cls_name), folder / name, dtype=dtype, partial=partial)
    return out, index
