"""CoSeR recipe on tiny random models: AiA, hard attention, cognitive encoder, guidance, method, CLI, training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr.cli import main
from semsr.core.components import load_checkpoint, load_component, read_index, save_checkpoint
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.method import SuggestsPriors
from semsr.core.options import OptionError
from semsr.fusion.aia import (
    AiAFusion,
    ConditionEncoder,
    HardAttnProcessor,
    feature_slots,
    hard_attention,
    install_aia,
    skip_channels,
    transformer_blocks,
)
from semsr.methods import coser as coser_module
from semsr.methods import resolve
from semsr.methods.coser import COSER_NEGATIVE, CoSeROptions, CoSeRSR, guidance_branches
from semsr.models.cognitive import (
    CognitiveEncoder,
    align_text_tokens,
    build_cognitive_encoder,
    load_clip_vision,
    load_cognitive_encoder,
    text_token_targets,
)
from semsr.ops.imresize import imresize
from semsr.pipeline.guidance import weighted
from semsr.testing.tiny import tiny_unet
from semsr.train.config import config_from_dict
from semsr.train.coser import CoSeRCognitiveTask, CoSeRSRTask, NeighbourReferences, load_text_only
from train_helpers import REPO, write_textures

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models


@pytest.fixture(scope="module")
def unet(tiny_models: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_models / "sd" / "unet", local_files_only=True).eval()


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> CoSeRSR:
    return CoSeRSR.from_pretrained(tiny_models / "sd", tiny_models / "coser", tiny_models / "clip-vision")


@pytest.fixture(scope="module")
def lr() -> torch.Tensor:
    return torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))


def _unet_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 4, 16, 16, generator=g),
        "t": torch.tensor([900, 30]),
        "context": torch.randn(2, 12, 32, generator=g),
        "z_lr": torch.randn(2, 4, 16, 16, generator=g),
        "z_ref": torch.randn(2, 4, 8, 12, generator=g),
    }


def _run(pipe: CoSeRSR, lr: torch.Tensor, **options):
    return pipe(lr, CoSeROptions(**options))


def _png(path: Path, image: torch.Tensor) -> Path:
    """Write ``image`` ``(1, 3, H, W)`` in [0, 1] as an 8-bit PNG."""
    arr = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
    return path


# ----------------------------------------------------------------------------- AiA


def test_zero_initialised_aia_equals_the_plain_unet(unet):
    fusion = AiAFusion.from_unet(unet)
    d = _unet_inputs()
    with torch.no_grad():
        plain = unet(d["x"], d["t"], encoder_hidden_states=d["context"]).sample
        wrapped = fusion(unet, d["x"], d["t"], d["context"], d["z_lr"], d["z_ref"])
        assert torch.equal(plain, wrapped)
        # every transformer block got AiA parts, and the hooks are inert without AiA inputs
        assert len(fusion.blocks) == len(transformer_blocks(unet)) > 0
        assert torch.equal(unet(d["x"], d["t"], encoder_hidden_states=d["context"]).sample, plain)
        # the same modules with non-zero "zero convolutions" do change the output (the test can fail)
        for block in fusion.blocks.values():
            torch.nn.init.normal_(block.ref_zero.weight, std=0.1)
        changed = fusion(unet, d["x"], d["t"], d["context"], d["z_lr"], d["z_ref"])
        assert (changed - plain).abs().max() > 1e-3
        # ... and the reference enters only through the reference attention
        no_ref = fusion(unet, d["x"], d["t"], d["context"], d["z_lr"], None)
        assert torch.equal(no_ref, plain)


def test_aia_on_an_sd2_style_unet():
    """Linear projections in the transformers and per-level head widths (SD 2.x layout)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=16,
    ).eval()
    fusion = AiAFusion.from_unet(unet)
    d = _unet_inputs(1)
    with torch.no_grad():
        plain = unet(d["x"], d["t"], encoder_hidden_states=d["context"]).sample
        assert torch.equal(fusion(unet, d["x"], d["t"], d["context"], d["z_lr"], d["z_ref"]), plain)
        for block in fusion.blocks.values():
            torch.nn.init.normal_(block.lr_zero.weight, std=0.1)
        assert (fusion(unet, d["x"], d["t"], d["context"], d["z_lr"], d["z_ref"]) - plain).abs().max() > 1e-3


