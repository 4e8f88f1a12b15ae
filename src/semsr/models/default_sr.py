"""The bundled default model: a residual diffusion refiner over a stage-1 restorer.

Flow for an LR image ``(B, 3, h, w)`` in [0, 1] and scale ``s`` (= 4)::

    y1  = stage1(LR)                              (B, 3, sh, sw)  realesrgan-x4plus (or bicubic)
    c   = unshuffle(2*y1 - 1, u)                  (B, 3u^2, sh/u, sw/u)   pixel-unshuffle "latent"
    e   = canny(y1)                               (B, 1, sh, sw)  edge prior (semsr.priors.edges)
    ctx = proj(MiniLM(prompt + IRPAD text))       (B, 77, D)      text prior (semsr.pipeline.text)
    r_T ~ N(0, I) in the unshuffled space          (B, 3u^2, sh/u, sw/u)
    r_0 = DDIM(UNet([r_t, c], t, ctx) + ControlNet(edges e))   few steps, x0 ("sample") prediction
    SR  = clamp(y1 + unshuffle^-1(r_0) / k, 0, 1)   k = residual_scale

The denoiser is a tiny :class:`diffusers.UNet2DConditionModel` whose
cross-attention reads the text context, plus a diffusers ControlNet (the SR
ControlNet machinery of :mod:`semsr.pipeline.sd_controlnet`) whose hint is the
edge map; the sampling loop is :func:`semsr.pipeline.sampler.sample` and
tiling :mod:`semsr.pipeline.latent_tiling`. The UNet's ``conv_out`` starts at
zero and the ControlNet's zero convolutions are zero, so an untrained model
predicts ``r_0 = 0`` and (with DDIM, ``set_alpha_to_one``) returns the stage-1
output unchanged.

Checkpoint folder (``save`` / ``load``): ``config.json`` (:class:`DefaultSRConfig`)
+ ``unet/``, ``controlnet/`` (diffusers folders) + ``text_proj.safetensors``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError

CONFIG_NAME = "config.json"
TEXT_PROJ_NAME = "text_proj.safetensors"
MINILM_WIDTH = 384


@dataclass
class DefaultSRConfig:
    """Architecture and diffusion settings of :class:`DefaultSR` (saved as ``config.json``).

    Attributes:
        scale: SR factor of the stage-1 restorer and of the model.
        unshuffle: pixel-unshuffle factor ``u`` of the working space (channels ``3 u^2``).
        block_out_channels / down_block_types / up_block_types / layers_per_block:
            the UNet (diffusers names).
        cross_attention_dim: width ``D`` of the text context.
        attention_head_dim: channels per attention head.
        conditioning_channels: ControlNet hint-embedding widths (``len = log2(u) + 1``).
        residual_scale: ``k``; the diffused residual is ``k * (HR - y1)`` (raises its SNR).
        stage1: registered method producing ``y1`` (``realesrgan-x4plus`` or ``bicubic``).
        scheduler: diffusers scheduler config (DDIM/DPM++ built from it).
        default_steps: sampling steps the method uses when the user gives none (chosen for
            the shipped weights, see docs/default-model.md).
    """

    scale: int = 4
    unshuffle: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
    layers_per_block: int = 1
    cross_attention_dim: int = 128
    attention_head_dim: int = 32
    conditioning_channels: list[int] = field(default_factory=lambda: [16, 16, 32])
    residual_scale: float = 4.0
    stage1: str = "realesrgan-x4plus"
    scheduler: dict[str, Any] = field(default_factory=lambda: {
        "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
        "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing",
    })
    default_steps: int = 4

    def __post_init__(self) -> None:
        u = self.unshuffle
        if u < 1 or u & (u - 1):
            raise SemsrError(f"unshuffle must be a power of two, got {u}")
        if 2 ** (len(self.conditioning_channels) - 1) != u:
            raise SemsrError(f"conditioning_channels needs {u.bit_length()} entries for unshuffle={u}")
        if self.default_steps < 1:
            raise SemsrError(f"default_steps must be >= 1, got {self.default_steps}")

    @property
    def channels(self) -> int:
        """Channels of the working space, ``3 u^2``."""
        return 3 * self.unshuffle ** 2

    @property
    def multiple(self) -> int:
        """HR sizes must be multiples of this (unshuffle times the UNet's down-sampling)."""
        return self.unshuffle * 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefaultSRConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise SemsrError(f"unknown default-model config keys {sorted(unknown)}")
        return cls(**data)


class DefaultSR(nn.Module):
    """Trainable part of the default model: UNet + edge ControlNet + text projection.

    ``forward(x_t, t, cond)`` is the denoiser: ``x_t (B, 3u^2, H/u, W/u)``
    noisy scaled residual, ``t`` scalar or ``(B,)`` timesteps, ``cond`` a dict
    with ``stage1 (B, 3u^2, H/u, W/u)`` (unshuffled ``2 y1 - 1``),
    ``tokens (B, 77, 384)`` frozen MiniLM tokens and ``edges (B, 1, H, W)``
    in [0, 1]. Returns the predicted clean residual, shaped like ``x_t``.
    """

    def __init__(self, config: DefaultSRConfig | None = None) -> None:
        super().__init__()
        from diffusers import ControlNetModel, UNet2DConditionModel

        self.config = cfg = config or DefaultSRConfig()
        heads = [max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels]
        self.unet = UNet2DConditionModel(
            sample_size=32, in_channels=2 * cfg.channels, out_channels=cfg.channels,
            down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=tuple(heads),
            norm_num_groups=min(16, min(cfg.block_out_channels)),
        )
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)
        self.controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_channels), conditioning_channels=1,
        )
        self.text_proj = nn.Linear(MINILM_WIDTH, cfg.cross_attention_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                edge_scale: float = 1.0) -> torch.Tensor:
        sample = torch.cat([x, cond["stage1"].to(x.dtype)], dim=1)
        context = self.text_proj(cond["tokens"].to(self.text_proj.weight.dtype))
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        down, mid = self.controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=cond["edges"].to(x.dtype),
                                    conditioning_scale=edge_scale, return_dict=False)
        return self.unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write the checkpoint folder (see the module docstring)."""
        from safetensors.torch import save_file

        from semsr.core.io import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.text_proj.state_dict().items()}
        with atomic_write(folder / TEXT_PROJ_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        with atomic_write(folder / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps({"kind": "semsr-default-sr", **asdict(self.config)}, indent=2) + "\n",
                           encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> DefaultSR:
        """Load a folder written by :meth:`save` (eval mode, frozen)."""
        from diffusers import ControlNetModel, UNet2DConditionModel
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise UnavailableError("not a default-model checkpoint (no config.json)", folder)
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        if data.pop("kind", None) != "semsr-default-sr":
            raise UnavailableError("not a default-model checkpoint (config kind != semsr-default-sr)", cfg_path)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = DefaultSRConfig.from_dict(data)
        model.unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        model.controlnet = ControlNetModel.from_pretrained(folder / "controlnet", local_files_only=True)
        model.text_proj = nn.Linear(MINILM_WIDTH, model.config.cross_attention_dim)
        model.text_proj.load_state_dict(load_file(str(folder / TEXT_PROJ_NAME)))
        return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------- space conversions
def to_space(image: torch.Tensor, u: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-inf, inf] -> ``(B, 3u^2, H/u, W/u)`` (pixel-unshuffle)."""
    return F.pixel_unshuffle(image, u)


