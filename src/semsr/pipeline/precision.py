"""Precision and speed settings for inference modules.

Measured on the 2-core CPU here (``benchmarks/pipeline_step.py``, see
/work/notes/pipeline_bench.md): bf16 *weights* (not autocast over fp32
weights) are what makes SD-size UNets fast on CPUs with AVX512-BF16; diffusers
already uses PyTorch SDPA attention (``AttnProcessor2_0``) by default.
``channels_last`` and ``torch.compile`` are available as options and off by
default (see the benchmark for their effect).
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