def test_aia_starts_from_the_pretrained_self_attention_and_keeps_unet_state(unet):
    keys_before = set(unet.state_dict())
    fusion = AiAFusion.from_unet(unet)
    install_aia(unet)
    assert set(unet.state_dict()) == keys_before
    name, _, block = transformer_blocks(unet)[0]
    part = fusion.block(name)
    assert torch.equal(part.lr_attn.to_q.weight, block.attn1.to_q.weight)
    assert torch.equal(part.ref_attn.to_v.weight, block.attn1.to_v.weight)
    assert torch.count_nonzero(part.lr_zero.weight) == 0 and torch.count_nonzero(part.ref_zero.bias) == 0
    # the ControlNet branches start as copies of the UNet's encoder path, attention included
    lr_branch, ref_branch = fusion.lr_branch, fusion.ref_branch
    assert torch.equal(lr_branch.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    assert torch.equal(
        ref_branch.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight,
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight,
    )
    assert torch.equal(lr_branch.mid_block.attentions[0].proj_in.weight, unet.mid_block.attentions[0].proj_in.weight)
    assert torch.equal(lr_branch.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)
    # the encoder option: copies of the resnets and downsamplers only
    enc = AiAFusion.from_unet(unet, control="encoder")
    assert torch.equal(enc.lr_branch.levels[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    assert torch.equal(enc.ref_branch.mid.conv2.weight, unet.mid_block.resnets[0].conv2.weight)
    assert not any("attn" in n for n, _ in enc.lr_branch.named_parameters())


def test_aia_structure_from_config_alone(unet):
    """A fusion built from its config (no UNet) has the same modules as one made from the UNet, and the
    encoders' initialisation draws nothing from the global RNG (the blocks' initialisation is seeded)."""
    for control in ("controlnet", "encoder"):
        torch.manual_seed(0)
        made = AiAFusion.from_unet(unet, control=control)
        after_made = torch.rand(4)
        torch.manual_seed(0)
        built = AiAFusion(**dict(made.config))
        assert torch.equal(torch.rand(4), after_made)
        a, b = made.state_dict(), built.state_dict()
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
        assert all(
            torch.equal(a[k], b[k]) for k in a if k.startswith("blocks.") and "_zero" not in k and ".to_" not in k
        )  # same seeded init; attentions are copied from the UNet only by from_unet


def test_control_features_come_from_controlnet_branches_with_attention(unet):
    """Issue 19: LR and reference features through ControlNet-style branches with attention (cross-attention
    to the context, the noisy latent as the LR branch's sample), placed at the UNet's skip connections; the
    attention-free encoders stay an explicit option."""
    from diffusers import ControlNetModel

    fusion = AiAFusion.from_unet(unet)
    assert fusion.config["control"] == "controlnet" and fusion.context_dependent
    assert isinstance(fusion.lr_branch, ControlNetModel) and isinstance(fusion.ref_branch, ControlNetModel)
    for branch in (fusion.lr_branch, fusion.ref_branch):  # a latent hint; zero-initialised hint embedding
        assert branch.controlnet_cond_embedding.conv_in.in_channels == 4
        torch.nn.init.normal_(branch.controlnet_cond_embedding.conv_out.weight, std=0.2)
    d = _unet_inputs(2)
    with torch.no_grad():
        feats = fusion.lr_features(d["z_lr"], d["t"], sample=d["x"], context=d["context"])
        # one feature per skip connection plus the mid block, as the UNet's encoder makes them
        cfg = fusion.config["unet_config"]
        assert [f.shape[1] for f in feats] == [*skip_channels(cfg), cfg["block_out_channels"][-1]]
        # the features attend to the context and read the noisy latent and the LR hint
        other_ctx = fusion.lr_features(d["z_lr"], d["t"], sample=d["x"], context=d["context"].flip(1) * 2)
        other_x = fusion.lr_features(d["z_lr"], d["t"], sample=d["x"] * 0.5, context=d["context"])
        other_lr = fusion.lr_features(d["z_lr"] * -1, d["t"], sample=d["x"], context=d["context"])
        for other in (other_ctx, other_x, other_lr):
            assert (other[2] - feats[2]).abs().max() > 1e-4
        ref = fusion.ref_features(d["z_ref"], d["t"], context=d["context"])
        ref_ctx = fusion.ref_features(d["z_ref"], d["t"], context=d["context"] * 3)
        assert ref[0].shape[-2:] == d["z_ref"].shape[-2:] and (ref_ctx[1] - ref[1]).abs().max() > 1e-4
        with pytest.raises(SemsrError, match="context"):
            fusion.lr_features(d["z_lr"], d["t"])
    # every transformer block reads the feature at its own place in the skip connections
    slots = feature_slots(cfg, [n for n, _, _ in transformer_blocks(unet)])
    assert slots == fusion.slots
    assert slots["down_blocks.0.attentions.1.transformer_blocks.0"] == 2  # conv_in, res0, res1
    assert slots["up_blocks.1.attentions.0.transformer_blocks.0"] == 2  # the first skip popped at that level
    assert slots["up_blocks.1.attentions.2.transformer_blocks.0"] == 0  # ... the last one: conv_in's
    assert slots["mid_block.attentions.0.transformer_blocks.0"] == len(skip_channels(cfg))
    # the encoder option: per-level features of the latent alone
    enc = AiAFusion.from_unet(unet, control="encoder")
    assert not enc.context_dependent
    with torch.no_grad():
        a = enc.lr_features(d["z_lr"], d["t"], sample=d["x"], context=d["context"])
        b = enc.lr_features(d["z_lr"], d["t"], sample=d["x"] * 0.5, context=d["context"] * 3)
    assert len(a) == len(cfg["block_out_channels"]) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(SemsrError, match="control must be one of"):
        AiAFusion.from_unet(unet, control="adapter")
    legacy = {k: v for k, v in dict(fusion.config).items() if k not in ("control", "controlnet_config")}
    with pytest.raises(UnavailableError, match="older semsr"):  # a pre-ControlNet AiA config
        AiAFusion(**{k: v for k, v in legacy.items() if not k.startswith("_")})
    with pytest.raises(SemsrError, match="conv_in"):  # no silently skipped input layer
        ConditionEncoder(dict(cfg), latent_channels=8).copy_from(unet)


def test_hard_attention_returns_the_argmax_value_scaled_by_its_score():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 3, 7, 4, generator=g),
        torch.randn(2, 3, 9, 4, generator=g),
        torch.randn(2, 3, 9, 5, generator=g),
    )
    out = hard_attention(q, k, v, scale=0.5, chunk=3)
    expected = torch.empty(2, 3, 7, 5)
    for b in range(2):
        for h in range(3):
            for i in range(7):
                scores = [float(q[b, h, i] @ k[b, h, j]) * 0.5 for j in range(9)]
                j = int(np.argmax(scores))
                expected[b, h, i] = v[b, h, j] * scores[j]
    torch.testing.assert_close(out, expected)


def test_hard_attention_processor_uses_the_projections_and_no_softmax():
    from diffusers.models.attention_processor import Attention

    attn = Attention(4, cross_attention_dim=4, heads=1, dim_head=4, processor=HardAttnProcessor())
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin.weight.copy_(torch.eye(4))
        attn.to_out[0].bias.zero_()
    keys = torch.tensor([[[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 3.0]]])
    query = torch.tensor([[[0, 1.0, 0, 0], [0, 0, 0, 1.0]]])
    out = attn(query, encoder_hidden_states=keys)
    # query 0 picks key 1 (score 2 * 0.5), query 1 picks key 2 (score 3 * 0.5)
    torch.testing.assert_close(out, torch.tensor([[[0, 2.0, 0, 0], [0, 0, 0, 4.5]]]))


def test_aia_checkpoint_round_trip_and_wrong_unet(unet, tmp_path):
    from diffusers import UNet2DConditionModel

    fusion = AiAFusion.from_unet(unet)
    with torch.no_grad():
        for block in fusion.blocks.values():
            torch.nn.init.normal_(block.lr_zero.weight, std=0.1)
    fusion.save_pretrained(tmp_path / "aia")
    loaded = load_component(AiAFusion, tmp_path / "aia")  # structure from the config alone
    loaded.check_unet(unet)
    d = _unet_inputs(3)
    with torch.no_grad():
        a = fusion(unet, d["x"], d["t"], d["context"], d["z_lr"], d["z_ref"])
        b = loaded(unet, d["x"], d["t"], d["context"], d["z_lr"], d["z_ref"])
    assert torch.equal(a, b)
    other = UNet2DConditionModel(**{**dict(tiny_unet().config), "block_out_channels": (32, 32)})
    with pytest.raises(UnavailableError, match="another UNet"):
        loaded.check_unet(other)


def test_coser_checkpoint_layout(tiny_models, tmp_path):
    """The tiny ``coser`` folder is the one checkpoint layout: model_index.json + cognitive/ + aia/."""
    index = read_index(tiny_models / "coser", "coser")
    assert index.components == {"cognitive": ("semsr", "CognitiveEncoder"), "aia": ("semsr", "AiAFusion")}
    parts, _ = load_checkpoint(tiny_models / "coser", "coser")
    assert isinstance(parts["cognitive"], CognitiveEncoder) and isinstance(parts["aia"], AiAFusion)
    assert parts["cognitive"].clip is None  # the CLIP tower is never part of the checkpoint
    save_checkpoint(tmp_path / "copy", "coser", parts)
    again, _ = load_checkpoint(tmp_path / "copy", "coser")
    for name, part in parts.items():
        want, got = part.state_dict(), again[name].state_dict()
        assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------- cognitive encoder


def test_align_text_tokens_takes_the_window_ending_at_the_end_token():
    tokens = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(2, 1, 3)
    out = align_text_tokens(tokens, torch.tensor([7, 3]), 4)
    assert out[0, :, 0].tolist() == [3, 4, 5, 6]  # last 4 of the 7 real tokens
    assert out[1, :, 0].tolist() == [0, 1, 2, 2]  # 3 tokens, end token repeated


def test_cognitive_encoder_shapes_and_overfit_step(tiny_models):
    clip = load_clip_vision(tiny_models / "clip-vision")
    text = load_text_only(tiny_models / "sd")
    torch.manual_seed(0)
    enc = build_cognitive_encoder(
        clip,
        text_width=text.width,
        pre_sr={"num_feat": 8, "num_block": 1},
        qformer={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
    )
    assert enc.num_queries == 50
    crossing = [hasattr(layer, "crossattention") for layer in enc.adapter.qformer.encoder.layer]
    assert crossing == [True, False]  # cross-attention every 2 layers
    lr = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    emb, pre = enc(lr)
    assert emb.shape == (2, 50, 32) and pre.shape == (2, 3, 48, 64)
    targets = text_token_targets(text, ["a photo of a cat", "a dog on the grass"], 50)
    assert targets.shape == (2, 50, 32)
    params = [p for p in enc.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in enc.clip.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(enc(lr)[0], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.pre_sr.parameters())  # through CLIP


@pytest.mark.parametrize("spec", [{"kind": "bicubic"}, {"kind": "method", "name": "bicubic"}])
def test_fixed_pre_sr_options(tiny_models, spec):
    enc = build_cognitive_encoder(
        load_clip_vision(tiny_models / "clip-vision"),
        text_width=32,
        num_queries=7,
        pre_sr=spec,
        qformer={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
    )
    lr = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    emb, pre = enc(lr)
    assert emb.shape == (1, 7, 32) and not list(enc.pre_sr.parameters())
    torch.testing.assert_close(pre, imresize(lr, scale=4).clamp(0, 1), atol=1e-5, rtol=0)


def test_cognitive_encoder_component_keeps_clip_attached_not_saved(tiny_models):
    from_checkpoint = load_cognitive_encoder(tiny_models / "coser", tiny_models / "clip-vision")
    from_component = load_cognitive_encoder(tiny_models / "coser" / "cognitive", tiny_models / "clip-vision")
    own = from_checkpoint.state_dict()
    assert own and all(k.startswith(("pre_sr.", "adapter.")) for k in own)
    assert all(torch.equal(own[k], v) for k, v in from_component.state_dict().items())
    assert not any(n.startswith("clip") for n, _ in from_checkpoint.named_parameters())
    lr = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(from_checkpoint.embed(lr), from_component.embed(lr))
    from_component.to(torch.float64)  # moves and casts take the attached tower along
    assert next(from_component.clip.parameters()).dtype == torch.float64
    assert from_component.embed(lr.double()).dtype == torch.float64
    with pytest.raises(SemsrError, match="CLIP"):
        CognitiveEncoder(
            num_queries=2,
            text_width=32,
            clip_width=32,
            pre_sr_spec={"kind": "bicubic"},
            qformer={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
        )(lr)


def test_cognitive_checkpoint_rejects_another_clip_width(tiny_models, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(tmp_path)
    # no silent guess of the CLIP input size and normalisation
    with pytest.raises(UnavailableError, match="preprocessor_config.json"):
        load_cognitive_encoder(tiny_models / "coser", tmp_path)
    (tmp_path / "preprocessor_config.json").write_bytes(
        (tiny_models / "clip-vision" / "preprocessor_config.json").read_bytes()
    )
    with pytest.raises(UnavailableError, match="wide"):
        load_cognitive_encoder(tiny_models / "coser", tmp_path)


# ----------------------------------------------------------------------------- guidance


def test_guidance_branches_and_formula():
    pos, neg = torch.ones(1, 3, 2), -torch.ones(1, 3, 2)
    ref, zero = torch.full((1, 4, 2, 2), 2.0), torch.zeros(1, 4, 2, 2)
    two = guidance_branches(pos, neg, ref, zero, 3.0)
    assert [w for w, _ in two] == [-2.0, 3.0]
    assert two[0][1].context is neg and two[0][1].reference is zero  # negative: neg prompt + VAE(zeros)
    assert two[1][1].context is pos and two[1][1].reference is ref
    three = guidance_branches(pos, neg, ref, zero, 3.0, reference_guidance=1.5)
    assert [w for w, _ in three] == [-0.5, -1.5, 3.0]
    assert three[1][1].context is neg and three[1][1].reference is ref

    def eps(b):  # a stand-in model: any function of the branch
        return b.context.sum() * 10 + b.reference.sum()

    e_n, e_r, e_f = eps(three[0][1]), eps(three[1][1]), eps(three[2][1])
    combined = sum(w * eps(b) for w, b in three)
    torch.testing.assert_close(combined, e_n + 1.5 * (e_r - e_n) + 3.0 * (e_f - e_r))
    assert [w for w, _ in guidance_branches(pos, neg, ref, zero, 1.0)] == [1.0]
    plain = guidance_branches(pos, neg, None, None, 4.0)
    assert [(w, b.reference) for w, b in plain] == [(-3.0, None), (4.0, None)]

    # the weighted denoiser wrapper evaluates the branches in one batched call, in order
    def batched(x, t, cond):
        return torch.cat([x[:1] * 0 + eps(b) for b in cond], dim=0)

    guided = weighted(batched, [w for w, _ in three])(torch.zeros(1, 4, 2, 2), torch.tensor(1), [b for _, b in three])
    torch.testing.assert_close(guided, torch.full((1, 4, 2, 2), float(combined)))


def test_negative_branch_uses_negative_prompt_embedding_and_vae_of_zeros(pipe, lr):
    pos, neg = pipe.contexts(lr, [""], ["blurry"])
    te = pipe.cognitive.num_queries
    assert pos.shape == neg.shape == (1, te, 32)
    torch.testing.assert_close(neg, text_token_targets(pipe.text, ["blurry"], te))
    ref = torch.rand(1, 3, 64, 80)
    z_ref, z_zero = pipe.reference_latent(ref, 1)
    with torch.no_grad():  # VAE(zeros): the VAE's own [-1, 1] input range, all zero
        direct = pipe.vae.encode(torch.zeros(1, 3, 64, 80)).latent_dist.mode() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(z_zero, direct)
    torch.testing.assert_close(z_ref, pipe.vae_encode(ref))
    branches = guidance_branches(pos, neg, z_ref, z_zero, 3.0)
    assert branches[0][1].context is neg and branches[0][1].reference is z_zero


def test_context_is_the_cognitive_embedding_alone(pipe, lr, monkeypatch):
    """Issue 19: reference generation and SR cross-attend to the cognitive embedding alone ``(B, Te, D)``
    (not ``[text(""); cognitive]``); the prompt takes part only with --no-cognition."""
    te = pipe.cognitive.num_queries
    pos, _ = pipe.contexts(lr, [""], ["blurry"])
    torch.testing.assert_close(pos, pipe.cognitive.embed(lr))
    seen = []
    unet_forward = type(pipe.unet).forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(("aia" in (kwargs.get("cross_attention_kwargs") or {}), tuple(encoder_hidden_states.shape)))
        return unet_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(pipe.unet), "forward", spy)
    _run(pipe, lr, steps=1, seed=0, reference_steps=1)
    generation = {shape for aia, shape in seen if not aia}
    sr = {shape for aia, shape in seen if aia}
    assert generation == {(2, te, 32)} and sr == {(2, te, 32)}  # CFG: negative + cognitive, Te tokens each
    seen.clear()
    _run(pipe, lr, steps=1, seed=0, reference_steps=1, no_cognition=True, prompt="a cat")
    assert {shape for _, shape in seen} == {(2, 77, 32)}
    with pytest.raises(SemsrError, match="--no-cognition"):
        _run(pipe, lr, steps=1, prompt="a cat")


# ----------------------------------------------------------------------------- pipeline and ablations


def test_pipeline_generates_a_reference_and_ablations(pipe, lr, monkeypatch, tmp_path):
    full = _run(pipe, lr, steps=3, seed=1)
    assert full.images.shape == (1, 3, 64, 80) and 0 <= full.images.min() and full.images.max() <= 1
    ref = full.side_images["reference"]
    assert ref.shape == (1, 3, 64, 80) and torch.equal(ref, (ref * 255).round() / 255)  # 8-bit levels
    assert full.priors["reference_source"] == "generated" and full.priors["cognition"] is True
    assert torch.equal(full.priors["reference"], ref[:1]) and "reference_path" not in full.priors
    assert full.priors["negative_prompt"] == COSER_NEGATIVE and full.priors["prompt"] == ""
    assert set(full.timings) >= {"reference", "encode", "denoise", "decode"}
    assert not hasattr(pipe, "last_reference") and not hasattr(pipe, "side_outputs")

    no_ref = _run(pipe, lr, steps=3, seed=1, no_reference=True)
    assert no_ref.side_images == {} and no_ref.priors["reference_source"] == "none"
    assert "reference" not in no_ref.priors and (no_ref.images - full.images).abs().max() > 1e-3
    other = _png(tmp_path / "other.png", torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(SemsrError, match="--reference and --no-reference"):  # no silently ignored reference
        _run(pipe, lr, steps=3, seed=1, no_reference=True, reference=other)
    with_other = _run(pipe, lr, steps=3, seed=1, reference=other)
    assert (with_other.images - full.images).abs().max() > 1e-3  # the reference matters when used
    assert with_other.priors["reference_source"] == "file" and with_other.priors["reference_path"] == str(other)
    assert with_other.side_images["reference"].shape == (1, 3, 40, 48)

    def boom(*a, **k):
        raise AssertionError("cognitive encoder called")

    base = _run(pipe, lr, steps=3, seed=1, no_cognition=True, reference=other)
    assert base.priors["cognition"] is False
    monkeypatch.setattr(pipe.cognitive, "embed", boom)
    assert torch.equal(_run(pipe, lr, steps=3, seed=1, no_cognition=True, reference=other).images, base.images)
    with pytest.raises(AssertionError, match="cognitive encoder called"):
        _run(pipe, lr, steps=1, seed=1, reference=other)


def test_separate_reference_guidance_changes_the_result(pipe, lr, tmp_path):
    ref = _png(tmp_path / "ref.png", torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(2)))
    a = _run(pipe, lr, steps=2, seed=0, reference=ref, guidance_scale=3.0).images
    b = _run(pipe, lr, steps=2, seed=0, reference=ref, guidance_scale=3.0, reference_guidance=3.0).images
    c = _run(pipe, lr, steps=2, seed=0, reference=ref, guidance_scale=3.0, reference_guidance=6.0).images
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4


def test_latent_tiles_match_shape_and_stay_close(pipe, tmp_path):
    lr = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(4))
    ref = _png(tmp_path / "ref.png", torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)))
    whole = _run(pipe, lr, steps=2, seed=0, reference=ref, latent_tile=0).images
    tiles = _run(pipe, lr, steps=2, seed=0, reference=ref, latent_tile=8, tile_overlap=4).images
    assert tiles.shape == whole.shape == (1, 3, 128, 160)
    assert (tiles - whole).abs().mean() < 0.1
    # --tile (input px) is the same tile in latent pixels of the 4x output (VAE factor 8)
    assert torch.equal(
        _run(pipe, lr, steps=2, seed=0, reference=ref, tile=16).images,
        _run(pipe, lr, steps=2, seed=0, reference=ref, latent_tile=8).images,
    )


# ----------------------------------------------------------------------------- method


def test_options_schema_and_errors():
    spec = resolve("coser")
    opts = spec.parse({"steps": "3", "reference_size": "256", "no_reference": "true", "reference": "~/r.png"})
    assert (opts.steps, opts.reference_size, opts.no_reference) == (3, 256, True)
    assert opts.reference == Path("~/r.png").expanduser()
    infos = CoSeROptions.infos()
    assert {n for n in ("checkpoint", "clip", "base") if infos[n].stage == "build"} == {"checkpoint", "clip", "base"}
    assert infos["reference"].widget == "image" and infos["reference"].stage == "run"
    defaults = CoSeROptions()
    assert (defaults.steps, defaults.guidance_scale, defaults.negative_prompt) == (50, 3.0, COSER_NEGATIVE)
    assert defaults.reference_guidance is None and defaults.reference_gen_guidance == 7.0
    with pytest.raises(OptionError, match="did you mean reference_size"):
        spec.parse({"referense_size": 3})
    assert spec.diffusion and set(spec.weight_paths) == {"base", "checkpoint", "clip"}
    with pytest.raises(UnavailableError, match="pass --checkpoint"):
        spec.build(spec.parse({"base": "/nowhere"}))


def test_method_caches_generated_references(tiny_models, tmp_path, monkeypatch, lr):
    monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / "cache"))
    spec = resolve("coser")
    options = spec.parse(
        {
            "base": tiny_models / "sd",
            "checkpoint": tiny_models / "coser",
            "clip": tiny_models / "clip-vision",
            "steps": 2,
            "seed": 3,
        }
    )
    method = spec.build(options)
    calls = []
    original = method.generate_reference

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(method, "generate_reference", counting)
    first = method(lr, options)
    second = method(lr, options)
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "coser-references").glob("*.png"))) == 1
    assert (first.priors["reference_source"], second.priors["reference_source"]) == ("generated", "cache")
    assert torch.equal(first.side_images["reference"], second.side_images["reference"])
    assert torch.equal(first.images, second.images)
    method(lr, options.replace(seed=4))  # another generation setting: another entry
    assert len(calls) == 2
    # references cached by another version of the generation (e.g. the former [text; cognitive] context)
    # are not reused
    monkeypatch.setattr(coser_module, "REFERENCE_VERSION", coser_module.REFERENCE_VERSION - 1)
    method(lr, options)
    assert len(calls) == 3
    # the spec and the pipeline agree: coser has no text priors to suggest (its prior is an embedding)
    assert spec.suggests_priors is False and not isinstance(method, SuggestsPriors)


