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
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError

#: ``config.json`` kind of a cognitive-encoder checkpoint folder.
CHECKPOINT_KIND = "coser-cognitive"
DEFAULT_QUERIES = 50
#: LR inputs are shrunk to this long side before pre-SR (CLIP only sees ~224 px).
DEFAULT_MAX_LR_SIDE = 128
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


class FixedPreSR(nn.Module):
    """A parameter-free pre-SR: MATLAB bicubic (``kind="bicubic"``) or a registry method (``kind="method"``).

    Registry methods (e.g. ``realesrgan-x4plus``) run without gradients and
    are built on first use.
    """

    def __init__(self, kind: str, scale: int = 4, name: str | None = None) -> None:
        super().__init__()
        self.kind, self.scale, self.name = kind, int(scale), name
        self._method: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "bicubic":
            from semsr.ops.imresize import imresize

            return imresize(x.float(), scale=self.scale).clamp(0, 1).to(x.dtype)
        if self._method is None:
            from semsr.methods import get_method

            self._method = get_method(str(self.name))
        with torch.no_grad():
            out = self._method(x.detach().float().cpu()).to(device=x.device, dtype=x.dtype)
        if out.shape[-1] != x.shape[-1] * self.scale:
            out = F.interpolate(out, size=(x.shape[-2] * self.scale, x.shape[-1] * self.scale), mode="bicubic",
                                align_corners=False, antialias=True)
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

    def __init__(self, model: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 layer: int = -2) -> None:
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


def load_clip_vision(folder: str | Path, *, layer: int = -2, dtype: torch.dtype = torch.float32) -> CLIPVisionTower:
    """Load a CLIP vision tower from a local transformers folder (a ``CLIPVisionModel`` or full ``CLIPModel``).

    Normalisation and input size come from ``preprocessor_config.json`` when
    present, else from the model config with OpenAI CLIP's mean/std.
    """
    from transformers import CLIPVisionModel

    from semsr.core.loading import ensure_offline, load_transformers_model, quiet_hf_logging, require

    ensure_offline()
    quiet_hf_logging()
    folder = require(Path(folder).expanduser(), "CLIP vision folder")
    model = load_transformers_model(CLIPVisionModel, folder, dtype=dtype, what="CLIP vision model")
    size, mean, std = int(model.config.image_size), _OPENAI_MEAN, _OPENAI_STD
    if (folder / "preprocessor_config.json").is_file():
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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
    from transformers import Blip2QFormerConfig

    opts: dict[str, Any] = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                            "intermediate_size": 3072, "cross_attention_frequency": 2,
                            "encoder_hidden_size": 1024}
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
        from transformers import Blip2QFormerModel

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