def from_space(z: torch.Tensor, u: int) -> torch.Tensor:
    """Inverse of :func:`to_space`: ``(B, 3u^2, h, w)`` -> ``(B, 3, u h, u w)``."""
    return F.pixel_shuffle(z, u)


# ---------------------------------------------------------------------- priors
class TextTokens:
    """Frozen MiniLM tokens ``list[str] -> (B, 77, 384)`` with a per-prompt cache."""

    def __init__(self) -> None:
        from semsr.pipeline.text import MiniLMTextEncoder
        from semsr.pipeline.text import PromptEncoder

        enc = MiniLMTextEncoder.build(MINILM_WIDTH)
        self.bert, self.tokenizer, self.max_length = enc.bert, enc.tokenizer, enc.max_length
        self._cached = PromptEncoder(self._encode)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        return self.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.float()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self._cached(list(prompts))


class DegradationText:
    """IRPAD's degradation description of LR images, or ``""`` per image when no IRPAD weights exist.

    Args:
        weights: IRPAD folder; ``None`` = the shipped weights (may be absent).
        enabled: False always returns empty descriptions.
    """

    def __init__(self, weights: str | Path | None = None, enabled: bool = True) -> None:
        self.estimator: Any = None
        self.reason = "disabled"
        if not enabled:
            return
        from semsr.priors.irpad import IRPADEstimator

        try:
            self.estimator = IRPADEstimator(weights=weights, max_crops=4)
            self.reason = ""
        except UnavailableError as err:
            self.reason = str(err)

    @property
    def available(self) -> bool:
        return self.estimator is not None

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor) -> list[str]:
        """``lr (B, 3, h, w)`` in [0, 1] -> one description per image."""
        if self.estimator is None:
            return [""] * lr.shape[0]
        from semsr.priors.irpad import describe

        c = self.estimator.config.crop
        if min(lr.shape[-2:]) < c:  # IRPAD's windows need at least one full crop
            lr = F.interpolate(lr, size=(max(c, lr.shape[-2]), max(c, lr.shape[-1])), mode="bicubic",
                               align_corners=False).clamp(0, 1)
        levels = self.estimator.predict_batch(lr)
        return [describe({t: int(v[i]) for t, v in levels.items()}, self.estimator.table, omit_none=True)
                for i in range(lr.shape[0])]


def edge_map(image: torch.Tensor) -> torch.Tensor:
    """Canny edges (:func:`semsr.priors.edges.canny_edges`) per image: ``(B, 3, H, W) -> (B, 1, H, W)`` in {0, 1}."""
    from semsr.priors.edges import canny_edges

    return torch.cat([canny_edges(img[None].float().clamp(0, 1).cpu())[0] for img in image]).to(image.device)


