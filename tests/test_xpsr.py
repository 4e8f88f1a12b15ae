"""XPSR: Semantic-Fusion Attention, conditional attention, Degradation-Free Constraint, the component
checkpoint, two-prompt CFG, the method contract (options in, SROutput out), prompt caching, running
without a VLM, the ``xpsr`` CLI preset and the tiny training config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models import Transformer2DModel
from torch.utils.data import default_collate

from semsr.cli import main
from semsr.core.components import load_component, read_index, save_checkpoint
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.method import Method, SuggestsPriors
from semsr.fusion.dfc import DFCHeads, dfc_loss, dfc_targets
from semsr.fusion.sfa import SFAFusion, controlnet_layers
from semsr.methods import build, resolve
from semsr.methods.xpsr import (
    XPSR_ADDED_POSITIVE,
    XPSR_LOW_NEGATIVE,
    XPSR_NEGATIVE,
    TwoPromptSR,
    XPSROptions,
    read_two_prompt_checkpoint,
)
from semsr.pipeline.guidance import cfg
from semsr.pipeline.latent_sr import make_hint
from semsr.pipeline.latent_tiling import untiled
from semsr.priors.prompts import TextPriors
from semsr.testing.tiny import tiny_controlnet, tiny_unet
from semsr.train import xpsr_prompts
from semsr.train.config import config_from_dict, load_config
from semsr.train.data import CropDataset, list_images, make_degrader
from semsr.train.losses import combine_losses
from semsr.train.tasks import build_task
from semsr.train.xpsr import XPSRTask, XPSRTrainable
from train_helpers import REPO, write_textures

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models


@pytest.fixture()
def nets():
    """A fresh tiny UNet + ControlNet (eval) pair."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = tiny_unet().eval()
        return unet, tiny_controlnet(unet).eval()


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 4, 8, 8, generator=g),
        "t": torch.tensor(400),
        "c_h": torch.randn(1, 77, 32, generator=g),
        "c_l": torch.randn(1, 77, 32, generator=g),
        "hint": torch.rand(1, 3, 64, 64, generator=g),
    }


def _plain(unet, controlnet, i):
    down, mid = controlnet(i["x"], i["t"], encoder_hidden_states=i["c_h"], controlnet_cond=i["hint"], return_dict=False)
    return unet(
        i["x"],
        i["t"],
        encoder_hidden_states=i["c_h"],
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]


# ----------------------------------------------------------------------------- SFA


def _residuals(fusion, unet, controlnet, i, c_h, c_l):
    """The SFA ControlNet's down and mid residuals for ``c_h``/``c_l`` (the UNet is not run)."""
    fusion.install(controlnet, unet)
    with fusion.conditions(low=c_l):
        down, mid = controlnet(i["x"], i["t"], encoder_hidden_states=c_h, controlnet_cond=i["hint"], return_dict=False)
    return torch.cat([d.flatten() for d in down] + [mid.flatten()])


def test_sfa_layers_are_whole_transformers_with_the_released_names(nets):
    """Per ControlNet transformer layer: attentions_lowlevel (a copy of the layer) and attentions_connect
    (cross-attention width = the layer's channels); the pretrained state dicts stay untouched."""
    unet, controlnet = nets
    state = {k: v.clone() for k, v in controlnet.state_dict().items()}
    fusion = SFAFusion.from_models(controlnet, unet)
    layers = controlnet_layers(controlnet)
    assert [(b, j) for b, j, _ in layers] == [("down_blocks.0", 0), ("down_blocks.0", 1), ("mid_block", 0)]
    for block, j, layer in layers:
        low = fusion.layer(block, "attentions_lowlevel", j)
        connect = fusion.layer(block, "attentions_connect", j)
        assert isinstance(low, Transformer2DModel) and isinstance(connect, Transformer2DModel)
        for k, v in layer.state_dict().items():
            assert torch.equal(low.state_dict()[k], v)
        assert low.proj_in.weight.data_ptr() != layer.proj_in.weight.data_ptr()  # copies, not shared
        channels = layer.config.in_channels
        assert connect.transformer_blocks[0].attn2.to_k.in_features == channels
        assert torch.equal(connect.proj_out.weight, layer.proj_out.weight)
    keys = list(fusion.state_dict())
    assert "down_blocks.0.attentions_lowlevel.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "mid_block.attentions_connect.0.proj_out.weight" in keys
    fusion.install(controlnet, unet)
    after = controlnet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_the_caption_reaches_the_controlnet_features_through_the_connect_residual(nets):
    """parallel SFA = T_c(T_h(x, c_h), T_l(x, c_l)) and T_c adds its input: with T_c's output projection at
    zero the features are exactly the high-level branch's (any c_l), and they follow the caption."""
    unet, controlnet = nets
    i = _inputs()
    other_caption = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(9))
    fusion = SFAFusion.from_models(controlnet, unet)
    with torch.no_grad():
        parallel = _residuals(fusion, unet, controlnet, i, i["c_h"], i["c_l"])
        assert not torch.allclose(parallel, _residuals(fusion, unet, controlnet, i, other_caption, i["c_l"]))
        for block, j, _ in controlnet_layers(controlnet):
            connect = fusion.layer(block, "attentions_connect", j)
            connect.proj_out.weight.zero_()
            connect.proj_out.bias.zero_()
        kept = _residuals(fusion, unet, controlnet, i, i["c_h"], i["c_l"])
        fusion.mode = "high"
        high = _residuals(fusion, unet, controlnet, i, i["c_h"], torch.zeros_like(i["c_l"]))
        assert torch.equal(kept, high)
        fusion.mode = "parallel"
        assert not torch.allclose(kept, _residuals(fusion, unet, controlnet, i, other_caption, i["c_l"]))


