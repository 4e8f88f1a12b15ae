"""SeeSR's released models through semsr, against outputs of the official code on a tiny random configuration.

The fixture (tests/data/seesr-released, README there) holds tiny random weights in the released file layout and
the official code's outputs for fixed inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from semsr.core.errors import UnavailableError
from semsr.models.ram import RAMTagger, load_ram_tagger, ram_preprocess, tagging_state, tags_from_logits
from semsr.priors.tagger import TagsProvider

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models

DATA = Path(__file__).parent / "data" / "seesr-released"


def _npy(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(DATA / name))


def test_dape_tagger_matches_official() -> None:
    bundle = load_ram_tagger(DATA / "DAPE")
    assert [p.name for p in bundle.files] == ["ram_swin_large_14m.safetensors", "DAPE.safetensors"]
    image = _npy("ram_image.npy").float() / 255
    with torch.no_grad():
        embeds, logits = bundle.model(ram_preprocess(image, bundle.model.config.image_size))
    assert (embeds - _npy("ram_embeds.npy")).abs().max() <= 1e-4
    assert (logits - _npy("ram_logits.npy")).abs().max() <= 1e-4
    tags = tags_from_logits(logits, bundle.tags, bundle.thresholds)
    assert ", ".join(tags[0]) == json.loads((DATA / "ram_tags.json").read_text())["tags"]


def test_dape_renamed_tensor_fails_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "DAPE"
    shutil.copytree(DATA / "DAPE", folder)
    state = load_file(folder / "DAPE.safetensors")
    key = "visual_encoder.layers.1.blocks.0.mlp.fc1.weight"
    state[key.replace("fc1", "fc_1")] = state.pop(key)
    save_file(state, folder / "DAPE.safetensors")
    with pytest.raises(UnavailableError) as err:
        load_ram_tagger(folder)
    message = str(err.value)
    assert "\n" not in message and "fc_1" in message and "DAPE.safetensors" in message


def test_ram_full_size_every_released_key_has_a_home() -> None:
    shapes = json.loads((DATA / "ram_swin_l_384_keys.json").read_text())
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    kept = tagging_state(state)
    with torch.device("meta"):
        model = RAMTagger()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(kept) == set(own)
    assert all(tuple(kept[k].shape) == own[k] for k in own)
    # what has no module of its own: LoRA factors (merged), recomputed buffers, the captioning parts
    dropped = [k for k in set(state) - set(kept) if ".lora_" not in k and not k.endswith(("_index", "attn_mask"))]
    assert {k.split(".")[0] for k in dropped} == {"tag_encoder", "text_decoder"}


def test_tags_prior_accepts_a_ram_folder() -> None:
    provider = TagsProvider(DATA / "DAPE")
    result = provider(_npy("ram_image.npy").float() / 255)
    expected = json.loads((DATA / "ram_tags.json").read_text())["tags"].split(", ")
    assert sorted(result.value) == sorted(expected)


# ----------------------------------------------------------------------------- UNet / ControlNet

RELEASED = DATA / "seesr"


@pytest.fixture(scope="module")
def released():
    from semsr.models.seesr import load_released_seesr

    return load_released_seesr(RELEASED)


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "seesr_outputs.safetensors"))


def _residuals(official: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    n = len([k for k in official if k.startswith("controlnet.down.")])
    return [official[f"controlnet.down.{i}"] for i in range(n)], official["controlnet.mid"]


def test_released_seesr_layout_and_sources(released) -> None:
    from semsr.models.seesr import SeeSRControlNet, SeeSRUNet, is_released_seesr

    assert is_released_seesr(RELEASED) and not is_released_seesr(DATA)
    assert isinstance(released.unet, SeeSRUNet) and isinstance(released.controlnet, SeeSRControlNet)
    assert released.sources["unet"].endswith("unet/diffusion_pytorch_model.safetensors")
    assert released.sources["controlnet"].endswith("controlnet/diffusion_pytorch_model.safetensors")
    assert any(".image_attentions." in k for k in released.unet.state_dict())
    assert next(released.unet.parameters()).dtype == torch.float32  # the fp16 files are cast


def test_seesr_controlnet_residuals_match_official(released, official) -> None:
    o = official
    with torch.no_grad():
        down, mid = released.controlnet(
            o["input.sample"],
            o["input.timestep"],
            o["input.context"],
            o["input.hint"],
            image_encoder_hidden_states=o["input.image_context"],
            return_dict=False,
        )
    ref_down, ref_mid = _residuals(o)
    assert len(down) == len(ref_down)
    for d, r in zip(down, ref_down, strict=True):
        assert (d - r).abs().max() <= 1e-4
    assert (mid - ref_mid).abs().max() <= 1e-4


def test_seesr_unet_output_matches_official(released, official) -> None:
    o = official
    down, mid = _residuals(o)

    def unet(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return released.unet(
                o["input.sample"],
                o["input.timestep"],
                o["input.context"],
                image_encoder_hidden_states=image,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]

    eps = unet(o["input.image_context"])
    assert (eps - o["unet.sample"]).abs().max() <= 1e-4
    assert (unet(torch.zeros_like(o["input.image_context"])) - eps).abs().max() > 1e-3  # the image context acts


def test_seesr_unet_copy_runs_its_own_image_attentions(released, official) -> None:
    import copy

    o = official
    down, mid = _residuals(o)
    twin = copy.deepcopy(released.unet)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".image_attentions." in name:
                p.add_(0.1)
        kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid, "return_dict": False}
        args = (o["input.sample"], o["input.timestep"], o["input.context"])
        image = o["input.image_context"]
        eps = released.unet(*args, image_encoder_hidden_states=image, **kwargs)[0]
        eps_twin = twin(*args, image_encoder_hidden_states=image, **kwargs)[0]
    assert (eps - o["unet.sample"]).abs().max() <= 1e-4  # the original is untouched
    assert (eps_twin - eps).abs().max() > 1e-2  # the copy's hooks run the copy's image attentions


def test_seesr_unet_needs_the_image_context(released, official) -> None:
    from semsr.core.errors import SemsrError

    with pytest.raises(SemsrError, match="image_encoder_hidden_states"), torch.no_grad():
        released.unet(official["input.sample"], official["input.timestep"], official["input.context"])


def test_seesr_renamed_tensor_fails_with_one_line(tmp_path: Path) -> None:
    from semsr.models.seesr import load_released_seesr

    folder = tmp_path / "seesr"
    shutil.copytree(RELEASED, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    key = "up_blocks.1.image_attentions.2.proj_in.weight"
    tensors[key.replace("proj_in", "proj_inn")] = tensors.pop(key)
    save_file(tensors, str(path))
    with pytest.raises(UnavailableError) as err:
        load_released_seesr(folder)
    message = str(err.value)
    assert "\n" not in message
    assert "proj_inn" in message and key in message and "unet" in message and "safetensors" in message


def test_seesr_mis_shaped_tensor_is_named(tmp_path: Path) -> None:
    from semsr.models.seesr import load_released_seesr

    folder = tmp_path / "seesr"
    shutil.copytree(RELEASED, folder)
    path = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    key = "mid_block.image_attentions.0.transformer_blocks.0.attn2.to_k.weight"
    tensors[key] = tensors[key][:, :256].contiguous()
    save_file(tensors, str(path))
    with pytest.raises(UnavailableError, match="mis-shaped") as err:
        load_released_seesr(folder)
    assert key in str(err.value) and "controlnet" in str(err.value)


def test_seesr_pickled_weights_are_not_read(tmp_path: Path) -> None:
    from semsr.models.seesr import load_released_seesr

    folder = tmp_path / "seesr"
    shutil.copytree(RELEASED, folder)
    (folder / "unet" / WEIGHTS).rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnavailableError, match="only safetensors"):
        load_released_seesr(folder)


WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_seesr_full_size_every_released_key_has_a_home(tmp_path: Path) -> None:
    """SD-2-base-size SeeSR UNet and ControlNet built on ``meta`` from the released configs: the official code's
    full-size key set (names and shapes, recorded from the official modules) maps one to one onto semsr's."""
    from semsr.models.seesr import build_seesr_part

    recorded = json.loads((DATA / "released-sd2-keys.json").read_text())
    folder = tmp_path / "full"
    for part in ("unet", "controlnet"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(recorded[part]["config"]))
        model = build_seesr_part(folder, part, device="meta")
        own = {k: list(v.shape) for k, v in model.state_dict().items()}
        released_keys = recorded[part]["keys"]
        assert sorted(set(released_keys) - set(own))[:5] == []  # every released tensor has a home
        assert sorted(set(own) - set(released_keys))[:5] == []  # none left uninitialised
        assert {k: v for k, v in released_keys.items() if own[k] != v} == {}
        assert sum(".image_attentions." in k for k in own) == {"unet": 416, "controlnet": 182}[part]
