"""Experiment configuration: one YAML file describes one training run.

The YAML has one section per concern; every key maps to a field of the
dataclasses below (unknown keys are errors, so typos do not pass silently)::

    name: tiny
    task: controlnet_sr            # see semsr.train.tasks
    seed: 0
    model:   {pretrained: tiny://, controlnet: null, options: {}}
    data:    {hr: ["{data}/train/bsds500"], crop_size: 64, batch_size: 2, ...}
    degradation: {...}             # passed to semsr.data.degradations
    optim:   {lr: 5.0e-5, weight_decay: 0.01, max_grad_norm: 1.0}
    schedule: {name: constant, warmup_steps: 0}
    train:   {max_steps: 100, grad_accum: 1, mixed_precision: "no", ema_decay: 0.999,
              null_prompt_prob: 0.1, gradient_checkpointing: false, attention: default}
    losses:  {eps_mse: 1.0}        # loss-term name -> weight (semsr.train.losses)
    validation: {every: 50, count: 2, steps: 4}
    checkpoint: {every: 50, keep: 3}

Command-line overrides use dotted keys with YAML values, e.g.
``train.max_steps=20 optim.lr=1e-4 losses.dfc=0.05``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semsr.core.errors import SemsrError


@dataclass
class ModelConfig:
    """Which weights the task starts from.

    Attributes:
        pretrained: Stable-Diffusion-layout folder (``unet/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or ``tiny://``
            for the tiny random models generated into the cache on demand.
        controlnet: ControlNet folder to start from; ``None`` initialises it
            from the UNet (``ControlNetModel.from_unet``). ``tiny://`` is
            accepted too.
        options: task-specific options (free-form, validated by the task).
    """

    pretrained: str = "tiny://"
    controlnet: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training images and how batches are made.

    Attributes:
        hr: HR image folders (``{data}`` expands to :func:`semsr.core.paths.data_root`); their images and those
            of their sub-folders one level down (ImageNet-style class folders).
        manifest: optional corpus manifest (``manifest.sqlite`` of ``semsr data
            build-corpus``): its ``train`` split, with cached captions.
        caption_prior: name of the manifest prior used as caption.
        limit: use at most this many images (after the validation split); 0 = all.
        val_count: images held out (the last ones in sorted order) for validation.
        crop_size: HR crop size in pixels.
        scale: SR factor; LR crops are ``crop_size // scale``.
        batch_size: per-process micro-batch size.
        num_workers: DataLoader worker processes.
        prompt: caption used when an image has none in the manifest.
        min_texture: redraw crops whose texture score (mean absolute luma
            gradient, 0-255 units, :func:`semsr.data.corpus.crops.texture_score`)
            is below this; 0 disables the filter.
        max_crop_tries: crops tried before keeping the most textured one.
        hflip: mirror crops horizontally with probability 0.5.
        cache_images: keep decoded images in memory (small corpora only).
        pairs: a pairs folder of ``semsr data make-pairs`` (``{data}`` expands): train on its precomputed
            LR images (aligned crops) instead of degrading HR crops on the fly; ``hr``/``manifest`` and the
            ``degradation`` section are then not used for the training data.
        priors: a prior store of ``semsr priors build`` (``{data}`` expands): the ``xpsr``, ``dalpsr``,
            ``mmsr``, ``rfa-sr`` and ``coser-sr`` tasks read their training priors from it instead of
            running prior models (needs ``pairs``: LR priors belong to fixed LR files).
    """

    hr: list[str] = field(default_factory=list)
    manifest: str | None = None
    caption_prior: str = "caption"
    limit: int = 0
    val_count: int = 2
    crop_size: int = 512
    scale: int = 4
    batch_size: int = 4
    num_workers: int = 0
    prompt: str = ""
    min_texture: float = 1.0
    max_crop_tries: int = 10
    hflip: bool = True
    cache_images: bool = True
    pairs: str | None = None
    priors: str | None = None


@dataclass
class OptimConfig:
    """AdamW settings and gradient clipping (``max_grad_norm`` 0 disables)."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: ``constant`` or ``cosine``, both with linear warm-up."""

    name: str = "constant"
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    """The optimisation loop.

    Attributes:
        max_steps: optimiser steps (each = ``grad_accum`` micro-batches).
        grad_accum: micro-batches accumulated per optimiser step.
        mixed_precision: ``no`` | ``bf16`` | ``fp16`` (frozen modules are cast
            to this dtype; trainable ones stay fp32 under autocast).
        ema_decay: EMA decay of the trainable weights; 0 disables EMA.
        null_prompt_prob: probability of replacing a caption by the empty
            prompt (trains the unconditional branch used by CFG).
        log_every: write a JSON-lines record every N steps.
        find_unused_parameters: passed to DDP for tasks with conditional branches.
        threads: torch intra-op threads per process (0 = leave torch's default).
        gradient_checkpointing: recompute activations in the backward pass instead of storing them, in every
            diffusers component of the trainable module and in the frozen UNet the gradients flow through
            (``enable_gradient_checkpointing()``): less memory, about one more forward pass of time.
        attention: attention kernel of the standard diffusers attentions of those components: ``default``
            (leave them as built; diffusers picks SDPA on torch >= 2), ``sdpa``
            (``F.scaled_dot_product_attention``), ``eager`` (the attention matrix materialised) or ``sliced``
            (one sample's heads at a time). semsr's own processors (AdaIN, hard attention) keep theirs.
    """

    max_steps: int = 1000
    grad_accum: int = 1
    mixed_precision: str = "no"
    ema_decay: float = 0.0
    null_prompt_prob: float = 0.1
    log_every: int = 1
    find_unused_parameters: bool = False
    threads: int = 0
    gradient_checkpointing: bool = False
    attention: str = "default"


#: Values of ``train.attention`` (see :class:`TrainConfig`).
ATTENTION_MODES = ("default", "sdpa", "eager", "sliced")


@dataclass
class ValidationConfig:
    """Periodic validation on held-out images (``every`` 0 disables).

    Attributes:
        every: run every N optimiser steps (and at the end of training).
        count: number of held-out images used (at most ``data.val_count``).
        steps: sampler steps of the validation pipeline.
        size: HR crop size (centre crop) of the validation images.
        metrics: metric names looked up in :mod:`semsr.eval.metrics`.
        prompt: prompt used for validation samples.
        guidance_scale: CFG scale of the validation sampler.
        use_ema: sample with the EMA weights when EMA is on.
    """

    every: int = 0
    count: int = 2
    steps: int = 4
    size: int = 128
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    prompt: str = ""
    guidance_scale: float = 1.0
    use_ema: bool = True


@dataclass
class CheckpointConfig:
    """Full-state checkpoints every N steps (and at the end); keep the newest ``keep``."""

    every: int = 500
    keep: int = 3


@dataclass
class ExperimentConfig:
    """Everything one training run needs; see the module docstring for the YAML."""

    name: str = "experiment"
    task: str = "controlnet_sr"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    losses: dict[str, float] = field(default_factory=lambda: {"eps_mse": 1.0})
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-``dict`` form (YAML/JSON serialisable)."""
        return _plain(asdict(self))

    def validate(self) -> None:
        """Raise :class:`SemsrError` for values no run could use."""
        checks = [
            (self.train.max_steps >= 0, "train.max_steps must be >= 0"),
            (self.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (
                self.train.mixed_precision in ("no", "bf16", "fp16"),
                "train.mixed_precision must be one of no, bf16, fp16",
            ),
            (0.0 <= self.train.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
            (0.0 <= self.train.null_prompt_prob <= 1.0, "train.null_prompt_prob must be in [0, 1]"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.train.threads >= 0, f"train.threads must be >= 0 (0 = torch's default), got {self.train.threads}"),
            (
                self.train.attention in ATTENTION_MODES,
                f"train.attention must be one of {', '.join(ATTENTION_MODES)}, got {self.train.attention!r}",
            ),
            (self.schedule.name in ("constant", "cosine"), "schedule.name must be constant or cosine"),
            (self.schedule.warmup_steps >= 0, "schedule.warmup_steps must be >= 0"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.data.batch_size >= 1, "data.batch_size must be >= 1"),
            (self.data.scale >= 1, "data.scale must be >= 1"),
            (
                self.data.crop_size >= 8 and self.data.crop_size % self.data.scale == 0,
                "data.crop_size must be >= 8 and a multiple of data.scale",
            ),
            (self.data.val_count >= 0, "data.val_count must be >= 0"),
            (self.checkpoint.every >= 0, "checkpoint.every must be >= 0"),
            (self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
            (self.validation.every >= 0, "validation.every must be >= 0"),
            (bool(self.losses), "losses must name at least one loss term"),
        ]
        for ok, message in checks:
            if not ok:
                raise SemsrError(message)


def _plain(value: Any) -> Any:
    """Tuples -> lists recursively, so the dict dumps cleanly to YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise SemsrError(f"'{where}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SemsrError(f"unknown key(s) in '{where}': {', '.join(map(str, unknown))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type (dataclass, tuple, number)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is Any:  # free-form values (task options) pass through; the task validates them, null included
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if value is None:
        raise SemsrError(f"'{where}' must not be null")
    try:
        if origin is tuple:
            return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
        if origin is list:
            items = value if isinstance(value, list) else [value]
            return [_coerce(args[0], v, where) for v in items] if args else list(items)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError("expected a mapping")
            return {str(k): (_coerce(args[1], v, f"{where}.{k}") if args else v) for k, v in value.items()}
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise TypeError("expected true/false")
            return value
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError("expected an integer")
            return int(float(value))
        if hint is float:
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise TypeError("expected a string")
            return str(value)
    except (TypeError, ValueError) as err:
        raise SemsrError(f"bad value for '{where}': {value!r} ({err})") from None
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SemsrError(f"override must look like key.sub=value, got {item!r}")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SemsrError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a raw mapping."""
    raw = apply_overrides(dict(data or {}), list(overrides or []))
    cfg = _build(ExperimentConfig, raw, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML, apply ``key=value`` overrides, validate.

    Raises:
        SemsrError: the file is missing, is not YAML, or holds bad values.
    """
    path = Path(path)
    if not path.is_file():
        raise SemsrError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise SemsrError(f"not valid YAML ({err.__class__.__name__})", path) from None
    if not isinstance(data, dict):
        raise SemsrError("top level of a config must be a mapping", path)
    try:
        return config_from_dict(data, overrides)
    except SemsrError as err:
        raise SemsrError(err.message, path) from None


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text of ``cfg`` (what a run directory records as ``config.yaml``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
