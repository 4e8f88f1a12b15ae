"""The network of the bundled default model: a residual diffusion refiner over a stage-1 restorer.

Flow for an LR image ``(B, 3, h, w)`` in [0, 1] and scale ``s`` (= 4); the
inference pipeline around the network is
:class:`semsr.methods.default_diffusion.DefaultSRPipeline`::

    y1  = stage1(LR)                              (B, 3, sh, sw)  realesrgan-x4plus (or bicubic)
    c   = unshuffle(2*y1 - 1, u)                  (B, 3u^2, sh/u, sw/u)   pixel-unshuffle "latent"
    e   = canny(y1)                               (B, 1, sh, sw)  edge prior (semsr.priors.edges)
    ctx = proj(MiniLM(prompt + IRPAD text))       (B, 77, D)      text prior (semsr.pipeline.text)
    r_T ~ N(0, I) in the unshuffled space          (B, 3u^2, sh/u, sw/u)
    r_0 = DDIM(UNet([r_t, c], t, ctx) + ControlNet(edges e))   few steps, x0 ("sample") prediction
    SR  = clamp(y1 + unshuffle^-1(r_0) / k, 0, 1)   k = residual_scale

:class:`DefaultSR` is the trainable part: a tiny
:class:`diffusers.UNet2DConditionModel` whose cross-attention reads the text
context, a diffusers ControlNet whose hint is the edge map, and the linear
projection of the frozen MiniLM tokens to the context width. The UNet's
``conv_out`` starts at zero and the ControlNet's zero convolutions are zero,
so an untrained model predicts ``r_0 = 0`` and (with DDIM,
``set_alpha_to_one``) returns the stage-1 output unchanged.

Checkpoint folder (:func:`save_default_sr` / :func:`load_default_sr`): the
``default-sr`` layout of :mod:`semsr.core.components`: ``model_index.json``,
whose ``meta`` is the :class:`DefaultSR` config (every architecture and
diffusion setting, including ``default_steps``), and one component folder per
part: ``unet/`` and ``controlnet/`` (diffusers) and ``text_proj/``
(:class:`DefaultSRTextProj`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from semsr.core.components import (
    INDEX_FILE,
    Component,
    load_checkpoint,
    register_component,
    register_to_config,
    save_checkpoint,
)
from semsr.core.errors import SemsrError, UnavailableError

#: Recipe name of the checkpoint layout (``model_index.json``'s ``_class_name``).
RECIPE = "default-sr"
#: Width of the frozen MiniLM tokens the text projection reads.
MINILM_WIDTH = 384
#: Where sampling starts (``DefaultSR.start``): a noise draw or the prior's mean (zeros).
START_MODES = ("noise", "mean")
#: Default diffusion schedule (diffusers scheduler config; DDIM/DPM++ are built from it).
DEFAULT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "sample",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}


@register_component
class DefaultSRTextProj(Component):
    """Linear projection of the frozen text tokens to the context width: ``(B, L, in_features)`` ->
    ``(B, L, out_features)`` (parameters ``weight``, ``bias`` as in ``nn.Linear``, initialised like it)."""

    @register_to_config
    def __init__(self, in_features: int = MINILM_WIDTH, out_features: int = 128) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@register_component
class DefaultSR(Component):
    """Trainable part of the default model: UNet + edge ControlNet + text projection.

    ``forward(x_t, t, cond)`` is the denoiser: ``x_t (B, 3u^2, H/u, W/u)``
    noisy scaled residual, ``t`` scalar or ``(B,)`` timesteps, ``cond`` a dict
    with ``stage1 (B, 3u^2, H/u, W/u)`` (unshuffled ``2 y1 - 1``),
    ``tokens (B, 77, text_width)`` frozen MiniLM tokens and ``edges (B, 1, H, W)``
    in [0, 1]. Returns the predicted clean residual, shaped like ``x_t``.

    Args (the component config, ``model.config.<name>``):
        scale: SR factor of the stage-1 restorer and of the model.
        unshuffle: pixel-unshuffle factor ``u`` of the working space (channels ``3 u^2``).
        block_out_channels / down_block_types / up_block_types / layers_per_block:
            the UNet (diffusers names).
        cross_attention_dim: width ``D`` of the text context.
        attention_head_dim: channels per attention head.
        conditioning_channels: ControlNet hint-embedding widths (``len = log2(u) + 1``).
        residual_scale: ``k``; the diffused residual is ``k * (HR - y1)`` (raises its SNR).
        stage1: registered method producing ``y1`` (``realesrgan-x4plus`` or ``bicubic``).
        scheduler: diffusers scheduler config (default :data:`DEFAULT_SCHEDULER`).
        default_steps: sampling steps the method uses when the user gives none (chosen
            for the shipped weights, see docs/default-model.md).
        start: where sampling starts: ``"noise"`` (``r_T ~ N(0, I)``, a fresh texture per seed) or
            ``"mean"`` (``r_T = 0``, the prior's mean: deterministic, no sampled grain).
        residual_blur: sigma in output pixels of a Gaussian low-pass applied to the predicted residual
            before it is added to ``y1`` (0 = none); removes the pixel-level grain of the working space.
        residual_core: soft threshold (coring) of the residual in [0, 1] units (0 = none): residual
            values below it, the refiner's low-amplitude, grain-like output, are dropped; larger
            ones (edges, tone and colour corrections) are kept, shrunk by it.
        residual_gain: factor on the cored residual (1 = as predicted).
        flat_smooth: sigma in output pixels of a Gaussian low-pass of ``y1`` applied only where ``y1``
            is flat (0 = none): the noise gate, see :func:`finish_refinement`.
        flat_gate: ``(lo, hi)`` local standard deviation of ``y1``'s luma (3x3 window, [0, 1] units):
            fully smoothed below ``lo``, untouched above ``hi``, linear in between.
        text_prior: whether the method feeds the text condition by default (False: the empty
            condition, no IRPAD; ``--prompt`` still works when the user gives one).
        text_width: width of the text tokens the projection reads (MiniLM: 384).
        unet, controlnet, text_proj: the parts, when loaded from a checkpoint (not part of
            the config); by default they are built from the config (``conv_out`` and the
            ControlNet's zero convolutions zero).

    Raises:
        SemsrError: an ``unshuffle`` that is not a power of two, ``conditioning_channels``
            of the wrong length, ``default_steps < 1``.
    """

    ignore_for_config = ["unet", "controlnet", "text_proj"]

    @register_to_config
    def __init__(
        self,
        scale: int = 4,
        unshuffle: int = 4,
        block_out_channels: Sequence[int] = (32, 64, 128),
        down_block_types: Sequence[str] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: Sequence[str] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block: int = 1,
        cross_attention_dim: int = 128,
        attention_head_dim: int = 32,
        conditioning_channels: Sequence[int] = (16, 16, 32),
        residual_scale: float = 4.0,
        stage1: str = "realesrgan-x4plus",
        scheduler: Mapping[str, Any] | None = None,
        default_steps: int = 4,
        text_width: int = MINILM_WIDTH,
        start: str = "noise",
        residual_blur: float = 0.0,
        text_prior: bool = True,
        residual_core: float = 0.0,
        residual_gain: float = 1.0,
        flat_smooth: float = 0.0,
        flat_gate: Sequence[float] = (1 / 255, 3 / 255),
        *,
        unet: UNet2DConditionModel | None = None,
        controlnet: ControlNetModel | None = None,
        text_proj: DefaultSRTextProj | None = None,
    ) -> None:
        super().__init__()
        u = int(unshuffle)
        if u < 1 or u & (u - 1):
            raise SemsrError(f"unshuffle must be a power of two, got {u}")
        if 2 ** (len(conditioning_channels) - 1) != u:
            raise SemsrError(f"conditioning_channels needs {u.bit_length()} entries for unshuffle={u}")
        if default_steps < 1:
            raise SemsrError(f"default_steps must be >= 1, got {default_steps}")
        if start not in START_MODES:
            raise SemsrError(f"start must be one of {START_MODES}, got {start!r}")
        if residual_blur < 0:
            raise SemsrError(f"residual_blur must be >= 0, got {residual_blur}")
        if residual_core < 0 or residual_gain < 0 or flat_smooth < 0:
            raise SemsrError(
                f"residual_core, residual_gain and flat_smooth must be >= 0, got {residual_core}, "
                f"{residual_gain}, {flat_smooth}"
            )
        if len(flat_gate) != 2 or not 0 <= flat_gate[0] < flat_gate[1]:
            raise SemsrError(f"flat_gate must be (lo, hi) with 0 <= lo < hi, got {tuple(flat_gate)}")
        if scheduler is None:  # record the schedule in the config: the file describes the model
            self.register_to_config(scheduler=dict(DEFAULT_SCHEDULER))
        channels = 3 * u * u
        if unet is None:
            heads = [max(1, c // attention_head_dim) for c in block_out_channels]
            unet = UNet2DConditionModel(
                sample_size=32,
                in_channels=2 * channels,
                out_channels=channels,
                down_block_types=tuple(down_block_types),
                up_block_types=tuple(up_block_types),
                block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block,
                cross_attention_dim=cross_attention_dim,
                attention_head_dim=tuple(heads),
                norm_num_groups=min(16, min(block_out_channels)),
            )
            nn.init.zeros_(unet.conv_out.weight)
            nn.init.zeros_(unet.conv_out.bias)
        if controlnet is None:
            controlnet = ControlNetModel.from_unet(
                unet,
                conditioning_embedding_out_channels=tuple(conditioning_channels),
                conditioning_channels=1,
            )
        if text_proj is None:
            text_proj = DefaultSRTextProj(text_width, cross_attention_dim)
        if (unet.config.in_channels, unet.config.out_channels) != (
            2 * channels,
            channels,
        ) or text_proj.config.out_features != unet.config.cross_attention_dim:
            raise SemsrError("the default-model parts do not fit its config (UNet channels or text width)")
        self.unet, self.controlnet, self.text_proj = unet, controlnet, text_proj

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **parts: Any) -> DefaultSR:
        """A model from config values (a training config's ``model.options``, a checkpoint's meta) and
        optionally its ``parts``; unknown keys are an error."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self", *cls.ignore_for_config}
        unknown = set(options) - known
        if unknown:
            raise SemsrError(f"unknown default-model config keys {sorted(unknown)}")
        return cls(**dict(options), **parts)

    @property
    def channels(self) -> int:
        """Channels of the working space, ``3 u^2``."""
        return 3 * self.config.unshuffle**2

    @property
    def multiple(self) -> int:
        """HR sizes must be multiples of this (unshuffle times the UNet's down-sampling)."""
        return self.config.unshuffle * 2 ** (len(self.config.block_out_channels) - 1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], edge_scale: float = 1.0
    ) -> torch.Tensor:
        sample = torch.cat([x, cond["stage1"].to(x.dtype)], dim=1)
        context = self.text_proj(cond["tokens"].to(self.text_proj.weight.dtype))
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        down, mid = self.controlnet(
            sample,
            t,
            encoder_hidden_states=context,
            controlnet_cond=cond["edges"].to(x.dtype),
            conditioning_scale=edge_scale,
            return_dict=False,
        )
        return self.unet(
            sample,
            t,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


# ---------------------------------------------------------------------- checkpoint
def save_default_sr(model: DefaultSR, folder: str | Path) -> Path:
    """Write the ``default-sr`` checkpoint folder of ``model`` (see the module docstring)."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    parts = {"unet": model.unet, "controlnet": model.controlnet, "text_proj": model.text_proj}
    return save_checkpoint(folder, RECIPE, parts, meta=config)


def load_default_sr(folder: str | Path) -> DefaultSR:
    """Load a folder written by :func:`save_default_sr` (eval mode, frozen).

    Raises:
        UnavailableError: not a ``default-sr`` checkpoint (one line).
    """
    folder = Path(folder).expanduser()
    if not (folder / INDEX_FILE).is_file():
        raise UnavailableError(f"not a default-model checkpoint (no {INDEX_FILE})", folder)
    parts, index = load_checkpoint(folder, RECIPE, names=["unet", "controlnet", "text_proj"])
    text_proj = parts["text_proj"]
    with torch.no_grad():  # own storage, as nn.Linear.load_state_dict gave it (kernels round by alignment)
        for t in text_proj.parameters():
            t.data = t.data.clone()
    try:
        model = DefaultSR.from_options(
            index.meta, unet=parts["unet"], controlnet=parts["controlnet"], text_proj=text_proj
        )
    except SemsrError as err:
        raise UnavailableError(f"bad default-model checkpoint: {err.message}", folder / INDEX_FILE) from None
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------- residual filter
def blur_residual(residual: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass (replicate padding) of ``residual (B, C, H, W)``; ``sigma <= 0``: unchanged."""
    if sigma <= 0:
        return residual
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=residual.device)
    g = torch.exp(-(x**2) / (2 * sigma * sigma))
    g = (g / g.sum()).to(residual.dtype)
    c = residual.shape[1]
    out = F.pad(residual, (radius,) * 4, mode="replicate")
    out = F.conv2d(out, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


#: BT.601 luma weights (the gate of :func:`flat_weight` reads the luma of ``y1``)
_LUMA = (0.299, 0.587, 0.114)


def local_std(x: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Standard deviation of ``x (B, C, H, W)`` in a ``(2 radius + 1)^2`` window (replicate padding), same shape."""
    k = 2 * radius + 1

    def mean(v: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(v, (radius,) * 4, mode="replicate"), k, stride=1)

    m = mean(x)
    return (mean(x * x) - m * m).clamp_min(0).sqrt()


def flat_weight(y1: torch.Tensor, gate: Sequence[float]) -> torch.Tensor:
    """Flatness of ``y1 (B, 3, H, W)`` in [0, 1]: ``(B, 1, H, W)``, 1 where the luma's 3x3 standard
    deviation is below ``gate[0]``, 0 above ``gate[1]``, linear in between."""
    w = torch.tensor(_LUMA, dtype=y1.dtype, device=y1.device).view(1, 3, 1, 1)
    lo, hi = float(gate[0]), float(gate[1])
    return (1 - (local_std((y1 * w).sum(1, keepdim=True)) - lo) / (hi - lo)).clamp(0, 1)


def finish_refinement(y1: torch.Tensor, residual: torch.Tensor, config: Any) -> torch.Tensor:
    """The refined image (not clamped) from the stage-1 output ``y1 (B, 3, H, W)`` and the predicted
    pixel-space residual ``residual (B, 3, H, W)`` (``from_space(r_0) / k``), with ``config``'s
    inference settings (a :class:`DefaultSR` config; defaults: ``y1 + residual``):

    ``flat = flat_weight(y1, flat_gate)``,
    ``y1' = y1 + flat * (blur(y1, flat_smooth) - y1)`` (the noise gate: the stage-1 output's faint
    pixel-level texture is removed where it has no structure),
    ``r' = residual_gain * soft(blur(residual, residual_blur), residual_core)`` (coring: the refiner's
    low-amplitude residual, grain-like, is dropped), result ``y1' + r'``.
    """
    r = blur_residual(residual, float(config.residual_blur))
    core = float(getattr(config, "residual_core", 0.0))
    if core > 0:
        r = r.sign() * (r.abs() - core).clamp_min(0)
    gain = float(getattr(config, "residual_gain", 1.0))
    if gain != 1:
        r = r * gain
    smooth = float(getattr(config, "flat_smooth", 0.0))
    if smooth > 0:
        flat = flat_weight(y1, getattr(config, "flat_gate", (1 / 255, 3 / 255)))
        y1 = y1 + flat * (blur_residual(y1, smooth) - y1)
    return y1 + r


# ---------------------------------------------------------------------- space conversions
def to_space(image: torch.Tensor, u: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-inf, inf] -> ``(B, 3u^2, H/u, W/u)`` (pixel-unshuffle)."""
    return F.pixel_unshuffle(image, u)


def from_space(z: torch.Tensor, u: int) -> torch.Tensor:
    """Inverse of :func:`to_space`: ``(B, 3u^2, h, w)`` -> ``(B, 3, u h, u w)``."""
    return F.pixel_shuffle(z, u)
