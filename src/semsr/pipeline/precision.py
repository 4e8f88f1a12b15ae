"""Precision and speed settings for inference modules.

Measured here (``benchmarks/pipeline_step.py``; 2 shared cores with AVX512-BF16,
torch 2.13 CPU; numbers in docs/benchmarks/pipeline.md): with SD-1.5-size
UNet + ControlNet, bf16 *weights* halve the memory (peak 3.1 GB vs 5.7 GB per
CFG step) but were not faster than fp32 (140 s vs 104 s per step on a heavily
loaded machine; an interleaved A/B of one SD resnet block: fp32 1.43 s, bf16
2.08 s, bf16 channels-last 1.71 s, fp32 channels-last 1.34 s). So fp32 stays
the default and bf16 is the low-memory option; fp16 is for GPUs only.
diffusers already uses PyTorch SDPA attention (``AttnProcessor2_0``).
``channels_last`` and ``torch.compile`` are options, off by default.
``torch.compile`` on the SD-1.5 UNet (fp32, batch 2, 64x64 latent): the default
mode compiles in ~176 s and does not win (median 0.98x); with inductor
*freezing* (``compile="freeze"``) a forward is ~1.3x faster (16.1-16.4 s vs
21.0-21.4 s) but peak RSS doubles (9.3 GB vs 4.6 GB) and the compile time
(~140-180 s cold, ~73 s with a warm cache) is repaid only after 30-40 UNet
forwards — worth it for long tiled or batch runs with RAM to spare.
"""
from __future__ import annotations

from typing import Any

import torch

from semsr.core.errors import SemsrError
from semsr.core.loading import resolve_dtype


def check_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """Resolve ``dtype`` for ``device``; fp16 is refused on CPU (slow/unsupported kernels)."""
    resolved = resolve_dtype(dtype)
    if resolved == torch.float16 and torch.device(device).type == "cpu":
        raise SemsrError("fp16 needs a GPU; on CPU use bf16 or fp32")
    return resolved


def compile_mode(value: bool | str | None) -> str | None:
    """Normalise a ``compile`` option: ``None`` (off), ``"default"`` or ``"freeze"``.

    Accepts booleans and the strings a command line gives (``true``/``false``/
    ``1``/``0``/``default``/``freeze``).
    """
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    text = str(value).strip().lower()
    if text in ("", "0", "false", "no", "off", "none"):
        return None
    if text in ("1", "true", "yes", "on", "default"):
        return "default"
    if text == "freeze":
        return "freeze"
    raise SemsrError(f"compile must be true, false, default or freeze, got {value!r}")


def prepare_module(module: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   channels_last: bool = False, compile: bool | str = False) -> Any:
    """Move ``module`` to ``device``/``dtype`` in eval mode, optionally channels-last and compiled.

    ``torch.compile`` wraps ``forward`` in place (``module.compile()``), so the
    module keeps its attributes (``config``, ``dtype``) that diffusers code reads.
    ``compile="freeze"`` also turns on inductor's weight freezing (process-wide;
    faster on CPU, twice the memory — see the module docstring).
    """
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    mode = compile_mode(compile)
    if mode == "freeze":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    if mode is not None:
        module.compile()
    return module
