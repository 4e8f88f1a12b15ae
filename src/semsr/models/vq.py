"""VQ tokenizers: spatial modality maps -> 16x16 discrete tokens.

MMSR ("The Power of Context") turns each spatial modality (edges, depth, segmentation) into
a 16x16 grid of codebook indices (codebook 1024, embedding dim 256) so it can
join the text tokens in the Multimodal Latent Connector. The tokenizers share
one interface (:class:`SpatialTokenizer`):

- :class:`EdgeVQ` -- the project's own small VQ autoencoder (conv encoder,
  cosine-similarity codebook with EMA updates and dead-code restarts,
  straight-through gradients, commitment loss, conv decoder), a
  :class:`~semsr.core.components.Component`. It is trained on Canny + HED
  maps of the BSDS500 training images (task ``edge-vq`` of ``semsr train``,
  see :mod:`semsr.train.vq`) and shipped in the package
  (``assets/weights/vq-edges/``, a component folder), so the edge modalities
  work offline: :func:`load_tokenizer` with no path loads it.
  :class:`DepthVQ` (depth maps, task ``depth-vq``) and :class:`SegVQ`
  (colour-palette segmentation maps, 3 channels so classes of equal grey stay
  apart, task ``seg-vq``) are the same network with their own weights and
  codebooks.
- :class:`DiffusersVQTokenizer` -- a VQGAN as a diffusers ``VQModel``: a local
  diffusers folder, or a taming-transformers / latent-diffusion VQGAN state
  dict exported to safetensors (:func:`load_taming_vqgan`, the paper's kind of
  tokenizer); the input size is chosen so the latent grid is 16x16.

Maps are ``(B, C, H, W)`` float in [0, 1] of any size; each tokenizer resizes
them to its input size and adapts the channel count (grey <-> RGB). A 1-channel
tokenizer averages RGB maps to grey, so it must not read segmentation maps
(:func:`check_modality_tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers import VQModel
from safetensors.torch import load_file
from torch import nn

from semsr.core.components import Component, load_component, register_component, register_to_config
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import quiet_hf_logging, strict_from_pretrained
from semsr.core.paths import assets_dir

#: Folder of the shipped edge tokenizer inside ``assets/weights``.
SHIPPED_EDGE_VQ = "vq-edges"


@runtime_checkable
class SpatialTokenizer(Protocol):
    """Interface of every spatial-map tokenizer.

    Attributes:
        grid: tokens per side (16).
        codebook_size: number of codebook entries (1024).
        embed_dim: dimension of a codebook vector (256).
        in_channels: map channels the network reads (1 = grey, 3 = RGB).
    """

    grid: int
    codebook_size: int
    embed_dim: int
    in_channels: int

    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in [0, 1] -> token ids ``(B, grid, grid)`` int64 in [0, codebook_size)."""
        ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, grid, grid)`` -> codebook vectors ``(B, grid*grid, embed_dim)`` (row-major)."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, grid, grid)`` -> reconstructed maps ``(B, C, S, S)`` in [0, 1]."""
        ...


