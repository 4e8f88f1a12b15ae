"""Speed and memory of the SD + SR ControlNet pipeline at real (SD-1.5) size, random weights.

    python benchmarks/pipeline_step.py [--json r.json] [--configs fp32,bf16,bf16-cl] [--e2e-sizes 512,2048]
        [--compile unet,down-block,transformer [--compile-modes default,freeze] [--compile-cache DIR]]
    python benchmarks/pipeline_step.py --device cuda --json gpu.json       # GPU: eager / channels_last /
        # torch.compile / CUDA graphs per step, 20 steps end to end at 512, 1024 and 2048, peak GPU memory
    python benchmarks/pipeline_step.py --size tiny --configs fp32 --e2e-sizes 64   # the same code on tiny models

1. Seconds per denoising step with CFG (UNet + ControlNet on a batch of 2,
   64x64 latent = 512x512 output, 77-token context) for each precision
   config, each in its own subprocess; peak RSS of the process while
   stepping (weights resident), plus RSS after loading.
2. End-to-end seconds for 512x512 and 2048x2048 outputs (x4 from 128x128 /
   512x512 LR) through ``SDControlNetSR`` with automatic latent tiling
   (64-latent tiles) and VAE tiling, 1 denoising step timed and the total
   for 20 steps estimated as ``encode + decode + 20 * step``; peak RSS.
3. ``--compile unet,down-block,transformer``: ``torch.compile`` (inductor) vs
   eager on a real-size piece (the whole SD-1.5 UNet at a 64x64 latent, batch
   2; its first down block; or one of its transformer blocks), each mode
   (``default``; ``freeze`` = inductor freezing) in its own subprocess with a
   fresh inductor cache: compile time (first compiled call minus a warm
   compiled call), seconds per forward eager vs compiled (interleaved rounds,
   min), max |compiled - eager| and peak RSS.

Models are built locally from the published SD-1.5 configs
(:mod:`semsr.pipeline.sd_configs`) with random weights: nothing is downloaded.
The ControlNet is ``ControlNetModel.from_unet`` (SD-1.5 ControlNet size).
``--size tiny`` runs the same code on the tiny test models (:mod:`semsr.testing.tiny`).

``--device cuda``: times are taken between ``torch.cuda.synchronize()`` calls, memory is
``torch.cuda.max_memory_allocated`` (reset before each measurement), the step configs default to
``fp16, fp16-cudagraphs, fp16-cl`` (``-cudagraphs``: ``mode="reduce-overhead"``, with
``torch.compiler.cudagraph_mark_step_begin()`` before each step because the ControlNet's
output buffers are reused; ``fp16-compile`` and ``bf16`` on request), the end-to-end runs time all
``--e2e-steps`` (default 20) at 512, 1024 and 2048 (latent tiles chosen from free GPU memory) instead
of estimating them from one step, and ``--e2e-compile`` (default ``reduce-overhead``) adds the pipeline
built with ``compile=<mode>`` at 512 (``--e2e-compile-sizes``) after an untimed compiling call. The
order (eager first, one compile per process) keeps the default run near 5 minutes on an H200.

``--scaling 256,512,1024,2048``: end-to-end seconds and peak memory per output size, once with
``--scaling-tile`` latent tiles (default 64: memory stays flat) and once with the automatic tile.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from semsr.core.machine import cpu_has_native_bf16, cpu_model, matmul_gflops, rss_mb

if TYPE_CHECKING:  # the workers import torch in their own subprocess
    import torch

CONFIGS = {
    "fp32": {"dtype": "fp32", "channels_last": False, "compile": False},
    "bf16": {"dtype": "bf16", "channels_last": False, "compile": False},
    "auto": {"dtype": "auto", "channels_last": False, "compile": False},  # semsr's default: its row names the result
    "bf16-cl": {"dtype": "bf16", "channels_last": True, "compile": False},
    # the ControlNet's hint embedding computed once (later steps of an image reuse it; same output)
    "bf16-hintcache": {"dtype": "bf16", "channels_last": False, "compile": False, "cache_hint": True},
    "fp32-hintcache": {"dtype": "fp32", "channels_last": False, "compile": False, "cache_hint": True},
    "bf16-compile": {"dtype": "bf16", "channels_last": False, "compile": True},
    "fp32-autocast": {"dtype": "fp32", "channels_last": False, "compile": False, "autocast": True},
    "fp16": {"dtype": "fp16", "channels_last": False, "compile": False},
    "fp16-cl": {"dtype": "fp16", "channels_last": True, "compile": False},
    "fp16-compile": {"dtype": "fp16", "channels_last": False, "compile": "default"},
    "fp16-cudagraphs": {"dtype": "fp16", "channels_last": False, "compile": "reduce-overhead"},
    # the rows below keep the hint cache on (the pipelines' default) and compare with bf16-hintcache
    # token merging (semsr.pipeline.tome): ratio of the tokens merged before self-attention at full resolution
    "bf16-tome30": {"dtype": "bf16", "cache_hint": True, "tome": 0.3},
    "bf16-tome50": {"dtype": "bf16", "cache_hint": True, "tome": 0.5},
    "bf16-tome50-all": {"dtype": "bf16", "cache_hint": True, "tome": 0.5, "tome_targets": "attn1,attn2,ff"},
    "bf16-tome50-ds2": {"dtype": "bf16", "cache_hint": True, "tome": 0.5, "tome_max_downsample": 2},
    "fp32-tome50": {"dtype": "fp32", "cache_hint": True, "tome": 0.5},
    # inductor weight freezing (compile="freeze"); -discard: freezing_discard_parameters (the eager weights are
    # freed after freezing: no eager baseline, and any graph break would fail)
    "bf16-freeze": {"dtype": "bf16", "cache_hint": True, "compile": "freeze"},
    "bf16-freeze-discard": {"dtype": "bf16", "cache_hint": True, "compile": "freeze", "discard": True},
    "bf16-freeze-tome50": {"dtype": "bf16", "cache_hint": True, "compile": "freeze", "tome": 0.5},
    "bf16-freeze-tome50-all": {
        "dtype": "bf16",
        "cache_hint": True,
        "compile": "freeze",
        "tome": 0.5,
        "tome_targets": "attn1,attn2,ff",
    },
    "bf16-freeze-discard-tome50": {
        "dtype": "bf16",
        "cache_hint": True,
        "compile": "freeze",
        "discard": True,
        "tome": 0.5,
    },
    # the same in fp32, for CPUs without native bf16 (where auto = fp32)
    "fp32-tome50-all": {"dtype": "fp32", "cache_hint": True, "tome": 0.5, "tome_targets": "attn1,attn2,ff"},
    "fp32-freeze": {"dtype": "fp32", "cache_hint": True, "compile": "freeze"},
    "fp32-freeze-tome50": {"dtype": "fp32", "cache_hint": True, "compile": "freeze", "tome": 0.5},
    "bf16-cl-hintcache": {"dtype": "bf16", "channels_last": True, "cache_hint": True},
    # attention variants: SDPA restricted to the math backend; diffusers attention slicing (sliced processor)
    "bf16-sdpa-math": {"dtype": "bf16", "cache_hint": True, "sdpa": "math"},
    "bf16-slice": {"dtype": "bf16", "cache_hint": True, "attention_slice": "auto"},
}
#: Step configs and end-to-end sizes measured by default, per device type.
DEFAULT_CONFIGS = {"cpu": "fp32,bf16,auto,bf16-cl", "cuda": "fp16,fp16-cudagraphs,fp16-cl"}
DEFAULT_E2E_SIZES = {"cpu": "512,2048", "cuda": "512,1024,2048"}


def _device_type(device: str) -> str:
    return device.split(":", 1)[0]


def _sync(device: str) -> None:
    """Wait for queued GPU work (timings on CUDA are taken between synchronisations)."""
    import torch

    if _device_type(device) == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: str) -> None:
    import torch

    if _device_type(device) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak()


def _peak_memory(device: str) -> dict:
    """Peak memory since the last reset: ``peak_rss_mb`` (CPU) or ``peak_gpu_mb`` (CUDA, max allocated)."""
    import torch

    if _device_type(device) == "cuda":
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_rss_mb": rss_mb("VmHWM")}
    return {"peak_rss_mb": rss_mb("VmHWM")}


def _sd_parts(size: str, *, with_text_encoder: bool) -> tuple[dict, dict]:
    """``(parts, dims)``: random UNet/VAE(/text encoder) of SD-1.5 size (``real``) or the tiny test models.

    ``dims``: ``latent`` side at 512-px-equivalent work (64 real, 16 tiny), ``context`` width, ``factor``.
    """
    from semsr.pipeline.sd_configs import random_sd15
    from semsr.testing.tiny import tiny_unet, tiny_vae

    if size == "real":
        return random_sd15(with_text_encoder=with_text_encoder), {"latent": 64, "context": 768, "factor": 8}
    if size != "tiny":
        raise ValueError(f"unknown --size {size!r} (real or tiny)")
    return {"unet": tiny_unet(), "vae": tiny_vae()}, {"latent": 16, "context": 32, "factor": 8}


def _controlnet(unet, size: str):
    from semsr.pipeline.sd_controlnet import new_controlnet
    from semsr.testing.tiny import tiny_controlnet

    return new_controlnet(unet) if size == "real" else tiny_controlnet(unet)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (comparable across machine loads, unlike wall time)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _reset_peak() -> None:
    """Reset VmHWM (Linux) so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _eps_quality(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """How close a step's output ``out`` is to the exact (unmerged, eager) output ``ref``, both ``(2, 4, h, w)``:
    PSNR in dB over ``ref``'s value range and the relative L2 error."""
    import math

    a, b = out.double(), ref.double()
    mse = (a - b).pow(2).mean().item()
    span = (b.max() - b.min()).item()
    return {
        "psnr_vs_exact_db": math.inf if mse == 0 else 10 * math.log10(span**2 / mse),
        "rel_l2_vs_exact": ((a - b).norm() / b.norm()).item(),
        "max_abs_diff_vs_exact": (a - b).abs().max().item(),
    }


def worker_step(cfg: dict, reps: int, device: str = "cpu", size: str = "real") -> dict:
    """Time one CFG step of ``cfg`` (see :data:`CONFIGS`): dtype, channels_last, compile (True/mode), hint cache,
    autocast, token merging (``tome`` ratio, ``tome_targets``, ``tome_max_downsample``), SDPA backend
    (``sdpa``), attention slicing. Configs that merge tokens or compile are also compared with the exact
    eager output of the same models and inputs (``psnr_vs_exact_db``)."""
    import contextlib
    import gc

    import torch

    from semsr.core.dtypes import describe_dtype, resolve_dtype
    from semsr.pipeline.precision import prepare_module
    from semsr.pipeline.sd_controlnet import controlnet_unet_forward
    from semsr.pipeline.step_cache import set_hint_cache
    from semsr.pipeline.tome import set_token_merging, tome_state

    torch.manual_seed(0)
    parts, dims = _sd_parts(size, with_text_encoder=False)
    unet = parts["unet"]
    controlnet = _controlnet(unet, size)
    dtype = resolve_dtype(cfg["dtype"], device)  # "auto": bf16 on CPUs with native bf16, else fp32; bf16/fp16 on CUDA
    precision = describe_dtype(cfg["dtype"], device)
    mode = cfg.get("compile", False)
    cuda_graphs = mode == "reduce-overhead" and _device_type(device) == "cuda"
    unet, controlnet = (
        prepare_module(m, device=device, dtype=dtype, channels_last=cfg.get("channels_last", False))
        for m in (unet, controlnet)
    )
    set_hint_cache(controlnet, bool(cfg.get("cache_hint", False)))
    if cfg.get("attention_slice"):
        for m in (unet, controlnet):
            m.set_attention_slice(cfg["attention_slice"])
    n = dims["latent"]
    x = torch.randn(2, 4, n, n, dtype=dtype, device=device)  # CFG batch: [uncond, cond]
    ctx = torch.randn(2, 77, dims["context"], dtype=dtype, device=device)
    hint = torch.rand(2, 3, n * dims["factor"], n * dims["factor"], dtype=dtype, device=device)
    t = torch.tensor(500, device=device)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.get("autocast", False)))
    sdpa = contextlib.nullcontext()
    if cfg.get("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel  # reason: only the sdpa rows need it

        sdpa = sdpa_kernel(getattr(SDPBackend, cfg["sdpa"].upper()))
    tome_targets = tuple(cfg.get("tome_targets", "attn1").split(","))
    exact = None
    if cfg.get("tome") or mode:  # the exact eager output, to compare with
        with torch.inference_mode(), autocast, sdpa:
            exact = controlnet_unet_forward(unet, controlnet, x, t, ctx, hint).clone()
    if cfg.get("tome"):
        targets = tuple(cfg.get("tome_targets", "attn1").split(","))
        for m in (unet, controlnet):
            set_token_merging(m, cfg["tome"], seed=0, targets=targets, max_downsample=cfg.get("tome_max_downsample", 1))
    if mode:
        if cfg.get("discard"):
            import torch._inductor.config as inductor_config  # reason: only the freeze rows need it

            inductor_config.freezing_discard_parameters = True
        for m in (unet, controlnet):
            if mode == "freeze":
                prepare_module(m, device=device, dtype=dtype, compile="freeze")
            else:
                m.compile(**({} if mode is True else {"mode": mode}))
    gc.collect()
    rss_loaded = rss_mb("VmRSS")
    _reset_peak_memory(device)

    def step() -> torch.Tensor:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return controlnet_unet_forward(unet, controlnet, x, t, ctx, hint)

    # The same step without the config's speed-up, timed in turn with it (same machine load): compiled rows
    # run their modules eagerly (torch.compiler.set_stance("force_eager"), token merging kept); eager rows
    # with token merging run with it removed. None: no such baseline (discarded weights, other rows).
    tome_kwargs = {}
    if cfg.get("tome"):
        tome_kwargs = {"seed": 0, "targets": tome_targets, "max_downsample": cfg.get("tome_max_downsample", 1)}
    baseline_name = None
    if mode and not cfg.get("discard"):
        baseline_name = "eager"
    elif cfg.get("tome") and not mode:
        baseline_name = "unmerged"

    @contextlib.contextmanager
    def baseline():
        if baseline_name == "eager":
            with torch.compiler.set_stance("force_eager"):
                yield
        else:
            for m in (unet, controlnet):
                set_token_merging(m, 0.0)
            try:
                yield
            finally:
                for m in (unet, controlnet):
                    set_token_merging(m, cfg["tome"], **tome_kwargs)

    def timed(ctx=contextlib.nullcontext) -> tuple[float, torch.Tensor]:
        with ctx():
            _sync(device)
            t0 = time.perf_counter()
            res = step()
            _sync(device)
        return time.perf_counter() - t0, res

    # freezing needs no_grad (inference-mode tensors cannot be frozen constants); eager rows use inference_mode
    grad_off = torch.no_grad() if mode == "freeze" else torch.inference_mode()
    times, base_times = [], []
    with grad_off, autocast, sdpa:
        _sync(device)
        t0 = time.perf_counter()
        ref = step().clone()  # warm-up (compiles when compiled)
        for _ in range(2 if mode else 0):  # CUDA graphs are recorded on a later call
            step()
        _sync(device)
        warm = time.perf_counter() - t0
        peak_warmup = _peak_memory(device)  # includes compiling, for compiled rows
        _reset_peak_memory(device)
        if baseline_name:
            timed(baseline)  # the baseline's own warm-up
        for _ in range(reps):
            if baseline_name:
                base_times.append(timed(baseline)[0])
            dt, out = timed()
            times.append(dt)
        diff = (out.float() - ref.float()).abs().max().item()
    interleaved = {}
    if base_times:
        interleaved = {
            "baseline": baseline_name,
            "baseline_seconds_all": base_times,
            "speedup_interleaved": min(base_times) / min(times),
            "speedup_interleaved_median": statistics.median(base_times) / statistics.median(times),
        }
    assert torch.isfinite(out.float()).all()
    state = tome_state(unet)
    return {
        "seconds_per_step": min(times),
        "seconds_per_step_all": times,
        "warmup_seconds": warm,
        "max_abs_diff_to_first_call": diff,
        **(_eps_quality(out, exact) if exact is not None else {}),
        **interleaved,
        "peak_warmup": peak_warmup,
        "tome_merged_calls_unet": state.merged_calls if state is not None else 0,
        "dtype_resolved": precision["dtype"],
        "dtype_reason": precision["dtype_reason"],
        "rss_after_load_mb": rss_loaded,
        "config": cfg,
        "device": device,
        "size": size,
        **{k: max(v, peak_warmup[k]) for k, v in _peak_memory(device).items()},  # the whole run (as before)
        **{f"{k.removesuffix('_mb')}_steady_mb": v for k, v in _peak_memory(device).items()},  # after warm-up
    }


def worker_flops(size: str = "real", device: str = "cpu") -> dict:
    """Floating-point operations of one exact CFG step (the step rows' UNet + ControlNet, batch 2), counted
    on the meta device (shapes only, nothing computed): convolutions and matmuls by torch's
    ``FlopCounterMode``, attention as ``4 * B * heads * L * S * d`` per ``scaled_dot_product_attention``
    call (QK^T and the weighted sum of V; softmax not counted). Token merging is off: merged rows do fewer.
    On a CPU also the GFLOP/s of a large matmul (:func:`semsr.core.machine.matmul_gflops`) in fp32, and in
    bf16 where the CPU has native bf16."""
    from unittest import mock

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from semsr.pipeline.sd_controlnet import controlnet_unet_forward

    meta = torch.device("meta")
    with meta:  # shapes only: no weights are allocated or initialised
        parts, dims = _sd_parts(size, with_text_encoder=False)
        unet = parts["unet"]
        controlnet = _controlnet(unet, size)
    n = dims["latent"]
    attention = [0]

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        attention[0] += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), mock.patch.object(F, "scaled_dot_product_attention", sdpa), counter:
        controlnet_unet_forward(
            unet,
            controlnet,
            torch.empty(2, 4, n, n, device=meta),
            torch.tensor(500, device=meta),
            torch.empty(2, 77, dims["context"], device=meta),
            torch.empty(2, 3, n * dims["factor"], n * dims["factor"], device=meta),
        )
    by_op = {str(op): int(c) for op, c in counter.get_flop_counts().get("Global", {}).items()}
    total = counter.get_total_flops() + attention[0]
    res = {"flops_per_step": total, "attention_flops": attention[0], "flops_by_op": by_op}
    if _device_type(device) == "cpu":  # the practical ceiling the rows are compared with
        res["matmul_gflops"] = {"fp32": matmul_gflops(torch.float32)}
        if cpu_has_native_bf16():
            res["matmul_gflops"]["bf16"] = matmul_gflops(torch.bfloat16)
    return res


