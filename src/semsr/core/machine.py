"""Facts about the machine a measurement ran on: CPU model, native bf16 support, process memory.

Speed tables name the CPU they came from and whether it has native bf16 (``avx512_bf16`` or AMX), because
bf16 is about twice as fast as fp32 on such CPUs and slower elsewhere. Memory is this process's resident set
(``VmRSS``) and its high-water mark (``VmHWM``) from ``/proc/self/status``, with ``ru_maxrss`` as fallback.
:func:`matmul_gflops` measures the rate a large matrix product reaches: the practical arithmetic ceiling that
a model's achieved GFLOP/s is compared with.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``"unknown CPU"``."""
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU does bf16 matrix work in hardware (``avx512_bf16`` or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def rss_mb(field: str = "VmRSS") -> float:
    """This process's ``VmRSS`` (or ``VmHWM``, the high-water mark) in MiB; NaN where ``/proc`` is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """This process's RSS high-water mark in MiB (``VmHWM``, else ``ru_maxrss``)."""
    peak = rss_mb("VmHWM")
    if peak == peak:  # not NaN
        return peak
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


def matmul_gflops(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    """GFLOP/s of an ``(n, n) @ (n, n)`` matmul in ``dtype`` on the CPU with the current torch threads (best of
    ``reps`` after one warm-up call)."""
    import torch  # reason: only this measurement needs torch; the CPU facts above stay import-light

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
