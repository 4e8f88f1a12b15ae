"""The training loop on 🤗 Accelerate.

One :class:`Trainer` runs one experiment (:class:`~semsr.train.config.ExperimentConfig`)
into an output directory (layout in :mod:`semsr.train.checkpoints`):

- the task (:mod:`semsr.train.tasks`) builds frozen + trainable modules; the
  trainable module and AdamW go through ``accelerator.prepare`` (DDP when
  launched with ``accelerate launch --num_processes N``; gloo on CPU);
- gradient accumulation (``accelerator.accumulate``), mixed precision
  (frozen modules cast to bf16/fp16, the trainable module's forward under
  autocast, fp32 master weights), gradient
  clipping, LR schedule (constant/cosine with warm-up), EMA of the trainable
  weights (diffusers' ``EMAModel``);
- data are a pure function of the sample position (:mod:`semsr.train.data`),
  so resuming only needs the step counter to reproduce the data order;
- every ``checkpoint.every`` steps a checkpoint stores the model, optimiser, LR
  scheduler, EMA, loss scaler, trainer step and sample position, and every
  process's RNG states as JSON + safetensors (:mod:`semsr.train.checkpoints`;
  nothing is pickled, so resuming cannot run code); ``resume=True`` loads the
  newest intact one (falling back to an older one, with a warning, when the newest
  cannot be read) and continues at the same step;
- a JSON-lines log, a curve PNG, periodic validation (SR of held-out images,
  metrics from :mod:`semsr.eval.metrics`, a sample grid PNG);
- memory options (:func:`apply_memory_options`): ``train.gradient_checkpointing`` and
  ``train.attention`` reach every diffusers component of the trainable module and the
  frozen UNet the gradients flow through.

The LR schedule is rebuilt from the config on resume; a cosine schedule
therefore follows the *new* ``max_steps`` if it was changed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semsr.core.dtypes import resolve_dtype
from semsr.core.errors import SemsrError
from semsr.core.io import atomic_folder, check_output_folder, sweep_temp_files
from semsr.eval.atomic import write_png, write_text
from semsr.eval.metrics import get_metric
from semsr.train import checkpoints as ckpt
from semsr.train.config import ATTENTION_MODES, ExperimentConfig, dump_config
from semsr.train.curve import plot_curve
from semsr.train.data import CropDataset, list_images, make_degrader, make_loader, validation_pairs
from semsr.train.losses import combine_losses, get_loss
from semsr.train.pairs import PairedCropDataset, paired_validation, read_pairs, split_pairs
from semsr.train.tasks import Task, available_tasks, build_task, import_task_modules

log = logging.getLogger(__name__)

StepCallback = Callable[["Trainer", int, dict[str, Any]], None]
"""Called on every process after each optimiser step as ``(trainer, step, record)``."""


class TrainState:
    """Counters saved with each checkpoint (part ``train_state``)."""

    def __init__(self) -> None:
        self.step = 0  # optimiser steps done
        self.samples = 0  # global sample positions consumed (semsr.train.data)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.samples = int(state["samples"])


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    step: int
    output: Path
    losses: list[float]
    last_checkpoint: Path | None
    is_main_process: bool = True


def has_accelerator_device() -> bool:
    """True when a GPU-like device is present (CUDA, XPU or MPS).

    Without one the Accelerator is created with ``cpu=True``: that is what makes
    Accelerate join processes started by ``accelerate launch --multi_gpu`` /
    ``torchrun`` into a gloo process group (``MULTI_CPU``) instead of running
    them as independent single processes.
    """
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def memory_option_targets(task: Task) -> dict[str, torch.nn.Module]:
    """The modules :func:`apply_memory_options` changes, by name: ``trainable`` and, for tasks on a frozen
    diffusion UNet (``task.unet``), that UNet, since the trainable parts' gradients flow through it (its
    activations are stored for the backward pass although its weights are frozen)."""
    targets = {"trainable": task.trainable}
    unet = getattr(task, "unet", None)
    if isinstance(unet, torch.nn.Module):
        targets["unet"] = unet
    return targets


def _state_holders(roots: list[torch.nn.Module]) -> list[tuple[Any, str]]:
    """``(object, attribute)`` of every per-call state the modules under ``roots`` declare in
    ``checkpoint_state_attrs`` (dotted paths, e.g. ``state.embedding``)."""
    holders = []
    for root in roots:
        for module in root.modules():
            for path in getattr(type(module), "checkpoint_state_attrs", ()):
                *parents, attr = path.split(".")
                obj = module
                for part in parents:
                    obj = getattr(obj, part)
                holders.append((obj, attr))
    return holders


@contextlib.contextmanager
def _restored(snapshot: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set each ``(object, attribute, value)`` of ``snapshot`` inside the block, then put the old values back."""
    old = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in snapshot]
    for obj, attr, value in snapshot:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in old:
            setattr(obj, attr, value)


