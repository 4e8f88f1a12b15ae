"""RAM (Recognize Anything) image tagger: Swin image encoder + query2label tagging head.

The tagging path of RAM (Zhang et al. 2023) as SeeSR's DAPE and DaLPSR use it:

1. ``visual_encoder``: a Swin Transformer (Microsoft layout: fused ``qkv``, relative position bias tables,
   patch merging ``norm`` then ``reduction``); its tokens ``(B, L, C)`` after the final ``norm`` are prefixed with
   their mean (``(B, 1 + L, C)``).
2. ``image_proj``: ``Linear(C, 512)`` -> the image embeddings ``(B, 1 + L, 512)``; SeeSR feeds these to its UNet and
   ControlNet image cross-attention (``ram_encoder_hidden_states``).
3. ``tagging_head``: BERT layers without self-attention and without embeddings: each layer is a cross-attention
   from the label queries to the image embeddings (``crossattention.self.query/key/value``,
   ``crossattention.output.dense/LayerNorm``) and a feed-forward (``intermediate.dense``,
   ``output.dense/LayerNorm``), post-norm, exact GELU. The queries are ``relu(wordvec_proj(label_embed))``
   ``(num_classes, hidden)``.
4. ``fc``: ``Linear(hidden, 1)`` -> logits ``(B, num_classes)``; a tag is kept when ``sigmoid(logit)`` exceeds its
   per-class threshold.

The module names are the released checkpoints' key names, so a RAM state dict loads with no renaming
(:func:`load_ram_state`). Released files also hold RAM's captioning parts (``tag_encoder``, ``text_decoder``) that
tagging never runs, recomputed buffers (``relative_position_index``, ``attn_mask``) and, for SeeSR's DAPE, LoRA
factors (``lora_A``/``lora_B``) which are merged into the weights they adapt, as the released code does when the
model is put in eval mode. The Swin is written out here rather than taken from ``transformers.SwinModel``: the
released names (fused ``qkv``, ``layers.N.blocks.M``) then load one to one and strict loading needs no renaming
table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from semsr.core.errors import UnavailableError
from semsr.core.loading import check_keys, load_state_dict_file

#: ImageNet mean/std RAM normalises its ``image_size`` x ``image_size`` input with.
RAM_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
RAM_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Prefixes of released RAM tensors the tagging path does not use (RAM's captioning / interaction encoder).
UNUSED_PREFIXES: tuple[str, ...] = ("tag_encoder.", "text_decoder.")
#: Suffixes of recomputed Swin buffers stored in released checkpoints.
RECOMPUTED_SUFFIXES: tuple[str, ...] = (".relative_position_index", ".attn_mask")


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * H/window * W/window, window * window, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _unwindows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`: ``(B * nW, window * window, C)`` -> ``(B, H, W, C)``."""
    c = x.shape[-1]
    b = x.shape[0] // ((h // window) * (w // window))
    x = x.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class WindowAttention(nn.Module):
    """Windowed multi-head self-attention with a relative position bias: ``(N', T, C)`` -> ``(N', T, C)``."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``(B * nW, T, C)``; ``mask`` ``(nW, T, T)`` (0 / -100) or None."""
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].view(t, t, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(n // nw, nw, self.heads, t, t) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, t, t)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))


class SwinMlp(nn.Module):
    """``fc1`` -> exact GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP on ``(B, H*W, C)`` tokens of a fixed ``resolution``."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        if resolution <= window:  # the window covers the whole map: no shift
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        mask = None
        if shift > 0:
            img = torch.zeros(1, resolution, resolution, 1)
            spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for i, (hs, ws) in enumerate((hs, ws) for hs in spans for ws in spans):
                img[:, hs, ws, :] = i
            win = _windows(img, window).squeeze(-1)
            diff = win.unsqueeze(1) - win.unsqueeze(2)
            mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r = self.resolution
        h = self.norm1(x).view(b, r, r, c)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = _unwindows(self.attn(_windows(h, self.window), self.attn_mask), self.window, r, r)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """``(B, H*W, C)`` -> ``(B, H/2*W/2, 2C)``: 2x2 neighbours concatenated, ``norm`` then ``reduction``."""

    def __init__(self, resolution: int, dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = x.view(b, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int, mlp_ratio: float, down: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinEncoder(nn.Module):
    """``(B, 3, S, S)`` normalised image -> ``(B, 1 + (S / patch / 2^(stages-1))^2, C_last)`` (mean token first)."""

    def __init__(
        self,
        image_size: int,
        patch: int,
        dim: int,
        depths: Sequence[int],
        heads: Sequence[int],
        window: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch, dim)
        res = image_size // patch
        n = len(depths)
        self.layers = nn.ModuleList(
            SwinStage(dim * 2**i, res // 2**i, depths[i], heads[i], window, mlp_ratio, i < n - 1) for i in range(n)
        )
        self.num_features = dim * 2 ** (n - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], 1)


class _Dense(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BERT's ``*Output`` modules)."""

    def __init__(self, din: int, dout: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(din, dout)
        self.LayerNorm = nn.LayerNorm(dout, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _CrossSelf(nn.Module):
    def __init__(self, hidden: int, context: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context, hidden)
        self.value = nn.Linear(context, hidden)


class _CrossAttention(nn.Module):
    def __init__(self, hidden: int, context: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.self = _CrossSelf(hidden, context)
        self.output = _Dense(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.self.query(x)), split(self.self.key(context)), split(self.self.value(context))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(b, n, d)
        return self.output(out, x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TaggingLayer(nn.Module):
    """One tagging-head layer: label queries ``(B, K, D)`` cross-attend to image embeddings ``(B, T, E)``."""

    def __init__(self, hidden: int, context: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.crossattention = _CrossAttention(hidden, context, heads, eps)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _Dense(inner, hidden, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.crossattention(x, context)
        return self.output(self.intermediate(h), h)


class _TaggingEncoder(nn.Module):
    def __init__(self, layers: int, *args: int | float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TaggingLayer(*args) for _ in range(layers))  # type: ignore[arg-type]


class TaggingHead(nn.Module):
    """``tagging_head``: the BERT encoder stack of :class:`TaggingLayer` (key names ``encoder.layer.N...``)."""

    def __init__(self, layers: int, hidden: int, context: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.encoder = _TaggingEncoder(layers, hidden, context, heads, inner, eps)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, context)
        return queries


class RAMTagger(ModelMixin, ConfigMixin):
    """RAM's image encoder and tagging head (the released ``RAM`` / DAPE tensors without the captioning parts).

    Args:
        image_size: square input side (384 for the released Swin-L RAM and DAPE).
        patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio: the Swin encoder
            (Swin-L: 4, 192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 4.0).
        embed_width: width of ``image_proj`` and ``label_embed`` (512 in RAM).
        head_hidden, head_layers, head_heads, head_intermediate, head_eps: the tagging head
            (RAM's q2l configuration: 768, 2, 4, 3072, 1e-12).
        num_classes: number of tags (4585 in RAM).
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 4,
        embed_dim: int = 192,
        depths: tuple[int, ...] = (2, 2, 18, 2),
        num_heads: tuple[int, ...] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        embed_width: int = 512,
        head_hidden: int = 768,
        head_layers: int = 2,
        head_heads: int = 4,
        head_intermediate: int = 3072,
        head_eps: float = 1e-12,
        num_classes: int = 4585,
    ) -> None:
        super().__init__()
        self.visual_encoder = SwinEncoder(
            image_size, patch_size, embed_dim, tuple(depths), tuple(num_heads), window_size, mlp_ratio
        )
        self.image_proj = nn.Linear(self.visual_encoder.num_features, embed_width)
        self.label_embed = nn.Parameter(torch.zeros(num_classes, embed_width))
        self.wordvec_proj: nn.Module = (
            nn.Linear(embed_width, head_hidden) if head_hidden != embed_width else nn.Identity()
        )
        self.tagging_head = TaggingHead(head_layers, head_hidden, embed_width, head_heads, head_intermediate, head_eps)
        self.fc = nn.Linear(head_hidden, 1)

    def image_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, S, S)`` -> image embeddings ``(B, 1 + T, embed_width)`` (SeeSR's UNet context)."""
        return self.image_proj(self.visual_encoder(image))

    def logits_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, 1 + T, E)`` -> tag logits ``(B, num_classes)``."""
        queries = F.relu(self.wordvec_proj(self.label_embed)).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, embeds)).squeeze(-1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(B, 3, S, S)`` -> ``(image embeddings (B, 1 + T, E), logits (B, num_classes))``."""
        embeds = self.image_embeds(image)
        return embeds, self.logits_from_embeds(embeds)


def merge_lora(state: dict[str, torch.Tensor], alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Fold ``X.lora_A`` / ``X.lora_B`` pairs into ``X.weight`` and drop them (the released code's eval-mode merge).

    A plain LoRA linear: ``W += (B @ A) * alpha / r`` with ``A`` ``(r, in)``, ``B`` ``(out, r)``. A fused Swin ``qkv``
    whose ``A`` is ``(g * r, in)`` and ``B`` ``(g * out / 3, r)`` adapts ``g`` of the three projections: ``g = 2``
    adapts query and value (the released DAPE), ``g = 3`` all three; group ``i`` is ``B_i @ A_i``.

    Raises:
        ValueError: a LoRA factor without its partner or weight, or shapes that fit neither form.
    """
    out = dict(state)
    for key in [k for k in state if k.endswith(".lora_A")]:
        base = key[: -len(".lora_A")]
        a, b, wkey = state[key].float(), state.get(base + ".lora_B"), base + ".weight"
        if b is None or wkey not in state:
            raise ValueError(f"{key}: LoRA factor without {base}.lora_B or {wkey}")
        b = b.float()
        w = state[wkey]
        r = b.shape[1]
        if tuple(b.shape) == (w.shape[0], r) and a.shape == (r, w.shape[1]):
            delta = b @ a
        elif base.endswith(".qkv") and w.shape[0] % 3 == 0 and a.shape[0] % r == 0:
            groups, part = a.shape[0] // r, w.shape[0] // 3
            if groups not in (2, 3) or tuple(b.shape) != (groups * part, r):
                raise ValueError(f"{key}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit {wkey}")
            rows = (0, 2) if groups == 2 else (0, 1, 2)
            delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for g, row in enumerate(rows):
                delta[row * part : (row + 1) * part] = b[g * part : (g + 1) * part] @ a[g * r : (g + 1) * r]
        else:
            raise ValueError(f"{key}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit {wkey}")
        out[wkey] = (w.float() + delta * (alpha / r)).to(w.dtype)
        del out[key], out[base + ".lora_B"]
    leftover = [k for k in out if k.endswith(".lora_B")]
    if leftover:
        raise ValueError(f"{leftover[0]}: LoRA factor without its lora_A")
    return out


def tagging_state(state: dict[str, torch.Tensor], lora_alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """A released RAM / DAPE state dict -> :class:`RAMTagger` keys.

    Unused parts and recomputed buffers are dropped (:data:`UNUSED_PREFIXES`, :data:`RECOMPUTED_SUFFIXES`) and LoRA
    factors merged (:func:`merge_lora`). RAM ties the weights of the first ``tagging_head`` layers' modules to the
    same modules of ``tag_encoder`` (one tensor, two names); in the released code each of the two LoRA linears
    merges its own factors into that shared weight, so the ``tag_encoder`` factors of a tied module are added to the
    ``tagging_head`` weight here too.
    """
    kept = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES) and not k.endswith(RECOMPUTED_SUFFIXES)}
    tied: dict[str, torch.Tensor] = {}
    for key in state:
        if key.startswith("tag_encoder.encoder.layer.") and key.endswith(".lora_A"):
            head_key = "tagging_head." + key[len("tag_encoder.") :]
            if head_key.replace(".lora_A", ".weight") in kept and head_key.replace(".lora_A", ".lora_B") in kept:
                tied[head_key] = state[key]
                tied[head_key.replace(".lora_A", ".lora_B")] = state[key.replace(".lora_A", ".lora_B")]
    merged = merge_lora(kept, lora_alpha)
    for key in [k for k in tied if k.endswith(".lora_A")]:
        base = key[: -len(".lora_A")]
        a, b = tied[key].float(), tied[base + ".lora_B"].float()
        w = merged[base + ".weight"]
        merged[base + ".weight"] = (w.float() + (b @ a) * (lora_alpha / b.shape[1])).to(w.dtype)
    return merged


#: Stems of a RAM tagger folder's weight files: RAM's checkpoint and SeeSR's DAPE fine-tune (docs/seesr.md).
RAM_BASE = "ram_swin_large_14m"
DAPE = "DAPE"
TAG_LIST_FILE = "ram_tag_list.txt"
THRESHOLD_FILE = "ram_tag_list_threshold.txt"
CONFIG_FILE = "ram_config.json"
#: RAM's default tag threshold (used for every tag when the folder has no threshold file).
DEFAULT_RAM_THRESHOLD = 0.68
EXPORT_HINT = (
    "if torch.load(weights_only=True) refuses a released .pth, export its tensors to safetensors "
    "with the command in docs/seesr.md"
)


@dataclass(frozen=True)
class RAMBundle:
    """A loaded RAM tagger: the model, its tag vocabulary and per-tag thresholds, and the files it came from."""

    model: RAMTagger
    tags: tuple[str, ...]
    thresholds: torch.Tensor  # (num_classes,)
    files: tuple[Path, ...]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _weights(root: Path, stem: str) -> Path | None:
    for suffix in (".safetensors", ".pth"):
        if (root / (stem + suffix)).is_file():
            return root / (stem + suffix)
    return None


def ram_files(folder: str | Path) -> tuple[Path, Path | None]:
    """The base RAM weights (``ram_swin_large_14m.safetensors`` or ``.pth``) of a tagger ``folder`` and the
    optional DAPE overlay (``DAPE.safetensors`` or ``.pth``); safetensors first.

    Raises:
        UnavailableError: one line when the folder has no base RAM weights.
    """
    root = Path(folder).expanduser()
    base = _weights(root, RAM_BASE) if root.is_dir() else None
    if base is None:
        raise UnavailableError(f"no {RAM_BASE}.safetensors (or .pth) in the RAM tagger folder", root)
    return base, _weights(root, DAPE)


def read_ram_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one released RAM/DAPE file: safetensors, or a ``.pth`` read with ``torch.load(weights_only=True)``
    (:func:`~semsr.core.loading.load_state_dict_file`), unwrapping a ``model`` / ``params`` dict."""
    try:
        state: dict = load_state_dict_file(path)
    except UnavailableError as err:
        raise UnavailableError(f"{err.message}; {EXPORT_HINT}", path) from None
    while len(state) == 1 and next(iter(state)) in ("model", "params") and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UnavailableError(f"{bad[0]!r} is not a tensor; {EXPORT_HINT}", path)
    return state


def load_ram_tagger(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, partial: bool | None = None
) -> RAMBundle:
    """Load a RAM (or SeeSR DAPE) tagger folder strictly.

    The folder holds ``ram_swin_large_14m.safetensors`` or ``.pth`` (RAM's checkpoint), optionally ``DAPE.safetensors``
    or ``.pth`` (SeeSR's fine-tune, loaded over it as the released test script does),
    ``ram_tag_list.txt`` (one tag per line), optionally ``ram_tag_list_threshold.txt`` (one threshold per tag) and
    ``ram_config.json`` (:class:`RAMTagger` arguments; default: the released Swin-L 384 configuration).

    Raises:
        UnavailableError: one line naming the file: a tensor the model has no place for (with the file it came
            from), a missing or mis-shaped tensor, a tag list that does not match ``num_classes``.
    """
    base, overlay = ram_files(folder)
    root = base.parent
    config_path = root / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    origin: dict[str, Path] = {}
    state: dict[str, torch.Tensor] = {}
    for path in (base, overlay):
        if path is None:
            continue
        for key, value in read_ram_state(path).items():
            state[key], origin[key] = value, path
    try:
        merged = tagging_state(state, float(config.pop("lora_alpha", 1.0)))
    except ValueError as err:
        key = str(err).split(":", 1)[0]
        raise UnavailableError(f"RAM tagger weights: {err}", origin.get(key, root)) from None
    if "num_classes" not in config and "label_embed" in merged:
        config["num_classes"] = int(merged["label_embed"].shape[0])
    with torch.device("meta"):
        model = RAMTagger(**config)
    own = model.state_dict()
    unexpected = [k for k in merged if k not in own]
    source = origin.get(unexpected[0], root) if unexpected else (overlay or base)
    missing = [k for k in own if k not in merged]
    mismatched = [k for k in own if k in merged and tuple(merged[k].shape) != tuple(own[k].shape)]
    check_keys(source, "RAM tagger", missing=missing, unexpected=unexpected, mismatched=mismatched, partial=partial)
    model = RAMTagger(**config)
    model.load_state_dict({k: v for k, v in merged.items() if k in own and k not in mismatched}, strict=False)
    model = (model if dtype == torch.float32 else model.to(dtype)).eval()
    tags_path = root / TAG_LIST_FILE
    if not tags_path.is_file():
        raise UnavailableError(f"no {TAG_LIST_FILE} (RAM's tag list, one tag per line)", tags_path)
    tags = tuple(_read_lines(tags_path))
    n = model.config.num_classes
    if len(tags) != n:
        raise UnavailableError(f"{len(tags)} tags for a model with {n} classes", tags_path)
    thr_path = root / THRESHOLD_FILE
    if thr_path.is_file():
        values = [float(v) for v in _read_lines(thr_path)]
        if len(values) != n:
            raise UnavailableError(f"{len(values)} thresholds for {n} tags", thr_path)
        thresholds = torch.tensor(values)
    else:
        thresholds = torch.full((n,), DEFAULT_RAM_THRESHOLD)
    files = (base,) if overlay is None else (base, overlay)
    return RAMBundle(model, tags, thresholds, files)


def ram_preprocess(image: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> RAM input ``(B, 3, size, size)``: bilinear resize, ImageNet normalisation.

    ``antialias=False`` is what the released script's tensor resize does with the torchvision of its requirements.
    """
    x = F.interpolate(image.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.tensor(RAM_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(RAM_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def tags_from_logits(logits: torch.Tensor, tags: Sequence[str], thresholds: torch.Tensor) -> list[list[str]]:
    """Per image, the tags whose ``sigmoid(logit)`` exceeds their threshold, in tag-list order."""
    keep = torch.sigmoid(logits.float()) > thresholds.to(logits.device)
    return [[tags[i] for i in row.nonzero().flatten().tolist()] for row in keep]