def test_sfa_modes_at_initialisation(nets):
    """'high' is the plain ControlNet + UNet for any c_l; 'low' with c_l == c_h too (T_l copies T_h);
    'serial' and 'parallel' differ from it and depend on c_l."""
    unet, controlnet = nets
    i = _inputs()
    with torch.no_grad():
        plain = _plain(unet, controlnet, i)
        fusion = SFAFusion.from_models(controlnet, unet, mode="high")
        fusion.install(controlnet, unet)

        def run(c_l):
            return fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], c_l, i["hint"])

        assert torch.equal(run(i["c_l"]), plain)
        fusion.mode = "low"
        assert torch.equal(run(i["c_h"]), plain) and not torch.allclose(run(i["c_l"]), plain)
        for mode in ("serial", "parallel"):
            fusion.mode = mode
            a, b = run(i["c_l"]), run(i["c_h"])
            assert a.shape == plain.shape and not torch.allclose(a, b) and not torch.allclose(a, plain)
        with pytest.raises(SemsrError, match="low-level prompt"):  # the ControlNet alone lacks c_l
            controlnet(i["x"], i["t"], encoder_hidden_states=i["c_h"], controlnet_cond=i["hint"], return_dict=False)


def test_conditional_attention_sits_in_the_up_blocks_only_and_attends_to_the_skip_residual(nets):
    unet, controlnet = nets
    i = _inputs(1)
    fusion = SFAFusion.from_models(controlnet, unet, mode="high")
    unet_keys = [k for k in fusion.state_dict() if ".pixel_attentions." in k]
    assert unet_keys and all(k.startswith("up_blocks.") for k in unet_keys)
    assert not any(k.startswith("up_blocks.") and ".pixel_attentions." not in k for k in fusion.state_dict())
    # one per up-block layer, attending to the residual of that layer's skip connection
    layers = [(e["block"], e["index"], e["residual"]) for e in fusion.config.unet_layers]
    assert layers == [(f"up_blocks.{b}", j, 5 - 3 * b - j) for b in range(2) for j in range(3)]
    assert fusion.layer("up_blocks.0", "pixel_attentions", 0).transformer_blocks[0].attn2.to_k.in_features == 64
    assert fusion.layer("up_blocks.1", "pixel_attentions", 2).transformer_blocks[0].attn2.to_k.in_features == 32
    with torch.no_grad():
        plain = _plain(unet, controlnet, i)
        fusion.install(controlnet, unet)

        def run():
            return fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])

        assert torch.equal(run(), plain)  # output projections start at zero
        for block in ("up_blocks.0", "up_blocks.1"):  # each up-block's layers change the output
            for j in range(3):
                torch.nn.init.normal_(fusion.layer(block, "pixel_attentions", j).proj_out.weight, std=0.1)
            moved = run()
            assert not torch.allclose(moved, plain)
            plain = moved
        # outside controlnet_unet_forward (no residuals given) the UNet is plain again
        fresh = tiny_unet().eval()
        fresh.load_state_dict(unet.state_dict())
        args = (i["x"], i["t"])
        assert torch.equal(
            unet(*args, encoder_hidden_states=i["c_h"], return_dict=False)[0],
            fresh(*args, encoder_hidden_states=i["c_h"], return_dict=False)[0],
        )


def test_reinstalling_replaces_the_hooks(nets):
    unet, controlnet = nets
    i = _inputs(2)
    first = SFAFusion.from_models(controlnet, unet)
    second = SFAFusion.from_models(controlnet, unet, mode="high")
    first.install(controlnet, unet)
    second.install(controlnet, unet)
    assert sum(len(m._forward_hooks) for m in controlnet.modules()) == len(controlnet_layers(controlnet))
    assert sum(len(m._forward_hooks) for m in unet.modules()) == len(second.config.unet_layers)
    with torch.no_grad():
        out = second.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])
        assert torch.equal(out, _plain(unet, controlnet, i))  # only the 'high' SFA acts
    no_unet_part = SFAFusion.from_models(controlnet)
    no_unet_part.install(controlnet, unet)  # removes the earlier conditional attention from the UNet
    assert not no_unet_part.conditional_attention and sum(len(m._forward_hooks) for m in unet.modules()) == 0