def prepare_maps(maps: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` maps to ``(B, channels, size, size)``.

    Downscaling uses antialiased bilinear interpolation (thin edges become
    soft lines instead of disappearing). RGB maps become grey by the channel
    mean when ``channels == 1``; grey maps are repeated when ``channels == 3``.
    """
    if maps.ndim != 4:
        raise ValueError(f"expected maps (B, C, H, W), got {tuple(maps.shape)}")
    x = maps.float()
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"cannot adapt {x.shape[1]}-channel maps to {channels} channels")
    if x.shape[-2:] != (size, size):
        down = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return x.clamp(0, 1)


# ------------------------------------------------------------------ own model


class _ResBlock(nn.Module):
    """Pre-activation residual block, channels unchanged: ``(B, C, H, W)`` -> same."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(8, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CodebookEMA(nn.Module):
    """Training state of an :class:`EMAQuantizer`'s codebook (not part of the tokenizer's weights).

    Buffers: ``count`` ``(K,)`` usage EMA, ``total`` ``(K, dim)`` EMA of the assigned vectors,
    ``initialised`` (the codebook was set from data). A fresh state initialises the codebook
    from the first training batch; :meth:`resume_from` continues from a trained codebook.

    Args:
        codebook_size, dim: the codebook's shape ``(K, dim)``.
        decay: EMA decay.
        dead_threshold: codes whose usage EMA falls below this are restarted from random
            vectors of the batch (keeps the codebook in use).
    """

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, dead_threshold: float = 0.03) -> None:
        super().__init__()
        self.decay, self.dead_threshold = float(decay), float(dead_threshold)
        self.register_buffer("count", torch.zeros(codebook_size))
        self.register_buffer("total", torch.zeros(codebook_size, dim))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def resume_from(self, codebook: torch.Tensor) -> CodebookEMA:
        """Continue from a trained ``codebook`` ``(K, dim)``: sums = the codes, usage 1 each."""
        self.total.copy_(codebook)
        self.count.fill_(1.0)
        self.initialised.fill_(True)
        return self

    @torch.no_grad()
    def init_from(self, flat: torch.Tensor, codebook: torch.Tensor, generator: torch.Generator | None) -> None:
        """Set every code to a random vector of the batch ``flat`` ``(N, dim)`` (unit norm)."""
        pick = torch.randint(0, flat.shape[0], (codebook.shape[0],), generator=generator).to(flat.device)
        codebook.copy_(flat[pick])
        self.total.copy_(flat[pick])
        self.count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(
        self, flat: torch.Tensor, ids: torch.Tensor, codebook: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        """One EMA step with the batch ``flat`` ``(N, dim)`` assigned to codes ``ids`` ``(N,)``; writes ``codebook``."""
        counts = torch.bincount(ids, minlength=codebook.shape[0]).type_as(flat)
        sums = torch.zeros_like(self.total).index_add_(0, ids, flat)
        self.count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.total.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = self.count < self.dead_threshold
        if dead.any():
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), generator=generator).to(flat.device)
            self.total[dead] = flat[pick]
            self.count[dead] = 0.25  # unused restarted codes are restarted again after ~100 steps
        codebook.copy_(F.normalize(self.total, dim=1))


class EMAQuantizer(nn.Module):
    """Cosine-similarity vector quantiser with an EMA-updated codebook.

    Vectors and codes are L2-normalised; the nearest code is the one with the
    largest cosine similarity. In training (an ``ema`` state passed to
    :meth:`forward`) the codebook follows an exponential moving average of the
    normalised encoder outputs assigned to each code, with dead-code restarts
    (:class:`CodebookEMA`); the first batch of a fresh state initialises the
    codebook. Gradients pass straight through; the commitment loss pulls
    encoder outputs towards their codes.
    """

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, dim), dim=1))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code ids for vectors ``(N, dim)`` -> ``(N,)`` int64."""
        return (F.normalize(z, dim=1) @ self.codebook.t()).argmax(1)

    def forward(
        self, z: torch.Tensor, ema: CodebookEMA | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``z`` ``(B, dim, h, w)``; with ``ema``, update the codebook first (training).

        ``generator`` drives the random picks of codebook (re)initialisation.
        Returns ``(z_q (B, dim, h, w), ids (B, h, w), commitment loss scalar)``.
        """
        b, d, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        if ema is not None and not bool(ema.initialised):
            ema.init_from(flat.detach(), self.codebook, generator)
        ids = (flat.detach() @ self.codebook.t()).argmax(1)
        if ema is not None:
            ema.update(flat.detach(), ids, self.codebook, generator)
        q = self.codebook[ids]
        commit = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        return q.view(b, h, w, d).permute(0, 3, 1, 2), ids.view(b, h, w), commit

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids (any shape) -> unit codebook vectors ``(*ids.shape, dim)``."""
        return self.codebook[ids]


@register_component
class EdgeVQ(Component):
    """Small VQ autoencoder for modality maps (edges; :class:`DepthVQ`, :class:`SegVQ` for the others).

    ``encode``: maps ``(B, C, H, W)`` in [0, 1] -> ids ``(B, 16, 16)``;
    ``decode``: ids -> maps ``(B, in_channels, image_size, image_size)`` in [0, 1];
    ``forward`` (training): prepared maps -> ``(logits, ids, commitment loss)``.
    ``modality``: the spatial modality this class tokenizes.

    The encoder folds ``patch x patch`` pixels into channels (pixel unshuffle),
    then runs ``len(channels)`` stages, each but the first halving the
    resolution, so ``image_size == grid * patch * 2**(len(channels) - 1)``.

    Args:
        in_channels: map channels (1).
        image_size: side of the maps the network reads (128).
        patch: pixel-unshuffle factor (2).
        channels: encoder stage widths (the decoder mirrors them).
        res_blocks: residual blocks per stage.
        grid: tokens per side (16).
        embed_dim: codebook vector size (256).
        codebook_size: number of codes (1024).
        decay, dead_threshold: codebook EMA settings used in training (:class:`CodebookEMA`).
    """

    modality = "edge"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 128,
        patch: int = 2,
        channels: Sequence[int] = (32, 64, 128),
        res_blocks: int = 1,
        grid: int = 16,
        embed_dim: int = 256,
        codebook_size: int = 1024,
        decay: float = 0.99,
        dead_threshold: float = 0.03,
    ) -> None:
        super().__init__()
        ch = tuple(int(c) for c in channels)
        if image_size != grid * patch * 2 ** (len(ch) - 1):
            raise ValueError("image_size must equal grid * patch * 2**(len(channels) - 1)")
        self.grid, self.codebook_size, self.embed_dim = int(grid), int(codebook_size), int(embed_dim)
        self.image_size, self.in_channels = int(image_size), int(in_channels)
        p = patch
        enc: list[nn.Module] = [nn.PixelUnshuffle(p), nn.Conv2d(in_channels * p * p, ch[0], 3, padding=1)]
        prev = ch[0]
        for i, c in enumerate(ch):
            if i > 0:
                enc.append(nn.Conv2d(prev, c, 4, stride=2, padding=1))
            enc += [_ResBlock(c) for _ in range(res_blocks)]
            prev = c
        enc += [nn.GroupNorm(8, prev), nn.SiLU(), nn.Conv2d(prev, embed_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = EMAQuantizer(codebook_size, embed_dim)
        dec: list[nn.Module] = [nn.Conv2d(embed_dim, ch[-1], 1)]
        for i in range(len(ch) - 1, -1, -1):  # mirror of the encoder
            dec += [_ResBlock(ch[i]) for _ in range(res_blocks)]
            if i > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i - 1], 3, padding=1)]
        dec += [
            nn.GroupNorm(8, ch[0]),
            nn.SiLU(),
            nn.Conv2d(ch[0], in_channels * p * p, 3, padding=1),
            nn.PixelShuffle(p),
        ]
        self.decoder = nn.Sequential(*dec)

    def new_ema(self, *, fresh: bool) -> CodebookEMA:
        """A codebook EMA state for training this model: ``fresh`` (first batch initialises the
        codebook) or continuing from the current codebook."""
        ema = CodebookEMA(self.codebook_size, self.embed_dim, self.config.decay, self.config.dead_threshold)
        ema = ema.to(self.quantizer.codebook.device)
        return ema if fresh else ema.resume_from(self.quantizer.codebook)

    def prepare(self, maps: torch.Tensor) -> torch.Tensor:
        """Any-size maps -> ``(B, in_channels, image_size, image_size)`` in [0, 1]."""
        return prepare_maps(maps, self.image_size, self.in_channels)

    def forward(
        self, x: torch.Tensor, ema: CodebookEMA | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepared maps ``(B, C, S, S)`` -> ``(recon logits (B, C, S, S), ids (B, 16, 16), commitment)``.

        With ``ema`` (training) the codebook is updated from this batch (see :class:`EMAQuantizer`).
        """
        z = self.encoder(x * 2.0 - 1.0)
        q, ids, commit = self.quantizer(z, ema, generator)
        return self.decoder(q), ids, commit

    @torch.no_grad()
    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self.prepare(maps.to(self.quantizer.codebook.device)) * 2.0 - 1.0)
        b, d, h, w = z.shape
        return self.quantizer.lookup(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.quantizer.embed(tokens.flatten(1))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.quantizer.embed(tokens).permute(0, 3, 1, 2)
        return torch.sigmoid(self.decoder(q))


@register_component
class DepthVQ(EdgeVQ):
    """:class:`EdgeVQ`'s network for depth maps ``(B, 1, H, W)`` (near = bright): its own weights and
    codebook, trained by task ``depth-vq`` (:mod:`semsr.train.vq`)."""

    modality = "depth"


@register_component
class SegVQ(EdgeVQ):
    """:class:`EdgeVQ`'s network for colour-palette segmentation maps ``(B, 3, H, W)``
    (:func:`semsr.priors.depth_seg.label_palette`): ``in_channels`` 3, so classes whose colours have
    the same grey value give different tokens; trained by task ``seg-vq`` (:mod:`semsr.train.vq`)."""

    modality = "seg"


#: semsr's own tokenizer classes by their ``config.json`` ``_class_name``.
OWN_TOKENIZERS: dict[str, type[EdgeVQ]] = {c.__name__: c for c in (EdgeVQ, DepthVQ, SegVQ)}


def check_modality_tokenizer(modality: str, tokenizer: SpatialTokenizer, where: str | Path) -> None:
    """Refuse a tokenizer that cannot keep ``modality`` apart: segmentation maps need 3 input channels
    (a grey tokenizer would average class colours, so classes of equal grey collapse), and semsr's own
    tokenizers read only the modality they were trained on."""
    own = getattr(tokenizer, "modality", None)
    if isinstance(tokenizer, EdgeVQ) and own != modality:
        raise UnavailableError(f"a {type(tokenizer).__name__} tokenizes {own} maps, not {modality} maps", where)
    if modality == "seg" and int(tokenizer.in_channels) < 3:
        raise UnavailableError(
            f"the seg tokenizer reads {tokenizer.in_channels}-channel maps; segmentation needs an RGB "
            "tokenizer (SegVQ or a VQGAN) so classes of equal grey value stay apart",
            where,
        )


def shipped_edge_vq_path() -> Path:
    """Folder of the edge tokenizer shipped in the package (``assets/weights/vq-edges``)."""
    return assets_dir() / "weights" / SHIPPED_EDGE_VQ


# ------------------------------------------------------------ diffusers VQGAN


class DiffusersVQTokenizer:
    """A diffusers ``VQModel`` (VQGAN) as a :class:`SpatialTokenizer` (:meth:`from_folder`,
    or :func:`load_taming_vqgan` for taming / latent-diffusion weights).

    The input side is ``grid * 2**(len(block_out_channels) - 1)`` (256 for the
    usual 5-level f16 VQGAN), so the latent grid is ``grid x grid``; maps are
    fed as RGB in [-1, 1] (grey maps repeated) and decoded back to [0, 1].

    Args:
        model: the ``VQModel`` (moved to ``device``, eval mode).
        path: where it came from (for messages and checkpoint metadata).
    """

    def __init__(self, model: VQModel, path: str | Path, grid: int = 16, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        self.model = model.to(device).eval()
        cfg = self.model.config
        self.grid = grid
        self.codebook_size = int(cfg.num_vq_embeddings)
        self.embed_dim = int(cfg.vq_embed_dim or cfg.latent_channels)
        self.image_size = grid * 2 ** (len(cfg.block_out_channels) - 1)
        self.in_channels = int(cfg.in_channels)

    @classmethod
    def from_folder(cls, path: str | Path, grid: int = 16, device: str | torch.device = "cpu") -> DiffusersVQTokenizer:
        """A diffusers ``VQModel`` folder (``config.json`` + weights)."""
        quiet_hf_logging()  # also forces the hubs offline
        try:
            model = strict_from_pretrained(VQModel, Path(path), what="VQModel")
        except (OSError, ValueError) as err:
            raise UnavailableError(f"cannot load a diffusers VQModel: {err}", path) from err
        return cls(model, path, grid, device)

    @property
    def device(self) -> torch.device:
        return self.model.quantize.embedding.weight.device

    def to(self, device: str | torch.device) -> DiffusersVQTokenizer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        x = prepare_maps(maps.to(self.device), self.image_size, self.in_channels) * 2.0 - 1.0
        h = self.model.encode(x).latents
        _, _, (_, _, ids) = self.model.quantize(h)
        return ids.view(h.shape[0], h.shape[2], h.shape[3])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.quantize.embedding(tokens.flatten(1).to(self.device))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        b, h, w = tokens.shape
        q = self.model.quantize.get_codebook_entry(tokens.reshape(-1).to(self.device), (b, h, w, self.embed_dim))
        out = self.model.decode(q, force_not_quantize=True).sample
        return ((out + 1.0) / 2.0).clamp(0, 1)


# ------------------------------------------------- taming / latent-diffusion VQGAN

#: Keys of a taming / latent-diffusion VQGAN file that are not part of the tokenizer: the training
#: loss (discriminator, LPIPS) and the segmentation-logging colouriser. Everything else must map.
TAMING_SKIPPED_PREFIXES = ("loss.", "colorize")
#: File suffixes of pickled checkpoints, which are never unpickled.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: How a user turns a published taming / latent-diffusion ``.ckpt`` into the safetensors file semsr reads
#: (run in their own environment: it unpickles the file).
TAMING_CONVERSION = (
    'python -c "import sys, torch; from safetensors.torch import save_file; '
    "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=False)['state_dict']; "
    'save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])" last.ckpt vqgan.safetensors'
)


def _conv1x1_to_linear(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])


def _taming_levels(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    levels = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return sorted(levels)


def taming_vqgan_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers ``VQModel`` arguments of a taming-layout VQGAN state dict, read from its shapes.

    taming's ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
    ``z_channels``, ``in_channels``, ``out_ch``), ``n_embed`` and ``embed_dim`` all show in the tensor
    shapes; taming normalises with 32 groups. Attention levels become ``AttnDownEncoderBlock2D`` /
    ``AttnUpDecoderBlock2D``.
    """
    try:
        levels = _taming_levels(state, "encoder.down.")
        blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
        widths = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
        enc_attn = [any(k.startswith(f"encoder.down.{i}.attn.") for k in state) for i in levels]
        dec_attn = [any(k.startswith(f"decoder.up.{i}.attn.") for k in state) for i in levels]
        config = {
            "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
            "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in enc_attn),
            "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(dec_attn)),
            "block_out_channels": tuple(widths),
            "layers_per_block": len(blocks),
            "latent_channels": int(state["encoder.conv_out.weight"].shape[0]),
            "num_vq_embeddings": int(state["quantize.embedding.weight"].shape[0]),
            "vq_embed_dim": int(state["quant_conv.weight"].shape[0]),
            "norm_num_groups": 32,
        }
    except (KeyError, IndexError, ValueError) as err:
        raise SemsrError(f"not a taming-transformers VQGAN state dict (missing {err})") from None
    if not levels or levels != list(range(len(levels))):
        raise SemsrError("not a taming-transformers VQGAN state dict (no encoder.down.N levels)")
    return config


def taming_to_diffusers_key(key: str, levels: int) -> str | None:
    """The diffusers ``VQModel`` name of a taming-layout key (None when the key has no counterpart).

    taming's decoder lists its levels from the finest (``up.0``) while diffusers' ``up_blocks`` start at
    the coarsest: ``decoder.up.i`` -> ``decoder.up_blocks.(levels - 1 - i)``.
    """
    resnet = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    top = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
        "quantize.embedding": "quantize.embedding",
    }
    stem, _, param = key.rpartition(".")
    if stem in top:
        return f"{top[stem]}.{param}"
    parts = stem.split(".")
    if len(parts) < 2 or parts[0] not in ("encoder", "decoder"):
        return None
    net, rest = parts[0], parts[1:]
    if rest in (["conv_in"], ["conv_out"]):
        return f"{net}.{rest[0]}.{param}"
    if rest == ["norm_out"]:
        return f"{net}.conv_norm_out.{param}"
    if rest[0] == "mid" and len(rest) == 3:
        name = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}.get(rest[1])
        table = attn if rest[1] == "attn_1" else resnet
        if name is None or rest[2] not in table:
            return None
        return f"{net}.mid_block.{name}.{table[rest[2]]}.{param}"
    group = {"encoder": "down", "decoder": "up"}[net]
    if rest[0] != group or len(rest) < 3 or not rest[1].isdigit():
        return None
    level = int(rest[1])
    block = f"{net}.down_blocks.{level}" if net == "encoder" else f"{net}.up_blocks.{levels - 1 - level}"
    if rest[2] in ("block", "attn") and len(rest) == 5 and rest[3].isdigit():
        table = resnet if rest[2] == "block" else attn
        kind = "resnets" if rest[2] == "block" else "attentions"
        if rest[4] not in table:
            return None
        return f"{block}.{kind}.{rest[3]}.{table[rest[4]]}.{param}"
    if rest[2:] == ["downsample", "conv"] and net == "encoder":
        return f"{block}.downsamplers.0.conv.{param}"
    if rest[2:] == ["upsample", "conv"] and net == "decoder":
        return f"{block}.upsamplers.0.conv.{param}"
    return None


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(sorted(keys)[:4])
    return shown + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def taming_to_diffusers(state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(VQModel config, VQModel state dict)`` of a taming-layout VQGAN state dict.

    Strict: every key must map (bar :data:`TAMING_SKIPPED_PREFIXES`), else :class:`SemsrError`
    naming the first few unmapped keys. taming's 1x1-conv attention projections become linear weights.
    """
    config = taming_vqgan_config(state)
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if key.startswith(TAMING_SKIPPED_PREFIXES):
            continue
        new = taming_to_diffusers_key(key, levels)
        if new is None:
            unmapped.append(key)
            continue
        projection = key.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and ".attn" in key
        out[new] = _conv1x1_to_linear(value) if projection and value.ndim == 4 else value
    if unmapped:
        raise SemsrError(f"{len(unmapped)} keys of no taming VQGAN part: {_listing(unmapped)}")
    return config, out


def load_taming_vqgan(path: str | Path, grid: int = 16, device: str | torch.device = "cpu") -> DiffusersVQTokenizer:
    """A taming-transformers / latent-diffusion VQGAN (``VQModel`` / ``VQModelInterface`` state dict keys:
    ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv.*``, ``post_quant_conv.*``)
    from a ``.safetensors`` file (or a folder holding exactly one) as a :class:`DiffusersVQTokenizer`.

    Strict: unmapped file keys and model weights the file lacks are one-line errors naming the first
    few. Pickled ``.ckpt`` files are refused with the conversion command (:data:`TAMING_CONVERSION`).
    """
    path = Path(path).expanduser()
    if path.suffix in PICKLE_SUFFIXES:
        raise UnavailableError(
            f"pickled checkpoints are not read; export its state_dict to safetensors in your own environment: "
            f"{TAMING_CONVERSION}",
            path,
        )
    file = path
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise UnavailableError(f"expected one taming VQGAN .safetensors file, found {len(found)}", path)
        file = found[0]
    if not file.is_file():
        raise UnavailableError("no such VQGAN file", file)
    try:
        state = load_file(str(file))
        config, mapped = taming_to_diffusers(state)
    except SemsrError as err:
        raise UnavailableError(str(err), file) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise UnavailableError(f"cannot read safetensors: {err}", file) from None
    model = VQModel(**config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    extra = [k for k in mapped if k not in expected]
    if missing or extra:
        what = f"missing {_listing(missing)}" if missing else f"unexpected {_listing(extra)}"
        raise UnavailableError(f"taming VQGAN weights do not fit the VQModel they describe: {what}", file)
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(mapped[k].shape)]
    if bad:
        raise UnavailableError(f"taming VQGAN tensors of the wrong shape: {_listing(bad)}", file)
    model.load_state_dict(mapped, strict=True)
    return DiffusersVQTokenizer(model, file, grid, device)


def _config_class(folder: Path) -> str | None:
    """``_class_name`` of ``folder/config.json`` (None when unreadable)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(data.get("_class_name")) if isinstance(data, dict) else None


def load_tokenizer(path: str | Path | None = None, device: str | torch.device = "cpu") -> SpatialTokenizer:
    """Load a spatial tokenizer.

    Args:
        path: ``None`` for the shipped edge tokenizer; a semsr tokenizer folder (``config.json``
            with ``_class_name`` EdgeVQ, DepthVQ or SegVQ); a diffusers ``VQModel`` folder; or a
            taming / latent-diffusion VQGAN ``.safetensors`` file, or a folder with one and no
            ``config.json`` (:func:`load_taming_vqgan`).
        device: torch device.
    """
    folder = shipped_edge_vq_path() if path is None else Path(path).expanduser()
    if folder.suffix == ".safetensors" or folder.suffix in PICKLE_SUFFIXES:
        return load_taming_vqgan(folder, device=device)
    if not folder.is_dir():
        raise UnavailableError(
            "not a VQ tokenizer (an EdgeVQ/DepthVQ/SegVQ or diffusers VQModel folder, or a taming VQGAN "
            ".safetensors file)",
            folder,
        )
    own = OWN_TOKENIZERS.get(_config_class(folder) or "")
    if own is not None:
        return load_component(own, folder).to(device)
    if not (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return load_taming_vqgan(folder, device=device)
    return DiffusersVQTokenizer.from_folder(folder, device=device)
