"""Device-agnostic GPU path: the ``compile`` option (CUDA-graph step marks) and latent tiling chosen from free memory."""

from __future__ import annotations

import time

import pytest
import torch

from semsr.core.errors import SemsrError
from semsr.methods.sd_controlnet import SDControlNetOptions
from semsr.pipeline import latent_sr, precision
from semsr.pipeline.memory import free_memory, unet_step_bytes, untiled_fits, vae_decode_bytes
from semsr.pipeline.precision import compile_mode
from semsr.pipeline.sd_controlnet import SDControlNetSR

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models

SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8}
SD_VAE = {"block_out_channels": [128, 256, 512, 512]}
GB = 1 << 30


def run(pipe: SDControlNetSR, lr: torch.Tensor, **kw) -> torch.Tensor:
    return pipe(lr, pipe.options_class(steps=2, prompt="a photo", seed=1, **kw)).images


def test_compile_mode_accepts_reduce_overhead_and_options_list_it():
    assert compile_mode("reduce-overhead") == "reduce-overhead" and compile_mode("cudagraphs") == "reduce-overhead"
    assert compile_mode("default") == "default" and compile_mode(None) is None
    with pytest.raises(SemsrError):
        compile_mode("max")
    assert SDControlNetOptions(compile="reduce-overhead").compile == "reduce-overhead"


def test_reduce_overhead_marks_a_step_before_every_model_call(pipe, lr, monkeypatch):
    """With ``compile=reduce-overhead`` every UNet+ControlNet call (each tile, each step) follows one
    ``cudagraph_mark_step_begin``; the calls themselves run eagerly here (the mode is set, not compiled)."""
    events: list[str] = []
    monkeypatch.setattr(precision.torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    forward = pipe.model_forward

    def spy(*args, **kwargs):
        events.append("call")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe, "model_forward", spy)
    monkeypatch.setattr(pipe, "compile_mode", "reduce-overhead")
    marked = run(pipe, lr, latent_tile=8)
    assert events and events == ["mark", "call"] * (len(events) // 2)
    n_marked = len(events) // 2
    monkeypatch.setattr(pipe, "compile_mode", None)
    events.clear()
    plain = run(pipe, lr, latent_tile=8)
    assert events == ["call"] * n_marked and n_marked > 2  # several tiles x 2 steps
    torch.testing.assert_close(marked, plain)


def test_step_begin_is_a_no_op_outside_reduce_overhead(monkeypatch):
    calls = []
    monkeypatch.setattr(precision.torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    precision.step_begin("default")
    precision.step_begin(None)
    precision.step_begin("reduce-overhead")
    assert calls == [1]


# ----------------------------------------------------------------------------- memory-driven tiling


def test_estimates_grow_with_size_and_quadratic_attention_dominates_off_cuda():
    small = unet_step_bytes(SD15_UNET, (64, 64), batch=2, dtype=torch.float16, quadratic_attention=False)
    big = unet_step_bytes(SD15_UNET, (256, 256), batch=2, dtype=torch.float16, quadratic_attention=False)
    assert big == pytest.approx(16 * small, rel=1e-6)  # linear in pixels with flash attention
    quad = unet_step_bytes(SD15_UNET, (256, 256), batch=2, dtype=torch.float16, quadratic_attention=True)
    assert quad > 20 * big
    assert vae_decode_bytes(SD_VAE, (256, 256), batch=1, dtype=torch.float16, quadratic_attention=False) > 4 * GB


def test_untiled_decision_from_faked_free_memory():
    """2048² output (256² latent) in fp16 on CUDA runs untiled on a 139 GB GPU, tiled on a 4 GB one; on the
    CPU, where attention scores may be materialised, 1024² tiles with 23 GB free and 512² (64² latent) does not."""
    kw = dict(batch=2, dtype=torch.float16)
    assert untiled_fits(SD15_UNET, SD_VAE, (256, 256), device="cuda", free=139 * GB, **kw)
    assert not untiled_fits(SD15_UNET, SD_VAE, (256, 256), device="cuda", free=4 * GB, **kw)
    cpu = dict(batch=2, dtype=torch.bfloat16, device="cpu", free=23 * GB)
    assert not untiled_fits(SD15_UNET, SD_VAE, (128, 128), **cpu)
    assert untiled_fits(SD15_UNET, SD_VAE, (64, 64), **cpu)
    assert not untiled_fits(SD15_UNET, SD_VAE, (64, 64), device="meta", **kw)  # free memory unknown: tiled
    assert free_memory("cpu") is None or free_memory("cpu") > 0


def test_pipeline_tiles_only_when_free_memory_is_short(pipe, monkeypatch):
    assert pipe.resolve_latent_tile((128, 128), None, free=1 << 40) == 0
    assert pipe.resolve_latent_tile((128, 128), None, free=1 << 10) == latent_sr.DEFAULT_LATENT_TILE
    assert pipe.resolve_latent_tile((32, 32), None, free=1 << 10) == 0  # one tile anyway
    assert pipe.resolve_latent_tile((128, 128), 32, free=1 << 40) == 32  # an explicit tile wins
    monkeypatch.setattr(latent_sr, "untiled_fits", lambda *a, **k: False)
    assert pipe.resolve_latent_tile((128, 128), None) == latent_sr.DEFAULT_LATENT_TILE


# ----------------------------------------------------------------------------- compile=default vs eager


@pytest.mark.slow
def test_compile_default_matches_eager_on_the_tiny_model(tiny_models, lr):
    """The compiled tiny pipeline (inductor, compiled once and reused across tiles and calls) matches eager."""
    eager = SDControlNetSR.from_pretrained(tiny_models / "sd", tiny_models / "controlnet")
    compiled = SDControlNetSR.from_pretrained(tiny_models / "sd", tiny_models / "controlnet", compile="default")
    ref = run(eager, lr, latent_tile=8)
    t0 = time.perf_counter()
    first = run(compiled, lr, latent_tile=8)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = run(compiled, lr, latent_tile=8)
    assert time.perf_counter() - t0 < t_first  # no recompilation on the second call
    torch.testing.assert_close(first, ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(second, first)
