"""Precision and speed settings for inference modules.

Measured here (``benchmarks/pipeline_step.py``; 2 shared cores with AVX512-BF16,
torch 2.13 CPU; numbers in /work/notes/pipeline_bench.md): with SD-1.5-size
UNet + ControlNet, bf16 *weights* halve the memory (peak 3.1 GB vs 5.7 GB per
CFG step) but were not faster than fp32 (140 s vs 104 s per step on a heavily
loaded machine; an interleaved A/B of one SD resnet block: fp32 1.43 s, bf16
2.08 s, bf16 channels-last 1.71 s, fp32 channels-last 1.34 s). So fp32 stays
the default and bf16 is the low-memory option; fp16 is for GPUs only.
diffusers already uses PyTorch SDPA attention (``AttnProcessor2_0``).
``channels_last`` and ``torch.compile`` are options, off by default
(compile was not measured: compiling an SD UNet takes minutes on 2 cores).
"""
from __future__ import annotations

from typing import Any

import torch

from semsr.errors import SemsrError
from semsr.pipeline.loading import resolve_dtype


def check_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """Resolve ``dtype`` for ``device``; fp16 is refused on CPU (slow/unsupported kernels)."""
    resolved = resolve_dtype(dtype)
    if resolved == torch.float16 and torch.device(device).type == "cpu":
        raise SemsrError("fp16 needs a GPU; on CPU use bf16 or fp32")
    return resolved


def prepare_module(module: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   channels_last: bool = False, compile: bool = False) -> Any:
    """Move ``module`` to ``device``/``dtype`` in eval mode, optionally channels-last and compiled.

    ``torch.compile`` wraps ``forward`` in place (``module.compile()``), so the
    module keeps its attributes (``config``, ``dtype``) that diffusers code reads.
    """
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if compile:
        module.compile()
    return module
