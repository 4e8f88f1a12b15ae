"""MMSR: Multimodal Latent Connector, null tokens, modality temperature, m-CFG, tiny pipeline and training."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import VQModel
from PIL import Image

from semsr.cli import main
from semsr.core.components import load_component, read_index
from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.mmlc import CAPTION, SPATIAL_MODALITIES, MultimodalLatentConnector, parse_temperatures
from semsr.fusion.mmsr_conditioning import ConcatConvIn, MMSRConditioning, cross_attention_paths
from semsr.methods import build
from semsr.methods.mmsr import MMSR, MMSROptions, guidance_negative, load_mmsr
from semsr.models.vq import (
    DepthVQ,
    DiffusersVQTokenizer,
    EdgeVQ,
    SegVQ,
    check_modality_tokenizer,
    load_tokenizer,
    prepare_maps,
)
from semsr.pipeline.guidance import cfg
from semsr.priors.depth_seg import label_palette
from semsr.priors.mmsr import ModalityTokens
from train_helpers import REPO, write_textures

W = 32  # tiny width (the tiny UNet's cross-attention width)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models


@pytest.fixture(scope="module")
def connector() -> MultimodalLatentConnector:
    torch.manual_seed(0)
    return MultimodalLatentConnector(width=W, text_width=W, heads=4, self_layers=1).eval()


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 77, W, generator=g)
    spatial = {m: torch.randn(batch, 256, 256, generator=g) for m in SPATIAL_MODALITIES}
    return text, spatial


# ----------------------------------------------------------------------------- connector


def test_token_counts_and_output_shape(connector):
    text, spatial = _inputs()
    assert connector.sequence_length == 3 * 256 + 77 == 845
    assert connector.sequence(text, spatial).shape == (2, 845, W)
    weights: list[torch.Tensor] = []
    with torch.no_grad():
        out = connector(text, spatial, attention_out=weights)
    assert out.shape == (2, 128, W)
    assert weights[0].shape == (2, 4, 128, 845)
    assert torch.allclose(weights[0].sum(-1), torch.ones(2, 4, 128), atol=1e-5)
    slots = connector.slots()
    assert [slots[m] for m in (CAPTION, *SPATIAL_MODALITIES)] == [
        slice(0, 77),
        slice(77, 333),
        slice(333, 589),
        slice(589, 845),
    ]
    two = MultimodalLatentConnector(width=W, text_width=W, heads=4, spatial=["edge", "depth"])
    assert two.sequence_length == 589 and two(text, {"edge": spatial["edge"]}).shape == (2, 128, W)


def test_missing_modality_uses_its_null_token(connector):
    text, spatial = _inputs()
    seq = connector.sequence(text, {"edge": spatial["edge"]})  # depth, seg missing
    slots = connector.slots()
    for m in ("depth", "seg"):
        assert torch.equal(seq[:, slots[m]], connector.null_tokens[m].expand(2, 256, -1))
    assert not torch.equal(seq[:, slots["edge"]], connector.null_tokens["edge"].expand(2, 256, -1))
    no_text = connector.sequence(None, spatial)
    assert torch.equal(no_text[:, slots[CAPTION]], connector.null_tokens[CAPTION].expand(2, 77, -1))
    # dropping a modality for all samples is the same as leaving it out
    drop = {"depth": torch.tensor([True, True]), "seg": torch.tensor([True, True])}
    with torch.no_grad():
        assert torch.allclose(
            connector(text, spatial, drop=drop), connector(text, {"edge": spatial["edge"]}), atol=1e-6
        )
        # a per-sample drop changes only that sample
        one = connector(text, spatial, drop={"edge": torch.tensor([True, False])})
        full = connector(text, spatial)
    assert not torch.allclose(one[0], full[0], atol=1e-4) and torch.allclose(one[1], full[1], atol=1e-6)
    # gradients reach the null tokens through the drop path
    out = connector(text, spatial, drop={"edge": torch.tensor([True, False])})
    out.square().mean().backward()
    assert connector.null_tokens["edge"].grad is not None and connector.null_tokens["edge"].grad.abs().sum() > 0
    connector.zero_grad(set_to_none=True)
    with pytest.raises(SemsrError, match="tokens"):
        connector.sequence(text, {"edge": torch.randn(2, 100, 256)})


def test_temperature_divides_the_modality_logits_by_default(connector):
    """The paper's temperature: softmax over s_ij / delta_m(j) (the old default added -ln delta instead)."""
    text, spatial = _inputs(batch=1)
    q = torch.randn(1, 3, W)
    kv = connector.sequence(text, spatial)
    attn = connector.cross_blocks[0].attn
    temps = {"depth": 0.5, "edge": 4.0}
    with torch.no_grad():
        _, got = attn(q, kv, None, return_weights=True, key_scale=connector.key_scale(temps))
        slots = connector.slots()
        # rebuild the scaled logits from the raw ones: s = q.k / sqrt(d) per head
        qh = attn._split(attn.to_q(q))
        kh = attn._split(attn.to_k(kv))
        raw = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
        scaled = raw.clone()
        for m, d in temps.items():
            scaled[..., slots[m]] = raw[..., slots[m]] / d
        assert torch.allclose(got, scaled.softmax(-1), atol=1e-5)
        # the connector uses this form unless told otherwise, and it differs from the bias form
        weights: list[torch.Tensor] = []
        connector(text, spatial, temps, attention_out=weights)
        by_bias: list[torch.Tensor] = []
        connector(text, spatial, temps, attention_out=by_bias, temperature_mode="bias")
    expect = connector.cross_blocks[0].attn(
        connector.cross_blocks[0].norm_q(connector.latents[None]),
        connector.cross_blocks[0].norm_kv(kv),
        None,
        return_weights=True,
        key_scale=connector.key_scale(temps),
    )[1]
    assert torch.allclose(weights[0], expect, atol=1e-5)
    assert not torch.allclose(weights[0], by_bias[0], atol=1e-3)
    with pytest.raises(SemsrError, match="temperature mode"):
        connector(text, spatial, temps, temperature_mode="x")


