"""The ``seesr`` method on SeeSR's released layout, against the official pipeline on a tiny random configuration
(tests/data/seesr-released, produced as its README says)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from semsr.core.errors import UnavailableError
from semsr.methods import resolve
from semsr.methods.seesr import SEESR_LATENT_TILE, SeeSROptions, SeeSRPipeline, seesr_prompt
from semsr.pipeline.latent_tiling import script_tile_starts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models

DATA = Path(__file__).parent / "data" / "seesr-released"
BASE, CHECKPOINT, TAGGER = DATA / "sd2", DATA / "seesr", DATA / "DAPE"
OUTPUTS = DATA / "seesr_outputs.safetensors"
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def pipe() -> SeeSRPipeline:
    return SeeSRPipeline.from_released(BASE, CHECKPOINT, TAGGER)


@pytest.fixture(scope="module")
def official() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(OUTPUTS), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(OUTPUTS)), meta


def _lr(official) -> torch.Tensor:
    return official[0]["sample.lr"].float() / 255


def test_dape_prompt_and_embeddings_match_official(pipe, official) -> None:
    tensors, meta = official
    tags, embeds = pipe.dape(_lr(official))
    assert tags == [meta["tags"]]
    assert (embeds - tensors["sample.ram_embeds"]).abs().max() <= 1e-4
    assert seesr_prompt(tags[0], "", SeeSROptions().added_prompt) == meta["prompt"]
    assert SeeSROptions().negative_prompt == meta["negative_prompt"]


def test_four_step_sample_matches_official(pipe, official) -> None:
    """The released pipeline's 4-step result (seed 7, guidance 5.5, LR latent noised to 999) without the colour
    fix, which the released script applies to 8-bit pictures afterwards."""
    tensors, meta = official
    options = SeeSROptions(steps=int(meta["steps"]), seed=int(meta["seed"]), colour_fix="none", process_size=0)
    out = pipe(_lr(official), options)
    assert out.priors["prompt"] == meta["prompt"] and out.priors["tags"] == meta["tags"]
    assert out.images.shape == tensors["sample.image"].shape
    assert (out.images - tensors["sample.image"]).abs().max() <= 1e-3
    assert out.priors["weights"]["unet"].endswith("unet/diffusion_pytorch_model.safetensors")
    assert out.priors["weights"]["tagger"].endswith("DAPE.safetensors")


def test_latent_tiles_match_official(pipe, official) -> None:
    """The released pipeline's tiling (square tiles on a stride of tile - overlap, the last flush with the edge,
    its Gaussian weights) on the 8x8 latent with tiles of 4, overlap 1: 3 x 3 tiles, 2 steps."""
    tensors, meta = official
    options = SeeSROptions(
        steps=2, seed=int(meta["seed"]), colour_fix="none", process_size=0, latent_tile=4, tile_overlap=1
    )
    out = pipe(_lr(official), options)
    assert (out.images - tensors["sample.image_tiled"]).abs().max() <= 1e-3
    assert (tensors["sample.image_tiled"] - tensors["sample.image"]).abs().max() > 0.1  # the tiles act


def test_small_input_resize(pipe, official) -> None:
    lr = _lr(official)
    assert pipe.process_input(lr, 512).shape[-2:] == (128, 128)  # short side 512 / 4
    assert pipe.process_input(lr, 0) is lr and pipe.process_input(lr, 64) is lr
    resized = pipe(lr[:, :, :12, :10], SeeSROptions(steps=1, process_size=96, latent_tile=0))
    assert resized.images.shape == (1, 3, 48, 40)  # processed at 24 px short side, returned at 4x the input


def test_tile_offsets_follow_the_released_grid() -> None:
    assert script_tile_starts(200, 96, 4) == [0, 92, 104]
    assert script_tile_starts(8, 4, 1) == [0, 3, 4]
    assert script_tile_starts(96, 96, 4) == [0]


@pytest.mark.parametrize(
    ("given", "want"),
    [({}, SEESR_LATENT_TILE), ({"tile": 16}, 8), ({"tile": 16, "latent_tile": 5}, 5), ({"latent_tile": 0}, 0)],
)
def test_tile_option_reaches_the_layout(pipe, official, monkeypatch, given, want) -> None:
    """``--tile`` (input px; x4 over the VAE's 8: half as many latent px) sets the latent tile, ``--latent-tile``
    overrides it, and without either the released script's 96 applies."""
    seen: list[int | None] = []
    layout = pipe.layout

    def spy(x, scale, tile):
        seen.append(tile)
        return layout(x, scale, tile)

    monkeypatch.setattr(pipe, "layout", spy)
    pipe(_lr(official), SeeSROptions(steps=1, colour_fix="none", process_size=0, **given))
    assert seen == [want]


def test_options_and_config_follow_the_released_script() -> None:
    spec = resolve("seesr")
    options = spec.options()
    assert (options.steps, options.guidance_scale, options.conditioning_scale) == (50, 5.5, 1.0)
    assert (options.latent_tile, options.tile_overlap, options.colour_fix) == (None, 4, "adain")  # 96 unless --tile
    assert (options.start_from_lr, options.start_timestep, options.process_size) == (True, 999, 512)
    assert options.added_prompt == "clean, high-resolution, 8k"
    assert spec.weight_paths == ("base", "checkpoint", "tagger") and spec.diffusion
    config = yaml.safe_load((REPO / "configs" / "seesr.yaml").read_text())
    assert config["method"] == "seesr"
    parsed = spec.parse(config["options"])
    assert parsed == spec.parse({k: v for k, v in config["options"].items() if k in ("base", "checkpoint", "tagger")})
    assert str(parsed.checkpoint).startswith("{weights}/")


def test_build_names_the_missing_folder() -> None:
    with pytest.raises(UnavailableError, match="--tagger"):
        resolve("seesr").build(SeeSROptions(base=BASE, checkpoint=CHECKPOINT))


def test_upscale_cli_and_bench_on_released_folders(tmp_path: Path, capsys) -> None:
    from semsr.cli import main

    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(images / "a.png")
    rc = main(
        [
            "upscale", "-i", str(images), "-o", str(tmp_path / "out"), "--method", "seesr",
            "--base", str(BASE), "--checkpoint", str(CHECKPOINT), "--tagger", str(TAGGER),
            "--steps", "2", "--process-size", "0",
        ]
    )  # fmt: skip
    capsys.readouterr()
    assert rc == 0
    assert Image.open(tmp_path / "out" / "a_out.png").size == (64, 64)
    rc = main(
        [
            "bench", "--methods", f"bicubic,seesr[base={BASE},checkpoint={CHECKPOINT},tagger={TAGGER},steps=1,"
            "process_size=0]", "--datasets", str(images), "--limit", "1", "--metrics", "psnr", "--no-isolate",
            "--json", str(tmp_path / "r.json"),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "seesr" in out
    assert json.loads((tmp_path / "r.json").read_text())


def test_web_form_lists_seesr_with_its_folders() -> None:
    from semsr.ui.catalog import catalogue, find

    entry = find(catalogue({"base": str(BASE), "checkpoint": str(CHECKPOINT), "tagger": str(TAGGER)}), "seesr")
    assert entry is not None
    text = json.dumps(entry)
    assert "process_size" in text and "start_timestep" in text and "tagger" in text


def test_python_api_runs_seesr(official) -> None:
    import semsr

    picture = Image.fromarray(official[0]["sample.lr"][0].permute(1, 2, 0).numpy())
    out = semsr.upscale(
        picture, "seesr", base=BASE, checkpoint=CHECKPOINT, tagger=TAGGER, steps=1, process_size=0, dtype="fp32"
    )
    assert out.size == (64, 64)


def test_guidance_at_most_one_runs_without_negative_branch(pipe) -> None:
    embeds = torch.zeros(1, 5, 512)
    cond, uncond = pipe.conditions(["a"], "b", 0.5, image_embeds=embeds)
    assert uncond is None and set(cond) == {"context", "image"}
    assert pipe.conditions(["a"], "b", 5.5, image_embeds=embeds)[1] is not None