def _build_pipeline(size: str, device: str, dtype: str, compile: str | None = None):
    """``SDControlNetSR`` (x4) on the random real-size or tiny models, built like the method builds it."""
    import gc

    import torch

    from semsr.methods.sd_controlnet import SDControlNetOptions
    from semsr.pipeline.sd_configs import SD15_SCHEDULER
    from semsr.pipeline.sd_controlnet import SDControlNetSR
    from semsr.pipeline.text import CLIPTextConditioner
    from semsr.testing.tiny import tiny_clip_tokenizer, tiny_text_encoder

    torch.manual_seed(0)
    parts, _ = _sd_parts(size, with_text_encoder=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))  # ids < 49408; the SD vocabulary is not shipped
    if size == "tiny":
        vocab = tokenizer.get_vocab()
        parts["text_encoder"] = tiny_text_encoder(len(vocab), tokenizer.eos_token_id, tokenizer.bos_token_id)
    text = CLIPTextConditioner(tokenizer, parts["text_encoder"])
    pipe = SDControlNetSR(
        vae=parts["vae"],
        unet=parts["unet"],
        controlnet=_controlnet(parts["unet"], size),
        text=text,
        scheduler_config=SD15_SCHEDULER,
        device=device,
        dtype=dtype,
        scale=4,
        compile=compile,
        options_class=SDControlNetOptions,
    )
    del parts
    gc.collect()
    return pipe