def test_bias_temperature_moves_attention_mass_monotonically(connector):
    text, spatial = _inputs()
    deltas = [0.4, 0.7, 1.0, 2.0, 5.0, 10.0]
    masses = []
    with torch.no_grad():
        for d in deltas:
            weights: list[torch.Tensor] = []
            connector(text, spatial, {"depth": d}, attention_out=weights, temperature_mode="bias")
            masses.append({k: float(v) for k, v in connector.modality_mass(weights[0]).items()})
    depth = [m["depth"] for m in masses]
    others = [m["edge"] + m["seg"] + m[CAPTION] for m in masses]
    assert all(a > b for a, b in zip(depth, depth[1:])), depth  # larger delta -> less mass
    assert all(a < b for a, b in zip(others, others[1:])), others
    # exact form for one query: mass(delta) = (A / delta) / (A / delta + 1 - A), A = mass at delta = 1
    q = torch.randn(1, 1, W)
    kv = connector.sequence(text[:1], {m: v[:1] for m, v in spatial.items()})
    attn = connector.cross_blocks[0].attn
    with torch.no_grad():
        _, w1 = attn(q, kv, None, return_weights=True)
        _, w4 = attn(q, kv, connector.key_bias({"depth": 4.0}), return_weights=True)
    s = connector.slots()["depth"]
    a = float(w1[..., s].sum(-1).mean())
    assert math.isclose(float(w4[..., s].sum(-1).mean()), (a / 4) / (a / 4 + 1 - a), rel_tol=1e-4)
    # delta = 1 is the untempered model; no temperatures -> no bias / scale at all
    assert connector.key_bias({"edge": 1.0}) is None and connector.key_scale({"edge": 1.0}) is None
    with torch.no_grad():
        assert torch.allclose(connector(text, spatial, {"edge": 1.0}), connector(text, spatial), atol=1e-6)


def test_parse_temperatures():
    assert parse_temperatures("depth=0.5,edge=2") == {"depth": 0.5, "edge": 2.0}
    assert parse_temperatures({"seg": 10}) == {"seg": 10.0}
    assert parse_temperatures(None) == {} and parse_temperatures("") == {}
    for bad, msg in (
        ("depth=0.3", "outside"),
        ("edge=11", "outside"),
        ("foo=1", "unknown modality"),
        ("depth", "NAME=VALUE"),
        ("depth=x", "not a number"),
    ):
        with pytest.raises(SemsrError, match=msg):
            parse_temperatures(bad)


