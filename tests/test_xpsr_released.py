"""XPSR's released weight layout: strict loading into semsr's modules, matched against the official code's
outputs (tests/data/xpsr-released, produced as its README says)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from semsr.core.errors import UnavailableError
from semsr.methods.xpsr_released import (
    build_released_xpsr,
    home_keys,
    is_released_layout,
    load_released_xpsr,
    route,
)

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


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD (text width 32, as the fixture UNet's cross-attention) and tiny VLM."""
    from semsr.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"), ["sd", "vlm"])


def test_upscale_cli_and_bench_on_released_folder(tiny_base, tmp_path, capsys):
    from semsr.cli import main

    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(images / "a.png")
    rc = main(
        [
            "upscale", "-i", str(images), "-o", str(tmp_path / "out"), "--method", "xpsr",
            "--base", str(tiny_base / "sd"), "--checkpoint", str(CHECKPOINT), "--vlm", str(tiny_base / "vlm"),
            "--steps", "2",
        ]
    )  # fmt: skip
    capsys.readouterr()
    assert rc == 0
    assert Image.open(tmp_path / "out" / "a_out.png").size == (64, 64)
    rc = main(
        [
            "bench", "--methods", f"bicubic,xpsr[base={tiny_base / 'sd'},checkpoint={CHECKPOINT},"
            f"vlm={tiny_base / 'vlm'},steps=2]", "--datasets", str(images), "--limit", "1", "--metrics", "psnr",
            "--no-isolate",
            "--json", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "xpsr" in out


def test_output_names_released_files(tiny_base):
    from semsr.methods.xpsr import TwoPromptSR
    from semsr.priors.prompts import TextPriors

    pipe = TwoPromptSR.from_checkpoint(tiny_base / "sd", CHECKPOINT)
    pipe.priors = TextPriors(vlm=tiny_base / "vlm", low_source="vlm")
    out = pipe(torch.rand(1, 3, 8, 8), pipe.options_class(steps=1))
    weights = out.priors["weights"]
    assert weights["unet"].endswith("unet/diffusion_pytorch_model.safetensors")
    assert weights["controlnet"].endswith("controlnet/diffusion_pytorch_model.safetensors")


def test_released_config_parses_as_xpsr_options():
    import yaml

    from semsr.methods import resolve

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "xpsr-released.yaml").read_text())
    assert config["method"] == "xpsr"
    options = resolve("xpsr").parse(config["options"])
    assert (options.steps, options.guidance_scale) == (20, 4.5)
    assert str(options.checkpoint).startswith("{weights}/")
