"""SeeSR's UNet and ControlNet: diffusers' models plus an image cross-attention after every text one.

SeeSR (public repository ``cswry/SeeSR``) extends Stable Diffusion 2's UNet and its ControlNet with
``image_attentions``: in every block that has text cross-attention (``attentions``: down, mid and, in the UNet,
up blocks) a second list of full ``Transformer2DModel``s, one per text transformer, with the same configuration
except ``cross_attention_dim = image_cross_attention_dim`` (512, the width of the DAPE tagger's image
embeddings). Each runs right after the text transformer of the same index, on its output, with the image
embeddings ``(B, T_img, 512)`` as context (the released mid block builds its image transformers without
``only_cross_attention``; SD-2 has it off everywhere, so copying the text transformer's configuration is the
same)::

    h = resnet(h); h = attentions[i](h, text (B, 77, D)); h = image_attentions[i](h, image (B, T_img, 512))

:class:`SeeSRUNet` and :class:`SeeSRControlNet` are diffusers' ``UNet2DConditionModel`` / ``ControlNetModel``
(config-registered, same tensor names as the released ``seesr/unet`` and ``seesr/controlnet`` folders, including
``*.image_attentions.*``) whose ``forward`` takes ``image_encoder_hidden_states``. diffusers' blocks run
unchanged; each image transformer is applied by a forward hook on the text transformer it follows.

:func:`load_released_seesr` reads a released SeeSR folder (``<folder>/unet``, ``<folder>/controlnet``: diffusers
``config.json`` + ``diffusion_pytorch_model.safetensors``) strictly: a released tensor without a home, a tensor the
file lacks or a mis-shaped one fails with one line naming the tensor and the file. Only safetensors are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models import Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import check_keys, partial_allowed

log = logging.getLogger(__name__)

#: Name of the per-block list of image transformers (released tensor names: ``<block>.image_attentions.<i>.*``).
IMAGE_ATTENTIONS = "image_attentions"
#: Width of the image context (DAPE's image embeddings); fixed in the released code.
IMAGE_CROSS_ATTENTION_DIM = 512
_OWN_KEYS = {"use_image_cross_attention", "image_cross_attention_dim"}


class _ImageContext:
    """The image embeddings of the running forward, read by the hooks of the text transformers."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    @contextmanager
    def bound(self, value: torch.Tensor | None) -> Iterator[None]:
        saved, self.value = self.value, value
        try:
            yield
        finally:
            self.value = saved


def _cross_attention_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks of ``model`` with text cross-attention (``attentions`` of ``Transformer2DModel``s), in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "attentions", None), nn.ModuleList)
        and len(m.attentions) > 0
        and all(isinstance(a, Transformer2DModel) for a in m.attentions)
    ]


def _image_transformer(text: Transformer2DModel, dim: int) -> Transformer2DModel:
    """A fresh ``Transformer2DModel`` configured as ``text`` but cross-attending to a ``dim``-wide context."""
    config = {k: v for k, v in text.config.items() if not k.startswith("_")}
    config["cross_attention_dim"] = int(dim)
    with torch.device(text.proj_in.weight.device):
        return Transformer2DModel.from_config(config)


#: Plain (unregistered) attributes of a text transformer naming its image transformer and the model's image
#: context: no new state-dict keys, and ``copy.deepcopy`` of the model carries them over to the copies.
_IMAGE_ATTN_ATTR, _CONTEXT_ATTR = "_seesr_image_attention", "_seesr_image_context"