def test_connector_is_a_component_and_round_trips(connector, tmp_path):
    connector.save_pretrained(tmp_path / "c")
    again = load_component(MultimodalLatentConnector, tmp_path / "c")  # the structure comes from config.json
    assert again.spatial == list(SPATIAL_MODALITIES) and again.sequence_length == 845
    text, spatial = _inputs()
    with torch.no_grad():
        assert torch.equal(again(text, spatial), connector(text, spatial))
    with pytest.raises(SemsrError, match="unknown spatial"):
        MultimodalLatentConnector(width=W, text_width=W, heads=4, spatial=["normals"])


# ----------------------------------------------------------------------------- guidance


def test_mcfg_formula_is_cfg_with_scale_one_plus_w():
    """(1 + w) eps(pos) - w eps(neg) == eps(neg) + (1 + w) (eps(pos) - eps(neg)) -- the guidance wrapper mmsr uses."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)

    def denoiser(x, t, cond):
        return lin(x) * cond["context"]

    x = torch.randn(2, 8)
    pos, neg = {"context": torch.randn(2, 8)}, {"context": torch.randn(2, 8)}
    with torch.no_grad():
        e_pos, e_neg = denoiser(x, 0, pos), denoiser(x, 0, neg)
        for w in (0.0, 2.0, 10.0, 14.0):
            got = cfg(denoiser, neg, 1.0 + w)(x, torch.tensor(0), pos)
            assert torch.allclose(got, (1 + w) * e_pos - w * e_neg, atol=1e-5)


def test_guidance_modes_build_their_negative_branch():
    assert guidance_negative("mcfg") == (True, True)
    assert guidance_negative("null-modality") == (True, False)
    assert guidance_negative("cfg") == (False, False)
    with pytest.raises(SemsrError):
        guidance_negative("x")


# ----------------------------------------------------------------------------- conv_in


def test_widened_conv_in_starts_as_the_pretrained_unet(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd" / "unet", local_files_only=True).eval()
    x, z, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.randn(1, 128, W)
    t = torch.tensor(500)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        cond = MMSRConditioning.new(unet, MultimodalLatentConnector(width=W, text_width=W, heads=4))
        assert cond.conv_in.weight.shape[1] == 8 and cond.conv_in.weight[:, 4:].abs().sum() == 0
        cond.attach(unet)
        out = unet(torch.cat([x, z], 1), t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-5)
    # a component: the structure comes from its config alone
    cond.conv_in.save_pretrained(tmp_path / "conv_in")
    again = load_component(ConcatConvIn, tmp_path / "conv_in")
    assert (again.in_channels, again.out_channels, again.latent_channels) == (8, cond.conv_in.out_channels, 4)
    assert torch.equal(again(torch.cat([x, z], 1)), cond.conv_in(torch.cat([x, z], 1)))


# ----------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def mmsr_method(tiny_models):
    return build("mmsr", {"base": tiny_models / "sd", "checkpoint": tiny_models / "mmsr"})


def test_tiny_checkpoint_layout(tiny_models):
    index = read_index(tiny_models / "mmsr", "mmsr")
    assert index.components == {
        "connector": ("semsr", "MultimodalLatentConnector"),
        "conv_in": ("semsr", "ConcatConvIn"),
        "unet_attention": ("semsr", "CrossAttentionLayers"),
        "vq_depth": ("semsr", "DepthVQ"),
        "vq_seg": ("semsr", "SegVQ"),
    }
    assert index.meta == {"modalities": ["edge", "depth", "seg"], "edge": "canny", "tokenizers": {}}
    cond, meta = load_mmsr(tiny_models / "mmsr")
    assert meta == index.meta and cond.unet_attention is not None and cond.latent_channels == 4


def test_tiny_pipeline_modalities_temperature_and_modes(mmsr_method, tiny_models):
    pipe = mmsr_method
    assert isinstance(pipe, MMSR) and (pipe.name, pipe.scale, pipe.tiles_itself) == ("mmsr", 4, True)
    assert pipe.default_modalities() == [CAPTION, "edge", "depth", "seg"]  # depth/ and seg/ found beside
    assert pipe.sources["depth"]["model"] == str(tiny_models / "depth")
    lr = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(3))
    run = MMSROptions.parse({"steps": 2, "seed": 0, "prompt": "a cat", "modalities": "caption,edge,depth,seg"})
    res = pipe(lr, run)
    out = res.images
    assert out.shape == (1, 3, 48, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert res.priors["modalities"] == (CAPTION, "edge", "depth", "seg")
    assert res.priors["prompt"] == "a cat" and res.priors["caption_source"] == "user"
    assert res.priors["edge"].shape == (1, 1, 48, 64) and res.priors["seg"].shape == (1, 3, 48, 64)
    assert "modality_temperature" not in res.priors and set(res.timings) >= {"priors", "encode", "denoise"}
    assert torch.equal(out, pipe(lr, run).images)
    hot = pipe(lr, run.replace(modality_temperature="edge=2"))
    assert hot.priors["modality_temperature"] == {"edge": 2.0} and hot.priors["temperature_mode"] == "divide"
    biased = pipe(lr, run.replace(modality_temperature="edge=2", temperature_mode="bias"))
    assert biased.priors["temperature_mode"] == "bias" and not torch.equal(biased.images, hot.images)
    # the per-modality option is the same knob and overrides the M=D form
    assert torch.equal(pipe(lr, run.replace(edge_temperature=2.0)).images, hot.images)
    assert torch.equal(pipe(lr, run.replace(modality_temperature="edge=5", edge_temperature=2.0)).images, hot.images)
    # all sliders at 1 (their default) is the untempered model and reports no temperature
    ones = pipe(lr, run.replace(**{f"{m}_temperature": 1.0 for m in (CAPTION, *SPATIAL_MODALITIES)}))
    assert torch.equal(ones.images, out) and "modality_temperature" not in ones.priors
    fewer = pipe(lr, run.replace(modalities="caption,edge"))
    assert not torch.equal(out, hot.images) and not torch.equal(out, fewer.images)
    assert "depth" not in fewer.priors
    # the three guidance modes differ in the negative branch only
    spatial, _ = pipe.modality_tokens(["edge"]).encode(torch.rand(1, 3, 48, 64))
    ctx = {}
    for mode in ("mcfg", "null-modality", "cfg"):
        ctx[mode] = pipe.contexts(["a cat"], ["blurry"], spatial, temperatures={}, mode=mode, need_negative=True)
    assert torch.equal(ctx["mcfg"][0], ctx["cfg"][0]) and torch.equal(ctx["mcfg"][0], ctx["null-modality"][0])
    assert not torch.allclose(ctx["mcfg"][1], ctx["null-modality"][1])
    assert not torch.allclose(ctx["null-modality"][1], ctx["cfg"][1])
    with torch.no_grad():
        expect_cfg = pipe.cond.context(pipe.encode_prompts([""]), {})
    assert torch.allclose(ctx["cfg"][1], expect_cfg, atol=1e-6)
    with pytest.raises(SemsrError, match="0.4"):
        run.replace(modality_temperature="depth=0.1")
    with pytest.raises(SemsrError, match="unknown entry"):
        run.replace(modalities="caption,normals")
    # an empty prompt asks the VLM (when one is given) for the caption; a given prompt is kept
    pipe.vlm = tiny_models / "vlm"
    try:
        caps = pipe.captions(lr, [""])
        assert caps[0] and pipe.captions(lr, ["a cat"]) == ["a cat"]
        suggestion = pipe.suggest_priors(lr)
        assert suggestion["prompt"] == suggestion["caption"] == caps[0]
        assert suggestion["modalities"] == (CAPTION, "edge", "depth", "seg")
    finally:
        pipe.vlm, pipe._captioner = None, None
    assert "prompt" not in pipe.suggest_priors(lr)


def test_options_schema():
    infos = MMSROptions.infos()
    assert (infos["steps"].default, infos["guidance_scale"].default, infos["guidance_scale"].min) == (50, 2.0, 0.0)
    assert infos["modalities"].kind == "strs" and infos["modalities"].choices == (CAPTION, *SPATIAL_MODALITIES)
    assert infos["modality_temperature"].kind == "floats" and infos["modality_temperature"].hidden
    for m in (CAPTION, *SPATIAL_MODALITIES):
        info = infos[f"{m}_temperature"]
        assert (info.widget, info.min, info.max, info.step, info.default) == ("slider", 0.4, 10.0, 0.1, 1.0)
    assert infos["guidance_mode"].choices == ("mcfg", "cfg", "null-modality")
    assert {
        n for n in ("checkpoint", "depth_model", "seg_model", "vq", "edge_detector", "vlm") if infos[n].stage == "build"
    } == {"checkpoint", "depth_model", "seg_model", "vq", "edge_detector", "vlm"}
    opts = MMSROptions.parse({"modality_temperature": "depth=0.5,edge=2", "seg_temperature": "3"})
    assert opts.temperatures() == {"depth": 0.5, "edge": 2.0, "seg": 3.0}


def test_cli_acceptance_command(tiny_models, tmp_path, capsys):
    arr = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "img.png")
    args = [
        "upscale",
        "-i",
        tmp_path / "img.png",
        "-o",
        tmp_path / "out",
        "--method",
        "mmsr",
        "--base",
        tiny_models / "sd",
        "--checkpoint",
        tiny_models / "mmsr",
        "--modalities",
        "caption,edge,depth,seg",
        "--modality-temperature",
        "edge=2",
        "--steps",
        "2",
        "--no-progress",
    ]
    assert main([str(a) for a in args]) == 0
    assert Image.open(tmp_path / "out" / "img_out.png").size == (96, 80)
    capsys.readouterr()
    # a requested modality without a model is a one-line error
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models / "mmsr", ckpt)
    rc = main(
        [
            str(a)
            for a in [
                "upscale",
                "-i",
                tmp_path / "img.png",
                "-o",
                tmp_path / "o2",
                "--method",
                "mmsr",
                "--base",
                tiny_models / "sd",
                "--checkpoint",
                ckpt,
                "--modalities",
                "caption,depth",
                "--steps",
                "1",
            ]
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "--depth-model" in err and "Traceback" not in err
    # without models beside the checkpoint: an error naming the flags, or an explicit opt-out
    common = ["upscale", "-i", tmp_path / "img.png", "-o", tmp_path / "o4", "--method", "mmsr", "--base"]
    common += [tiny_models / "sd", "--checkpoint", ckpt, "--steps", "1", "--no-progress"]
    assert main([str(a) for a in common]) != 0
    err = capsys.readouterr().err
    assert "--depth-model" in err and "--no-depth" in err and len(err.strip().splitlines()) == 1
    assert main([str(a) for a in [*common, "--no-depth", "--no-segmentation"]]) == 0
    assert (tmp_path / "o4" / "img_out.png").is_file()
    capsys.readouterr()
    rc = main(
        [
            str(a)
            for a in [
                "upscale",
                "-i",
                tmp_path / "img.png",
                "-o",
                tmp_path / "o3",
                "--method",
                "mmsr",
                "--base",
                tiny_models / "sd",
                "--checkpoint",
                tmp_path,
            ]
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "MMSR checkpoint" in err


# ----------------------------------------------------------------------------- training


def test_tiny_training_config_runs_through_semsr_train(tiny_models, tmp_path, capsys):
    hr = write_textures(tmp_path / "hr", count=4, size=(72, 72))
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "mmsr-tiny.yaml"),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        f"model.pretrained={tiny_models / 'sd'}",
        f"model.options.depth_model={tiny_models / 'depth'}",
        f"model.options.seg_model={tiny_models / 'seg'}",
        f"model.options.depth_vq={tiny_models / 'vq-depth'}",
        f"model.options.seg_vq={tiny_models / 'vq-seg'}",
        f"data.hr=[{hr}]",
        "data.val_count=1",
        "data.limit=0",
        "validation.every=2",
        "checkpoint.every=2",
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "train", "val"]
    assert all(math.isfinite(r["loss"]) for r in records if r["type"] == "train")
    final = tmp_path / "run" / "final"
    cond, meta = load_mmsr(final)
    assert meta["modalities"] == ["edge", "depth", "seg"] and cond.unet_attention is not None
    index = read_index(final, "mmsr")
    assert index.components["vq_depth"] == ("semsr", "DepthVQ") and index.components["vq_seg"] == ("semsr", "SegVQ")
    assert "vq_edge" not in index.components  # the shipped edge VQ is not copied
    assert cond.conv_in.weight[:, 4:].abs().sum() > 0  # the LR channels left zero and learned
    pipe = MMSR.from_pretrained(
        tiny_models / "sd", final, depth_model=tiny_models / "depth", seg_model=tiny_models / "seg"
    )
    assert pipe(torch.rand(1, 3, 16, 16), MMSROptions(steps=1)).images.shape == (1, 3, 64, 64)
    capsys.readouterr()


def test_null_drop_probability_in_training_draws(tiny_models):
    from semsr.train.config import config_from_dict
    from semsr.train.tasks import build_task

    cfg = config_from_dict(
        {
            "name": "t",
            "task": "mmsr",
            "seed": 0,
            "model": {
                "pretrained": str(tiny_models / "sd"),
                "options": {
                    "modalities": ["edge"],
                    "modality_drop_prob": 0.1,
                    "connector": {"heads": 4, "self_layers": 1},
                },
            },
            "data": {"hr": ["/nonexistent"], "crop_size": 64, "scale": 4, "batch_size": 2},
        }
    )
    task = build_task(cfg)
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    drops = task.draw_drops(gens)
    assert set(drops) == {CAPTION, "edge"}
    for v in drops.values():
        assert abs(float(v.float().mean()) - 0.1) < 0.025
    trainable = {n for n, p in task.trainable.named_parameters() if p.requires_grad}
    assert any(n.startswith("connector.") for n in trainable) and "conv_in.weight" in trainable
    assert not any(p.requires_grad for p in task.unet.parameters())


def test_cross_attention_training_exports_and_reloads(tiny_models, tmp_path):
    from semsr.train.config import config_from_dict
    from semsr.train.tasks import build_task

    cfg = config_from_dict(
        {
            "name": "t",
            "task": "mmsr",
            "seed": 0,
            "model": {
                "pretrained": str(tiny_models / "sd"),
                "options": {
                    "modalities": ["edge"],
                    "train_cross_attention": True,
                    "connector": {"num_latents": 16, "heads": 4, "self_layers": 1},
                },
            },
            "data": {"hr": ["/nonexistent"], "crop_size": 64, "scale": 4, "batch_size": 2},
        }
    )
    task = build_task(cfg)
    task.setup(torch.device("cpu"), torch.float32)
    model = task.trainable
    paths = cross_attention_paths(task.unet)
    layers = model.unet_attention.layers
    assert paths and sorted(model.unet_attention.paths) == sorted(paths)
    key = next(iter(layers))
    path = key.replace("__", ".")
    # fresh copies equal the UNet's layers
    assert torch.equal(layers[key].to_k.weight, task.unet.get_submodule(path).to_k.weight)
    g = torch.Generator().manual_seed(0)
    batch = {
        "hr": torch.rand(2, 3, 64, 64, generator=g),
        "lr": torch.rand(2, 3, 16, 16, generator=g),
        "prompt": ["a cat", "a dog"],
        "seed": torch.tensor([1, 2]),
    }
    out = task.compute(model, batch)
    torch.nn.functional.mse_loss(out["pred"], out["target"]).backward()
    assert layers[key].to_k.weight.grad.abs().sum() > 0
    assert task.unet.get_submodule(path) is layers[key]
    with torch.no_grad():
        layers[key].to_k.weight.add_(0.5)
    task.export(model, tmp_path / "ck")
    assert read_index(tmp_path / "ck", "mmsr").components["unet_attention"] == ("semsr", "CrossAttentionLayers")
    pipe = MMSR.from_pretrained(tiny_models / "sd", tmp_path / "ck")
    loaded = pipe.unet.get_submodule(path).to_k.weight
    assert torch.allclose(loaded, layers[key].to_k.weight)
    run = MMSROptions(modalities=("caption", "edge"), steps=1)
    assert pipe(torch.rand(1, 3, 16, 16), run).images.shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------- modality tokenizers


def _equal_grey_pair() -> tuple[int, int]:
    """Two label ids whose palette colours differ but have the same grey (channel mean) value."""
    palette = label_palette(16)
    grey = palette.mean(1)
    for i in range(1, 16):
        for j in range(i + 1, 16):
            if torch.isclose(grey[i], grey[j]) and not torch.equal(palette[i], palette[j]):
                return i, j
    raise AssertionError("no equal-grey pair in the palette")


def test_seg_tokens_keep_class_identity(tiny_models):
    """A seg map of two classes with equal grey value gives different tokens (the grey edge VQ merged them)."""
    i, j = _equal_grey_pair()
    palette = label_palette(16)
    maps = torch.stack([palette[k].view(3, 1, 1).expand(3, 48, 64) for k in (i, j)])
    assert torch.equal(prepare_maps(maps, 64, 1)[0], prepare_maps(maps, 64, 1)[1])  # grey: one class
    seg_vq = load_tokenizer(tiny_models / "vq-seg")
    assert isinstance(seg_vq, SegVQ) and seg_vq.in_channels == 3
    ids = seg_vq.encode(maps)
    assert not torch.equal(ids[0], ids[1])
    # a two-class map and the same map with the two classes swapped: one grey map, different tokens
    two = torch.zeros(2, 3, 48, 64)
    two[0, :, :, :32], two[0, :, :, 32:] = palette[i].view(3, 1, 1), palette[j].view(3, 1, 1)
    two[1, :, :, :32], two[1, :, :, 32:] = palette[j].view(3, 1, 1), palette[i].view(3, 1, 1)
    assert torch.equal(two[0].mean(0), two[1].mean(0))
    ids = seg_vq.encode(two)
    assert not torch.equal(ids[0], ids[1])
    # the pipeline tokenizes seg with the checkpoint's SegVQ; a grey tokenizer is refused for seg
    tokens = ModalityTokens(["seg"], {"seg": seg_vq}, {"seg": {"model": str(tiny_models / "seg")}}, use_cache=False)
    vectors, seg_maps = tokens.encode(torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(vectors["seg"], seg_vq.embed(seg_vq.encode(seg_maps["seg"])))
    grey_vqgan = VQModel(
        in_channels=1, out_channels=1, block_out_channels=(32,), norm_num_groups=8, vq_embed_dim=256, latent_channels=4
    )
    with pytest.raises(UnavailableError, match="classes of equal grey"):
        ModalityTokens(["seg"], {"seg": DiffusersVQTokenizer(grey_vqgan, "grey")}, use_cache=False)
    with pytest.raises(UnavailableError, match="EdgeVQ tokenizes edge maps, not seg"):
        check_modality_tokenizer("seg", load_tokenizer(None), "edge-vq")


def test_depth_has_its_own_tokenizer(mmsr_method, tiny_models, tmp_path):
    pipe = mmsr_method
    assert isinstance(pipe.tokenizers["depth"], DepthVQ) and isinstance(pipe.tokenizers["seg"], SegVQ)
    assert type(pipe.tokenizers["edge"]) is EdgeVQ and pipe.tokenizers["depth"] is not pipe.tokenizers["edge"]
    edge_codes = pipe.tokenizers["edge"].quantizer.codebook
    depth_codes = pipe.tokenizers["depth"].quantizer.codebook
    assert edge_codes.shape != depth_codes.shape or not torch.equal(edge_codes, depth_codes)
    hint = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    vectors, maps = pipe.modality_tokens(["depth"]).encode(hint)
    depth_vq = pipe.tokenizers["depth"]
    assert torch.equal(vectors["depth"], depth_vq.embed(depth_vq.encode(maps["depth"])))
    with pytest.raises(UnavailableError, match="tokenizes edge maps, not depth"):
        check_modality_tokenizer("depth", pipe.tokenizers["edge"], "x")
    # a checkpoint without a depth tokenizer: an error naming --depth-vq (never the edge codebook)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models / "mmsr", ckpt)
    index = json.loads((ckpt / "model_index.json").read_text())
    del index["vq_depth"]
    (ckpt / "model_index.json").write_text(json.dumps(index))
    models = {"depth_model": tiny_models / "depth", "seg_model": tiny_models / "seg"}
    bare = MMSR.from_pretrained(tiny_models / "sd", ckpt, **models)
    assert "depth" not in bare.tokenizers
    with pytest.raises(UnavailableError, match="--depth-vq"):
        bare(torch.rand(1, 3, 12, 16), MMSROptions(steps=1))
    given = MMSR.from_pretrained(tiny_models / "sd", ckpt, depth_vq=tiny_models / "vq-depth", **models)
    assert isinstance(given.tokenizers["depth"], DepthVQ)


def test_missing_depth_or_seg_model_is_an_error_or_an_explicit_opt_out(tiny_models, tmp_path):
    ckpt = tmp_path / "alone" / "mmsr"  # no depth/ or seg/ beside it
    shutil.copytree(tiny_models / "mmsr", ckpt)
    pipe = MMSR.from_pretrained(tiny_models / "sd", ckpt)
    lr = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    assert pipe.default_modalities() == [CAPTION, "edge", "depth", "seg"]  # not silently fewer
    with pytest.raises(UnavailableError, match="--depth-model PATH.*--no-depth"):
        pipe(lr, MMSROptions(steps=1))
    out = pipe(lr, MMSROptions(steps=1, no_depth=True, no_segmentation=True))
    assert out.priors["no_depth"] is True and out.priors["no_segmentation"] is True
    assert out.priors["modalities"] == (CAPTION, "edge") and "depth" not in out.priors
    with pytest.raises(SemsrError, match="--no-depth"):
        pipe(lr, MMSROptions(steps=1, no_depth=True, modalities=("caption", "depth")))
    full = MMSR.from_pretrained(tiny_models / "sd", tiny_models / "mmsr")
    assert "no_depth" not in full(lr, MMSROptions(steps=1, no_segmentation=True)).priors


def test_depth_and_seg_providers_run_on_the_method_device(tiny_models, monkeypatch):
    import semsr.priors.mmsr as priors_mmsr

    seen: dict[str, dict] = {}
    real = priors_mmsr.get_provider

    def spy(name, **opts):
        seen[name] = opts
        return real(name, **opts)

    monkeypatch.setattr(priors_mmsr, "get_provider", spy)
    pipe = MMSR.from_pretrained(tiny_models / "sd", tiny_models / "mmsr", device="cpu")
    tokens = pipe.modality_tokens(["edge", "depth", "seg"])
    assert seen["depth"]["device"] == seen["seg"]["device"] == str(pipe.device)
    assert tokens.providers["depth"].provider.device == pipe.device
    assert "device" not in seen["canny"]


def test_cross_attention_trains_by_default(tiny_models):
    """The paper does not say which UNet parts train; the cross-attention reads connector tokens, so it trains."""
    from semsr.train.config import config_from_dict
    from semsr.train.tasks import build_task

    base = {
        "name": "t",
        "task": "mmsr",
        "seed": 0,
        "model": {
            "pretrained": str(tiny_models / "sd"),
            "options": {"modalities": ["edge"], "connector": {"num_latents": 8, "heads": 4, "self_layers": 1}},
        },
        "data": {"hr": ["/nonexistent"], "crop_size": 64, "scale": 4, "batch_size": 2},
    }
    task = build_task(config_from_dict(base))
    trainable = {n for n, p in task.trainable.named_parameters() if p.requires_grad}
    assert task.trainable.unet_attention is not None
    assert any(n.startswith("unet_attention.") and ".to_k." in n for n in trainable)
    base["model"]["options"]["train_cross_attention"] = False
    assert build_task(config_from_dict(base)).trainable.unet_attention is None
    # a depth modality without a tokenizer is an error naming the option
    base["model"]["options"].update(modalities=["edge", "depth"], depth_model=str(tiny_models / "depth"))
    with pytest.raises(SemsrError, match="model.options.depth_vq"):
        build_task(config_from_dict(base))
    # continuing from a checkpoint reuses its tokenizers
    base["model"]["options"] = {
        "modalities": ["edge", "depth", "seg"],
        "depth_model": str(tiny_models / "depth"),
        "seg_model": str(tiny_models / "seg"),
        "init": str(tiny_models / "mmsr"),
    }
    task = build_task(config_from_dict(base))
    assert isinstance(task.tokenizers["depth"], DepthVQ) and isinstance(task.tokenizers["seg"], SegVQ)
    assert task.shipped == {"edge"}
