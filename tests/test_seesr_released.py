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
