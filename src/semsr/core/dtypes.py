"""One place that turns the user's device and precision words into torch objects."""

from __future__ import annotations

import logging
import os

import torch

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.machine import cpu_has_native_bf16

log = logging.getLogger(__name__)

#: Precision words accepted by ``--dtype``; ``auto`` is resolved per device by :func:`auto_dtype`.
DTYPE_CHOICES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
#: Environment variable that replaces what ``auto`` resolves to (``fp32``, ``bf16`` or ``fp16``).
DTYPE_ENV = "SEMSR_DTYPE"

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CPU; ``"cuda"`` must exist; only CPU and CUDA devices are supported."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as err:
        raise SemsrError(f"unknown device {device!r}; use cpu or cuda") from err
    if dev.type not in ("cpu", "cuda"):
        raise SemsrError(f"unsupported device {str(device)!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("device 'cuda' requested but this PyTorch has no CUDA device")
    return dev


def _names(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def auto_dtype(device: str | torch.device | None = None) -> tuple[torch.dtype, str]:
    """What ``--dtype auto`` means on ``device``, and why (a short sentence for logs and reports).

    CPU: bf16 when the CPU does bf16 matrix work in hardware (``avx512_bf16`` or AMX flags, read by
    :func:`semsr.core.machine.cpu_has_native_bf16`; there bf16 convolutions and matmuls run about twice as fast
    as fp32), fp32 otherwise (bf16 is emulated and slower). No micro-benchmark is run: the flags decide.
    CUDA: bf16 where the GPU supports it, else fp16. The environment variable ``SEMSR_DTYPE``
    (``fp32``/``bf16``/``fp16``) overrides the choice.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env = os.environ.get(DTYPE_ENV, "").strip().lower()
    if env and env != "auto":
        if env not in DTYPES:
            raise SemsrError(f"{DTYPE_ENV}={env!r} is not a precision; use auto, fp32, bf16 or fp16")
        out = DTYPES[env]
        if out == torch.float16 and dev.type == "cpu":
            out = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
            return out, f"{DTYPE_ENV}=fp16 cannot run on CPU; {_names(out)} instead"
        if out == torch.bfloat16 and dev.type == "cpu":
            warn_emulated_bf16()
        return out, f"{DTYPE_ENV}={env}"
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device supports bf16"
        return torch.float16, "CUDA device without bf16 support: fp16"
    if cpu_has_native_bf16():
        return torch.bfloat16, "CPU has native bf16 (avx512_bf16/AMX)"
    return torch.float32, "CPU has no native bf16 (no avx512_bf16/AMX): fp32"


def describe_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> dict[str, str]:
    """``{"dtype_requested", "dtype", "dtype_reason"}`` for reports: what was asked, what runs, and why."""
    requested = "auto" if dtype is None else (_names(dtype) if isinstance(dtype, torch.dtype) else str(dtype).lower())
    if requested == "auto":
        out, why = auto_dtype(device)
    else:
        try:
            out, why = resolve_dtype(dtype, device), "requested"
        except SemsrError as err:
            return {"dtype_requested": requested, "dtype": "invalid", "dtype_reason": str(err)}
    return {"dtype_requested": requested, "dtype": _names(out), "dtype_reason": why}


def resolve_dtype(
    dtype: str | torch.dtype | None,
    device: str | torch.device | None = None,
    *,
    default: torch.dtype = torch.float32,
    cuda_default: torch.dtype | None = None,
) -> torch.dtype:
    """A floating torch dtype from ``"auto" | "fp32" | "bf16" | "fp16"`` (or a dtype).

    ``"auto"`` is :func:`auto_dtype` on ``device`` (CPU when ``None``). ``None`` gives ``default``
    (``cuda_default`` on a CUDA ``device`` when given). fp16 on a CPU ``device`` is refused (slow or
    missing kernels).
    """
    dev = torch.device(device) if device is not None else None
    if isinstance(dtype, str) and dtype.lower() == "auto":
        out, why = auto_dtype(dev)
        log.info("dtype auto -> %s on %s (%s)", _names(out), dev or "cpu", why)
        return out
    if dtype is None:
        out = cuda_default if (cuda_default is not None and dev is not None and dev.type == "cuda") else default
    elif isinstance(dtype, torch.dtype):
        out = dtype
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in DTYPES:
            raise SemsrError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
        out = DTYPES[key]
    if not out.is_floating_point:
        raise SemsrError(f"dtype must be floating point, not {out}")
    if out == torch.float16 and dev is not None and dev.type == "cpu":
        raise SemsrError("fp16 needs a GPU; on CPU use bf16 or fp32")
    if out == torch.bfloat16 and dtype is not None and (dev is None or dev.type == "cpu"):
        warn_emulated_bf16()
    return out


_warned_bf16: list[bool] = []


def warn_emulated_bf16() -> None:
    """Log once per process that bf16 was asked for on a CPU without native bf16 (no avx512_bf16/AMX), where
    PyTorch emulates it far slower than fp32; nothing when the CPU has native bf16."""
    if _warned_bf16 or cpu_has_native_bf16():
        return
    _warned_bf16.append(True)
    log.warning(
        "bf16 on this CPU (no avx512_bf16/AMX) is emulated and much slower than fp32; --dtype auto picks fp32 here"
    )


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when ``threads`` is given (>= 1)."""
    if threads is not None:
        if int(threads) < 1:
            raise SemsrError(f"threads must be >= 1, not {threads}")
        torch.set_num_threads(int(threads))
