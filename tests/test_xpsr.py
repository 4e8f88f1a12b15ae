"""XPSR: Semantic-Fusion Attention, conditional attention, Degradation-Free Constraint, the component
checkpoint, two-prompt CFG, the method contract (options in, SROutput out), prompt caching, running
without a VLM, the ``xpsr`` CLI preset and the tiny training config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from semsr.cli import main
from semsr.core.components import load_component, read_index, save_checkpoint
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.method import Method, SuggestsPriors
from semsr.fusion.dfc import DFCHeads, dfc_loss, dfc_targets
from semsr.fusion.sfa import SFAFusion, transformer_blocks, two_prompt_context
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
from semsr.pipeline.latent_tiling import untiled
from semsr.priors import prompts as prompts_mod
from semsr.priors.prompts import TextPriors
from semsr.testing.tiny import tiny_controlnet, tiny_unet
from semsr.train.losses import combine_losses
from semsr.train.xpsr import XPSRTrainable
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


def test_sfa_blocks_start_as_copies_of_the_pretrained_attentions(nets):
    unet, controlnet = nets
    state = {k: v.clone() for k, v in controlnet.state_dict().items()}
    fusion = SFAFusion.from_models(controlnet, unet)
    blocks = transformer_blocks(controlnet)
    assert len(fusion.low) == len(fusion.fuse) == len(blocks) > 0
    for name, block in blocks:
        slot = name.replace(".", "__")
        for new, old in ((fusion.low[slot], block.attn2), (fusion.fuse[slot], block.attn1)):
            for (kn, vn), (ko, vo) in zip(new.state_dict().items(), old.state_dict().items(), strict=True):
                assert kn == ko and torch.equal(vn, vo)
            assert new.to_q.weight.data_ptr() != old.to_q.weight.data_ptr()  # copies, not shared
    for name, block in transformer_blocks(unet):
        slot = name.replace(".", "__")
        assert torch.equal(fusion.cond[slot].to_k.weight, block.attn1.to_k.weight)
        assert not fusion.cond_out[slot].weight.any() and not fusion.cond_out[slot].bias.any()
    fusion.install(controlnet, unet)
    # installing processors leaves the pretrained state dicts untouched
    after = controlnet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_sfa_identities_at_initialisation(nets):
    """With c_h == c_l == c: parallel = attn1(attn2(x, c)), serial = attn2(attn2(x, c), c);
    mode 'high' = the plain ControlNet + UNet for any c_l (conditional attention starts at zero)."""
    unet, controlnet = nets
    i = _inputs()
    with torch.no_grad():
        plain = _plain(unet, controlnet, i)
        fusion = SFAFusion.from_models(controlnet, unet, mode="high")
        fusion.install(controlnet, unet)
        high = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])
        assert torch.equal(high, plain)

        name, block = transformer_blocks(controlnet)[0]
        x = torch.randn(2, 64, block.attn1.to_q.in_features)
        c = torch.randn(2, 77, 32)
        base = AttnProcessor2_0()
        ca = base(block.attn2, x, c)
        fusion.mode = "parallel"
        par = block.attn2(x, encoder_hidden_states=two_prompt_context(c, c))
        assert par.shape == x.shape
        torch.testing.assert_close(par, block.attn1(ca), rtol=1e-5, atol=1e-6)
        fusion.mode = "serial"
        ser = block.attn2(x, encoder_hidden_states=two_prompt_context(c, c))
        torch.testing.assert_close(ser, base(block.attn2, ca, c), rtol=1e-5, atol=1e-6)
        fusion.mode = "low"
        torch.testing.assert_close(
            block.attn2(x, encoder_hidden_states=two_prompt_context(torch.zeros_like(c), c)), ca, rtol=1e-5, atol=1e-6
        )
        # the low-level prompt matters in the fused modes
        fusion.mode = "parallel"
        a = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])
        b = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_h"], i["hint"])
        assert a.shape == plain.shape and not torch.allclose(a, b)


def test_conditional_attention_is_a_no_op_until_trained(nets):
    unet, controlnet = nets
    i = _inputs(1)
    fusion = SFAFusion.from_models(controlnet, unet, mode="high")
    with torch.no_grad():
        plain = _plain(unet, controlnet, i)
        fusion.install(controlnet, unet)
        assert torch.equal(
            fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"]), plain
        )
        for layer in fusion.cond_out.values():
            torch.nn.init.normal_(layer.weight, std=0.1)
        moved = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])
        assert not torch.allclose(moved, plain)
        # outside the ControlNet call (no features set) the UNet is plain again
        assert torch.equal(
            unet(i["x"], i["t"], encoder_hidden_states=i["c_h"], return_dict=False)[0],
            unet(i["x"], i["t"], encoder_hidden_states=i["c_h"], return_dict=False)[0],
        )
        assert fusion._unet_features is None


def test_making_an_sfa_draws_only_what_its_zero_layers_draw(nets):
    """The attention copies do not advance the global RNG, so seeded writers keep their weights."""
    unet, controlnet = nets
    torch.manual_seed(7)
    fusion = SFAFusion.from_models(controlnet, unet)
    after = torch.rand(3)
    torch.manual_seed(7)
    for layer in fusion.cond_out.values():  # the draws of the zero layers' default initialisation
        torch.nn.Linear(layer.in_features, layer.out_features)
    assert torch.equal(torch.rand(3), after)
    torch.manual_seed(7)
    SFAFusion.from_models(controlnet)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)


def test_sfa_and_dfc_components_rebuild_from_their_folder_alone(nets, tmp_path):
    unet, controlnet = nets
    fusion = SFAFusion.from_models(controlnet, unet, mode="serial")
    heads = DFCHeads.from_controlnet(controlnet)
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


def test_dfc_heads_shapes_and_loss_decreases_on_an_overfit_batch(nets):
    unet, controlnet = nets
    controlnet.train()
    heads = DFCHeads.from_controlnet(controlnet)
    g = torch.Generator().manual_seed(3)
    hr = torch.rand(2, 3, 64, 64, generator=g)
    hr_latent = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)

    def step() -> torch.Tensor:
        with heads.capture(controlnet) as feats:
            controlnet(x, torch.tensor([10, 900]), encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        preds = heads(feats)
        return dfc_loss(preds, dfc_targets(preds, hr_latent, hr)), preds

    loss0, preds = step()
    sizes = {k: tuple(v.shape[1:]) for k, v in preds.items()}
    assert sizes["latent/mid"] == (4, 4, 4)
    assert {v for k, v in sizes.items() if k.startswith("latent/")} == {(4, 8, 8), (4, 4, 4)}
    assert sorted(v for k, v in sizes.items() if k.startswith("pixel/")) == [(3, 8, 8), (3, 16, 16), (3, 32, 32)]
    opt = torch.optim.Adam(list(heads.parameters()) + list(controlnet.parameters()), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        loss, _ = step()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * float(loss0.detach())
    # hooks exist only inside capture()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in controlnet.modules())


def test_dfc_is_a_registered_loss_term():
    pred = {"latent/mid": torch.zeros(1, 4, 2, 2), "pixel/pyr1": torch.ones(1, 3, 4, 4)}
    outputs = {
        "pred": torch.zeros(1, 4, 2, 2),
        "target": torch.ones(1, 4, 2, 2),
        "dfc_pred": pred,
        "dfc_target": dfc_targets(pred, torch.ones(1, 4, 4, 4), torch.zeros(1, 3, 8, 8)),
    }
    total, parts = combine_losses({"eps_mse": 1.0, "dfc": 0.05}, outputs)
    assert parts == {"eps_mse": 1.0, "dfc": 2.0}
    assert float(total) == pytest.approx(1.1)


# ----------------------------------------------------------------------------- pipeline / method


def test_training_runs_the_inference_forward(nets):
    """XPSRTrainable's prediction is SFAFusion.controlnet_unet_forward, with the DFC features captured."""
    unet, controlnet = nets
    fusion = SFAFusion.from_models(controlnet, unet)
    with torch.no_grad():
        for layer in fusion.cond_out.values():
            torch.nn.init.normal_(layer.weight, std=0.05)
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
    assert (opts.negative_prompt, opts.low_negative_prompt, opts.added_prompt) == (
        XPSR_NEGATIVE,
        XPSR_LOW_NEGATIVE,
        XPSR_ADDED_POSITIVE,
    )
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