class CognitiveEncoder(nn.Module):
    """pre-SR -> CLIP vision tower -> adapter (see the module docstring).

    ``forward(lr (B, 3, h, w) in [0, 1])`` returns ``(embedding (B, Te, D),
    pre_sr (B, 3, s*h', s*w'))`` where ``h', w'`` is the LR size after
    shrinking its long side to ``max_lr_side`` (when larger).
    """

    def __init__(self, pre_sr: nn.Module, clip: CLIPVisionTower, adapter: CognitiveAdapter, *,
                 pre_sr_spec: dict[str, Any], max_lr_side: int = DEFAULT_MAX_LR_SIDE) -> None:
        super().__init__()
        if int(adapter.qformer.config.encoder_hidden_size) != clip.width:
            raise SemsrError(f"cognitive adapter expects {adapter.qformer.config.encoder_hidden_size}-wide image "
                             f"tokens but the CLIP vision model gives {clip.width}")
        self.pre_sr = pre_sr
        self.clip = clip
        self.adapter = adapter
        self.pre_sr_spec = dict(pre_sr_spec)
        self.max_lr_side = int(max_lr_side)

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
        from semsr.ops.imresize import imresize

        h, w = lr.shape[-2:]
        size = (max(1, round(h * self.max_lr_side / side)), max(1, round(w * self.max_lr_side / side)))
        return imresize(lr.float(), size=size).clamp(0, 1).to(lr.dtype)

    def forward(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.pre_sr(self.shrink(lr))
        tokens = self.clip(up.clamp(0, 1))
        return self.adapter(tokens.to(self.adapter.query_tokens.dtype)), up

    def embed(self, lr: torch.Tensor) -> torch.Tensor:
        """Only the cognitive embedding ``(B, Te, D)``."""
        return self.forward(lr)[0]

    # -- checkpoints ---------------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights saved in a checkpoint: pre-SR (when it has any) and adapter; never CLIP."""
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        state.update({f"pre_sr.{k}": v for k, v in self.pre_sr.state_dict().items()})
        return state

    def config(self) -> dict[str, Any]:
        qcfg = self.adapter.qformer.config
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "cross_attention_frequency", "encoder_hidden_size", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range", "hidden_act")
        return {"kind": CHECKPOINT_KIND, "version": 1, "num_queries": self.num_queries,
                "text_width": self.text_width, "clip_layer": self.clip.layer, "clip_width": self.clip.width,
                "max_lr_side": self.max_lr_side, "pre_sr": self.pre_sr_spec,
                "qformer": {k: getattr(qcfg, k) for k in keys}}

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/config.json`` + ``folder/model.safetensors`` (pre-SR + adapter)."""
        from semsr.core.loading import save_checkpoint

        return save_checkpoint(folder, self.trained_state_dict(), self.config())


def build_cognitive_encoder(clip: CLIPVisionTower, *, text_width: int, num_queries: int = DEFAULT_QUERIES,
                            pre_sr: dict[str, Any] | None = None, qformer: dict[str, Any] | None = None,
                            max_lr_side: int = DEFAULT_MAX_LR_SIDE) -> CognitiveEncoder:
    """A freshly initialised encoder around ``clip`` (the Q-Former's image width is set to CLIP's)."""
    spec = {"kind": "srresnet", "num_feat": 64, "num_block": 16, "scale": 4, **(pre_sr or {})}
    qcfg = qformer_config(**{**(qformer or {}), "encoder_hidden_size": clip.width})
    adapter = CognitiveAdapter(qcfg, num_queries, text_width)
    return CognitiveEncoder(build_pre_sr(spec), clip, adapter, pre_sr_spec=spec, max_lr_side=max_lr_side)


def load_cognitive_encoder(folder: str | Path, clip: CLIPVisionTower | str | Path) -> CognitiveEncoder:
    """Load a cognitive-encoder checkpoint (``folder`` or ``folder/cognitive``) around a CLIP tower.

    ``clip`` is a loaded tower or the CLIP folder; its width must match the checkpoint's.
    """
    from semsr.core.loading import load_checkpoint, require

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() and (folder / "cognitive").is_dir():
        folder = folder / "cognitive"
    require(folder / "config.json", "cognitive encoder config")
    tensors, config = load_checkpoint(folder)
    if config.get("kind") != CHECKPOINT_KIND:
        raise UnavailableError(f"not a CoSeR cognitive-encoder checkpoint (config kind {config.get('kind')!r})",
                               folder / "config.json")
    if not isinstance(clip, CLIPVisionTower):
        clip = load_clip_vision(clip, layer=int(config.get("clip_layer", -2)))
    if int(config["clip_width"]) != clip.width:
        raise UnavailableError(f"cognitive encoder was trained on a {config['clip_width']}-wide CLIP vision model; "
                               f"the given one is {clip.width}-wide", folder)
    clip.layer = int(config.get("clip_layer", clip.layer))
    qcfg = qformer_config(**config["qformer"])
    adapter = CognitiveAdapter(qcfg, int(config["num_queries"]), int(config["text_width"]))
    enc = CognitiveEncoder(build_pre_sr(config["pre_sr"]), clip, adapter, pre_sr_spec=config["pre_sr"],
                           max_lr_side=int(config.get("max_lr_side", DEFAULT_MAX_LR_SIDE)))
    own = enc.trained_state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UnavailableError(f"cognitive encoder weights do not match its config: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}", folder)
    enc.adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
    enc.pre_sr.load_state_dict({k[len("pre_sr."):]: v for k, v in tensors.items() if k.startswith("pre_sr.")})
    return enc


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
    batch = conditioner.tokenizer(list(prompts), padding="max_length", max_length=conditioner.max_length,
                                  truncation=True, return_tensors="pt")
    return batch.attention_mask.sum(dim=1)


@torch.no_grad()
def text_token_targets(conditioner: Any, prompts: list[str], n: int) -> torch.Tensor:
    """Caption token embeddings aligned to ``n`` tokens: ``(B, n, D)`` (see :func:`align_text_tokens`)."""
    tokens = conditioner.encode(list(prompts))
    return align_text_tokens(tokens, token_lengths(conditioner, prompts), n)
