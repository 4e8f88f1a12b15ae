"""XPSR: Semantic-Fusion Attention, conditional attention, Degradation-Free Constraint, two-prompt CFG,
prompt caching, running without a VLM, the ``xpsr`` CLI preset and the tiny training config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semsr.cli import main
from semsr.core.errors import UnavailableError
from semsr.fusion.dfc import DFCHeads, dfc_loss, dfc_targets
from semsr.fusion.sfa import SFAFusion, transformer_blocks, two_prompt_context
from semsr.methods.xpsr import XPSR_ADDED_POSITIVE, XPSR_LOW_NEGATIVE, XPSR_NEGATIVE, TwoPromptSR
from semsr.testing.tiny import tiny_controlnet, tiny_unet
from semsr.pipeline.latent_tiling import untiled
from semsr.pipeline.sampler import guided
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
    return {"x": torch.randn(1, 4, 8, 8, generator=g), "t": torch.tensor(400),
            "c_h": torch.randn(1, 77, 32, generator=g), "c_l": torch.randn(1, 77, 32, generator=g),
            "hint": torch.rand(1, 3, 64, 64, generator=g)}


def _plain(unet, controlnet, i):
    down, mid = controlnet(i["x"], i["t"], encoder_hidden_states=i["c_h"], controlnet_cond=i["hint"],
                           return_dict=False)
    return unet(i["x"], i["t"], encoder_hidden_states=i["c_h"], down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


# ----------------------------------------------------------------------------- SFA


def test_sfa_blocks_start_as_copies_of_the_pretrained_attentions(nets):
    unet, controlnet = nets
    state = {k: v.clone() for k, v in controlnet.state_dict().items()}
    fusion = SFAFusion(controlnet, unet)
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
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, controlnet = nets
    i = _inputs()
    with torch.no_grad():
        plain = _plain(unet, controlnet, i)
        fusion = SFAFusion(controlnet, unet, mode="high")
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
        torch.testing.assert_close(block.attn2(x, encoder_hidden_states=two_prompt_context(torch.zeros_like(c), c)),
                                   ca, rtol=1e-5, atol=1e-6)
        # the low-level prompt matters in the fused modes
        fusion.mode = "parallel"
        a = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])
        b = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_h"], i["hint"])
        assert a.shape == plain.shape and not torch.allclose(a, b)


def test_conditional_attention_is_a_no_op_until_trained(nets):
    unet, controlnet = nets
    i = _inputs(1)
    fusion = SFAFusion(controlnet, unet, mode="high")
    with torch.no_grad():
        plain = _plain(unet, controlnet, i)
        fusion.install(controlnet, unet)
        assert torch.equal(fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"],
                                                          i["hint"]), plain)
        for layer in fusion.cond_out.values():
            torch.nn.init.normal_(layer.weight, std=0.1)
        moved = fusion.controlnet_unet_forward(unet, controlnet, i["x"], i["t"], i["c_h"], i["c_l"], i["hint"])
        assert not torch.allclose(moved, plain)
        # outside the ControlNet call (no features set) the UNet is plain again
        assert torch.equal(unet(i["x"], i["t"], encoder_hidden_states=i["c_h"], return_dict=False)[0],
                           unet(i["x"], i["t"], encoder_hidden_states=i["c_h"], return_dict=False)[0])
        assert fusion._unet_features is None


def test_sfa_checkpoint_roundtrip(nets, tmp_path):
    unet, controlnet = nets
    fusion = SFAFusion(controlnet, unet, mode="serial")
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.01)
    fusion.save(tmp_path / "sfa")
    back = SFAFusion.load(tmp_path / "sfa", controlnet, unet)
    assert back.mode == "serial"
    assert all(torch.equal(a, b) for a, b in zip(fusion.state_dict().values(), back.state_dict().values(),
                                                 strict=True))
    assert SFAFusion.load(tmp_path / "sfa", controlnet, unet, mode="high").mode == "high"
    (tmp_path / "sfa" / "config.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(UnavailableError):
        SFAFusion.load(tmp_path / "sfa", controlnet, unet)


# ----------------------------------------------------------------------------- DFC


def test_dfc_heads_shapes_and_loss_decreases_on_an_overfit_batch(nets):
    unet, controlnet = nets
    controlnet.train()
    heads = DFCHeads(controlnet)
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
    from semsr.train.losses import combine_losses

    pred = {"latent/mid": torch.zeros(1, 4, 2, 2), "pixel/pyr1": torch.ones(1, 3, 4, 4)}
    outputs = {"pred": torch.zeros(1, 4, 2, 2), "target": torch.ones(1, 4, 2, 2), "dfc_pred": pred,
               "dfc_target": dfc_targets(pred, torch.ones(1, 4, 4, 4), torch.zeros(1, 3, 8, 8))}
    total, parts = combine_losses({"eps_mse": 1.0, "dfc": 0.05}, outputs)
    assert parts == {"eps_mse": 1.0, "dfc": 2.0}
    assert float(total) == pytest.approx(1.1)


# ----------------------------------------------------------------------------- pipeline / method


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> TwoPromptSR:
    return TwoPromptSR.from_checkpoint(tiny_models / "sd", tiny_models / "xpsr")


def test_cfg_uses_both_negatives(pipe):
    """eps = eps(neg_h, neg_l) + s * [eps(c_h, c_l) - eps(neg_h, neg_l)], one batched forward."""
    pipe._low = (["heavy noise"], [XPSR_LOW_NEGATIVE])
    try:
        cond, uncond = pipe.conditions(["a cat"], XPSR_NEGATIVE, 4.5)
    finally:
        pipe._low = None
    enc = pipe.encode_prompts
    assert torch.equal(cond["context"], enc(["a cat"])) and torch.equal(cond["low"], enc(["heavy noise"]))
    assert torch.equal(uncond["context"], enc([XPSR_NEGATIVE])) and torch.equal(uncond["low"], enc([XPSR_LOW_NEGATIVE]))
    hint = torch.rand(1, 3, 64, 64)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    denoiser = untiled(pipe.spatial_denoiser(hint))
    out = guided(denoiser, x, t, cond, uncond, 4.5)
    with torch.no_grad():
        eps = {k: pipe.sfa.controlnet_unet_forward(pipe.unet, pipe.controlnet, x, t, c["context"], c["low"], hint)
               for k, c in (("c", cond), ("u", uncond))}
    torch.testing.assert_close(out, eps["u"] + 4.5 * (eps["c"] - eps["u"]), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="outside __call__"):
        pipe.conditions(["a"], None, 1.0)


def test_method_caches_prompts_and_runs_without_vlm(tiny_models, capsys, tmp_path, monkeypatch):
    import semsr.priors.prompts as prompts_mod
    from semsr.methods import get_method

    monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / "cache"))  # other tests may have cached this image's priors

    prompts_mod._noted.discard("no-vlm")
    method = get_method("xpsr", base=str(tiny_models / "sd"), checkpoint=str(tiny_models / "xpsr"),
                        irpad=str(tiny_models / "irpad-untrained"))
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = method(lr, prompt="a red bird", steps=1)
    assert out.shape == (1, 3, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
    method(lr, prompt="a red bird", steps=1)
    err = capsys.readouterr().err
    assert err.count("no vision-language model") == 1
    cond = method.last_conditions[0]
    assert cond.high == "a red bird" and cond.sources == {"high": "user", "low": "irpad"}
    assert method.prompts(lr, {**method.defaults, "prompt": "a red bird"})[0] == [f"a red bird, {XPSR_ADDED_POSITIVE}"]
    irpad = method.priors.irpad
    assert irpad.misses == 1 and irpad.hits >= 2  # the IRPAD description is computed once per image


def test_vlm_prompts_are_cached(tiny_models):
    from semsr.priors.prompts import TextPriors

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
    rc = main(["upscale", "-i", str(img), "-o", str(tmp_path / "out"), "--method", "xpsr", "--base",
               str(tiny_models / "sd"), "--checkpoint", str(tiny_models / "xpsr"), "--vlm", str(tiny_models / "vlm"),
               "--steps", "2", "--sfa-mode", "serial", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "in_out.png").size == (96, 80)
    rc = main(["upscale", "-i", str(img), "-o", str(tmp_path / "o2"), "--method", "xpsr", "--base",
               str(tiny_models / "sd"), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and "--checkpoint" in err and "Traceback" not in err


def test_tiny_xpsr_config_trains_through_semsr_train(tiny_models, tmp_path, capsys):
    hr = write_textures(tmp_path / "hr", count=4, size=(72, 72))
    args = ["train", "--config", str(REPO / "configs" / "xpsr-tiny.yaml"), "--output", str(tmp_path / "run"),
            "--max-steps", "2", f"model.pretrained={tiny_models / 'sd'}", f"model.options.vlm={tiny_models / 'vlm'}",
            "model.options.max_new_tokens=4", f"data.hr=[{hr}]", "data.val_count=1", "data.limit=0",
            "validation.every=2", "checkpoint.every=2"]
    assert main(args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and set(train[0]["terms"]) == {"eps_mse", "dfc"}
    final = tmp_path / "run" / "final"
    pipe = TwoPromptSR.from_checkpoint(tiny_models / "sd", final)
    assert pipe.sfa.mode == "parallel" and len(pipe.sfa.cond) > 0
    assert pipe(torch.rand(1, 3, 16, 16), prompt="x", low_prompt="y", steps=1).shape == (1, 3, 64, 64)
