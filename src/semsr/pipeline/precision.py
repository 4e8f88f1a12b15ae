"""Memory-format and compile settings for inference modules (dtypes: :func:`semsr.core.dtypes.resolve_dtype`).

The default precision is ``auto`` (:func:`semsr.core.dtypes.auto_dtype`: bf16 on CPUs with native bf16, fp32
on other CPUs, bf16/fp16 on GPUs); bf16 weights halve the memory; fp16 is for GPUs only. diffusers already uses
PyTorch SDPA attention. ``channels_last`` and ``torch.compile`` (``compile="default"``; ``"reduce-overhead"`` for
CUDA graphs on GPUs, which needs :func:`step_begin` before every model call; or ``"freeze"`` for inductor weight
freezing: faster forwards on CPU for twice the memory and a long compile) are options, off by default. A module is
compiled once, when the pipeline is built, and reused across calls and tiles (tiles of one size keep the shapes
stable, so there is no recompilation). Measurements behind these defaults:
``docs/benchmarks/pipeline.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from semsr.core.errors import SemsrError

#: The ``compile`` option's values (besides off).
COMPILE_MODES = ("default", "reduce-overhead", "freeze")


def compile_mode(value: bool | str | None) -> str | None:
    """Normalise a ``compile`` option: ``None`` (off), ``"default"``, ``"reduce-overhead"`` or ``"freeze"``.

    Accepts booleans and the strings a command line gives (``true``/``false``/
    ``1``/``0``/``default``/``reduce-overhead``/``cudagraphs``/``freeze``).
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
    if text in ("freeze", "reduce-overhead"):
        return text
    if text in ("reduce_overhead", "cudagraphs", "cuda-graphs"):
        return "reduce-overhead"
    raise SemsrError(f"compile must be true, false, default, reduce-overhead or freeze, got {value!r}")


def step_begin(mode: str | None) -> None:
    """Mark the start of a model call for CUDA graphs (``mode="reduce-overhead"``; a no-op otherwise).

    CUDA-graph trees reuse their output buffers on the next replay; the mark tells
    them the previous call's outputs are no longer read (the pipelines copy them
    out as float32 first), which avoids the overwritten-output error of the
    ControlNet + UNet pair.
    """
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def prepare_module(
    module: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    compile: bool | str | None = False,
) -> Any:
    """Move ``module`` to ``device``/``dtype`` in eval mode, optionally channels-last and compiled.

    ``torch.compile`` wraps ``forward`` in place (``module.compile()``), so the
    module keeps its attributes (``config``, ``dtype``) that diffusers code reads.
    ``compile="freeze"`` also turns on inductor's weight freezing (process-wide;
    faster forwards on CPU for twice the memory); ``compile="reduce-overhead"``
    compiles with CUDA graphs (callers mark each call with :func:`step_begin`).
    """
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    mode = compile_mode(compile)
    if mode == "freeze":
        import torch._inductor.config as inductor_config  # heavy: loads the compiler stack

        inductor_config.freezing = True
    if mode == "reduce-overhead":
        module.compile(mode="reduce-overhead")
    elif mode is not None:
        module.compile()
    return module