def worker_tome_quality(
    out_size: int, dtype: str, ratios: list[float], steps: int, device: str, size: str, targets: str = "attn1"
) -> dict:
    """Token merging end to end: one x4 upscale to ``out_size``² with ``steps`` steps unmerged (the reference)
    and once per ratio (merging ``targets``); PSNR / SSIM (RGB, 0-255) of each against the reference and the
    seconds per step."""
    import torch

    from semsr.eval.metrics.pixel import psnr_255, ssim_255
    from semsr.methods.sd_controlnet import SDControlNetOptions

    pipe = _build_pipeline(size, device, dtype)
    lr = torch.rand(1, 3, out_size // 4, out_size // 4, generator=torch.Generator().manual_seed(0))
    opts = SDControlNetOptions(steps=steps, prompt="a photo", seed=0, latent_tile=0)
    res: dict = {"output": f"{out_size}x{out_size}", "steps": steps, "dtype": str(pipe.dtype), "size": size}
    res["targets"] = targets
    ref = None
    for ratio in [0.0, *ratios]:
        with torch.inference_mode():
            out = pipe(lr, opts.replace(tome_ratio=ratio, tome_targets=targets))
        img = out.images[0] * 255
        tm = out.timings
        row = {"seconds_per_step": tm["denoise"] / steps, "seconds_total": tm["encode"] + tm["denoise"] + tm["decode"]}
        if ref is None:
            ref = img
        else:
            row.update(psnr_db=psnr_255(img, ref), ssim=ssim_255(img, ref))
            row["step_speedup"] = res["0.0"]["seconds_per_step"] / row["seconds_per_step"]
        res[str(ratio)] = row
    res["peak_rss_mb"] = rss_mb("VmHWM")
    return res


def worker_e2e(
    out_size: int,
    dtype: str,
    device: str = "cpu",
    size: str = "real",
    steps: int = 1,
    compile: str | None = None,
    latent_tile: int | None = None,
) -> dict:
    """One upscale to ``out_size``² through ``SDControlNetSR`` with ``steps`` denoising steps.

    With one step the 20-step time is estimated as ``encode + decode + 20 * step``; with more it is measured.
    ``compile`` is the pipeline's ``compile`` option (compiled at build, warmed up by a first call that is
    not timed); ``latent_tile`` None = the automatic choice (free memory), 0 = untiled.
    """

    import torch

    from semsr.methods.sd_controlnet import SDControlNetOptions

    t_build = time.perf_counter()
    pipe = _build_pipeline(size, device, dtype, compile)
    build_seconds = time.perf_counter() - t_build
    rss_loaded = rss_mb("VmRSS")
    lr = torch.rand(1, 3, out_size // 4, out_size // 4, generator=torch.Generator().manual_seed(0))
    opts = SDControlNetOptions(steps=steps, prompt="a photo", seed=0, latent_tile=latent_tile)
    warmup_seconds = None
    if _device_type(device) == "cuda" or compile:  # first call: kernels, cuDNN autotuning, compilation
        t_warm = time.perf_counter()
        with torch.inference_mode():
            pipe(lr, opts.replace(steps=1))
        _sync(device)
        warmup_seconds = time.perf_counter() - t_warm
    _reset_peak_memory(device)
    _sync(device)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with torch.inference_mode():
        out = pipe(lr, opts)
    _sync(device)
    total, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    assert out.images.shape == (1, 3, out_size, out_size)
    tm = out.timings
    fixed = total - tm["denoise"]
    per_step = tm["denoise"] / steps
    return {
        "measured": True,
        "output": f"{out_size}x{out_size}",
        "dtype": dtype,
        "device": device,
        "size": size,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "build_seconds": build_seconds,
        "seconds_total": total,
        "seconds_1_step": fixed + per_step,
        "cpu_seconds": cpu,
        "seconds_per_step": per_step,
        "encode_seconds": tm["encode"],
        "decode_seconds": tm["decode"],
        "estimated_seconds_20_steps": fixed + 20 * per_step,
        "seconds_20_steps_measured": total if steps == 20 else None,
        "latent_tile": pipe.resolve_latent_tile((out_size // 8, out_size // 8), latent_tile),
        "compile": compile,
        "warmup_seconds": warmup_seconds,
        "rss_after_load_mb": rss_loaded,
        **_peak_memory(device),
    }


COMPILE_TARGETS = ("unet", "down-block", "transformer")
COMPILE_MODES = ("default", "freeze")


def _compile_piece(target: str, dtype: torch.dtype):
    """A real-size SD-1.5 piece and a call running it: ``(module, call)``, ``call(m) -> Tensor``.

    Inputs are a CFG batch of 2 at SD's native 64x64 latent (512x512 output):
    ``unet`` gets ``(2, 4, 64, 64)``; ``down-block`` (CrossAttnDownBlock2D, 320
    ch) and ``transformer`` (its first Transformer2DModel) get ``(2, 320, 64, 64)``;
    the context is ``(2, 77, 768)``, the time embedding ``(2, 1280)``.
    """
    import torch

    from semsr.pipeline.sd_configs import random_sd15

    torch.manual_seed(0)
    unet = random_sd15(with_text_encoder=False)["unet"].to(dtype).eval().requires_grad_(False)
    ctx = torch.randn(2, 77, 768, dtype=dtype)
    if target == "unet":
        x, t = torch.randn(2, 4, 64, 64, dtype=dtype), torch.tensor(500)
        return unet, lambda m: m(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    h = torch.randn(2, 320, 64, 64, dtype=dtype)
    if target == "down-block":
        temb = torch.randn(2, 1280, dtype=dtype)
        return unet.down_blocks[0], lambda m: m(h, temb, encoder_hidden_states=ctx)[0]
    if target == "transformer":
        return unet.down_blocks[0].attentions[0], lambda m: m(h, encoder_hidden_states=ctx, return_dict=False)[0]
    raise ValueError(f"unknown compile target {target!r} (choose from {', '.join(COMPILE_TARGETS)})")


def worker_compile(target: str, mode: str, reps: int, dtype_name: str) -> dict:
    """Eager vs ``torch.compile`` on one piece (see :func:`_compile_piece`), in this process."""
    import gc

    import torch
    import torch._inductor.config as inductor_config

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    module, call = _compile_piece(target, dtype)
    params_m = sum(p.numel() for p in module.parameters()) / 1e6
    gc.collect()
    _reset_peak()
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}")
    inductor_config.freezing = mode == "freeze"
    compiled = torch.compile(module)

    def timed(m) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = call(m)
        return time.perf_counter() - t0, out

    with torch.no_grad():  # freezing needs no_grad; inference_mode is not used for either side
        eager_warm, ref = timed(module)
        first, out = timed(compiled)
        second, _ = timed(compiled)
        eager, comp = [], []
        for _ in range(reps):  # interleaved so both sides see the same machine load
            eager.append(timed(module)[0])
            comp.append(timed(compiled)[0])
    diff = (out.float() - ref.float()).abs().max().item()
    return {
        "target": target,
        "mode": mode,
        "dtype": dtype_name,
        "params_m": params_m,
        "threads": torch.get_num_threads(),
        "compile_seconds": first - min(comp),
        "first_compiled_call_seconds": first,
        "second_compiled_call_seconds": second,
        "eager_warmup_seconds": eager_warm,
        "eager_seconds": min(eager),
        "compiled_seconds": min(comp),
        "eager_seconds_all": eager,
        "compiled_seconds_all": comp,
        "speedup": min(eager) / min(comp),
        "speedup_median": statistics.median(eager) / statistics.median(comp),
        "max_abs_diff": diff,
        "ref_abs_max": ref.float().abs().max().item(),
        "peak_rss_mb": rss_mb("VmHWM"),
    }


def _run_worker(args: list[str], timeout: float | None = None, inductor_cache: str | None = None) -> dict:
    """Run one measurement in a fresh process; its result dict, or ``{"error": ...}``.

    ``inductor_cache``: inductor cache folder to use; None = a fresh temporary
    one, so compile times are cold-cache times.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    try:
        cmd = [sys.executable, __file__, *args, "--worker-out", out]
        with tempfile.TemporaryDirectory(prefix="inductor-") as fresh:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache or fresh}
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
            )
            try:
                _, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and any compile sub-processes it started
                proc.communicate()
                return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            if proc.returncode < 0:
                return {"error": f"worker terminated by signal {-proc.returncode}"}
            lines = [ln for ln in stderr.strip().splitlines() if "Error" in ln or "error" in ln]
            return {"error": (lines or [f"exit {proc.returncode}"])[-1]}
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def _print_tables(results: dict) -> None:
    steps = [k for k in CONFIGS if k in results]
    if steps:
        print(
            "\nconfig            ms/step(CFG,512px)   GFLOP/s   peak MB (GPU alloc. or RSS)   RSS loaded MB   warm-up s"
            "   [speed-up, timed in turn with its baseline]   [eps PSNR vs the exact eager step]"
        )
    flops = results.get("flops", {}).get("flops_per_step")
    if steps and flops:
        print(f"one exact CFG step: {flops / 1e9:.0f} GFLOP (GFLOP/s: these over s/step; merged rows do fewer)")
        for name, rate in results["flops"].get("matmul_gflops", {}).items():
            print(f"a 4096² {name} matmul on this CPU: {rate:.0f} GFLOP/s")
    for name in steps:
        r = results[name]
        if name == "auto" and "dtype_resolved" in r:
            print(f"auto = {r['dtype_resolved']} on this machine ({r['dtype_reason']})")
        if "error" in r:
            print(f"{name:<17} error: {r['error']}")
        else:
            peak = r.get("peak_gpu_mb", r["peak_rss_mb"])
            extra = ""
            if "speedup_interleaved" in r:
                extra += f"   {r['speedup_interleaved']:.2f}x vs {r['baseline']} (median {r['speedup_interleaved_median']:.2f}x)"
            if r.get("config", {}).get("compile"):
                extra += f"   peak RSS after warm-up {r.get('peak_rss_steady_mb', 0):.0f} MB"
            if "psnr_vs_exact_db" in r:
                extra += f"   eps PSNR vs exact {r['psnr_vs_exact_db']:.1f} dB"
            rate = f"{flops / 1e9 / r['seconds_per_step']:>7.1f}" if flops else f"{'-':>7}"
            print(
                f"{name:<17} {1000 * r['seconds_per_step']:>18.1f}   {rate}   {peak:>27.0f}   {r['rss_after_load_mb']:>13.0f}"
                f"   {r['warmup_seconds']:>9.1f}{extra}"
            )
    sizes = [k for k in results if k.startswith("e2e_")]
    if sizes:
        print("\nend-to-end   steps   s total   s/step   encode s   decode s   20 steps s   latent tile   peak MB")
    for key in sizes:
        r = results[key]
        if "error" in r:
            print(f"{key:<12} error: {r['error']}")
        else:
            twenty = r.get("seconds_20_steps_measured") or r["estimated_seconds_20_steps"]
            mark = "" if r.get("seconds_20_steps_measured") else " (est.)"
            print(
                f"{r['output']:<12} {r.get('steps', 1):>5}   {r.get('seconds_total', r['seconds_1_step']):>7.2f}   "
                f"{r['seconds_per_step']:>6.3f}   {r['encode_seconds']:>8.2f}   {r['decode_seconds']:>8.2f}   "
                f"{twenty:>10.2f}{mark}   {str(r.get('latent_tile')):>11}   {r.get('peak_gpu_mb', r['peak_rss_mb']):>7.0f}"
            )


def _print_compile_table(results: dict) -> None:
    keys = [k for k in results if k.startswith("compile_")]
    if not keys:
        return
    print("\n(s/fwd: min of the interleaved rounds; speedup: eager/compiled of the min and of the median)")
    print(
        "torch.compile run                     compile s   eager s/fwd   compiled s/fwd   speedup min  median"
        "   max|diff|   peak RSS MB"
    )
    for key in keys:
        r = results[key]
        if "error" in r:
            print(f"{key.removeprefix('compile_'):<36} error: {r['error']}")
        else:
            med = statistics.median(r["eager_seconds_all"]) / statistics.median(r["compiled_seconds_all"])
            print(
                f"{key.removeprefix('compile_'):<36} {r['compile_seconds']:>10.1f}   {r['eager_seconds']:>11.2f}   "
                f"{r['compiled_seconds']:>14.2f}   {r['speedup']:>11.2f}  {med:>6.2f}   {r['max_abs_diff']:>9.1e}"
                f"   {r['peak_rss_mb']:>11.0f}"
            )


#: Pipeline compile modes timed end to end by default, per device type (CPU: none, compiling takes minutes).
DEFAULT_E2E_COMPILE = {"cpu": "", "cuda": "reduce-overhead"}


def run_e2e_compile(measure, args, dev: str, sizes: str, dtype: str, steps: int) -> None:
    """End-to-end runs of the pipeline built with ``compile=<mode>`` (``--e2e-compile``) at the
    ``--e2e-compile-sizes`` among ``sizes`` (each process compiles anew, about two minutes on an H200),
    smallest first; keys ``e2e_<size>_<mode>``; each run is capped at ``--compile-timeout`` seconds."""
    modes = DEFAULT_E2E_COMPILE.get(dev, "") if args.e2e_compile is None else args.e2e_compile
    wanted = {int(s) for s in args.e2e_compile_sizes.split(",") if s}
    for mode in [m for m in modes.split(",") if m]:
        for size in sorted(int(s) for s in sizes.split(",") if s and int(s) in wanted):
            measure(f"e2e_{size}_{mode}", ["e2e", str(size), dtype, str(steps), mode, "-"], args.compile_timeout)


def run_scaling(measure, args, dev: str) -> None:
    """``--scaling``: one end-to-end run per output size, tiled with ``--scaling-tile`` latent tiles (flat
    memory) and with the automatic tile; ``--e2e-steps`` (default 1: the 20-step time is estimated)."""
    dtype = args.e2e_dtype or ("fp16" if dev == "cuda" else "fp32")
    steps = args.e2e_steps or 1
    for size in sorted(int(s) for s in args.scaling.split(",") if s):
        if args.scaling_tile:
            measure(f"scaling_{size}_tiled", ["e2e", str(size), dtype, str(steps), "-", str(args.scaling_tile)])
        measure(f"scaling_{size}_auto", ["e2e", str(size), dtype, str(steps), "-", "-"])


def _print_e2e_rows(title: str, rows: dict, name_width: int, columns: list[tuple[str, int, str, str]]) -> None:
    """One table of end-to-end rows: the run name, then ``columns`` = (header, width, result key, format spec),
    then the peak memory (GPU when measured, else RSS). Failed rows print their error."""
    print(f"\n{title}")
    print(f"{'run':{name_width}} " + " ".join(f"{h:>{w}}" for h, w, _, _ in columns) + f" {'peak MB':>9}")
    for key, r in rows.items():
        if "seconds_per_step" not in r:
            print(f"{key:{name_width}} {r.get('error', 'failed')}")
            continue
        peak = r.get("peak_gpu_mb") or r.get("peak_rss_mb") or 0
        cells = " ".join(f"{r.get(k) or 0:{w}{spec}}" for _, w, k, spec in columns)
        print(f"{key:{name_width}} {cells} {peak:9.0f}")


def _print_tome_table(results: dict) -> None:
    keys = [k for k in results if k.startswith("tome_quality_")]
    if keys:
        print("\ntoken merging end to end    ratio   s/step   step speedup   PSNR dB vs ratio 0   SSIM vs ratio 0")
    for key in keys:
        r = results[key]
        if "error" in r:
            print(f"{key:<27} error: {r['error']}")
            continue
        for ratio, row in ((k, v) for k, v in r.items() if isinstance(v, dict)):
            print(
                f"{r['output'] + ' ' + str(r['steps']) + ' steps ' + r.get('targets', 'attn1'):<27} {ratio:>5}   {row['seconds_per_step']:>6.3f}"
                f"   {row.get('step_speedup', 1.0):>12.2f}   {row.get('psnr_db', float('inf')):>18.2f}"
                f"   {row.get('ssim', 1.0):>15.4f}"
            )


def _print_e2e_compile_table(results: dict) -> None:
    rows = {k: v for k, v in results.items() if k.startswith("e2e_") and isinstance(v, dict) and v.get("compile")}
    if rows:
        columns = [("s/step", 8, "seconds_per_step", ".3f"), ("total s", 8, "seconds_total", ".2f")]
        columns += [("20-step s", 10, "estimated_seconds_20_steps", ".2f"), ("warm-up s", 10, "warmup_seconds", ".1f")]
        _print_e2e_rows("end to end, pipeline compile modes (eager rows above):", rows, 28, columns)


def _print_scaling_table(results: dict) -> None:
    rows = {k: v for k, v in results.items() if k.startswith("scaling_")}
    columns = [("tile", 5, "latent_tile", "d"), ("1-step s", 9, "seconds_1_step", ".2f")]
    columns += [("20-step s", 10, "estimated_seconds_20_steps", ".2f")]
    _print_e2e_rows("scaling with output size (end to end):", rows, 24, columns)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write results as JSON here (updated after every measurement)")
    ap.add_argument("--merge", action="store_true", help="update an existing --json file instead of replacing it")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default cpu)")
    ap.add_argument("--size", default="real", choices=["real", "tiny"], help="SD-1.5 size or the tiny test models")
    ap.add_argument(
        "--configs",
        default=None,
        help=f"step configs ({', '.join(CONFIGS)}); '' = none; default per device: {DEFAULT_CONFIGS}",
    )
    ap.add_argument("--reps", type=int, default=2, help="timed steps per config (min is reported)")
    ap.add_argument("--e2e-dtype", default=None, help="dtype for end-to-end runs (default: fastest step config)")
    ap.add_argument(
        "--e2e-sizes", default=None, help=f"end-to-end output sizes; '' = none; default {DEFAULT_E2E_SIZES}"
    )
    ap.add_argument(
        "--e2e-steps", type=int, default=None, help="denoising steps timed end to end (default: 1 on CPU, 20 on CUDA)"
    )
    ap.add_argument("--skip-2048", action="store_true", help="same as --e2e-sizes 512")
    ap.add_argument("--skip-e2e", action="store_true", help="same as --e2e-sizes ''")
    ap.add_argument(
        "--compile",
        default="",
        help=f"torch.compile vs eager on these pieces ({', '.join(COMPILE_TARGETS)}); default none",
    )
    ap.add_argument("--compile-modes", default="default,freeze", help=f"compile modes ({', '.join(COMPILE_MODES)})")
    ap.add_argument("--compile-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile-reps", type=int, default=3, help="interleaved eager/compiled rounds (min is reported)")
    ap.add_argument("--compile-timeout", type=float, default=1200.0, help="seconds before a compile worker is killed")
    ap.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="inductor cache folder shared by the compile runs (default: a fresh one per run, i.e. "
        "cold-cache compile times; run twice with the same DIR for warm-cache times)",
    )
    ap.add_argument(
        "--e2e-compile",
        default=None,
        help="pipeline compile modes (default, reduce-overhead, freeze) also timed end to end, each after an "
        f"untimed compiling call; '' = eager only; default per device: {DEFAULT_E2E_COMPILE}",
    )
    ap.add_argument(
        "--e2e-compile-sizes", default="512,64", help="output sizes of the --e2e-compile runs (default 512,64)"
    )
    ap.add_argument(
        "--scaling",
        default=None,
        metavar="SIZES",
        help="scaling curve: end-to-end seconds and peak memory at these output sizes (e.g. 256,512,1024,2048), "
        "tiled (--scaling-tile) and automatic; replaces the step / end-to-end runs",
    )
    ap.add_argument(
        "--scaling-tile", type=int, default=64, help="latent tile of the tiled scaling rows (default 64; 0 = none)"
    )
    ap.add_argument(
        "--tome-quality",
        default="",
        metavar="SIZES",
        help="token merging end to end at these output sizes (e.g. 512): PSNR/SSIM against the unmerged output "
        "and seconds per step for each --tome-ratios, --tome-steps steps, dtype --e2e-dtype (default auto)",
    )
    ap.add_argument("--tome-ratios", default="0.3,0.5", help="token merging ratios of --tome-quality")
    ap.add_argument("--tome-steps", type=int, default=20, help="denoising steps of --tome-quality")
    ap.add_argument(
        "--tome-targets",
        default="attn1",
        help="merged sub-modules of --tome-quality (the tome_targets option: attn1, attn1+ff, attn1+attn2+ff)",
    )
    ap.add_argument(
        "--no-flops",
        action="store_true",
        help="skip counting the step's floating-point operations (the GFLOP/s column of the step table)",
    )
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind = args.worker[0]
        if kind == "step":
            res = worker_step(CONFIGS[args.worker[1]], int(args.worker[2]), args.device, args.size)
        elif kind == "flops":
            res = worker_flops(args.size, args.device)
        elif kind == "tome-quality":
            ratios = [float(r) for r in args.worker[3].split(",") if r]
            w = args.worker
            res = worker_tome_quality(int(w[1]), w[2], ratios, int(w[4]), args.device, args.size, w[5])
        elif kind == "compile":
            res = worker_compile(args.worker[1], args.worker[2], int(args.worker[3]), args.worker[4])
        else:
            extra = [None if a == "-" else a for a in args.worker[4:6]] + [None, None]
            res = worker_e2e(
                int(args.worker[1]),
                args.worker[2],
                args.device,
                args.size,
                int(args.worker[3]),
                compile=extra[0],
                latent_tile=None if extra[1] is None else int(extra[1]),
            )
        Path(args.worker_out).write_text(json.dumps(res))
        return 0

    results: dict = {}
    if args.merge and args.json and Path(args.json).is_file():
        results = json.loads(Path(args.json).read_text())
    machine = results.setdefault("machine", {"cpus": os.cpu_count()})
    machine.update(device=args.device, size=args.size, cpu_model=cpu_model(), cpu_bf16=cpu_has_native_bf16())
    runs = machine.setdefault("load_avg", {})
    dev = _device_type(args.device)
    common = ["--device", args.device, "--size", args.size]
    print(f"pipeline_step: device {args.device}, {args.size} size, CPU {machine['cpu_model']}", flush=True)

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    def measure(key: str, worker_args: list[str], timeout: float | None = None, cache: str | None = None) -> None:
        print(f"[{key}] ...", flush=True)
        start, t0 = os.getloadavg(), time.perf_counter()
        results[key] = _run_worker([*common, "--worker", *worker_args], timeout, cache)
        runs[key] = {
            "start": start,
            "end": os.getloadavg(),
            "process_wall_seconds": time.perf_counter() - t0,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        print(f"  {results[key]}", flush=True)
        save()

    if args.scaling is not None:
        run_scaling(measure, args, dev)
        _print_scaling_table(results)
        return 0
    configs = [c for c in (DEFAULT_CONFIGS.get(dev, "fp32") if args.configs is None else args.configs).split(",") if c]
    if configs and not args.no_flops:
        measure("flops", ["flops"])
    for name in configs:
        measure(name, ["step", name, str(args.reps)])
    timed = {k: v for k, v in results.items() if k in CONFIGS and "seconds_per_step" in v}
    e2e_dtype = args.e2e_dtype or (
        CONFIGS[min(timed, key=lambda k: timed[k]["seconds_per_step"])]["dtype"] if timed else "fp32"
    )
    e2e_sizes = DEFAULT_E2E_SIZES.get(dev, "512") if args.e2e_sizes is None else args.e2e_sizes
    sizes = "" if args.skip_e2e else "512" if args.skip_2048 else e2e_sizes
    e2e_steps = args.e2e_steps or (20 if dev == "cuda" else 1)
    for size in [int(s) for s in sizes.split(",") if s]:
        measure(f"e2e_{size}", ["e2e", str(size), e2e_dtype, str(e2e_steps)])
    run_e2e_compile(measure, args, dev, sizes, e2e_dtype, e2e_steps)
    for size in [int(s) for s in args.tome_quality.split(",") if s]:
        tome_args = [str(size), args.e2e_dtype or "auto", args.tome_ratios, str(args.tome_steps), args.tome_targets]
        suffix = "" if args.tome_targets == "attn1" else "_" + args.tome_targets.replace("+", "_")
        measure(f"tome_quality_{size}{suffix}", ["tome-quality", *tome_args])
    for target in [t for t in args.compile.split(",") if t]:
        for mode in [m for m in args.compile_modes.split(",") if m]:
            key = f"compile_{target}_{mode}" + ("_cache" if args.compile_cache else "")
            measure(
                key,
                ["compile", target, mode, str(args.compile_reps), args.compile_dtype],
                args.compile_timeout,
                args.compile_cache,
            )
            if args.compile_cache:
                results[key]["inductor_cache"] = "shared: " + args.compile_cache
                save()
    _print_tables(results)
    _print_e2e_compile_table(results)
    _print_compile_table(results)
    _print_tome_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