def join_prompt(user: str, degradation: str) -> str:
    """The text condition: user prompt and degradation description, comma-joined."""
    return ", ".join(p.strip() for p in (user, degradation) if p and p.strip())


# ---------------------------------------------------------------------- inference
class DefaultSRPipeline:
    """Inference around a :class:`DefaultSR`: stage 1, priors, few-step sampling, tiling.

    Args:
        model: the trained (or fresh) :class:`DefaultSR`; it is frozen here.
        stage1: a registered method (``(B, 3, h, w) -> (B, 3, sh, sw)``); default
            ``model.config.stage1`` built on ``device``.
        text: frozen MiniLM tokens (shared with training); built when None.
        irpad: IRPAD weights folder (None: the shipped ones; absent: no degradation text).
    """

    def __init__(self, model: DefaultSR, *, stage1: Any = None, text: TextTokens | None = None,
                 degradation: DegradationText | None = None, irpad: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        from semsr.methods import get_method

        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = model.config
        self.stage1 = stage1 if stage1 is not None else get_method(self.config.stage1, device=str(self.device))
        self.text = text if text is not None else TextTokens()
        self.degradation = degradation if degradation is not None else DegradationText(irpad)

    @torch.no_grad()
    def conditions(self, lr: torch.Tensor, y1: torch.Tensor, prompts: list[str], *, use_text: bool = True,
                   use_edges: bool = True, use_irpad: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Condition dict for :meth:`DefaultSR.forward` and the text prompts used."""
        u = self.config.unshuffle
        deg = self.degradation(lr) if use_irpad else [""] * lr.shape[0]
        texts = [join_prompt(p, d) if use_text else "" for p, d in zip(prompts, deg, strict=True)]
        edges = edge_map(y1) if use_edges else torch.zeros_like(y1[:, :1])
        cond = {"stage1": to_space(y1 * 2 - 1, u).to(self.device), "tokens": self.text(texts).to(self.device),
                "edges": edges.to(self.device)}
        return cond, texts

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, *, prompt: str | list[str] = "", steps: int = 4, seed: int = 0,
                 scheduler: str = "ddim", guidance_scale: float = 1.0, use_text: bool = True,
                 use_edges: bool = True, use_irpad: bool = True, edge_scale: float = 1.0,
                 tile: int | None = 256, tile_overlap: int | None = None, progress: Any = None) -> torch.Tensor:
        """Super-resolve ``lr (B, 3, h, w)`` in [0, 1] -> ``(B, 3, s h, s w)`` in [0, 1].

        ``tile`` is the side of a working-space tile (``tile * u`` output pixels; None or 0:
        untiled). ``steps == 0`` returns the stage-1 output (the ablation floor).
        """
        from semsr.pipeline.latent_tiling import crop_window, tiled, untiled
        from semsr.pipeline.sampler import make_scheduler, sample

        cfg = self.config
        b, _, h, w = lr.shape
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        if len(prompts) != b:
            raise SemsrError(f"{len(prompts)} prompts for {b} images")
        lr = lr.float().clamp(0, 1)
        y1 = self.stage1(lr).float().clamp(0, 1).to(self.device)
        if steps == 0:
            return y1.cpu()
        # pad the stage-1 output (not the LR) to the model's multiple, so the crop is exactly stage1(lr)
        ph, pw = (-y1.shape[-2]) % cfg.multiple, (-y1.shape[-1]) % cfg.multiple
        if ph or pw:
            y1 = F.pad(y1, (0, pw, 0, ph), mode="replicate")
        cond, _ = self.conditions(lr, y1, prompts, use_text=use_text, use_edges=use_edges, use_irpad=use_irpad)
        uncond = None
        if guidance_scale != 1.0:
            uncond = {**cond, "tokens": self.text([""] * b).to(self.device)}
        u = cfg.unshuffle

        def spatial(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor], window: tuple[int, int, int, int]):
            local = {"stage1": crop_window(c["stage1"], window), "tokens": c["tokens"],
                     "edges": crop_window(c["edges"], window, u)}
            return self.model(x, t, local, edge_scale=edge_scale)

        shape = (b, cfg.channels, y1.shape[-2] // u, y1.shape[-1] // u)
        side = cfg.multiple // u
        if tile and max(shape[-2:]) > tile:
            tile = max(side, int(tile) // side * side)
            overlap = tile_overlap if tile_overlap is not None else tile // 4
            denoiser = tiled(spatial, tile, overlap)
        else:
            denoiser = untiled(spatial)
        sched = make_scheduler(scheduler, cfg.scheduler)
        gen = torch.Generator().manual_seed(int(seed))
        residual = sample(denoiser, sched, shape=shape, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                          steps=int(steps), generator=gen, device=self.device, progress=progress)
        sr = (y1 + from_space(residual, u) / cfg.residual_scale).clamp_(0, 1)
        return sr[..., : h * cfg.scale, : w * cfg.scale].cpu()
