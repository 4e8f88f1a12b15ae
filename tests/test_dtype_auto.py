"""``--dtype auto``: bf16 on CPUs with native bf16 (faked CPU flags here), fp32 elsewhere, bf16/fp16 on CUDA."""

from __future__ import annotations

import logging

import pytest
import torch

from semsr import methods
from semsr.core import dtypes, machine
from semsr.core.dtypes import resolve_dtype
from semsr.core.errors import SemsrError
from semsr.core.options import MethodOptions


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEMSR_DTYPE", raising=False)  # conftest pins fp32 for the rest of the suite


def _flags(monkeypatch: pytest.MonkeyPatch, flags: set[str]) -> None:
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ({"avx2", "fma"}, torch.float32),
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"amx_bf16", "amx_tile"}, torch.bfloat16),
    ],
)
def test_auto_on_cpu_follows_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str], want: torch.dtype) -> None:
    _flags(monkeypatch, flags)
    assert dtypes.resolve_dtype("auto", "cpu") == want
    assert dtypes.resolve_dtype("auto") == want
    info = dtypes.describe_dtype("auto", "cpu")
    assert info["dtype_requested"] == "auto" and info["dtype"] == ("bf16" if want == torch.bfloat16 else "fp32")
    assert ("no native bf16" in info["dtype_reason"]) == (want == torch.float32)


@pytest.mark.parametrize(("bf16_ok", "want"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda(monkeypatch: pytest.MonkeyPatch, bf16_ok: bool, want: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    out, why = dtypes.auto_dtype(torch.device("cuda"))
    assert out == want and "CUDA" in why


def test_env_overrides_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    _flags(monkeypatch, {"avx512_bf16"})
    monkeypatch.setenv("SEMSR_DTYPE", "fp32")
    assert dtypes.resolve_dtype("auto", "cpu") == torch.float32
    assert dtypes.resolve_dtype("bf16", "cpu") == torch.bfloat16  # an explicit precision wins over the env
    monkeypatch.setenv("SEMSR_DTYPE", "fp16")
    assert dtypes.resolve_dtype("auto", "cpu") == torch.bfloat16  # fp16 cannot run on CPU
    monkeypatch.setenv("SEMSR_DTYPE", "fp64")
    with pytest.raises(SemsrError, match="SEMSR_DTYPE"):
        dtypes.resolve_dtype("auto", "cpu")


def test_option_choices_and_default() -> None:
    assert MethodOptions().dtype == "auto"
    assert dtypes.DTYPE_CHOICES == ("auto", "fp32", "bf16", "fp16")
    spec = methods.resolve("bicubic")
    assert spec.parse({"dtype": "auto"}).dtype == "auto"
    with pytest.raises(SemsrError, match="auto, fp32, bf16, fp16"):
        spec.parse({"dtype": "fp64"})


def test_auto_end_to_end_restorer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny RRDBNet restorer under auto runs bf16 with faked native-bf16 flags, fp32 without; outputs agree."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    outs = {}
    for flags in ({"avx512_bf16"}, {"avx2"}):
        _flags(monkeypatch, flags)
        method = methods.build("realesrgan-x4plus", {"dtype": "auto"})
        outs[next(iter(flags))] = (method.dtype, method(x).images)
    (d_bf, y_bf), (d_32, y_32) = outs["avx512_bf16"], outs["avx2"]
    assert d_bf == torch.bfloat16 and d_32 == torch.float32
    assert y_bf.dtype == y_32.dtype == torch.float32 and y_bf.shape == (1, 3, 32, 32)
    diff = (y_bf - y_32).abs()  # random-noise input: bf16 rounding shows most here
    assert diff.mean() < 1e-2 and diff.max() < 0.15


def test_auto_end_to_end_tiny_sd_controlnet(tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    """sd-controlnet on the tiny random models under the default ``auto``: bf16 with native-bf16 flags, fp32
    without; both give a finite image of the right size, close to each other."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    build = {"base": str(tiny_models / "sd"), "controlnet": str(tiny_models / "controlnet"), "steps": 1, "seed": 0}
    outs = {}
    for flag in ("avx512_bf16", "avx2"):
        _flags(monkeypatch, {flag})
        spec = methods.resolve("sd-controlnet")
        options = spec.parse(build)
        assert options.dtype == "auto"
        method = spec.factory(options)
        with torch.no_grad():
            outs[flag] = (method.dtype, method(x, options).images)
    assert outs["avx512_bf16"][0] == torch.bfloat16 and outs["avx2"][0] == torch.float32
    y_bf, y_32 = outs["avx512_bf16"][1], outs["avx2"][1]
    assert y_bf.shape == y_32.shape and y_bf.shape[-2:] == (16 * 4, 16 * 4) and torch.isfinite(y_bf).all()
    assert (y_bf.float() - y_32.float()).abs().mean() < 0.1


@pytest.mark.parametrize(("flags", "warned"), [({"avx2"}, True), ({"avx512_bf16"}, False)])
def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, flags: set[str], warned: bool
) -> None:
    """``--dtype bf16`` (or ``SEMSR_DTYPE=bf16``) on a CPU that emulates bf16 logs one warning per process;
    fp32, auto and CPUs with native bf16 log none."""
    _flags(monkeypatch, flags)
    monkeypatch.setattr(dtypes, "_warned_bf16", [])
    with caplog.at_level(logging.WARNING, logger="semsr.core.dtypes"):
        assert resolve_dtype("fp32", "cpu") == torch.float32
        assert resolve_dtype("auto", "cpu") == (torch.float32 if warned else torch.bfloat16)
        assert not caplog.records
        assert resolve_dtype("bf16", "cpu") == torch.bfloat16
        assert resolve_dtype(torch.bfloat16) == torch.bfloat16
        monkeypatch.setenv("SEMSR_DTYPE", "bf16")
        assert resolve_dtype("auto", "cpu") == torch.bfloat16
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == (1 if warned else 0)
    assert all("emulated and much slower than fp32" in m for m in messages)