def test_method_caches_prompts_and_runs_without_vlm(tiny_models, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / "cache"))  # other tests may have cached this image's priors
    monkeypatch.setattr(prompts_mod, "_noted", set())
    method = _xpsr(tiny_models, irpad=str(tiny_models / "irpad-untrained"))
    assert isinstance(method, Method) and isinstance(method, SuggestsPriors) and method.tiles_itself
    assert (method.name, method.scale) == ("xpsr", 4)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    opts = resolve("xpsr").parse({"prompt": "a red bird", "steps": 1})
    out = method(lr, opts)
    img = out.images
    assert img.shape == (1, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
    again = method(lr, opts)
    assert torch.equal(again.images, img) and again.priors == out.priors
    err = capsys.readouterr().err
    assert err.count("no vision-language model") == 1
    p = out.priors
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
    rc = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(tmp_path / "o2"),
            "--method",
            "xpsr",
            "--base",
            str(tiny_models / "sd"),
            "--steps",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "--checkpoint" in err and "Traceback" not in err


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
    assert pipe.sfa.mode == "parallel" and len(pipe.sfa.cond) > 0
    out = pipe(torch.rand(1, 3, 16, 16), XPSROptions(steps=1), prompts=["x"], low_prompts=["y"])
    assert out.images.shape == (1, 3, 64, 64)