# ----------------------------------------------------------------------------- CLI


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_end_to_end_with_reference_cache(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / "cache"))
    calls = []
    original = CoSeRSR.generate_reference

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CoSeRSR, "generate_reference", counting)
    img = _image(tmp_path / "img.png", 7)
    args = [
        "upscale",
        "-i",
        img,
        "-o",
        tmp_path / "out",
        "--method",
        "coser",
        "--base",
        tiny_models / "sd",
        "--checkpoint",
        tiny_models / "coser",
        "--clip",
        tiny_models / "clip-vision",
        "--steps",
        "4",
        "--save-reference",
        "--no-progress",
    ]
    assert main([str(a) for a in args]) == 0
    out, ref = tmp_path / "out" / "img_out.png", tmp_path / "out" / "img_out_reference.png"
    assert Image.open(out).size == (80, 64) and Image.open(ref).size == (80, 64)
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "coser-references").glob("*.png"))) == 1
    first, first_ref = np.asarray(Image.open(out)), np.asarray(Image.open(ref))
    assert main([str(a) for a in args + ["--overwrite"]]) == 0
    assert len(calls) == 1  # second run: the reference came from the cache
    assert np.array_equal(np.asarray(Image.open(out)), first)
    assert np.array_equal(np.asarray(Image.open(ref)), first_ref)
    # a user reference is used as given (no generation) and saved beside the output
    user = _image(tmp_path / "user_ref.png", 9)
    assert main([str(a) for a in args + ["--overwrite", "--reference", user, "--suffix", "u"]]) == 0
    assert len(calls) == 1 and (tmp_path / "out" / "img_u_reference.png").is_file()
    # the no-reference ablation writes no reference
    assert main([str(a) for a in args + ["--no-reference", "--suffix", "nr"]]) == 0
    assert (tmp_path / "out" / "img_nr.png").is_file() and not (tmp_path / "out" / "img_nr_reference.png").exists()
    capsys.readouterr()