@pytest.mark.parametrize(
    ("mode", "frozen"),
    [("parallel", set()), ("serial", {"attentions_connect"}), ("high", {"attentions_connect", "attentions_lowlevel"})],
)
def test_training_freezes_the_layers_its_sfa_mode_does_not_run(nets, mode, frozen):
    """No trainable parameter without a gradient (DDP): a mode's unused layers stop training."""
    unet, controlnet = nets
    fusion = SFAFusion.from_models(controlnet, unet, mode=mode)
    fusion.freeze_unused()
    for name, param in fusion.named_parameters():
        kind = (
            name.split(".")[2] if name.startswith("down_blocks") or name.startswith("up_blocks") else name.split(".")[1]
        )
        assert param.requires_grad == (kind not in frozen), name
    fusion.install(controlnet, unet)
    i = _inputs(3)
    fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"]).sum().backward()
    assert all(p.grad is not None for p in fusion.parameters() if p.requires_grad)


def test_making_an_sfa_leaves_the_global_rng_alone(nets):
    unet, controlnet = nets
    torch.manual_seed(7)
    a = SFAFusion.from_models(controlnet, unet)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)
    torch.manual_seed(7)
    b = SFAFusion.from_models(controlnet, unet)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_sfa_and_dfc_components_rebuild_from_their_folder_alone(nets, tmp_path):
    unet, controlnet = nets
    fusion = SFAFusion.from_models(controlnet, unet, mode="serial")
    heads = DFCHeads.from_controlnet(controlnet, "released")
    with torch.no_grad():
        for p in list(fusion.parameters()) + list(heads.parameters()):
            p.add_(0.01)
    fusion.save_pretrained(tmp_path / "sfa")
    heads.save_pretrained(tmp_path / "dfc")
    cfg_json = json.loads((tmp_path / "sfa" / "config.json").read_text())
    assert cfg_json["_class_name"] == "SFAFusion" and cfg_json["mode"] == "serial"
    back = load_component(SFAFusion, tmp_path / "sfa")  # no ControlNet or UNet needed
    assert back.mode == "serial" and list(back.state_dict()) == list(fusion.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fusion.state_dict().values(), back.state_dict().values(), strict=True))
    dfc = load_component(DFCHeads, tmp_path / "dfc")
    assert dfc.latent_index == heads.latent_index and dfc.pixel_index == heads.pixel_index
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), dfc.state_dict().values(), strict=True))
    back.mode = "high"  # a mode change is part of the config that is saved
    assert back.config.mode == "high"
    with pytest.raises(SemsrError, match="unknown SFA mode"):
        back.mode = "sideways"
    (tmp_path / "sfa" / "config.json").write_text(json.dumps({"_class_name": "SFAFusion", "nope": 1}))
    with pytest.raises(UnavailableError):
        load_component(SFAFusion, tmp_path / "sfa")


