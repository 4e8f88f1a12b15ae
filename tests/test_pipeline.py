"""Diffusion SR core on the tiny random models: loading, sampler, guidance, tiling, colour fix, CLI."""

from __future__ import annotations

import copy
import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.loading import load_controlnet, load_sd
from semsr.core.outputs import SROutput
from semsr.methods.sd_controlnet import SDControlNetOptions
from semsr.pipeline.colorfix import adain, colour_fix, wavelet, wavelet_split
from semsr.pipeline.guidance import cat_conditions, cfg, weighted
from semsr.pipeline.latent_tiling import blend_windows, script_tile_starts, tile_starts, tiled, untiled
from semsr.pipeline.options import ControlNetSROptions
from semsr.pipeline.sampler import make_scheduler, sample
from semsr.pipeline.sd_controlnet import SDControlNetSR, controlnet_unet_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models


def call(pipe: SDControlNetSR, lr: torch.Tensor, **kw) -> SROutput:
    opts = dict(steps=3, prompt="a photo", seed=1)
    opts.update(kw)
    return pipe(lr, pipe.options_class(**opts))


def run(pipe: SDControlNetSR, lr: torch.Tensor, **kw) -> torch.Tensor:
    return call(pipe, lr, **kw).images


# ----------------------------------------------------------------------------- pipeline


def test_full_pipeline_shape_range_timings_and_priors(pipe, lr):
    out = call(pipe, lr, steps=4)
    y = out.images
    assert y.shape == (1, 3, 128, 160) and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1 and y.std() > 0.01
    assert set(out.timings) >= {"encode", "denoise", "decode"} and out.timings["steps"] == 4
    assert out.priors == {"prompt": "a photo", "negative_prompt": SDControlNetOptions().negative_prompt}
    assert not hasattr(pipe, "last_timings")


def test_options_class_is_an_init_keyword(pipe, lr):
    assert pipe.options_class is SDControlNetOptions
    plain = SDControlNetSR(
        vae=pipe.vae, unet=pipe.unet, controlnet=pipe.controlnet, text=pipe.text, scheduler_config=pipe.scheduler_config
    )
    assert plain.options_class is ControlNetSROptions and SDControlNetSR.options_class is ControlNetSROptions
    assert plain.suggest_priors(lr) == {"negative_prompt": ""}
    assert pipe.suggest_priors(lr) == {"negative_prompt": SDControlNetOptions().negative_prompt}
    # a call without options uses the defaults of the options class
    with_defaults = pipe(lr)
    assert torch.equal(with_defaults.images, pipe(lr, SDControlNetOptions()).images)


def test_odd_sizes_and_batches_are_padded_and_cropped(pipe):
    x2 = SDControlNetSR(
        vae=pipe.vae,
        unet=pipe.unet,
        controlnet=pipe.controlnet,
        text=pipe.text,
        scheduler_config=pipe.scheduler_config,
        scale=2,
        options_class=SDControlNetOptions,
    )
    x = torch.rand(2, 3, 13, 21, generator=torch.Generator().manual_seed(3))
    out = x2(x, SDControlNetOptions(steps=2, seed=0), prompts=["a cat", "a dog"])
    assert out.images.shape == (2, 3, 26, 42)
    assert out.priors["prompt"] == "a cat"


def test_same_seed_same_output_and_seed_matters(pipe, lr):
    a, b = run(pipe, lr), run(pipe, lr)
    assert torch.equal(a, b)
    assert (a - run(pipe, lr, seed=2)).abs().mean() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_other_schedulers_run_and_differ_from_ddpm(pipe, lr, scheduler):
    y = run(pipe, lr, scheduler=scheduler)
    assert y.shape == (1, 3, 128, 160)
    assert (y - run(pipe, lr)).abs().mean() > 1e-4


def test_start_from_noise_and_strength(pipe, lr):
    a = run(pipe, lr, start_from_lr=False)
    b = run(pipe, lr, strength=0.5, steps=4)
    assert a.shape == b.shape == (1, 3, 128, 160)
    assert (a - run(pipe, lr)).abs().mean() > 1e-4


