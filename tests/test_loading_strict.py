"""Strict loading: every loader of a weight file fails with one line naming the file and the first
mismatching keys, unless a partial load is asked for (then it loads and warns, listing the keys)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from semsr.core.components import load_checkpoint, save_checkpoint
from semsr.core.errors import UnavailableError
from semsr.core.loading import load_controlnet, load_sd, partial_loading
from semsr.models.rrdbnet import RRDBConfig, RRDBNet, rrdbnet_from_pth, save_pth
from semsr.pipeline.sd_controlnet import SDControlNetSR
from semsr.pipeline.text import MiniLMProjection
from semsr.testing.tiny import resolve_model_path

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA = "controlnet_sfa.0.attn.to_q.weight"  # like the fusion tensors an XPSR-layout ControlNet folder carries


def _edit(file: Path, *, add: str | None = None, drop: str | None = None) -> str | None:
    """Add a tensor named ``add`` and/or drop the tensor ``drop`` (a prefix) of a safetensors file; returns the
    dropped key."""
    tensors = load_file(str(file))
    dropped = None
    if drop is not None:
        dropped = next(k for k in sorted(tensors) if k.startswith(drop))
        del tensors[dropped]
    if add is not None:
        tensors[add] = torch.zeros(4, 4)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return dropped


@pytest.fixture()
def controlnet_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "controlnet"
    shutil.copytree(resolve_model_path("tiny://controlnet"), folder)
    return folder


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_controlnet_with_an_extra_tensor_fails_naming_it(controlnet_copy):
    _edit(controlnet_copy / "diffusion_pytorch_model.safetensors", add=EXTRA)
    with pytest.raises(UnavailableError) as err:
        load_controlnet(controlnet_copy)
    text = _one_line(err)
    assert "diffusion_pytorch_model.safetensors" in text and EXTRA in text and "1 unexpected tensor" in text
    assert "--partial-load" in text


def test_controlnet_with_a_missing_tensor_fails_naming_it(controlnet_copy):
    dropped = _edit(controlnet_copy / "diffusion_pytorch_model.safetensors", drop="controlnet_down_blocks.")
    with pytest.raises(UnavailableError) as err:
        load_controlnet(controlnet_copy)
    assert dropped in _one_line(err) and "1 missing tensor" in str(err.value)


def test_partial_load_loads_and_warns_listing_the_keys(controlnet_copy, caplog):
    dropped = _edit(controlnet_copy / "diffusion_pytorch_model.safetensors", add=EXTRA, drop="controlnet_mid_block.")
    with caplog.at_level(logging.WARNING, logger="semsr.loading"):
        net = load_controlnet(controlnet_copy, partial=True)
    assert net.__class__.__name__ == "ControlNetModel"
    assert EXTRA in caplog.text and dropped in caplog.text and "partial load" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="semsr.loading"), partial_loading(True):
        load_controlnet(controlnet_copy)
    assert EXTRA in caplog.text


def test_pipeline_and_api_follow_the_partial_load_option(controlnet_copy, caplog):
    import semsr

    _edit(controlnet_copy / "diffusion_pytorch_model.safetensors", add=EXTRA)
    sd = resolve_model_path("tiny://sd")
    with pytest.raises(UnavailableError, match=EXTRA):
        SDControlNetSR.from_pretrained(sd, controlnet_copy)
    with pytest.raises(UnavailableError, match=EXTRA):
        semsr.load("sd-controlnet", base=sd, controlnet=controlnet_copy)
    with caplog.at_level(logging.WARNING, logger="semsr.loading"):
        pipe = semsr.load("sd-controlnet", base=sd, controlnet=controlnet_copy, partial_load=True)
    assert pipe is not None and EXTRA in caplog.text


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_sd_folder_parts_are_strict(tmp_path, part):
    folder = tmp_path / "sd"
    shutil.copytree(resolve_model_path("tiny://sd"), folder)
    file = next((folder / part).glob("*.safetensors"))
    _edit(file, add=f"{part}.extra.weight")
    with pytest.raises(UnavailableError) as err:
        load_sd(folder)
    assert f"{part}.extra.weight" in _one_line(err) and file.name in str(err.value)
    load_sd(folder, partial=True)


def test_single_file_extra_and_missing_tensors_fail(tmp_path):
    file = tmp_path / "sd.safetensors"
    shutil.copy(resolve_model_path("tiny://sd.safetensors"), file)
    shutil.copytree(resolve_model_path("tiny://sd"), tmp_path / "sd")
    extra = "model.diffusion_model.input_blocks.99.0.weight"
    _edit(file, add=extra)
    with pytest.raises(UnavailableError) as err:
        load_sd(file, config=tmp_path / "sd")
    assert extra in _one_line(err) and "sd.safetensors" in str(err.value)
    dropped = _edit(file, drop="first_stage_model.decoder.")
    with pytest.raises(UnavailableError, match="1 missing tensor") as err:
        load_sd(file, config=tmp_path / "sd")
    assert dropped in str(err.value)


def test_single_file_ignores_schedule_buffers(tmp_path):
    file = tmp_path / "sd.safetensors"
    shutil.copy(resolve_model_path("tiny://sd.safetensors"), file)
    shutil.copytree(resolve_model_path("tiny://sd"), tmp_path / "sd")
    tensors = load_file(str(file))
    tensors["alphas_cumprod"] = torch.ones(1000)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors, str(file))
    load_sd(file, config=tmp_path / "sd")


def test_component_checkpoints_are_strict(tmp_path):
    save_checkpoint(tmp_path / "ckpt", "demo", {"proj": MiniLMProjection(8)})
    _edit(tmp_path / "ckpt" / "proj" / "diffusion_pytorch_model.safetensors", add="gate.weight")
    with pytest.raises(UnavailableError) as err:
        load_checkpoint(tmp_path / "ckpt", "demo")
    assert "gate.weight" in _one_line(err) and "MiniLMProjection" in str(err.value)
    parts, _ = load_checkpoint(tmp_path / "ckpt", "demo", partial=True)
    assert parts["proj"].weight.shape == (8, 384)
    _edit(tmp_path / "ckpt" / "proj" / "diffusion_pytorch_model.safetensors", drop="bias")
    with pytest.raises(UnavailableError, match="1 missing tensor .bias"):
        load_checkpoint(tmp_path / "ckpt", "demo", partial=False)


def test_restorer_pth_is_strict(tmp_path):
    model = RRDBNet(RRDBConfig(num_block=1, num_feat=8, num_grow_ch=4, scale=4))
    path = tmp_path / "net.pth"
    save_pth(model, path)
    state = torch.load(path, weights_only=True)
    state["params_ema"]["body.0.extra.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(UnavailableError) as err:
        rrdbnet_from_pth(path)
    assert "body.0.extra.weight" in _one_line(err) and "net.pth" in str(err.value)
    assert isinstance(rrdbnet_from_pth(path, partial=True), RRDBNet)


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {**text, "image_size": 32, "patch_size": 8}
    CLIPModel(
        CLIPConfig(text_config={**text, "vocab_size": 100}, vision_config=vision, projection_dim=8)
    ).save_pretrained(folder)
    return folder


def test_a_tower_loads_from_a_full_clip_folder_but_not_with_a_stray_tensor(tmp_path):
    from transformers import CLIPVisionModel

    from semsr.core.loading import load_transformers_model

    folder = _tiny_clip(tmp_path / "clip")
    load_transformers_model(CLIPVisionModel, folder)  # the text tower and projections are the other parts
    _edit(folder / "model.safetensors", add="vision_model.encoder.extra.weight")
    with pytest.raises(UnavailableError, match=r"encoder\.extra\.weight"):
        load_transformers_model(CLIPVisionModel, folder)


def test_a_mis_shaped_tensor_fails_naming_it(controlnet_copy):
    file = controlnet_copy / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    key = "controlnet_mid_block.weight"
    tensors[key] = torch.zeros(1, *tensors[key].shape[1:])
    save_file(tensors, str(file))
    with pytest.raises(UnavailableError) as err:
        load_controlnet(controlnet_copy)
    assert key in _one_line(err)


@pytest.mark.parametrize("name", ["depth", "seg", "tagger", "vlm"])
def test_prior_models_are_strict(name, tmp_path):
    from semsr.priors.depth_seg import DepthProvider, SegProvider
    from semsr.priors.tagger import TagsProvider
    from semsr.priors.vlm import load_vlm

    load = {"depth": DepthProvider, "seg": SegProvider, "tagger": TagsProvider, "vlm": lambda p: load_vlm(str(p))}[name]
    folder = tmp_path / name
    shutil.copytree(resolve_model_path(f"tiny://{name}"), folder)
    file = next(folder.glob("*.safetensors"))
    root = sorted(load_file(str(file)))[0].split(".")[0]
    _edit(file, add=f"{root}.stray.weight")
    with pytest.raises(UnavailableError) as err:
        load(folder)
    assert "stray.weight" in _one_line(err) and str(folder) in str(err.value)