def checkpoint_function(holders: list[tuple[Any, str]]) -> Callable[..., Any]:
    """A diffusers ``gradient_checkpointing_func``: ``torch.utils.checkpoint`` (non-reentrant) that, when it
    recomputes a block in the backward pass, restores the per-call state of ``holders`` as it was in the
    forward pass (a recipe's hooks read e.g. the low-level prompt or the control embedding from there, and
    the forward has reset it by the time the backward runs)."""

    def run(module: torch.nn.Module, *args: Any) -> Any:
        snapshot = [(obj, attr, getattr(obj, attr)) for obj, attr in holders]

        def contexts() -> tuple[Any, Any]:
            return contextlib.nullcontext(), _restored(snapshot)

        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    return run


def apply_memory_options(task: Task, gradient_checkpointing: bool, attention: str) -> dict[str, list[str]]:
    """Apply ``train.gradient_checkpointing`` and ``train.attention`` to :func:`memory_option_targets`.

    Gradient checkpointing calls ``enable_gradient_checkpointing()`` on every diffusers ``ModelMixin`` inside
    the targets that supports it (its blocks then recompute their activations in the backward pass; a
    recipe's new attentions living in those blocks, such as XPSR's SFA layers or CoSeR's AiA, are
    recomputed with them). A component's per-call state declared in ``checkpoint_state_attrs`` (XPSR's
    SFA prompts, RFA's AdaIN control) is restored for the recomputation (:func:`checkpoint_function`).
    ``attention`` replaces the processor of every diffusers ``Attention`` whose
    processor is a standard one (``AttnProcessor``, ``AttnProcessor2_0``, ``SlicedAttnProcessor``);
    semsr's own processors are left as they are.

    Returns what was changed: ``{"checkpointing": [component paths], "attention": [attention paths]}``,
    paths prefixed by the target name (``trainable.controlnet``, ``unet``, ...).

    Raises:
        SemsrError: an unknown ``attention`` mode.
    """
    from diffusers import ModelMixin  # heavy dependency, imported on use
    from diffusers.models.attention_processor import (  # heavy dependency, imported on use
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
        SlicedAttnProcessor,
    )

    if attention not in ATTENTION_MODES:
        raise SemsrError(f"train.attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    done: dict[str, list[str]] = {"checkpointing": [], "attention": []}
    standard = (AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor)
    targets = memory_option_targets(task)
    recompute = checkpoint_function(_state_holders(list(targets.values())))
    for target, root in targets.items():
        for path, module in root.named_modules():
            name = f"{target}.{path}" if path else target
            if (
                gradient_checkpointing
                and isinstance(module, ModelMixin)
                and module._supports_gradient_checkpointing
                and not module.is_gradient_checkpointing
            ):
                module.enable_gradient_checkpointing(recompute)
                done["checkpointing"].append(name)
            if attention != "default" and isinstance(module, Attention) and type(module.processor) in standard:
                if attention == "sdpa":
                    module.set_processor(AttnProcessor2_0())
                elif attention == "eager":
                    module.set_processor(AttnProcessor())
                else:  # sliced: the heads of one sample per slice
                    module.set_processor(SlicedAttnProcessor(slice_size=module.heads))
                done["attention"].append(name)
    return done


class Trainer:
    """Run (or resume) one experiment.

    Args:
        cfg: the experiment.
        output: run directory (created).
        resume: continue from the newest checkpoint in ``output`` (starts
            fresh, with a log message, when there is none).
        callbacks: functions called after every optimiser step (all processes).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        output: str | Path,
        resume: bool = False,
        callbacks: list[StepCallback] | None = None,
    ) -> None:
        self.cfg = cfg
        self.output = Path(output)
        self.resume = resume
        self.callbacks = list(callbacks or [])
        import_task_modules()  # recipes register their tasks and loss terms on import
        if cfg.task not in available_tasks():
            raise SemsrError(f"unknown task '{cfg.task}' (known: {', '.join(available_tasks())})")
        for name in cfg.losses:
            get_loss(name)  # fail on unknown loss names before loading models
        if self.output.exists() and not self.output.is_dir():
            raise SemsrError("--output is a file, not a run folder", self.output)
        check_output_folder(self.output, "--output", create=False)
        if not resume and ckpt.list_checkpoints(self.output):
            raise SemsrError("output already holds checkpoints; pass --resume or choose another --output", self.output)

    # -- set-up ------------------------------------------------------------
    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator  # heavy dependency, imported on use
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration  # heavy, imported on use

        return Accelerator(
            cpu=not has_accelerator_device(),
            mixed_precision=self.cfg.train.mixed_precision,
            gradient_accumulation_steps=self.cfg.train.grad_accum,
            step_scheduler_with_optimizer=False,
            project_config=ProjectConfiguration(project_dir=str(self.output)),
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=self.cfg.train.find_unused_parameters)
            ],
        )

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        from diffusers.optimization import get_scheduler  # heavy dependency, imported on use

        name = {"constant": "constant_with_warmup", "cosine": "cosine"}[self.cfg.schedule.name]
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=self.cfg.schedule.warmup_steps,
            num_training_steps=max(1, self.cfg.train.max_steps),
        )

    # -- main loop ----------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until ``train.max_steps``; returns the final step and the losses of this session."""
        cfg = self.cfg
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.mixed_precision == "fp16" and not has_accelerator_device():
            raise SemsrError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
        self.output.mkdir(parents=True, exist_ok=True)
        sweep_temp_files(self.output, recursive=True)  # a killed run's temp files and export staging folders
        self._build()
        acc, state = self.accelerator, self.state
        run_log = ckpt.RunLog(self.output / "log.jsonl")
        last_ckpt = self._resume(run_log) if self.resume else None
        if acc.is_main_process:
            run_log.truncate_after(state.step)
            write_text(self.output / "config.yaml", dump_config(cfg))
        acc.wait_for_everyone()
        batches, val_pairs = self._data()

        losses: list[float] = []
        t_last = time.perf_counter()
        while state.step < cfg.train.max_steps:
            loss, terms, lr = self._optimizer_step(batches)
            step = state.step
            if not math.isfinite(loss):
                raise SemsrError(f"loss became {loss} at step {step}; lower optim.lr or check the data")
            losses.append(loss)
            now = time.perf_counter()
            record = {
                "type": "train",
                "step": step,
                "loss": loss,
                "terms": terms,
                "lr": lr,
                "samples": state.samples,
                "sec": round(now - t_last, 4),
            }
            t_last = now
            last = step == cfg.train.max_steps
            if acc.is_main_process and (step % cfg.train.log_every == 0 or last):
                run_log.write(record)
            if cfg.validation.every and (step % cfg.validation.every == 0 or last):
                self.validate(step, val_pairs, run_log)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last:
                last_ckpt = self.save_checkpoint(step)
                if acc.is_main_process:
                    plot_curve(run_log.records(), self.output / "curve.png", title=cfg.name)
            for cb in self.callbacks:
                cb(self, step, record)

        self.export()
        if acc.is_main_process:
            plot_curve(run_log.records(), self.output / "curve.png", title=cfg.name)
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(
            step=state.step,
            output=self.output,
            losses=losses,
            last_checkpoint=last_ckpt,
            is_main_process=acc.is_main_process,
        )

    def _build(self) -> None:
        """Accelerator, task, AdamW, LR schedule, EMA; register everything a checkpoint holds."""
        from accelerate.utils import set_seed  # heavy dependency, imported on use

        cfg = self.cfg
        acc = self.accelerator = self._make_accelerator()
        set_seed(cfg.seed)
        with acc.main_process_first():  # files generated on demand (tiny://) are written once, by rank 0
            task = self.task = build_task(cfg)
        mixed = cfg.train.mixed_precision
        task.setup(acc.device, resolve_dtype(None if mixed == "no" else mixed))
        self.memory_options = apply_memory_options(task, cfg.train.gradient_checkpointing, cfg.train.attention)
        if cfg.train.gradient_checkpointing and not self.memory_options["checkpointing"]:
            log.warning("train.gradient_checkpointing: task '%s' has no component that supports it", cfg.task)
        params = [p for p in task.trainable.parameters() if p.requires_grad]
        if not params:
            raise SemsrError(f"task '{cfg.task}' has no trainable parameters")
        self.n_params = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps
        )
        # the scheduler is stepped once per optimiser step by this loop (not prepared:
        # Accelerate would step it once per process)
        self.lr_scheduler = self._make_scheduler(optimizer)
        self.model, self.optimizer = acc.prepare(task.trainable, optimizer)
        self.state = TrainState()
        self.ema = None
        if cfg.train.ema_decay > 0:
            from diffusers.training_utils import EMAModel  # heavy dependency, imported on use

            self.ema = EMAModel(acc.unwrap_model(self.model).parameters(), decay=cfg.train.ema_decay)

    def _state_parts(self) -> dict[str, Any]:
        """The objects a checkpoint holds, by part name (each has ``state_dict``/``load_state_dict``)."""
        parts: dict[str, Any] = {
            "model": self.accelerator.unwrap_model(self.model),
            "optimizer": self.optimizer,
            "scheduler": self.lr_scheduler,
            "train_state": self.state,
        }
        if self.ema is not None:
            parts["ema"] = self.ema
        if self.accelerator.scaler is not None:
            parts["scaler"] = self.accelerator.scaler
        return parts

    def _read_checkpoint(self, step: int, folder: Path) -> dict[str, Any]:
        """Every part of one checkpoint this process needs, read and checked before anything is applied.

        Raises:
            SemsrError: unknown files in the folder (refused, never loaded).
            CorruptCheckpoint: a part that cannot be read, or a step that does not match the folder.
        """
        ckpt.check_known_files(folder)
        if self.ema is not None and not (folder / "ema.json").exists() and (folder / "model.json").exists():
            raise SemsrError(
                "checkpoint has no EMA state (trained with train.ema_decay=0); resume with the same", folder
            )
        names = [n for n in self._state_parts() if n != "scaler" or (folder / "scaler.json").exists()]
        states = {name: ckpt.read_part(folder, name) for name in names}
        rng = f"random_states_{self.accelerator.process_index}"
        if (folder / f"{rng}.json").exists():
            states[rng] = ckpt.read_part(folder, rng)
        saved = states["train_state"]
        if not isinstance(saved, dict) or saved.get("step") != step:
            raise ckpt.CorruptCheckpoint(f"train_state.json does not say step {step}", folder)
        return states

    def _resume(self, run_log: ckpt.RunLog) -> Path | None:
        """Load the newest intact checkpoint (if any); returns its folder.

        A checkpoint that cannot be read is skipped with a warning naming it and the
        one used instead; a checkpoint holding unknown files stops the run.
        """
        acc = self.accelerator
        if acc.is_main_process:
            ckpt.remove_staging_dirs(self.output)
        acc.wait_for_everyone()
        found = ckpt.list_checkpoints(self.output)
        if not found:
            log.warning("no checkpoint in %s: starting from step 0", self.output)
            return None
        skipped: list[str] = []
        for step, folder in reversed(found):
            try:
                states = self._read_checkpoint(step, folder)
            except ckpt.CorruptCheckpoint as err:
                if acc.is_main_process:
                    print(f"semsr: warning: checkpoint {folder.name} is unreadable ({err}); trying an older one",
                          file=sys.stderr, flush=True)  # fmt: skip
                skipped.append(folder.name)
                continue
            self._apply_checkpoint(states, folder)
            note = f" (skipped unreadable {', '.join(skipped)})" if skipped else ""
            acc.print(f"resumed from {folder} at step {self.state.step}{note}")
            return folder
        raise SemsrError(f"no intact checkpoint to resume from ({', '.join(skipped)} unreadable)", self.output)

    def _apply_checkpoint(self, states: dict[str, Any], folder: Path) -> None:
        """Load the parts read by :meth:`_read_checkpoint` into the live objects."""
        parts = self._state_parts()
        try:
            for name, obj in parts.items():
                if name in states:
                    obj.load_state_dict(states[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise SemsrError(
                f"checkpoint does not match this experiment ({str(err).splitlines()[0]}); "
                "resume with the config it was trained with",
                folder,
            ) from None
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        rng = states.get(f"random_states_{self.accelerator.process_index}")
        if rng is not None:
            ckpt.restore_rng_state(rng)

    def _data(self) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The endless batch iterator (from the consumed sample count) and the validation pairs."""
        cfg, acc = self.cfg, self.accelerator
        degrade = make_degrader(cfg.degradation, cfg.data.scale)
        pairs = read_pairs(cfg.data.pairs) if cfg.data.pairs else None
        if pairs is not None:
            train_items, val_items = split_pairs(pairs, cfg.data)
        else:
            train_items, val_items = list_images(cfg.data, cfg.data.crop_size)
        train_items = self.task.train_items(train_items)
        if pairs is not None:
            dataset: CropDataset = PairedCropDataset(train_items, pairs, cfg.data, cfg.seed)
        else:
            dataset = CropDataset(train_items, cfg.data, degrade, cfg.seed)
        loader = make_loader(
            dataset,
            cfg.data.batch_size,
            start=self.state.samples,
            rank=acc.process_index,
            world_size=acc.num_processes,
            num_workers=cfg.data.num_workers,
        )
        val_pairs = []
        if cfg.validation.every and acc.is_main_process and val_items:
            multiple = cfg.data.scale * self.task.pixel_multiple
            if pairs is not None:
                val_pairs = paired_validation(
                    val_items[: cfg.validation.count], pairs, cfg.validation.size, cfg.data.scale, multiple
                )
            else:
                val_pairs = validation_pairs(
                    val_items[: cfg.validation.count], cfg.validation.size, degrade, cfg.seed, multiple=multiple
                )
        acc.print(
            f"training '{cfg.name}' ({cfg.task}): {len(train_items)} images, {self.n_params / 1e6:.3f} M trainable "
            f"params, {acc.num_processes} process(es) x batch {cfg.data.batch_size} x accum {cfg.train.grad_accum}"
        )
        return iter(loader), val_pairs

    def _optimizer_step(self, batches: Any) -> tuple[float, dict[str, float], float]:
        """``grad_accum`` micro-batches, one optimiser step, LR schedule, EMA.

        Returns the step's loss and loss terms (averaged over micro-batches and
        processes) and the learning rate the step used.
        """
        cfg, acc, model, optimizer = self.cfg, self.accelerator, self.model, self.optimizer
        totals, terms = [], {}
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            with acc.accumulate(model):
                # the prepared trainable module runs under autocast (Accelerate wraps its
                # forward); frozen modules run natively in the weight dtype
                loss, parts = combine_losses(cfg.losses, self.task.compute(model, batch))
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            totals.append(float(loss.detach()))
            for k, v in parts.items():
                terms.setdefault(k, []).append(v)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(acc.unwrap_model(model).parameters())
        self.state.step += 1
        self.state.samples += cfg.train.grad_accum * cfg.data.batch_size * acc.num_processes

        names = sorted(terms)
        local = torch.tensor(
            [float(np.mean(totals))] + [float(np.mean(terms[k])) for k in names], dtype=torch.float64, device=acc.device
        )
        values = (acc.reduce(local, reduction="mean") if acc.num_processes > 1 else local).tolist()
        return values[0], dict(zip(names, values[1:], strict=True)), lr

    # -- checkpoints, validation, export -----------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Write the full training state after ``step`` (all processes must call this).

        Every process writes its part into the staging folder
        (:func:`~semsr.train.checkpoints.staging_dir`); the main process then marks
        it complete and moves it into place (:func:`~semsr.train.checkpoints.commit_checkpoint`).
        """
        acc = self.accelerator
        staging = ckpt.staging_dir(self.output, step, clear=acc.is_main_process)
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name, obj in self._state_parts().items():
                ckpt.write_part(staging, name, obj.state_dict())
        ckpt.write_part(staging, f"random_states_{acc.process_index}", ckpt.capture_rng_state())
        acc.wait_for_everyone()
        final = self.output / "checkpoints" / ckpt.checkpoint_name(step)
        if acc.is_main_process:
            final = ckpt.commit_checkpoint(
                self.output,
                staging,
                step,
                {"processes": acc.num_processes, "task": self.cfg.task, "name": self.cfg.name},
                keep=self.cfg.checkpoint.keep,
            )
        acc.wait_for_everyone()
        return final

    def weights_copy(self, use_ema: bool) -> torch.nn.Module:
        """A detached copy of the trainable module, with the EMA weights if ``use_ema``.

        Validation and export work on a copy because the inference pipeline
        casts and freezes the modules it is given.
        """
        model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        # under mixed precision Accelerate patches an autocast + outputs-to-fp32 wrapper
        # onto the instance's forward; the copy runs natively in the pipeline's dtype
        if "_original_forward" in model.__dict__:
            del model.__dict__["_original_forward"]
            model.__dict__.pop("forward", None)
        if use_ema and self.ema is not None:
            self.ema.copy_to(model.parameters())
        return model.eval().requires_grad_(False)

    def validate(self, step: int, pairs: list[tuple[torch.Tensor, torch.Tensor]], run_log: ckpt.RunLog) -> None:
        """SR the held-out pairs, log metrics, save a grid PNG (main process only)."""
        acc = self.accelerator
        if acc.is_main_process and pairs:
            vcfg = self.cfg.validation
            use_ema = vcfg.use_ema and self.ema is not None
            model = self.weights_copy(use_ema)
            srs = []
            for i, (_, lr) in enumerate(pairs):
                sr = self.task.sample(
                    model,
                    lr[None].to(acc.device),
                    [vcfg.prompt],
                    vcfg.steps,
                    vcfg.guidance_scale,
                    seed=self.cfg.seed + i,
                )
                srs.append(sr[0].float().cpu().clamp(0, 1))
            del model
            metrics = compute_metrics(vcfg.metrics, srs, [hr for hr, _ in pairs])
            write_png(self.output / "val" / f"{ckpt.checkpoint_name(step)}.png", sample_grid(pairs, srs))
            run_log.write({"type": "val", "step": step, "metrics": metrics, "ema": use_ema})
            acc.print(f"step {step}: validation " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        acc.wait_for_everyone()

    def export(self) -> None:
        """Save the trainable weights to ``final/`` (and EMA weights to ``final_ema/``).

        Each folder is written by the task into a staging folder and moved into place when
        complete (:func:`~semsr.core.io.atomic_folder`), replacing the folder of an earlier run.
        """
        acc = self.accelerator
        if acc.is_main_process:
            with atomic_folder(self.output / "final") as folder:
                self.task.export(acc.unwrap_model(self.model), folder)
            if self.ema is not None:
                with atomic_folder(self.output / "final_ema") as folder:
                    self.task.export(self.weights_copy(use_ema=True), folder)
        acc.wait_for_everyone()


def compute_metrics(names: list[str], preds: list[torch.Tensor], gts: list[torch.Tensor]) -> dict[str, float]:
    """Mean of each metric over image pairs ``(3, H, W)`` in [0, 1]; unavailable metrics are skipped."""
    out: dict[str, float] = {}
    for name in names:
        try:
            fn = get_metric(name)
            vals = [float(fn(p[None], g[None])) for p, g in zip(preds, gts, strict=True)]
        except SemsrError as err:
            log.warning("validation metric %s skipped: %s", name, err)
            continue
        out[name] = float(np.mean(vals))
    return out


def sample_grid(pairs: list[tuple[torch.Tensor, torch.Tensor]], srs: list[torch.Tensor]) -> np.ndarray:
    """Rows of ``[LR (nearest-upsampled) | SR | HR]`` as a uint8 ``(H, W, 3)`` array."""
    rows = []
    for (hr, lr), sr in zip(pairs, srs, strict=True):
        h, w = hr.shape[-2:]
        lr_up = torch.nn.functional.interpolate(lr[None], size=(h, w), mode="nearest")[0]
        sr = sr[..., :h, :w]
        if sr.shape[-2:] != (h, w):
            sr = torch.nn.functional.interpolate(sr[None], size=(h, w), mode="bicubic")[0]
        rows.append(torch.cat([lr_up, sr, hr], dim=-1))
    width = max(r.shape[-1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows]
    grid = torch.cat(rows, dim=-2).clamp(0, 1)
    return (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