def _image_attention_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook of a text transformer: its output ``(B, C, h, w)`` goes through its image transformer with the
    image embeddings of the running forward as context (attention mask and cross-attention kwargs passed on)."""
    image_attn, context = module.__dict__[_IMAGE_ATTN_ATTR], module.__dict__[_CONTEXT_ATTR]
    if context.value is None:
        raise SemsrError("this SeeSR model needs the image embeddings: pass image_encoder_hidden_states")
    hidden = output[0] if isinstance(output, tuple) else output.sample
    out = image_attn(
        hidden,
        encoder_hidden_states=context.value.to(hidden.dtype),
        cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
        attention_mask=kwargs.get("attention_mask"),
        return_dict=False,
    )[0]
    if isinstance(output, tuple):
        return (out, *output[1:])
    output.sample = out
    return output


def install_image_attentions(model: nn.Module, dim: int, context: _ImageContext) -> int:
    """Give every cross-attention block of ``model`` its ``image_attentions`` (one per text transformer,
    :func:`_image_transformer`) and hook each after its text transformer; returns how many were added."""
    count = 0
    for block in _cross_attention_blocks(model):
        images = nn.ModuleList([_image_transformer(a, dim) for a in block.attentions])
        block.add_module(IMAGE_ATTENTIONS, images)
        for text, image in zip(block.attentions, images, strict=True):
            object.__setattr__(text, _IMAGE_ATTN_ATTR, image)
            object.__setattr__(text, _CONTEXT_ATTR, context)
            text.register_forward_hook(_image_attention_hook, with_kwargs=True)
            count += 1
    return count


class _ImageCrossAttention:
    """Shared parts of the two models: config keys, installation, the bound image context."""

    _image_context: _ImageContext
    #: The diffusers model class extended (its ``__init__`` arguments are config keys).
    diffusers_base: type

    @staticmethod
    def _get_init_keys(input_class: type) -> set[str]:
        """Config keys ``from_config`` passes on: the diffusers parent's ``__init__`` arguments plus ours (the
        ``__init__`` below takes the parent's as ``**kwargs``)."""
        keys = ConfigMixin._get_init_keys(input_class)
        if issubclass(input_class, _ImageCrossAttention):
            keys = (keys | ConfigMixin._get_init_keys(input_class.diffusers_base) | _OWN_KEYS) - {"kwargs"}
        return keys

    def _setup_image_attention(self, use_image_cross_attention: bool, image_cross_attention_dim: int) -> None:
        self.register_to_config(  # type: ignore[attr-defined]
            use_image_cross_attention=bool(use_image_cross_attention),
            image_cross_attention_dim=int(image_cross_attention_dim),
        )
        self._image_context = _ImageContext()
        if use_image_cross_attention:
            install_image_attentions(self, image_cross_attention_dim, self._image_context)  # type: ignore[arg-type]

    def _check_image_context(self, image: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.config.use_image_cross_attention:  # type: ignore[attr-defined]
            return None
        if image is None:
            raise SemsrError(
                f"{type(self).__name__} has image cross-attention: pass image_encoder_hidden_states (B, T, "
                f"{self.config.image_cross_attention_dim})"  # type: ignore[attr-defined]
            )
        if image.shape[0] != batch:
            if batch % image.shape[0]:
                raise SemsrError(f"{image.shape[0]} image contexts for a batch of {batch}")
            image = image.repeat(batch // image.shape[0], 1, 1)
        return image


class SeeSRUNet(_ImageCrossAttention, UNet2DConditionModel):
    """SD UNet with SeeSR's image cross-attention (module docstring).

    Args:
        use_image_cross_attention: add ``image_attentions`` (the released config sets it).
        image_cross_attention_dim: width of the image context (512).
        **kwargs: ``UNet2DConditionModel`` arguments (the released ``unet/config.json``).
    """

    diffusers_base = UNet2DConditionModel

    def __init__(
        self,
        use_image_cross_attention: bool = True,
        image_cross_attention_dim: int = IMAGE_CROSS_ATTENTION_DIM,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._setup_image_attention(use_image_cross_attention, image_cross_attention_dim)

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        image_encoder_hidden_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """``UNet2DConditionModel.forward`` with ``image_encoder_hidden_states`` ``(B, T_img, 512)`` (repeated
        to the batch of ``sample`` ``(N, 4, h, w)`` when ``N`` is a multiple of ``B``)."""
        image = self._check_image_context(image_encoder_hidden_states, sample.shape[0])
        with self._image_context.bound(image):
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)


class SeeSRControlNet(_ImageCrossAttention, ControlNetModel):
    """ControlNet with SeeSR's image cross-attention in its down and mid blocks (module docstring).

    Args:
        use_image_cross_attention: add ``image_attentions`` (the released config sets it).
        image_cross_attention_dim: width of the image context (512).
        **kwargs: ``ControlNetModel`` arguments (the released ``controlnet/config.json``).
    """

    diffusers_base = ControlNetModel

    def __init__(
        self,
        use_image_cross_attention: bool = True,
        image_cross_attention_dim: int = IMAGE_CROSS_ATTENTION_DIM,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._setup_image_attention(use_image_cross_attention, image_cross_attention_dim)

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *args: Any,
        image_encoder_hidden_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """``ControlNetModel.forward`` with ``image_encoder_hidden_states`` ``(B, T_img, 512)`` (as the UNet's)."""
        image = self._check_image_context(image_encoder_hidden_states, sample.shape[0])
        with self._image_context.bound(image):
            return super().forward(sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs)


# ----------------------------------------------------------------------------- released folders

WEIGHTS = "diffusion_pytorch_model.safetensors"
#: Released sub-folders and the semsr class of each.
PARTS: dict[str, type[_ImageCrossAttention]] = {"unet": SeeSRUNet, "controlnet": SeeSRControlNet}


def is_released_seesr(folder: str | Path) -> bool:
    """True when ``folder`` has SeeSR's released ``unet/`` and ``controlnet/`` diffusers folders."""
    folder = Path(folder)
    return all((folder / part / "config.json").is_file() for part in PARTS)


def released_config(folder: str | Path, part: str) -> dict[str, Any]:
    """The released ``<folder>/<part>/config.json`` restricted to the keys the semsr class of ``part`` accepts
    (a config written by another diffusers version carries keys this one does not know)."""
    path = Path(folder) / part / "config.json"
    if not path.is_file():
        raise UnavailableError(f"missing config.json of the released SeeSR {part}", path.parent)
    cls = PARTS[part]
    accepted = cls._get_init_keys(cls) - {"self"}
    return {k: v for k, v in json.loads(path.read_text()).items() if k in accepted}


def weights_file(folder: str | Path, part: str) -> Path:
    """``<folder>/<part>/diffusion_pytorch_model.safetensors`` (one line naming what is there instead)."""
    sub = Path(folder) / part
    path = sub / WEIGHTS
    if not path.is_file():
        other = sorted(p.name for p in sub.glob("diffusion_pytorch_model*"))
        hint = f" (found {', '.join(other)}; only safetensors files are read)" if other else ""
        raise UnavailableError(f"missing {WEIGHTS}{hint}", sub)
    return path


def build_seesr_part(folder: str | Path, part: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """The semsr model of released ``part`` (``unet`` / ``controlnet``) shaped by its config, randomly or
    ``meta``-initialised."""
    with torch.device(device):
        return PARTS[part].from_config(released_config(folder, part))


def released_keys(folder: str | Path, part: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of the released ``part`` file (header only)."""
    with safe_open(str(weights_file(folder, part)), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@dataclass
class ReleasedSeeSR:
    """The UNet and ControlNet of a released SeeSR folder and the file each came from."""

    unet: SeeSRUNet
    controlnet: SeeSRControlNet
    sources: dict[str, str] = field(default_factory=dict)


def load_seesr_part(
    folder: str | Path, part: str, *, dtype: torch.dtype = torch.float32, partial: bool | None = None
) -> nn.Module:
    """Load released ``part`` strictly (module docstring); eval mode, ``dtype``."""
    path = weights_file(folder, part)
    model = build_seesr_part(folder, part, device="meta")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = load_file(str(path))
    unexpected = [k for k in tensors if k not in own]
    missing = [k for k in own if k not in tensors]
    mismatched = [k for k, v in tensors.items() if k in own and tuple(v.shape) != own[k]]
    check_keys(
        path, f"released SeeSR {part}", missing=missing, unexpected=unexpected, mismatched=mismatched, partial=partial
    )
    state = {k: v.to(dtype) for k, v in tensors.items() if k in own and k not in mismatched}
    if missing or mismatched:  # a partial load: the tensors the file lacks keep their initial values
        model = build_seesr_part(folder, part)
        model.load_state_dict(state, strict=not partial_allowed(partial))
        model.to(dtype)
    else:
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_released_seesr(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, partial: bool | None = None
) -> ReleasedSeeSR:
    """Load a released SeeSR folder (``unet/`` + ``controlnet/``) strictly into :class:`SeeSRUNet` and
    :class:`SeeSRControlNet`.

    Raises:
        UnavailableError: one line naming the released file and the tensors without a home / missing /
            mis-shaped.
    """
    folder = Path(folder)
    parts = {part: load_seesr_part(folder, part, dtype=dtype, partial=partial) for part in PARTS}
    sources = {part: str(weights_file(folder, part)) for part in PARTS}
    for part, source in sources.items():
        log.info("released SeeSR %s <- %s", part, source)
    return ReleasedSeeSR(unet=parts["unet"], controlnet=parts["controlnet"], sources=sources)  # type: ignore[arg-type]
