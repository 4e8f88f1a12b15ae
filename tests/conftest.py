"""Shared pytest fixtures. Area-specific fixtures live in the area's test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semsr.core.paths import data_root
from semsr.methods.sd_controlnet import SDControlNetOptions
from semsr.pipeline.sd_controlnet import SDControlNetSR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data root (``SEMSR_DATA`` or ``../shared/data``); skips when absent."""
    root = data_root()
    if root is None or not root.is_dir():
        pytest.skip("shared data folder not found (set SEMSR_DATA)")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests from writing into the user's ~/.cache/semsr (NIQE params are shared)."""
    cache = tmp_path_factory.getbasetemp() / "semsr-cache"
    monkeypatch.setenv("SEMSR_CACHE", str(cache))


@pytest.fixture(autouse=True)
def _fp32_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--dtype auto`` (the default) means fp32 in tests: the suite's numbers were recorded in fp32, and auto is
    bf16 on CPUs with native bf16. Tests of ``auto`` itself remove ``SEMSR_DTYPE`` (see tests/test_dtype_auto.py)."""
    monkeypatch.setenv("SEMSR_DTYPE", "fp32")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with every registered tiny random model (``semsr.testing.tiny``), written once per session.

    Entries: ``sd/`` (diffusers SD folder), ``controlnet/``, ``sd.safetensors``
    (single-file LDM layout), ``sd-minilm/`` (MiniLM text fallback), plus
    whatever recipe modules register.
    """
    from semsr.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny-model tests (two threads spin against each
    other on the shared cores). Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> SDControlNetSR:
    """The tiny SD + SR ControlNet pipeline (modules that need another pipeline define their own ``pipe``)."""
    return SDControlNetSR.from_pretrained(
        tiny_models / "sd", tiny_models / "controlnet", options_class=SDControlNetOptions
    )


@pytest.fixture(scope="module")
def lr() -> torch.Tensor:
    """A fixed ``(1, 3, 32, 40)`` LR image in [0, 1]."""
    return torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
