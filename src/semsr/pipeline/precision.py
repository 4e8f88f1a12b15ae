"""Memory-format and compile settings for inference modules (dtypes: :func:`semsr.core.dtypes.resolve_dtype`).

The default precision is ``auto`` (:func:`semsr.core.dtypes.auto_dtype`: bf16 on CPUs with native bf16, fp32
on other CPUs, bf16/fp16 on GPUs); bf16 weights halve the memory; fp16 is for GPUs only. diffusers already uses PyTorch SDPA attention. ``channels_last`` and
``torch.compile`` (``compile="default"``, or ``"freeze"`` for inductor weight
freezing: faster forwards on CPU for twice the memory and a long compile) are
options, off by default. Measurements behind these defaults:
``docs/benchmarks/pipeline.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from semsr.core.errors import SemsrError


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


def prepare_module(
    module: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    compile: bool | str = False,
) -> Any:
    """Move ``module`` to ``device``/``dtype`` in eval mode, optionally channels-last and compiled.

    ``torch.compile`` wraps ``forward`` in place (``module.compile()``), so the
    module keeps its attributes (``config``, ``dtype``) that diffusers code reads.
    ``compile="freeze"`` also turns on inductor's weight freezing (process-wide;
    faster forwards on CPU for twice the memory).
    """
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    mode = compile_mode(compile)
    if mode == "freeze":
        import torch._inductor.config as inductor_config  # heavy: loads the compiler stack

        inductor_config.freezing = True
    if mode is not None:
        module.compile()
    return module