def test_save_load_round_trip_identical(pipe, lr, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "controlnet" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # written whole, no staging left behind
    again = SDControlNetSR.from_pretrained(tmp_path / "saved", options_class=SDControlNetOptions)
    for name in ("unet", "vae", "controlnet"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(run(pipe, lr), run(again, lr))


def _count_unet_calls(pipe: SDControlNetSR):
    calls: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return calls, handle


def test_guidance_scale_one_takes_the_no_cfg_path(pipe, lr):
    calls, handle = _count_unet_calls(pipe)
    try:
        run(pipe, lr, steps=3, guidance_scale=1.0)
        assert calls == [1, 1, 1]  # one forward per step, batch of 1: no unconditional branch
        calls.clear()
        run(pipe, lr, steps=3, guidance_scale=4.5)
        assert calls == [2, 2, 2]  # CFG: one batched forward [uncond, cond] per step
    finally:
        handle.remove()


def test_negative_prompt_changes_output(pipe, lr):
    a = run(pipe, lr, negative_prompt="blurry, noise")
    b = run(pipe, lr, negative_prompt="sharp, clean, detailed photograph")
    assert (a - b).abs().mean() > 1e-4
    # and with guidance 1 the negative prompt is not used at all
    assert torch.equal(
        run(pipe, lr, guidance_scale=1.0, negative_prompt="x"), run(pipe, lr, guidance_scale=1.0, negative_prompt="y")
    )


def test_controlnet_hint_matters(pipe, lr):
    a = run(pipe, lr, conditioning_scale=1.0, colour_fix="none")
    b = run(pipe, lr, conditioning_scale=0.0, colour_fix="none")
    assert (a - b).abs().mean() > 1e-4


def test_controlnet_unet_forward_casts_residuals_to_the_unet_dtype(pipe):
    """fp32: exactly UNet(x, + ControlNet residuals); a bf16 UNet takes fp32 residuals (mixed-precision training)."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    hint, t = torch.rand(2, 3, 64, 64, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        down, mid = pipe.controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        want = pipe.unet(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        assert torch.equal(controlnet_unet_forward(pipe.unet, pipe.controlnet, x, t, ctx, hint), want)
        unet16 = copy.deepcopy(pipe.unet).to(torch.bfloat16)

        def fp32_controlnet(xb, tb, *, encoder_hidden_states, controlnet_cond, **kw):  # autocast-like: fp32 outputs
            return pipe.controlnet(
                xb.float(),
                tb,
                encoder_hidden_states=encoder_hidden_states.float(),
                controlnet_cond=controlnet_cond.float(),
                **kw,
            )

        out = controlnet_unet_forward(unet16, fp32_controlnet, x.bfloat16(), t, ctx.bfloat16(), hint.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert (out.float() - want).abs().mean() < 0.1 * want.abs().mean()


# ----------------------------------------------------------------------------- tiling


def test_tile_starts_cover_with_overlap():
    for size in range(1, 200, 7):
        for tile, overlap in ((16, 4), (64, 16), (10, 0)):
            starts = tile_starts(size, tile, overlap)
            assert starts[0] == 0 and starts[-1] + min(tile, size) == size
            assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_blend_windows_exact_for_pointwise_functions_with_window_crops():
    """Blending and window bookkeeping are exact: a pointwise model that reads a spatial
    condition through its window gives the untiled result."""
    g = torch.Generator().manual_seed(0)
    x, cmap = torch.randn(2, 4, 37, 53, generator=g), torch.randn(1, 1, 37, 53, generator=g)

    def spatial(xt, t, cond, window):
        top, left, h, w = window
        return torch.tanh(xt) * 2 + cond * cmap[..., top : top + h, left : left + w]

    full = untiled(spatial)(x, torch.tensor(1), 0.5)
    tiles = tiled(spatial, tile=16, overlap=5)(x, torch.tensor(1), 0.5)
    torch.testing.assert_close(tiles, full, rtol=0, atol=1e-5)
    blended = blend_windows(lambda xt, window: spatial(xt, torch.tensor(1), 0.5, window), x, 16, 5)
    assert torch.equal(blended, tiles)


def test_script_tiles_no_larger_than_their_overlap_still_advance():
    """The released (script) layout with a tile rounded down to the overlap or below (e.g. ``--latent-tile 4``
    against SeeSR's overlap of 4) clamps the overlap to tile - 1 instead of never advancing, and stays exact for
    a pointwise model; the start rule itself refuses such an overlap."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = blend_windows(lambda xt, window: torch.tanh(xt), x, 4, 4, style="script")
    torch.testing.assert_close(out, torch.tanh(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="overlap 4 must be smaller than the tile"):
        script_tile_starts(8, 4, 4)
    assert script_tile_starts(4, 4, 4) == [0]


def test_latent_tile_at_least_latent_size_is_identical(pipe, lr):
    assert torch.equal(run(pipe, lr, latent_tile=0), run(pipe, lr, latent_tile=64))


def test_tiled_vs_untiled_pipeline_close(pipe, lr):
    """The UNet attends globally, so latent tiles cannot reproduce the untiled result exactly.
    Tolerance: tiling (12-latent tiles, 4 overlap, on a 16x20 latent - 4 tiles, a harsh case)
    must change the image far less than re-sampling with another seed does (measured ratio
    ~0.14; bound 0.35), and the tiled image must not show seams (no larger jumps at tile borders)."""
    base = run(pipe, lr, latent_tile=0, colour_fix="none")
    tiled_out = run(pipe, lr, latent_tile=12, tile_overlap=4, colour_fix="none")
    other_seed = run(pipe, lr, latent_tile=0, seed=7, colour_fix="none")
    d_tile = (base - tiled_out).abs().mean()
    d_seed = (base - other_seed).abs().mean()
    assert d_tile < 0.35 * d_seed, (d_tile, d_seed)


def test_tiled_vae_close_to_untiled(pipe):
    """diffusers' tiled VAE (GroupNorm statistics per tile, linear blending): the error must be
    well below the image's own variation (tiny random VAE; measured ~0.03 vs std ~0.15)."""
    z = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    full, tiles = pipe.vae_decode(z), pipe.vae_decode(z, tile_px=96)
    assert tiles.shape == full.shape == (1, 3, 192, 256)
    assert (full - tiles).abs().mean() < 0.5 * full.std()
    assert not pipe.vae.use_tiling  # restored after the call


# ----------------------------------------------------------------------------- sampler pieces


def test_cat_conditions():
    a = {"context": torch.zeros(1, 3, 2), "extra": (torch.ones(1, 2),), "mode": "x"}
    b = {"context": torch.ones(1, 3, 2), "extra": (torch.zeros(1, 2),), "mode": "x"}
    c = cat_conditions(a, b)
    assert c["context"].shape == (2, 3, 2) and c["extra"][0].shape == (2, 2) and c["mode"] == "x"
    assert torch.equal(c["context"][1], b["context"][0])
    assert cat_conditions(None, None) is None
    with pytest.raises(TypeError):
        cat_conditions({"mode": "x"}, {"mode": "y"})


def _cond_denoiser(calls: list[int]):
    def den(x, t, cond):  # output = the condition's value, broadcast
        calls.append(x.shape[0])
        return x * 0 + cond[:, :1, None, None]

    return den


def test_cfg_formula_one_batched_call_and_passthrough():
    calls: list[int] = []
    den = _cond_denoiser(calls)
    assert cfg(den, None, 3.0) is den and cfg(den, torch.ones(1, 1), 1.0) is den  # one forward, no CFG
    x = torch.zeros(1, 1, 2, 2)
    guided = cfg(den, torch.full((1, 1), 1.0), 2.5)
    out = guided(x, torch.tensor(0), torch.full((1, 1), 3.0))
    torch.testing.assert_close(out, torch.full_like(x, 1 + 2.5 * (3 - 1)))
    assert calls == [2]  # [uncond, cond] in one call


def test_weighted_branches_sum_in_float32():
    calls: list[int] = []

    def den(x, t, cond):
        calls.append(x.shape[0])
        return torch.cat([xc * 0 + c for xc, c in zip(x.chunk(len(cond)), cond)]).to(torch.bfloat16)

    x = torch.zeros(2, 1, 2, 2)
    out = weighted(den, [0.5, -2.0, 1.0])(x, torch.tensor(0), [1.0, 2.0, 4.0])
    assert out.dtype == torch.float32 and calls == [6]
    torch.testing.assert_close(out, torch.full_like(x, 0.5 - 4.0 + 4.0))


def test_sampler_has_no_guidance_and_calls_the_denoiser_once_per_step(pipe):
    params = set(inspect.signature(sample).parameters)
    assert not params & {"uncond", "guidance_scale", "guided", "guidance"}
    seen, calls = [], []
    den = _cond_denoiser(calls)
    sched = make_scheduler("ddpm", pipe.scheduler_config)
    z = sample(
        den,
        sched,
        shape=(1, 4, 4, 4),
        cond=torch.zeros(1, 1),
        steps=5,
        generator=torch.Generator().manual_seed(0),
        progress=lambda d, n: seen.append((d, n)),
    )
    assert z.shape == (1, 4, 4, 4) and z.dtype == torch.float32
    assert seen[-1] == (5, 5) and len(seen) == 5 and calls == [1] * 5
    calls.clear()
    guided = cfg(den, torch.ones(1, 1), 3.0)  # guidance wraps the denoiser: the sampler does not know
    sample(
        guided,
        make_scheduler("ddim", pipe.scheduler_config),
        shape=(1, 4, 4, 4),
        cond=torch.zeros(1, 1),
        steps=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert calls == [2] * 3
    with pytest.raises(SemsrError):
        make_scheduler("euler-magic", pipe.scheduler_config)
    with pytest.raises(SemsrError, match="steps"):
        sample(den, sched, shape=(1, 4, 4, 4), cond=None, steps=0)


def test_sample_from_init_latents_with_strength(pipe):
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []
    den = _cond_denoiser(calls)
    z = sample(
        den,
        make_scheduler("ddim", pipe.scheduler_config),
        shape=(1, 4, 4, 4),
        cond=torch.zeros(1, 1),
        steps=4,
        generator=torch.Generator().manual_seed(0),
        init_latents=init,
        strength=0.5,
    )
    assert z.shape == (1, 4, 4, 4) and len(calls) == 2  # half the schedule
    with pytest.raises(SemsrError, match="strength"):
        sample(
            den,
            make_scheduler("ddim", pipe.scheduler_config),
            shape=(1, 4, 4, 4),
            cond=None,
            steps=4,
            init_latents=init,
            strength=0.0,
        )


# ----------------------------------------------------------------------------- colour fix


def test_adain_matches_reference_channel_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 50, generator=g) * 0.5
    ref = torch.rand(2, 3, 20, 25, generator=g) * 0.3 + 0.4
    y = adain(x, ref)
    torch.testing.assert_close(y.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(2, 3)), ref.std(dim=(2, 3)), atol=1e-4, rtol=1e-3)


def test_wavelet_keeps_reference_low_and_output_high_frequencies():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    ref = torch.stack([yy, xx, 1 - yy])[None] * 0.6 + 0.2  # smooth colour ramps
    detail = (torch.rand(1, 3, 96, 96, generator=g) - 0.5) * 0.2
    x = 0.5 + detail  # wrong colours, fine detail
    y = wavelet(x, ref)
    high_y, low_y = wavelet_split(y)
    high_x, _ = wavelet_split(x)
    _, low_ref = wavelet_split(ref)
    assert (low_y - low_ref).abs().mean() < 0.1 * (low_ref - 0.5).abs().mean()
    corr = torch.corrcoef(torch.stack([high_y.flatten(), high_x.flatten()]))[0, 1]
    assert corr > 0.95  # the output's detail survives
    assert torch.equal(colour_fix(x, ref, "none"), x.clamp(0, 1))
    with pytest.raises(SemsrError):
        colour_fix(x, ref, "sepia")


# ----------------------------------------------------------------------------- loading


def test_single_file_loads_same_weights_as_folder(tiny_models):
    folder, single = load_sd(tiny_models / "sd"), load_sd(tiny_models / "sd.safetensors")
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_ckpt_single_file_loads_with_weights_only(tiny_models, tmp_path):
    from semsr.core.single_file import save_single_file

    comps = load_sd(tiny_models / "sd")
    ckpt = save_single_file(tmp_path / "model.ckpt", unet=comps.unet, vae=comps.vae, text_encoder=comps.text_encoder)
    again = load_sd(ckpt, config=tiny_models / "sd")
    sa, sb = comps.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _copy_sd(tiny_models: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "sd"
    shutil.copytree(tiny_models / "sd", dst)
    return dst


@pytest.mark.parametrize(
    "missing",
    [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "model_index.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ],
)
def test_incomplete_sd_folder_names_the_missing_file(tiny_models, tmp_path, missing):
    sd = _copy_sd(tiny_models, tmp_path)
    (sd / missing).unlink()
    if missing == "tokenizer/merges.txt":
        (sd / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(UnavailableError) as info:
        load_sd(sd)
    assert missing in str(info.value)


def test_wrong_paths_give_clear_errors(tmp_path, tiny_models):
    with pytest.raises(UnavailableError, match="no such Stable Diffusion"):
        load_sd(tmp_path / "nope")
    with pytest.raises(UnavailableError, match="controlnet/config.json|missing ControlNet config"):
        bad = tmp_path / "controlnet"
        bad.mkdir()
        load_controlnet(bad)
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(tiny_models / "sd.safetensors", lonely)
    with pytest.raises(UnavailableError, match="config folder"):
        load_sd(lonely)


def test_cli_wrong_base_is_one_line_error(tmp_path, capsys):
    from semsr.cli import main

    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    code = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(tmp_path / "out"),
            "--method",
            "sd-controlnet",
            "--base",
            str(tmp_path / "missing-sd"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "missing-sd" in err and "Traceback" not in err


def test_minilm_fallback_text_encoder(tiny_models, lr, tmp_path):
    from semsr.pipeline.text import MiniLMProjection, MiniLMTextEncoder

    p = SDControlNetSR.from_pretrained(tiny_models / "sd-minilm", tiny_models / "controlnet")
    assert isinstance(p.text, MiniLMTextEncoder)
    ctx = p.text.encode(["a photo of a cat", ""])
    assert ctx.shape == (2, 77, 32)
    assert (ctx[0] - ctx[1]).abs().mean() > 1e-4
    assert run(p, lr, steps=2).shape == (1, 3, 128, 160)
    p.text.save_projection(tmp_path / "proj")  # the projection is a component folder
    assert sorted(f.name for f in (tmp_path / "proj").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    again = MiniLMTextEncoder.from_projection(tmp_path / "proj")
    assert isinstance(again.proj, MiniLMProjection) and again.proj.config.width == 32
    torch.testing.assert_close(again.encode(["a photo of a cat"]), ctx[:1], rtol=0, atol=1e-6)
    with pytest.raises(UnavailableError, match="no config.json"):
        MiniLMTextEncoder.from_projection(tmp_path)


# ----------------------------------------------------------------------------- CLI


def test_cli_tiny_models_then_upscale(tmp_path):
    from semsr.cli import main

    tiny = tmp_path / "tiny"
    assert main(["dev", "tiny-models", "--out", str(tiny), "--only", "sd", "controlnet"]) == 0
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "out"
    code = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(out),
            "--method",
            "sd-controlnet",
            "--base",
            str(tiny / "sd"),
            "--controlnet",
            str(tiny / "controlnet"),
            "--steps",
            "4",
            "--prompt",
            "a photo",
            "--no-progress",
        ]
    )
    assert code == 0
    files = list(out.iterdir())
    assert len(files) == 1
    with Image.open(files[0]) as res:
        assert res.size == (80, 96)


def test_tiny_registry_accepts_new_writers(tmp_path):
    from semsr.testing import tiny

    def write_marker(root: Path) -> None:
        (root / "marker.txt").write_text(str(torch.rand(1).item()))

    tiny.register_tiny("marker", write_marker)
    try:
        assert "marker" in tiny.tiny_names()
        tiny.write_tiny_models(tmp_path / "a", ["marker"])
        tiny.write_tiny_models(tmp_path / "b", ["marker"])
        # each writer starts from a seed derived from its name: reproducible output
        assert (tmp_path / "a" / "marker.txt").read_text() == (tmp_path / "b" / "marker.txt").read_text()
        with pytest.raises(SemsrError, match="unknown tiny component"):
            tiny.write_tiny_models(tmp_path / "c", ["no-such-model"])
    finally:
        tiny._WRITERS.pop("marker", None)


def test_loading_forces_offline_mode():
    import os

    import huggingface_hub.constants as hub

    from semsr.core import loading

    loading.ensure_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE


def test_compile_option_values() -> None:
    from semsr.pipeline.precision import compile_mode

    assert compile_mode(False) is None and compile_mode("false") is None and compile_mode(None) is None
    assert compile_mode(True) == "default" and compile_mode("1") == "default"
    assert compile_mode("Freeze") == "freeze"
    with pytest.raises(SemsrError, match="compile must be"):
        compile_mode("fast")


def test_dev_tiny_models_writes_what_it_can_without_an_optional_package(tmp_path, monkeypatch, capsys):
    """Without the MiniLM package, ``semsr dev tiny-models`` writes the rest and names what it skipped."""
    import semsr.pipeline.text as text
    from semsr.cli import main

    monkeypatch.setattr(text, "MINILM_PACKAGE", "semsr_no_such_minilm_package")
    rc = main(["dev", "tiny-models", "--out", str(tmp_path), "--only", "sd", "controlnet", "sd-minilm"])
    assert rc == 0
    assert (tmp_path / "sd" / "model_index.json").is_file() and (tmp_path / "controlnet").is_dir()
    assert not (tmp_path / "sd-minilm").exists()
    err = capsys.readouterr().err
    assert "skipped sd-minilm" in err and "pip install" in err