def test_cli_missing_paths_are_one_line_errors(tiny_models, tmp_path, capsys):
    img = _image(tmp_path / "img.png", 1)
    rc = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(tmp_path / "o"),
            "--method",
            "coser",
            "--base",
            str(tiny_models / "sd"),
            "--checkpoint",
            str(tiny_models / "coser"),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "--clip" in err and "Traceback" not in err
    rc = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(tmp_path / "o"),
            "--method",
            "coser",
            "--base",
            str(tiny_models / "sd"),
            "--checkpoint",
            str(tmp_path),
            "--clip",
            str(tiny_models / "clip-vision"),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "CoSeR checkpoint" in err


# ----------------------------------------------------------------------------- training


def test_tiny_training_configs_run_through_semsr_train(tiny_models, tmp_path, capsys):
    hr = write_textures(tmp_path / "hr", count=5, size=(72, 72))
    common = [f"data.hr=[{hr}]", "data.val_count=1", "data.limit=0"]
    cog = [
        "train",
        "--config",
        str(REPO / "configs" / "coser-cognitive-tiny.yaml"),
        "--output",
        str(tmp_path / "cog"),
        "--max-steps",
        "3",
        f"model.pretrained={tiny_models / 'sd'}",
        f"model.options.clip={tiny_models / 'clip-vision'}",
        *common,
    ]
    assert main(cog) == 0
    records = [json.loads(line) for line in (tmp_path / "cog" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert "cognitive_mse" in records[0]["terms"]
    assert read_index(tmp_path / "cog" / "final", "coser").components == {"cognitive": ("semsr", "CognitiveEncoder")}

    sr = [
        "train",
        "--config",
        str(REPO / "configs" / "coser-tiny.yaml"),
        "--output",
        str(tmp_path / "sr"),
        "--max-steps",
        "2",
        f"model.pretrained={tiny_models / 'sd'}",
        f"model.options.clip={tiny_models / 'clip-vision'}",
        f"model.options.cognitive={tmp_path / 'cog' / 'final'}",
        "validation.every=2",
        *common,
    ]
    assert main(sr) == 0
    records = [json.loads(line) for line in (tmp_path / "sr" / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "train", "val"]
    final = tmp_path / "sr" / "final"
    # the exported folder is a complete checkpoint for the coser method
    assert set(read_index(final, "coser").components) == {"cognitive", "aia"}
    pipe = CoSeRSR.from_pretrained(tiny_models / "sd", final, tiny_models / "clip-vision")
    assert pipe(torch.rand(1, 3, 16, 16), CoSeROptions(steps=1)).images.shape == (1, 3, 64, 64)
    # ... and a stage-1 export is not
    with pytest.raises(UnavailableError, match="no 'aia' component"):
        CoSeRSR.from_pretrained(tiny_models / "sd", tmp_path / "cog" / "final", tiny_models / "clip-vision")
    capsys.readouterr()


def test_sr_task_trains_aia_and_encoders_only(tiny_models, tmp_path):
    hr = write_textures(tmp_path / "hr", count=4, size=(72, 72))
    cfg = config_from_dict(
        {
            "name": "t",
            "task": "coser-sr",
            "model": {
                "pretrained": str(tiny_models / "sd"),
                "options": {
                    "clip": str(tiny_models / "clip-vision"),
                    "cognitive": str(tiny_models / "coser"),
                    "reference_top_k": 2,
                },
            },
            "data": {"hr": [str(hr)], "val_count": 1, "crop_size": 64, "scale": 4, "batch_size": 2},
        }
    )
    task = CoSeRSRTask(cfg)
    trainable = {id(p) for p in task.trainable.parameters() if p.requires_grad}
    assert trainable and len(trainable) == sum(1 for _ in task.trainable.parameters())
    assert not any(p.requires_grad for p in task.unet.parameters())
    assert not any(p.requires_grad for p in task.cognitive.parameters())
    # references are other training images (never the crop's own image when there are others)
    for pos in range(6):
        i = task.references.dataset.index_at(pos)
        assert task.references.neighbour(pos, torch.Generator().manual_seed(pos)) != i
    # the pool embeddings are kept in a prior store per CLIP model in the cache
    assert len(list((Path(os.environ["SEMSR_CACHE"]) / "coser-clip-store").glob("*/index.sqlite"))) >= 1
    with pytest.raises(SemsrError, match="unknown model.options"):
        CoSeRSRTask(
            config_from_dict(
                {
                    **cfg.to_dict(),
                    "model": {
                        "pretrained": str(tiny_models / "sd"),
                        "options": {"clip": "x", "cognitive": "y", "bogus": 1},
                    },
                }
            )
        )


def _sr_config(tiny_models: Path, hr: list[Path], **options) -> dict:
    return {
        "name": "t",
        "task": "coser-sr",
        "model": {
            "pretrained": str(tiny_models / "sd"),
            "options": {
                "clip": str(tiny_models / "clip-vision"),
                "cognitive": str(tiny_models / "coser"),
                "reference_top_k": 2,
                **options,
            },
        },
        "data": {"hr": [str(h) for h in hr], "val_count": 1, "crop_size": 64, "scale": 4, "batch_size": 2},
    }


def test_sr_training_context_is_the_cognitive_embedding_alone(tiny_models, tmp_path):
    hr = write_textures(tmp_path / "hr", count=3, size=(72, 72))
    task = CoSeRSRTask(config_from_dict(_sr_config(tiny_models, [hr])))
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    context, z_lr, z_ref = task.conditions(lr, torch.tensor([0, 1]), gens, (64, 64))
    te = task.cognitive.num_queries
    assert context.shape == (2, te, 32) and z_lr.shape == z_ref.shape == (2, 4, 8, 8)
    cog = task.cognitive.embed(lr)
    null = text_token_targets(task.text, ["", ""], te)
    for i in range(2):  # each sample: its cognitive embedding, or the null tokens (prompt drop-out)
        assert torch.allclose(context[i], cog[i]) or torch.allclose(context[i], null[i])


def _class_folders(root: Path, counts: dict[str, int]) -> Path:
    for k, (name, count) in enumerate(counts.items()):
        write_textures(root / name, count=count, size=(72, 72), seed=10 * k)
    return root


def test_training_references_same_class_with_labels_else_clip_neighbours(tiny_models, tmp_path):
    """Issue 19: ImageNet-style class folders give same-class references; a flat folder CLIP neighbours."""
    classes = _class_folders(tmp_path / "imagenet", {"n01": 3, "n02": 3, "n03": 3})
    task = CoSeRSRTask(config_from_dict(_sr_config(tiny_models, [classes])))
    refs = task.references
    assert refs.pool == "class" and len(refs.items) == 8  # 9 images, the last held out for validation
    labels = [it.path.parent.name for it in refs.items]
    for i, row in enumerate(refs.neighbours):
        assert len(row) >= 1 and all(labels[int(j)] == labels[i] and int(j) != i for j in row)
    for pos in range(8):
        i = refs.dataset.index_at(pos)
        j = refs.neighbour(pos, torch.Generator().manual_seed(pos))
        assert labels[j] == labels[i] and j != i
    # the same images as CLIP neighbours when asked: other classes become candidates
    clip_refs = CoSeRSRTask(config_from_dict(_sr_config(tiny_models, [classes], reference_pool="clip"))).references
    assert clip_refs.pool == "clip" and any(
        labels[int(j)] != labels[i] for i, r in enumerate(clip_refs.neighbours) for j in r
    )
    # a flat folder has no labels: CLIP neighbours over all images
    flat = write_textures(tmp_path / "flat", count=4, size=(72, 72))
    flat_refs = CoSeRSRTask(config_from_dict(_sr_config(tiny_models, [flat]))).references
    assert flat_refs.pool == "clip" and all(i not in r.tolist() for i, r in enumerate(flat_refs.neighbours))
    with pytest.raises(SemsrError, match="not in a class folder"):
        NeighbourReferences(config_from_dict(_sr_config(tiny_models, [flat])), task.cognitive.clip, pool="class")


def test_training_references_never_fall_back_silently(tiny_models, tmp_path):
    clip = load_clip_vision(tiny_models / "clip-vision")
    mixed = _class_folders(tmp_path / "mixed", {"n01": 2})
    write_textures(mixed, count=2, size=(72, 72), seed=5)
    with pytest.raises(SemsrError, match="reference_pool"):
        NeighbourReferences(config_from_dict(_sr_config(tiny_models, [mixed])), clip)
    lone = _class_folders(tmp_path / "lone", {"n01": 3, "n02": 1, "n03": 1})  # n03 held out; n02 alone
    with pytest.raises(SemsrError, match="class 'n02' has no other image"):
        NeighbourReferences(config_from_dict(_sr_config(tiny_models, [lone])), clip)
    single = write_textures(tmp_path / "single", count=2, size=(72, 72))  # one training image + validation
    with pytest.raises(SemsrError, match="no other image"):
        NeighbourReferences(config_from_dict(_sr_config(tiny_models, [single])), clip)


def test_cognitive_training_without_captions_is_an_error(tiny_models, tmp_path):
    hr = write_textures(tmp_path / "hr", count=3, size=(72, 72))
    cfg = {
        "name": "c",
        "task": "coser-cognitive",
        "model": {"pretrained": str(tiny_models / "sd"), "options": {"clip": str(tiny_models / "clip-vision")}},
        "data": {"hr": [str(hr)], "val_count": 1, "crop_size": 64, "scale": 4, "batch_size": 2},
    }
    with pytest.raises(SemsrError, match="data.prompt"):
        CoSeRCognitiveTask(config_from_dict(cfg))
    CoSeRCognitiveTask(config_from_dict({**cfg, "data": {**cfg["data"], "prompt": "a photo"}}))