def test_sfa_refuses_a_controlnet_it_was_not_made_for(nets):
    unet, controlnet = nets
    fusion = SFAFusion.from_models(controlnet, unet)
    other = ControlNetModel.from_unet(
        UNet2DConditionModel(**{**dict(unet.config), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")})
    )
    with pytest.raises(SemsrError, match="do not fit this ControlNet"):
        fusion.install(other)


def test_two_prompt_checkpoint_layout(nets, tmp_path, tiny_models):
    unet, controlnet = nets
    fusion = SFAFusion.from_models(controlnet, unet)
    save_checkpoint(
        tmp_path / "ck",
        "dalpsr",
        {"controlnet": controlnet, "sfa": fusion, "dfc": DFCHeads.from_controlnet(controlnet)},
    )
    index = read_index(tmp_path / "ck")
    assert index.recipe == "dalpsr" and index.components == {
        "controlnet": ("diffusers", "ControlNetModel"),
        "sfa": ("semsr", "SFAFusion"),
        "dfc": ("semsr", "DFCHeads"),
    }
    parts = read_two_prompt_checkpoint(tmp_path / "ck")  # xpsr and dalpsr share the layout
    assert sorted(parts) == ["controlnet", "sfa"] and parts["sfa"].mode == "parallel"
    assert sorted(read_two_prompt_checkpoint(tmp_path / "ck", names=None)) == ["controlnet", "dfc", "sfa"]
    save_checkpoint(tmp_path / "other", "mmsr", {"controlnet": controlnet})
    with pytest.raises(UnavailableError, match="not an XPSR/DaLPSR one"):
        read_two_prompt_checkpoint(tmp_path / "other")
    with pytest.raises(UnavailableError, match="checkpoint folder"):
        read_two_prompt_checkpoint(tmp_path)
    assert read_index(tiny_models / "xpsr").recipe == "xpsr" and read_index(tiny_models / "dalpsr").recipe == "dalpsr"


# ----------------------------------------------------------------------------- DFC


def _dfc_step(heads, controlnet, inputs):
    with heads.capture(controlnet) as feats:
        controlnet(
            inputs["x"],
            torch.tensor([10, 900]),
            encoder_hidden_states=inputs["ctx"],
            controlnet_cond=inputs["hint"],
            return_dict=False,
        )
    preds = heads(feats)
    return dfc_loss(preds, dfc_targets(preds, inputs["hr_latent"], inputs["hr"])), preds, feats


def _dfc_inputs():
    g = torch.Generator().manual_seed(3)
    return {
        "hr": torch.rand(2, 3, 64, 64, generator=g),
        "hr_latent": torch.randn(2, 4, 8, 8, generator=g),
        "hint": torch.rand(2, 3, 64, 64, generator=g),
        "x": torch.randn(2, 4, 8, 8, generator=g),
        "ctx": torch.randn(2, 77, 32, generator=g),
    }


def test_dfc_heads_paper_default_and_released_set(nets):
    """Paper (default): the last residual of the (up to) three lowest-resolution levels, no mid head;
    released: every residual and the mid block. Pixel heads on the 3 stride-2 hint stages either way.
    Heads read the zero-convolution outputs, under the released key names."""
    unet, controlnet = nets
    paper = DFCHeads.from_controlnet(controlnet)
    assert paper.latent_index == [2, 5] and paper.conv_degradation_mid is None  # the tiny net has two levels
    released = DFCHeads.from_controlnet(controlnet, "released")
    assert released.latent_index == list(range(6)) and released.conv_degradation_mid is not None
    assert set(released.state_dict()) >= {
        "conv_degradation.0.0.weight",
        "conv_degradation_mid.0.weight",
        "controlnet_cond_embedding.to_rgbs.2.weight",
    }
    with pytest.raises(SemsrError, match="unknown DFC latent heads"):
        DFCHeads.from_controlnet(controlnet, "all")
    inputs = _dfc_inputs()
    with torch.no_grad():
        _, preds, feats = _dfc_step(released, controlnet, inputs)
        zero_conv_out = controlnet.controlnet_down_blocks[5]
        down, _ = controlnet(
            inputs["x"],
            torch.tensor([10, 900]),
            encoder_hidden_states=inputs["ctx"],
            controlnet_cond=inputs["hint"],
            return_dict=False,
        )
    assert zero_conv_out.out_channels == feats["latent/5"].shape[1] and torch.equal(feats["latent/5"], down[5])
    sizes = {k: tuple(v.shape[1:]) for k, v in preds.items()}
    assert sizes["latent/mid"] == (4, 4, 4) and sizes["latent/0"] == (4, 8, 8)
    assert sorted(v for k, v in sizes.items() if k.startswith("pixel/")) == [(3, 8, 8), (3, 16, 16), (3, 32, 32)]


def test_dfc_targets_are_bilinear_and_in_minus_one_to_one():
    hr = torch.rand(1, 3, 16, 16)
    latent = torch.randn(1, 4, 8, 8)
    preds = {"pixel/0": torch.zeros(1, 3, 8, 8), "latent/mid": torch.zeros(1, 4, 4, 4), "latent/0": latent}
    targets = dfc_targets(preds, latent, hr)
    want = torch.nn.functional.interpolate(hr * 2 - 1, size=(8, 8), mode="bilinear")
    assert torch.equal(targets["pixel/0"], want) and float(targets["pixel/0"].min()) < 0
    assert torch.equal(targets["latent/mid"], torch.nn.functional.interpolate(latent, size=(4, 4), mode="bilinear"))
    assert torch.equal(targets["latent/0"], latent)


def test_dfc_loss_decreases_on_an_overfit_batch(nets):
    unet, controlnet = nets
    controlnet.train()
    heads = DFCHeads.from_controlnet(controlnet)
    inputs = _dfc_inputs()
    loss0, _, _ = _dfc_step(heads, controlnet, inputs)
    opt = torch.optim.Adam(list(heads.parameters()) + list(controlnet.parameters()), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        loss, _, _ = _dfc_step(heads, controlnet, inputs)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * float(loss0.detach())
    # hooks exist only inside capture()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in controlnet.modules())


def test_dfc_is_a_registered_loss_term():
    pred = {"latent/mid": torch.zeros(1, 4, 2, 2), "pixel/0": torch.ones(1, 3, 4, 4)}
    outputs = {
        "pred": torch.zeros(1, 4, 2, 2),
        "target": torch.ones(1, 4, 2, 2),
        "dfc_pred": pred,
        "dfc_target": dfc_targets(pred, torch.ones(1, 4, 4, 4), torch.zeros(1, 3, 8, 8)),
    }
    total, parts = combine_losses({"eps_mse": 1.0, "dfc": 0.05}, outputs)
    assert parts == {"eps_mse": 1.0, "dfc": 3.0}  # |0 - 1| + |1 - (-1)|
    assert float(total) == pytest.approx(1.15)


# ----------------------------------------------------------------------------- pipeline / method


def test_training_runs_the_inference_forward(nets):
    """XPSRTrainable's prediction is SFAFusion.controlnet_unet_forward, with the DFC features captured."""
    unet, controlnet = nets
    fusion = SFAFusion.from_models(controlnet, unet)
    with torch.no_grad():
        for name, param in fusion.named_parameters():
            if ".pixel_attentions." in name and ".proj_out." in name:
                torch.nn.init.normal_(param, std=0.05)
    model = XPSRTrainable(controlnet, fusion, DFCHeads.from_controlnet(controlnet))
    i = _inputs(2)
    with torch.no_grad():
        pred, heads = model(i["x"], i["t"], i["c_h"], i["c_l"], i["hint"], unet)
        direct = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])
    assert torch.equal(pred, direct) and {k.split("/")[0] for k in heads} == {"latent", "pixel"}


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> TwoPromptSR:
    return TwoPromptSR.from_checkpoint(tiny_models / "sd", tiny_models / "xpsr")


def test_cfg_uses_both_negatives(pipe):
    """eps = eps(neg_h, neg_l) + s * [eps(c_h, c_l) - eps(neg_h, neg_l)], one batched forward."""
    cond, uncond = pipe.conditions(
        ["a cat"], XPSR_NEGATIVE, 4.5, low_prompts=["heavy noise"], low_negative_prompts=[XPSR_LOW_NEGATIVE]
    )
    enc = pipe.encode_prompts
    assert torch.equal(cond["context"], enc(["a cat"])) and torch.equal(cond["low"], enc(["heavy noise"]))
    assert torch.equal(uncond["context"], enc([XPSR_NEGATIVE])) and torch.equal(uncond["low"], enc([XPSR_LOW_NEGATIVE]))
    hint = torch.rand(1, 3, 64, 64)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    out = cfg(untiled(pipe.spatial_denoiser(hint)), uncond, 4.5)(x, t, cond)
    with torch.no_grad():
        eps = {
            k: pipe.sfa.controlnet_unet_forward(pipe.unet, pipe.controlnet, x, t, c["context"], c["low"], hint)
            for k, c in (("c", cond), ("u", uncond))
        }
    torch.testing.assert_close(out, eps["u"] + 4.5 * (eps["c"] - eps["u"]), rtol=1e-4, atol=1e-5)
    assert pipe.conditions(["a"], XPSR_NEGATIVE, 1.0, low_prompts=["b"])[1] is None  # no CFG at scale 1
    with pytest.raises(SemsrError, match="low-level prompts"):
        pipe.conditions(["a"], None, 1.0)
    with pytest.raises(SemsrError, match="2 low-level prompts for 1 images"):
        pipe.conditions(["a"], None, 1.0, low_prompts=["b", "c"])


def test_pipeline_without_priors_takes_its_prompts(pipe):
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    out = pipe(lr, XPSROptions(steps=1), prompts=["a cat"], low_prompts=["heavy noise"])
    assert out.images.shape == (1, 3, 64, 64)
    assert out.priors == {
        "prompt": "a cat",
        "negative_prompt": XPSR_NEGATIVE,
        "low_prompt": "heavy noise",
        "low_negative_prompt": XPSR_LOW_NEGATIVE,
    }
    assert {"priors", "encode", "denoise", "decode", "steps"} <= set(out.timings)
    with pytest.raises(SemsrError, match="no text priors"):
        pipe(lr, XPSROptions(steps=1), prompts=["a cat"])


def _xpsr(tiny_models: Path, **build_opts: str) -> TwoPromptSR:
    return build("xpsr", {"base": str(tiny_models / "sd"), "checkpoint": str(tiny_models / "xpsr"), **build_opts})


def test_xpsr_options_carry_the_recipe_defaults():
    spec = resolve("xpsr")
    opts = spec.parse({})
    assert isinstance(opts, XPSROptions) and spec.options is XPSROptions and spec.suggests_priors
    assert (opts.negative_prompt, opts.added_prompt, opts.preset, opts.low_negative_prompt) == (
        None,
        None,
        None,
        XPSR_LOW_NEGATIVE,
    )  # the preset's: semsr's for a semsr checkpoint
    assert opts.resolved_defaults() == {
        "preset": "semsr",
        "negative_prompt": XPSR_NEGATIVE,
        "added_prompt": XPSR_ADDED_POSITIVE,
    }
    assert (opts.steps, opts.guidance_scale, opts.scheduler, opts.colour_fix, opts.start_from_lr) == (
        20,
        4.5,
        "ddpm",
        "adain",
        True,
    )
    assert opts.low_prompt is None and opts.priors_in_prompt is False and XPSROptions.infos()["priors_in_prompt"].hidden
    assert set(XPSROptions.names("build")) >= {"base", "checkpoint", "vlm", "irpad", "sfa_mode"}
    assert set(XPSROptions.names("run")) >= {"low_prompt", "low_negative_prompt", "added_prompt", "priors_in_prompt"}
    with pytest.raises(Exception, match="did you mean low_prompt"):
        spec.parse({"low_promt": "x"})
    with pytest.raises(Exception, match="sfa_mode"):
        spec.parse({"sfa_mode": "sideways"})


def test_xpsr_without_a_vlm_is_an_error_naming_the_options(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMSR_WEIGHTS", str(tmp_path / "no-weights"))
    with pytest.raises(UnavailableError, match="--vlm PATH.*--no-vlm") as err:
        _xpsr(tiny_models, irpad=str(tiny_models / "irpad-untrained"))
    assert "\n" not in str(err.value)
    with pytest.raises(UnavailableError, match="exclude each other"):
        _xpsr(tiny_models, vlm=str(tiny_models / "vlm"), no_vlm=True)
    assert resolve("xpsr").options.infos()["no_vlm"].help == "no VLM: use my prompt (+ IRPAD)"


def test_method_caches_prompts_and_runs_with_no_vlm(tiny_models, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / "cache"))  # other tests may have cached this image's priors
    method = _xpsr(tiny_models, irpad=str(tiny_models / "irpad-untrained"), no_vlm=True)
    assert isinstance(method, Method) and isinstance(method, SuggestsPriors) and method.tiles_itself
    assert (method.name, method.scale) == ("xpsr", 4)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    opts = resolve("xpsr").parse({"prompt": "a red bird", "steps": 1})
    out = method(lr, opts)
    img = out.images
    assert img.shape == (1, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
    again = method(lr, opts)
    assert torch.equal(again.images, img) and again.priors == out.priors
    assert capsys.readouterr().err == ""  # nothing silent to say: the opt-out was explicit
    p = out.priors
    assert p["no_vlm"] is True
    assert p["prompt"] == f"a red bird, {XPSR_ADDED_POSITIVE}" and p["user_prompt"] == "a red bird"
    assert p["semantic_prompt"] == "a red bird" and p["sources"] == {"high": "user", "low": "irpad"}
    assert p["degradation"] == p["low_prompt"] and p["low_negative_prompt"] == XPSR_LOW_NEGATIVE
    irpad = method.priors.irpad
    assert irpad.misses == 1 and irpad.hits >= 1  # the IRPAD description is computed once per image
    # the user prompt is an argument of each call: nothing of it stays in the method
    suggestion = method.suggest_priors(lr)
    assert suggestion["prompt"] == "" and suggestion["sources"] == {"high": "none", "low": "irpad"}
    assert suggestion["low_prompt"] == p["low_prompt"] and suggestion["negative_prompt"] == XPSR_NEGATIVE
    other = method(lr, resolve("xpsr").parse({"prompt": "a blue fish", "low_prompt": "heavy noise", "steps": 1}))
    assert (
        other.priors["prompt"] == f"a blue fish, {XPSR_ADDED_POSITIVE}" and other.priors["low_prompt"] == "heavy noise"
    )
    assert "degradation" not in other.priors and other.priors["sources"] == {"high": "user"}
    assert not torch.equal(other.images, img)


def test_vlm_prompts_are_cached(tiny_models):
    priors = TextPriors(vlm=tiny_models / "vlm", low_source="vlm", max_new_tokens=4)
    img = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    first = priors(img)
    second = priors(img)
    assert first == second and first.sources == {"high": "vlm", "low": "vlm"}
    assert (priors.caption.misses, priors.caption.hits) == (1, 1)
    assert (priors.quality.misses, priors.quality.hits) == (1, 1)


def test_cli_xpsr_end_to_end(tiny_models, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy()).save(img)
    rc = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(tmp_path / "out"),
            "--method",
            "xpsr",
            "--base",
            str(tiny_models / "sd"),
            "--checkpoint",
            str(tiny_models / "xpsr"),
            "--vlm",
            str(tiny_models / "vlm"),
            "--steps",
            "2",
            "--sfa-mode",
            "serial",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "in_out.png").size == (96, 80)
    base = ["upscale", "-i", str(img), "--method", "xpsr", "--base", str(tiny_models / "sd"), "--steps", "1"]
    rc = main([*base, "-o", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc != 0 and "--checkpoint" in err and "Traceback" not in err


def test_cli_xpsr_without_vlm_exits_non_zero_with_one_line(tiny_models, tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("SEMSR_WEIGHTS", str(tmp_path / "no-weights"))
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(img)
    base = ["upscale", "-i", str(img), "--method", "xpsr", "--base", str(tiny_models / "sd")]
    base += ["--checkpoint", str(tiny_models / "xpsr"), "--irpad", str(tiny_models / "irpad-untrained")]
    base += ["--steps", "1", "--no-progress"]
    rc = main([*base, "-o", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and "--vlm" in lines[0] and "--no-vlm" in lines[0], err
    assert not (tmp_path / "o1" / "in_out.png").exists()
    assert main([*base, "-o", str(tmp_path / "o2"), "--no-vlm"]) == 0, capsys.readouterr().err
    assert (tmp_path / "o2" / "in_out.png").exists()


def test_tiny_xpsr_config_trains_through_semsr_train(tiny_models, tmp_path, capsys):
    hr = write_textures(tmp_path / "hr", count=4, size=(72, 72))
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "xpsr-tiny.yaml"),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        f"model.pretrained={tiny_models / 'sd'}",
        f"model.options.vlm={tiny_models / 'vlm'}",
        "model.options.max_new_tokens=4",
        f"data.hr=[{hr}]",
        "data.val_count=1",
        "data.limit=0",
        "validation.every=2",
        "checkpoint.every=2",
    ]
    assert main(args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and set(train[0]["terms"]) == {"eps_mse", "dfc"}
    final = tmp_path / "run" / "final"
    index = read_index(final)
    assert index.recipe == "xpsr" and set(index.components) == {"controlnet", "sfa", "dfc"}
    pipe = TwoPromptSR.from_checkpoint(tiny_models / "sd", final)
    assert pipe.sfa.mode == "parallel" and pipe.sfa.conditional_attention
    out = pipe(torch.rand(1, 3, 16, 16), XPSROptions(steps=1), prompts=["x"], low_prompts=["y"])
    assert out.images.shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------- training prompts


def _prompt_file(path: Path, names: list[str], low_gt: bool = True) -> Path:
    lines = []
    for n, name in enumerate(names):
        rec = {"key": name, "high": f"a house {n}", "low": f"blurry {n}"}
        if low_gt:
            rec["low_gt"] = f"sharp {n}"
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def _xpsr_task(tiny_models: Path, hr: Path, prompts: Path, **options):
    cfg = config_from_dict(
        {
            "name": "t",
            "task": "xpsr",
            "model": {"pretrained": str(tiny_models / "sd"), "options": {"prompts": str(prompts), **options}},
            "data": {"hr": [str(hr)], "val_count": 1, "crop_size": 64, "scale": 4, "batch_size": 2},
            "degradation": {"type": "bicubic"},
            "train": {"null_prompt_prob": 0.0},
            "validation": {"every": 0},
        }
    )
    task = build_task(cfg)
    task.setup(torch.device("cpu"), torch.float32)
    return task, cfg


def _spy_step(task, cfg):
    """One ``compute`` on the first two training crops; returns (batch, texts encoded, hint given)."""
    items = task.train_items(list_images(cfg.data, cfg.data.crop_size)[0])
    data = CropDataset(items, cfg.data, make_degrader({"type": "bicubic"}, 4), 0)
    batch = default_collate([data[0], data[1]])
    texts: list[list[str]] = []
    encode = task.prompts
    task.prompts = lambda prompts: (texts.append(list(prompts)), encode(prompts))[1]
    hints: list[torch.Tensor] = []
    handle = task.trainable.register_forward_pre_hook(lambda _m, args: hints.append(args[4]))
    try:
        task.compute(task.trainable, batch)
    finally:
        handle.remove()
        task.prompts = encode
    return batch, texts, hints[0]


def test_training_reads_precomputed_prompts_and_uses_the_hr_crop_as_hint(tiny_models, tmp_path):
    """As released: caption of the HR image + quality answer for the LR image; where the HR crop is
    the hint (gt_hint_prob), the quality answer for the HR image."""
    hr = write_textures(tmp_path / "hr", count=3, size=(72, 72))
    names = sorted(p.name for p in hr.iterdir())
    prompts = _prompt_file(tmp_path / "prompts.jsonl", names)
    want_high = lambda batch: [f"a house {names.index(Path(p).name)}" for p in batch["path"]]  # noqa: E731

    task, cfg = _xpsr_task(tiny_models, hr, prompts, gt_hint_prob=0.0)
    batch, texts, hint = _spy_step(task, cfg)
    assert texts[0] == want_high(batch)
    assert texts[1] == [f"blurry {names.index(Path(p).name)}" for p in batch["path"]]
    assert torch.equal(hint, make_hint(batch["lr"], (64, 64)))

    task, cfg = _xpsr_task(tiny_models, hr, prompts, gt_hint_prob=1.0)
    batch, texts, hint = _spy_step(task, cfg)
    assert texts[0] == want_high(batch)
    assert texts[1] == [f"sharp {names.index(Path(p).name)}" for p in batch["path"]]
    assert torch.equal(hint, batch["hr"])
    assert XPSRTask.DEFAULTS["gt_hint_prob"] == 0.1 and load_config(REPO / "configs" / "xpsr.yaml").model.options[
        "gt_hint_prob"
    ] == pytest.approx(0.1)


def test_training_without_prompts_for_an_image_fails_in_one_line(tiny_models, tmp_path, capsys):
    hr = write_textures(tmp_path / "hr", count=3, size=(72, 72))
    names = sorted(p.name for p in hr.iterdir())
    prompts = _prompt_file(tmp_path / "prompts.jsonl", names[1:])
    task, cfg = _xpsr_task(tiny_models, hr, prompts)
    with pytest.raises(SemsrError, match=f"no prompts for training image {names[0]}"):
        task.train_items(list_images(cfg.data, cfg.data.crop_size)[0])
    no_gt = _prompt_file(tmp_path / "no-gt.jsonl", names, low_gt=False)
    task, cfg = _xpsr_task(tiny_models, hr, no_gt)  # the GT-hint trick needs the HR quality answers
    with pytest.raises(SemsrError, match="no 'low_gt'"):
        task.train_items(list_images(cfg.data, cfg.data.crop_size)[0])
    (tmp_path / "bad.jsonl").write_text('{"key": "a.png", "high": "x"}\n')
    args = ["train", "--config", str(REPO / "configs" / "xpsr-tiny.yaml"), "--output", str(tmp_path / "run")]
    args += [f"model.pretrained={tiny_models / 'sd'}", f"data.hr=[{hr}]", "data.val_count=1", "data.limit=0"]
    assert main([*args, f"model.options.prompts={prompts}", "validation.every=0"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"no prompts for training image {names[0]}" in err[0]
    assert main([*args, f"model.options.prompts={tmp_path / 'bad.jsonl'}"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "line 1 needs string fields 'high' and 'low'" in err[0]


def test_prompt_records_from_two_semsr_priors_indexes(tmp_path):
    def index(path: Path, entries: list[tuple[str, dict[str, str]]]) -> Path:
        images = [
            {"input": name, "priors": {k: {"kind": "text", "value": v} for k, v in priors.items()}}
            for name, priors in entries
        ]
        path.write_text(json.dumps({"providers": {}, "images": images}))
        return path

    hr = index(tmp_path / "hr.json", [("HR/a.jpg", {"caption": "a cat", "quality": "sharp"})])
    lr = index(tmp_path / "lr.json", [("LR/a.png", {"quality": "blurry"})])
    out = tmp_path / "p.jsonl"
    assert xpsr_prompts.main([str(hr), str(lr), "-o", str(out)]) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {"key": "a.jpg", "high": "a cat", "low": "blurry", "low_gt": "sharp"}
    ]
    assert xpsr_prompts.XPSRPromptFile.load(out).get("/data/HR/a.jpg")["low"] == "blurry"
    assert xpsr_prompts.XPSRPromptFile.load(out).get("x/A.JPG")["high"] == "a cat"
    absolute = tmp_path / "abs.jsonl"
    absolute.write_text(json.dumps({"key": "/data/HR/b.png", "high": "h", "low": "l"}) + "\n")
    assert xpsr_prompts.XPSRPromptFile.load(absolute).get("/data/HR/b.png", ("high", "low"))["low"] == "l"
    with pytest.raises(SemsrError, match="no prompts for training image b.png"):
        xpsr_prompts.XPSRPromptFile.load(absolute).get("/other/b.png")
    empty = index(tmp_path / "lr2.json", [])
    assert xpsr_prompts.main([str(hr), str(empty), "-o", str(out)]) != 0


def test_training_without_vlm_or_opt_out_fails_when_the_task_is_built(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMSR_WEIGHTS", str(tmp_path / "no-weights"))
    hr = write_textures(tmp_path / "hr", count=2, size=(72, 72))
    raw = {
        "name": "t",
        "task": "xpsr",
        "model": {"pretrained": str(tiny_models / "sd"), "options": {"irpad": str(tiny_models / "irpad-untrained")}},
        "data": {"hr": [str(hr)], "val_count": 1, "crop_size": 64, "scale": 4, "batch_size": 1},
    }
    with pytest.raises(UnavailableError, match="--no-vlm"):
        build_task(config_from_dict(raw))
    task = build_task(config_from_dict(raw, ["model.options.no_vlm=true"]))
    assert task.text_priors().no_vlm
