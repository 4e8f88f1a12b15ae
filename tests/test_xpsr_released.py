"""XPSR's released weight layout: strict loading into semsr's modules, matched against the official code's
outputs (tests/data/xpsr-released, produced as its README says)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from semsr.core.errors import UnavailableError
from semsr.methods import resolve
from semsr.methods.xpsr import XPSR_ADDED_POSITIVE, XPSR_NEGATIVE, TwoPromptSR
from semsr.methods.xpsr_released import (
    RELEASED_ADDED_PROMPT,
    RELEASED_NEGATIVE,
    build_released_xpsr,
    home_keys,
    is_released_layout,
    load_released_xpsr,
    route,
)
from semsr.pipeline.latent_tiling import script_tile_starts, script_tile_weight
from semsr.priors.prompts import TextConditions, TextPriors

FIXTURE = Path(__file__).parent / "data" / "xpsr-released"
CHECKPOINT = FIXTURE / "checkpoint-4"


@pytest.fixture(scope="module")
def released():
    return load_released_xpsr(CHECKPOINT)


@pytest.fixture(scope="module")
def official():
    return load_file(str(FIXTURE / "outputs.safetensors"))


def _inputs(o):
    return [o[f"input.{k}"] for k in ("sample", "timestep", "context", "low_context", "hint")]


def test_layout_detected():
    assert is_released_layout(CHECKPOINT)
    assert not is_released_layout(FIXTURE)


def test_sources_name_the_released_files(released):
    assert released.sources["unet"].endswith("unet/diffusion_pytorch_model.safetensors")
    assert released.sources["controlnet"].endswith("controlnet/diffusion_pytorch_model.safetensors")
    assert released.sources["dfc"] == released.sources["controlnet"]
    assert set(released.sources) == {"unet", "controlnet", "dfc", "sfa (unet side)", "sfa (controlnet side)"}


def test_controlnet_residuals_match_official(released, official):
    x, t, c, low, hint = _inputs(official)
    released.sfa.install(released.controlnet, released.unet)
    with torch.no_grad(), released.sfa.conditions(low=low):
        down, mid = released.controlnet(x, t, encoder_hidden_states=c, controlnet_cond=hint, return_dict=False)
    assert len(down) == len([k for k in official if k.startswith("controlnet.down.")])
    for i, d in enumerate(down):
        assert (d - official[f"controlnet.down.{i}"]).abs().max() <= 1e-4
    assert (mid - official["controlnet.mid"]).abs().max() <= 1e-4


def test_unet_output_matches_official(released, official):
    x, t, c, low, hint = _inputs(official)
    released.sfa.install(released.controlnet, released.unet)
    with torch.no_grad():
        eps = released.sfa.controlnet_unet_forward(released.unet, released.controlnet, x, t, c, low, hint)
    ref = official["unet.sample"]
    assert ref.abs().max() > 0.1  # the fixture's new layers act
    assert (eps - ref).abs().max() <= 1e-4


def test_renamed_tensor_fails_with_one_line(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, folder)
    path = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    key = "down_blocks.0.attentions_lowlevel.0.proj_in.weight"
    tensors["down_blocks.0.attentions_lowlevel.0.proj_inn.weight"] = tensors.pop(key)
    save_file(tensors, str(path))
    with pytest.raises(UnavailableError) as err:
        load_released_xpsr(folder)
    message = str(err.value)
    assert "\n" not in message
    assert "proj_inn" in message and key in message and "controlnet" in message


def test_pickled_weights_are_not_read(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnavailableError, match="only safetensors"):
        load_released_xpsr(folder)


def test_full_size_every_released_key_has_a_home(tmp_path):
    """SD-1.5-size XPSR built on ``meta`` from the released configs: the official code's full-size key set
    (names and shapes, recorded from the official modules) maps one to one onto semsr's modules."""
    recorded = json.loads((FIXTURE / "released-sd15-keys.json").read_text())
    folder = tmp_path / "full"
    for part in ("unet", "controlnet"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(recorded[part]["config"]))
    model = build_released_xpsr(folder, device="meta")
    homes = home_keys(model)
    states = {
        "unet": model.unet.state_dict(),
        "controlnet": model.controlnet.state_dict(),
        "sfa": model.sfa.state_dict(),
        "dfc": model.dfc.state_dict(),
    }
    for part in ("unet", "controlnet"):
        released = recorded[part]["keys"]
        unmapped = [k for k in released if k not in homes[part].get(route(part, k), set())]
        assert not unmapped, unmapped[:5]
        expected = set().union(*homes[part].values())
        assert not expected - set(released), sorted(expected - set(released))[:5]
        for key, shape in released.items():
            assert list(states[route(part, key)][key].shape) == shape, key
    assert sum(len(v) for v in homes["unet"].values()) == len(recorded["unet"]["keys"])
    # strict loading of the full-size released tensors (as meta tensors of the recorded shapes) fills every
    # module completely: no key missing or unexpected in any home
    modules = {"unet": model.unet, "controlnet": model.controlnet, "sfa": model.sfa, "dfc": model.dfc}
    filled: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for part in ("unet", "controlnet"):
        for key, shape in recorded[part]["keys"].items():
            filled[route(part, key)][key] = torch.empty(shape, device="meta")
    for name, module in modules.items():
        result = module.load_state_dict(filled[name], strict=True, assign=True)
        assert not result.missing_keys and not result.unexpected_keys, name


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD (text width 32, as the fixture UNet's cross-attention) and tiny VLM (the official sample was
    made with this tiny SD's VAE, text encoder, tokenizer and scheduler; the writer is deterministic)."""
    from semsr.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"), ["sd", "vlm"])


# The official sample (tests/data/xpsr-released/README.md): fixed prompts instead of the VLM's.
HIGH = "a red apple on a wooden table"
LOW = "the image is blurry and noisy, with low resolution"


class FixedPriors:
    """Text priors that always give the official sample's caption and quality prompt."""

    no_vlm = False

    def __call__(self, image: torch.Tensor, prompt: str | None = None) -> TextConditions:
        return TextConditions(high=HIGH, low=LOW, sources={"high": "vlm", "low": "vlm"})


@pytest.fixture(scope="module")
def sample():
    return load_file(str(FIXTURE / "sample.safetensors"))


@pytest.fixture(scope="module")
def released_pipe(tiny_base):
    pipe = TwoPromptSR.from_checkpoint(tiny_base / "sd", CHECKPOINT)
    pipe.priors = FixedPriors()
    return pipe


def _run_sample(pipe: TwoPromptSR, sample: dict, case: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """semsr's xpsr pipeline on the sample's LR with the released preset (the default for the folder):
    the final latent (caught on its way to the VAE) and the output image."""
    latents: list[torch.Tensor] = []
    decode = pipe.vae_decode

    def catch(z: torch.Tensor, tile_px: int | None = None) -> torch.Tensor:
        latents.append(z.clone())
        return decode(z, tile_px)

    pipe.vae_decode = catch
    try:
        out = pipe(sample["sample.lr"].float() / 255, pipe.options_class(steps=4, **options))
    finally:
        del pipe.vae_decode
    assert out.priors["preset"] == "released"
    assert out.priors["prompt"] == f"{HIGH} {RELEASED_ADDED_PROMPT}"
    assert out.priors["negative_prompt"] == RELEASED_NEGATIVE
    return latents[-1], out.images


def _check_sample(latent: torch.Tensor, image: torch.Tensor, sample: dict, case: str) -> None:
    ref = sample[f"sample.{case}latent"]
    assert latent.shape == ref.shape
    assert (latent - ref).abs().max() <= 1e-3, float((latent - ref).abs().max())
    official = sample[f"sample.{case}output"].float()  # 8-bit, as the script saves it
    assert image.shape == official.shape
    diff = (image * 255 - official).abs()
    assert diff.max() <= 1.0 + 1e-4 and (diff > 0.5).float().mean() <= 1e-3  # an 8-bit rounding step at most


@pytest.mark.parametrize(
    ("case", "options"),
    [("", {"process_size": 64}), ("tiled.", {"process_size": 64, "latent_tile": 6, "tile_overlap": 2})],
    ids=["whole", "tiled"],
)
def test_four_step_sample_matches_official(released_pipe, sample, case, options):
    """The official pipeline's 4-step result (seed 0, its 8-bit hint enlarged to process_size, LR latent
    sampled and noised to t=T and to 800, its tiles, 8-bit AdaIN, resize back) within 1e-3 (latent)."""
    latent, image = _run_sample(released_pipe, sample, case, **options)
    _check_sample(latent, image, sample, case)


@pytest.mark.slow  # 512-pixel hint: ~1-3 min on 2 busy cores
@pytest.mark.parametrize(
    ("case", "options"), [("p512.", {}), ("p512.tiled.", {"latent_tile": 24})], ids=["whole", "tiled"]
)
def test_four_step_sample_matches_official_at_released_size(released_pipe, sample, case, options):
    latent, image = _run_sample(released_pipe, sample, case, **options)
    _check_sample(latent, image, sample, case)


def test_script_tiles_match_the_released_layout():
    assert script_tile_starts(64, 24, 8) == [0, 16, 32, 40]  # stride 16, last tile at the end
    assert script_tile_starts(85, 24, 8) == [0, 16, 32, 48, 61]
    assert script_tile_starts(24, 24, 8) == [0]
    w = script_tile_weight(6)
    assert w.dtype == torch.float64 and w.shape == (6, 6)
    assert torch.allclose(w[3], w[3].flip(0))  # across: centred at (6 - 1) / 2
    assert w[:, 0].argmax() == 3 and not torch.allclose(w[:, 0], w[:, 0].flip(0))  # down: centred at 6 / 2


def test_semsr_preset_keeps_semsr_defaults(released_pipe):
    opts = released_pipe.resolve_options(released_pipe.options_class(preset="semsr"))
    assert (opts.negative_prompt, opts.added_prompt) == (XPSR_NEGATIVE, XPSR_ADDED_POSITIVE)
    opts = released_pipe.resolve_options(released_pipe.options_class(negative_prompt="ugly"))
    assert (opts.preset, opts.negative_prompt, opts.added_prompt) == ("released", "ugly", RELEASED_ADDED_PROMPT)
    out = released_pipe(torch.rand(1, 3, 8, 8), released_pipe.options_class(steps=1, preset="semsr"))
    assert "preset" not in out.priors and out.priors["prompt"] == f"{HIGH}, {XPSR_ADDED_POSITIVE}"
    assert out.images.shape == (1, 3, 32, 32)


def _images(folder: Path) -> Path:
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((16, 12, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    return folder


def _config(tmp_path: Path, tiny_base: Path) -> Path:
    """configs/xpsr-released.yaml with ``{weights}`` (SEMSR_WEIGHTS) holding the tiny models and the fixture
    under the names the config uses."""
    weights = tmp_path / "weights"
    (weights / "xpsr").mkdir(parents=True)
    (weights / "stable-diffusion-v1-5").symlink_to(tiny_base / "sd")
    (weights / "llava-1.5-7b-hf").symlink_to(tiny_base / "vlm")
    (weights / "xpsr" / "checkpoint-300000").symlink_to(CHECKPOINT.resolve())
    return weights


def test_upscale_config_cli_and_bench_on_released_folder(tiny_base, tmp_path, capsys, monkeypatch):
    from semsr.cli import main

    images = _images(tmp_path / "in")
    monkeypatch.setenv("SEMSR_WEIGHTS", str(_config(tmp_path, tiny_base)))
    config = Path(__file__).parents[1] / "configs" / "xpsr-released.yaml"
    rc = main(
        [
            "upscale", "-i", str(images), "-o", str(tmp_path / "out"), "--config", str(config),
            "--steps", "1", "--process-size", "64", "--json", str(tmp_path / "u.json"),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert Image.open(tmp_path / "out" / "a_out.png").size == (48, 64)
    rc = main(
        [
            "upscale", "-i", str(images), "-o", str(tmp_path / "out2"), "--method", "xpsr",
            "--base", str(tiny_base / "sd"), "--checkpoint", str(CHECKPOINT), "--vlm", str(tiny_base / "vlm"),
            "--steps", "1", "--process-size", "64",
        ]
    )  # fmt: skip
    capsys.readouterr()
    assert rc == 0
    assert Image.open(tmp_path / "out2" / "a_out.png").size == (48, 64)
    rc = main(
        [
            "bench", "--methods", f"bicubic,xpsr[base={tiny_base / 'sd'},checkpoint={CHECKPOINT},"
            f"vlm={tiny_base / 'vlm'},steps=1,process_size=64]", "--datasets", str(images), "--limit", "1",
            "--metrics", "psnr", "--no-isolate", "--json", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "xpsr" in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert "xpsr" in json.dumps(rows)


def test_upscale_config_errors_are_one_line(tmp_path, capsys):
    from semsr.cli import main

    images = _images(tmp_path / "in")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: xpsr\noptions: {steps: 2, stepz: 3}\n")
    assert main(["upscale", "-i", str(images), "-o", str(tmp_path / "o"), "--config", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "stepz" in err
    other = tmp_path / "other.yaml"
    other.write_text("method: xpsr\n")
    assert main(["upscale", "-i", str(images), "-o", str(tmp_path / "o"), "-n", "bicubic", "--config", str(other)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config is for method xpsr" in err


def test_renamed_tensor_fails_in_one_line_on_the_cli(tiny_base, tmp_path):
    """The CLI on a released folder with one tensor renamed: one stderr line naming it, non-zero exit."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    key = "up_blocks.1.pixel_attentions.0.proj_out.weight"
    tensors[key.replace("proj_out", "proj_outt")] = tensors.pop(key)
    save_file(tensors, str(path))
    images = _images(tmp_path / "in")
    cmd = [
        sys.executable, "-m", "semsr.cli", "upscale", "-i", str(images), "-o", str(tmp_path / "o"),
        "--method", "xpsr", "--base", str(tiny_base / "sd"), "--checkpoint", str(folder),
        "--vlm", str(tiny_base / "vlm"), "--steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert key in lines[0] and "proj_outt" in lines[0] and "unet" in lines[0]


def test_output_names_released_files(tiny_base):
    pipe = TwoPromptSR.from_checkpoint(tiny_base / "sd", CHECKPOINT)
    pipe.priors = TextPriors(vlm=tiny_base / "vlm", low_source="vlm")
    out = pipe(torch.rand(1, 3, 8, 8), pipe.options_class(steps=1, process_size=32))
    weights = out.priors["weights"]
    assert weights["unet"].endswith("unet/diffusion_pytorch_model.safetensors")
    assert weights["controlnet"].endswith("controlnet/diffusion_pytorch_model.safetensors")


def test_released_config_parses_as_xpsr_options():
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "xpsr-released.yaml").read_text())
    assert config["method"] == "xpsr"
    options = resolve("xpsr").parse(config["options"])
    assert (options.steps, options.guidance_scale, options.preset, options.process_size) == (20, 4.5, "released", 512)
    assert (options.negative_prompt, options.added_prompt) == (RELEASED_NEGATIVE, RELEASED_ADDED_PROMPT)
    assert str(options.checkpoint).startswith("{weights}/")
