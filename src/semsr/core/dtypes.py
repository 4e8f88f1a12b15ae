"""One place that turns the user's device and precision words into torch objects."""

from __future__ import annotations

import torch

from semsr.core.errors import SemsrError, UnavailableError

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


def resolve_dtype(
    dtype: str | torch.dtype | None,
    device: str | torch.device | None = None,
    *,
    default: torch.dtype = torch.float32,
    cuda_default: torch.dtype | None = None,
) -> torch.dtype:
    """A floating torch dtype from ``"fp32" | "bf16" | "fp16"`` (or a dtype).

    ``None`` gives ``default`` (``cuda_default`` on a CUDA ``device`` when
    given). fp16 on a CPU ``device`` is refused (slow or missing kernels).
    """
    dev = torch.device(device) if device is not None else None
    if dtype is None:
        out = cuda_default if (cuda_default is not None and dev is not None and dev.type == "cuda") else default
    elif isinstance(dtype, torch.dtype):
        out = dtype
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in DTYPES:
            raise SemsrError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
        out = DTYPES[key]
    if not out.is_floating_point:
        raise SemsrError(f"dtype must be floating point, not {out}")
    if out == torch.float16 and dev is not None and dev.type == "cpu":
        raise SemsrError("fp16 needs a GPU; on CPU use bf16 or fp32")
    return out


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when ``threads`` is given (>= 1)."""
    if threads is not None:
        if int(threads) < 1:
            raise SemsrError(f"threads must be >= 1, not {threads}")
        torch.set_num_threads(int(threads))
