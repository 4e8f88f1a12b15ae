"""semsr.core.machine: the facts speed tables name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semsr.core import machine


def test_cpu_facts_come_from_proc_cpuinfo() -> None:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert machine.cpu_model() in text or machine.cpu_model() == "unknown CPU"
    assert machine.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & machine.cpu_flags())


def test_peak_rss_grows_with_an_allocation() -> None:
    before = machine.peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert machine.rss_mb() > 0 and machine.peak_rss_mb() >= before
    assert machine.peak_rss_mb() >= block.nbytes / 2**20
