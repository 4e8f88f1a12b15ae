"""VQ tokenizers: spatial modality maps -> 16x16 discrete tokens.

MMSR (seed 001) turns each spatial modality (edges, depth, segmentation) into
a 16x16 grid of codebook indices (codebook 1024, embedding dim 256) so it can
join the text tokens in the Multimodal Latent Connector. Two tokenizers share
one interface (:class:`SpatialTokenizer`):

- :class:`EdgeVQ` -- the project's own small VQ autoencoder (conv encoder,
  cosine-similarity codebook with EMA updates and dead-code restarts,
  straight-through gradients, commitment loss, conv decoder). It is trained on
  Canny + HED maps of the BSDS500 training images (``semsr train-vq``, see
  :mod:`semsr.train.vq`) and shipped in the package
  (``assets/weights/vq_edges.safetensors`` + ``vq_edges.json``), so the edge
  modalities work offline: :func:`load_tokenizer` with no path loads it.
- :class:`DiffusersVQTokenizer` -- any diffusers ``VQModel`` (a VQGAN) from a
  local folder; the input size is chosen so the latent grid is 16x16.

Maps are ``(B, C, H, W)`` float in [0, 1] of any size; each tokenizer resizes
them to its input size and adapts the channel count (grey <-> RGB).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import UnavailableError
from semsr.core.io import atomic_write
from semsr.core.paths import assets_dir

#: Name of the shipped edge tokenizer inside ``assets/weights``.
SHIPPED_EDGE_VQ = "vq_edges"


@runtime_checkable
class SpatialTokenizer(Protocol):
    """Interface of every spatial-map tokenizer.

    Attributes:
        grid: tokens per side (16).
        codebook_size: number of codebook entries (1024).
        embed_dim: dimension of a codebook vector (256).
    """

    grid: int
    codebook_size: int
    embed_dim: int

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


@dataclass
class EdgeVQConfig:
    """Hyper-parameters of :class:`EdgeVQ` (stored as JSON beside the weights).

    The encoder folds ``patch x patch`` pixels into channels (pixel unshuffle),
    then runs ``len(channels)`` stages, each but the first halving the
    resolution, so ``image_size == grid * patch * 2**(len(channels) - 1)``.
    """

    in_channels: int = 1
    image_size: int = 128
    patch: int = 2
    channels: tuple[int, ...] = (32, 64, 128)
    res_blocks: int = 1
    grid: int = 16
    embed_dim: int = 256
    codebook_size: int = 1024
    decay: float = 0.99
    commitment: float = 0.25
    dead_threshold: float = 0.03

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if self.image_size != self.grid * self.patch * 2 ** (len(self.channels) - 1):
            raise ValueError("image_size must equal grid * patch * 2**(len(channels) - 1)")


class _ResBlock(nn.Module):
    """Pre-activation residual block, channels unchanged: ``(B, C, H, W)`` -> same."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class EMAQuantizer(nn.Module):
    """Cosine-similarity vector quantiser with an EMA-updated codebook.

    Vectors and codes are L2-normalised; the nearest code is the one with the
    largest cosine similarity. In training the codebook follows an exponential
    moving average (``decay``) of the normalised encoder outputs assigned to
    each code, and codes whose usage EMA falls below ``dead_threshold`` are
    restarted from random encoder outputs of the batch (keeps the codebook in
    use). The first training batch initialises the codebook (random encoder outputs).
    Gradients pass straight through; the commitment loss pulls encoder
    outputs towards their codes.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, dead_threshold: float = 0.03) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.dead_threshold = decay, dead_threshold
        init = F.normalize(torch.randn(codebook_size, dim), dim=1)
        self.register_buffer("codebook", init)
        # Training state (not saved with the weights): usage and sums of the EMA, and whether
        # the codebook was initialised from data (the first training batch).
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("ema_initialised", torch.tensor(False))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code ids for vectors ``(N, dim)`` -> ``(N,)`` int64."""
        return (F.normalize(z, dim=1) @ self.codebook.t()).argmax(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``z`` ``(B, dim, h, w)``.

        Returns ``(z_q (B, dim, h, w), ids (B, h, w), commitment loss scalar)``.
        """
        b, d, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        if self.training and not bool(self.ema_initialised):
            self._init_from(flat.detach())
        ids = (flat.detach() @ self.codebook.t()).argmax(1)
        if self.training:
            self._ema_update(flat.detach(), ids)
        q = self.codebook[ids]
        commit = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        return q.view(b, h, w, d).permute(0, 3, 1, 2), ids.view(b, h, w), commit

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """Set every code to a random vector of the batch ``flat`` ``(N, dim)`` (unit norm)."""
        pick = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        self.codebook.copy_(flat[pick])
        self.ema_sum.copy_(flat[pick])
        self.ema_count.fill_(1.0)
        self.ema_initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids, minlength=self.codebook_size).type_as(flat)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, flat)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = self.ema_count < self.dead_threshold
        if dead.any():
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)
            self.ema_sum[dead] = flat[pick]
            self.ema_count[dead] = 0.25  # unused restarted codes are restarted again after ~100 steps
        self.codebook.copy_(F.normalize(self.ema_sum, dim=1))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids (any shape) -> unit codebook vectors ``(*ids.shape, dim)``."""
        return self.codebook[ids]


class EdgeVQ(nn.Module):
    """Small VQ autoencoder for single-channel modality maps (edges by default).

    ``encode``: maps ``(B, C, H, W)`` in [0, 1] -> ids ``(B, 16, 16)``;
    ``decode``: ids -> maps ``(B, in_channels, image_size, image_size)`` in [0, 1];
    ``forward`` (training): prepared maps -> ``(logits, ids, commitment loss)``.
    """

    def __init__(self, config: EdgeVQConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or EdgeVQConfig()
        self.grid, self.codebook_size, self.embed_dim = cfg.grid, cfg.codebook_size, cfg.embed_dim
        ch, p = cfg.channels, cfg.patch
        enc: list[nn.Module] = [nn.PixelUnshuffle(p), nn.Conv2d(cfg.in_channels * p * p, ch[0], 3, padding=1)]
        prev = ch[0]
        for i, c in enumerate(ch):
            if i > 0:
                enc.append(nn.Conv2d(prev, c, 4, stride=2, padding=1))
            enc += [_ResBlock(c) for _ in range(cfg.res_blocks)]
            prev = c
        enc += [nn.GroupNorm(8, prev), nn.SiLU(), nn.Conv2d(prev, cfg.embed_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = EMAQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.decay, cfg.dead_threshold)
        dec: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, ch[-1], 1)]
        for i in range(len(ch) - 1, -1, -1):  # mirror of the encoder
            dec += [_ResBlock(ch[i]) for _ in range(cfg.res_blocks)]
            if i > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i - 1], 3, padding=1)]
        dec += [nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], cfg.in_channels * p * p, 3, padding=1),
                nn.PixelShuffle(p)]
        self.decoder = nn.Sequential(*dec)

    def prepare(self, maps: torch.Tensor) -> torch.Tensor:
        """Any-size maps -> ``(B, in_channels, image_size, image_size)`` in [0, 1]."""
        return prepare_maps(maps, self.config.image_size, self.config.in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepared maps ``(B, C, S, S)`` -> ``(recon logits (B, C, S, S), ids (B, 16, 16), commitment)``."""
        z = self.encoder(x * 2.0 - 1.0)
        q, ids, commit = self.quantizer(z)
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

    # -- persistence: <stem>.safetensors + <stem>.json
    def save(self, path: str | Path) -> Path:
        """Write weights (fp32 safetensors) and config JSON beside it; returns the weights path."""
        from safetensors.torch import save_file

        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("quantizer.ema_")}
        with atomic_write(path) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        cfg = asdict(self.config)
        cfg["channels"] = list(cfg["channels"])
        with atomic_write(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EdgeVQ":
        """Load from ``<stem>.safetensors`` + ``<stem>.json`` (either path works)."""
        from safetensors.torch import load_file

        path = Path(path)
        weights, cfg_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
        if not weights.is_file() or not cfg_path.is_file():
            raise UnavailableError("VQ tokenizer weights/config not found (.safetensors + .json)", path)
        known = {f.name for f in fields(EdgeVQConfig)}
        cfg = EdgeVQConfig(**{k: v for k, v in json.loads(cfg_path.read_text()).items() if k in known})
        model = cls(cfg)
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("quantizer.ema_") for k in missing):
            raise UnavailableError(f"weights do not match the config (missing {missing}, unexpected {unexpected})", weights)
        q = model.quantizer  # ready for fine-tuning: EMA state restarts from the loaded codebook
        q.ema_sum.copy_(q.codebook)
        q.ema_count.fill_(1.0)
        q.ema_initialised.fill_(True)
        return model.eval()


def shipped_edge_vq_path() -> Path:
    """Path of the edge tokenizer shipped in the package (``assets/weights/vq_edges.safetensors``)."""
    return assets_dir() / "weights" / f"{SHIPPED_EDGE_VQ}.safetensors"


# ------------------------------------------------------------ diffusers VQGAN


class DiffusersVQTokenizer:
    """A diffusers ``VQModel`` (VQGAN) from a local folder as a :class:`SpatialTokenizer`.

    The input side is ``grid * 2**(len(block_out_channels) - 1)`` (256 for the
    usual 5-level f16 VQGAN), so the latent grid is ``grid x grid``; maps are
    fed as RGB in [-1, 1] (grey maps repeated) and decoded back to [0, 1].
    """

    def __init__(self, path: str | Path, grid: int = 16, device: str = "cpu") -> None:
        from diffusers import VQModel

        from semsr.core.loading import quiet_hf_logging  # also forces the hubs offline

        quiet_hf_logging()
        self.path = Path(path)
        try:
            self.model = VQModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as err:
            raise UnavailableError(f"cannot load a diffusers VQModel: {err}", self.path) from err
        cfg = self.model.config
        self.grid = grid
        self.codebook_size = int(cfg.num_vq_embeddings)
        self.embed_dim = int(cfg.vq_embed_dim or cfg.latent_channels)
        self.image_size = grid * 2 ** (len(cfg.block_out_channels) - 1)
        self.in_channels = int(cfg.in_channels)

    @property
    def device(self) -> torch.device:
        return self.model.quantize.embedding.weight.device

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


def load_tokenizer(path: str | Path | None = None, device: str = "cpu") -> SpatialTokenizer:
    """Load a spatial tokenizer.

    Args:
        path: ``None`` for the shipped edge tokenizer; a diffusers ``VQModel``
            folder (``config.json`` with ``_class_name: VQModel``); or an
            :class:`EdgeVQ` ``.safetensors``/``.json`` pair.
        device: torch device.
    """
    if path is None:
        return EdgeVQ.load(shipped_edge_vq_path()).to(device)
    path = Path(path)
    if path.is_dir():
        return DiffusersVQTokenizer(path, device=device)
    return EdgeVQ.load(path).to(device)
