"""RFA recipe: aligner training, checkpoint round trip, bench-retrieval CLI, AdaIN gates, end-to-end run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfa_helpers import one_thread, write_blocks  # noqa: F401  (autouse fixture)
from semsr.models.rfa import AlignerConfig, ReferenceFindingAligner, align_loss, load_aligner
from semsr.train.rfa import PairFeatures, split_by_hash, train_aligner


def _synthetic_pairs(n: int = 96, tokens: int = 5, tdim: int = 12, dim: int = 16, seed: int = 0):
    """LR tokens whose HR target is a fixed non-linear function of them; raw LR vector = noisy target."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(n, tokens, tdim, generator=g)
    w = torch.randn(tdim, dim, generator=g)
    hr = F.normalize(torch.tanh(tok.mean(1) @ w) + 0.5 * torch.tanh(tok[:, 0] @ w), dim=-1)
    lr_vec = F.normalize(hr + 0.8 * torch.randn(n, dim, generator=g), dim=-1)
    feats = PairFeatures(lr_vec, tok, torch.arange(n), [f"{i:04d}" for i in range(n)])
    return feats, hr


@pytest.mark.parametrize("residual", [True, False])
def test_aligner_loss_falls(residual: bool) -> None:
    feats, hr = _synthetic_pairs(n=48)
    model, losses = train_aligner(feats, hr, steps=60, batch=48, lr=3e-3, width=32, depth=1, heads=2,
                                  residual=residual)
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        pred = model(feats.lr_tokens, feats.lr_vec)
    assert float(align_loss(pred, hr)) < float(align_loss(feats.lr_vec, hr))


def test_residual_aligner_starts_as_identity_and_round_trips(tmp_path: Path) -> None:
    cfg = AlignerConfig(token_dim=12, out_dim=16, num_tokens=5, width=32, depth=1, heads=2, embedder="x")
    model = ReferenceFindingAligner(cfg).eval()
    feats, _ = _synthetic_pairs(n=4)
    with torch.no_grad():
        assert torch.allclose(model(feats.lr_tokens, feats.lr_vec), feats.lr_vec)
        model.head.bias.fill_(0.1)
        ref = model(feats.lr_tokens, feats.lr_vec)
    model.save(tmp_path / "al")
    again = load_aligner(tmp_path / "al", "x")
    with torch.no_grad():
        assert torch.allclose(again(feats.lr_tokens, feats.lr_vec), ref)
    from semsr.core.errors import SemsrError

    with pytest.raises(SemsrError):
        load_aligner(tmp_path / "al", "other-embedder")
    with pytest.raises(SemsrError):
        again(feats.lr_tokens[:, :3], feats.lr_vec)


def test_split_by_hash_is_deterministic_and_disjoint() -> None:
    shas = [f"{i:08x}" for i in range(50)]
    tr, ho = split_by_hash(shas, 0.2, seed=3)
    assert (tr, ho) == split_by_hash(list(shas), 0.2, seed=3)
    assert len(ho) == 10 and not set(tr) & set(ho) and len(tr) + len(ho) == 50


def test_bench_retrieval_cli(tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture) -> None:
    from semsr.cli import main

    imgs = write_blocks(tmp_path / "imgs", 10)
    out = tmp_path / "r.json"
    rc = main(["bench-retrieval", "--images", str(imgs), "--db", str(tmp_path / "db"), "--embedder",
               f"clip:{tiny_models / 'clip-vision'}", "--steps", "10", "--holdout", "0.3", "--json", str(out),
               "--lr-size", "8",  # below the tiny CLIP's 32 px input, so LR and HR embeddings differ
               "--save-aligner", str(tmp_path / "aligner")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["database_size"] == 10 and res["heldout_pairs"] == 3 and res["train_pairs"] == 7
    for q in ("raw", "aligned"):
        assert 0.0 <= res["heldout"][q]["top1"] <= res["heldout"][q]["top4"] <= 1.0
    assert "top-4" in capsys.readouterr().out
    # the saved aligner serves LR queries in `semsr index search --aligner`
    assert main(["index", "search", str(imgs / "3.png"), "--db", str(tmp_path / "db"), "-k", "2", "--json",
                 "--aligner", str(tmp_path / "aligner")]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2


def test_adain_gates_at_init_leave_unet_unchanged_and_learn(tiny_models: Path) -> None:
    from diffusers import UNet2DConditionModel

    from semsr.fusion.adain import attach_adain

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    keys = set(unet.state_dict())
    adapters = attach_adain(unet, control_dim=16)
    assert set(unet.state_dict()) == keys  # the UNet's own weights/keys are untouched
    gates = adapters.gates()
    assert gates and all(float(v.detach()) == 0.0 for v in gates.values())
    ctrl = torch.randn(1, 16, generator=g)  # repeated over the batch (as for CFG)
    with torch.no_grad(), adapters.control(ctrl):
        same = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(same, ref, atol=1e-5)
    # opened gates change the output, and the gates receive gradients
    with torch.no_grad():
        for v in gates.values():
            v.fill_(0.5)
    with adapters.control(ctrl):
        out = unet(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(out, ref, atol=1e-4)
    out.pow(2).mean().backward()
    assert all(v.grad is not None and float(v.grad.abs()) > 0 for v in gates.values())


def test_enhancer_loss_falls_and_text_decodes(tiny_models: Path) -> None:
    from semsr.models.rfa import (EmbeddingEnhancer, EnhancerConfig, caption_loss, enhancer_loss, generate_text,
                                  load_text_decoder)

    lm, tok = load_text_decoder(tiny_models / "text-decoder")
    g = torch.Generator().manual_seed(0)
    lr_tok, refs = torch.randn(8, 5, 12, generator=g), torch.randn(8, 4, 5, 12, generator=g)
    hr = F.normalize(torch.tanh(refs.mean((1, 2)) @ torch.randn(12, 16, generator=g)), dim=-1)
    torch.manual_seed(0)
    model = EmbeddingEnhancer(EnhancerConfig(token_dim=12, out_dim=16, num_tokens=5, lm_dim=lm.config.n_embd,
                                             width=32, depth=1, heads=2, prefix_len=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = tok(["a photo of a cat"] * 8, return_tensors="pt").input_ids
    cos_losses, cap_losses = [], []
    for _ in range(30):
        emb, prefix = model(lr_tok, refs)
        cos, cap = enhancer_loss(emb, hr), caption_loss(lm, prefix, ids)
        opt.zero_grad()
        (cos + cap).backward()
        opt.step()
        cos_losses.append(float(cos.detach()))
        cap_losses.append(float(cap.detach()))
    assert np.mean(cos_losses[-5:]) < 0.5 * np.mean(cos_losses[:3])
    # only the prefix is trained (frozen random LM): the teacher-forced caption loss still goes down
    assert np.mean(cap_losses[-5:]) < np.mean(cap_losses[:3]) - 0.5
    with torch.no_grad():
        texts = generate_text(lm, tok, model(lr_tok[:2], refs[:2, :3])[1], max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_rfa_end_to_end_saves_references(tmp_path: Path, tiny_models: Path) -> None:
    from PIL import Image

    from semsr.cli import main

    rng = np.random.default_rng(1)
    refs = write_blocks(tmp_path / "refs", 3, px=12, seed=1, prefix="r")
    db = tmp_path / "db"
    assert main(["index", "build", "--images", str(refs), "--out", str(db), "--embedder",
                 f"clip:{tiny_models / 'clip-vision'}"]) == 0
    lr = tmp_path / "lr.png"
    Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).save(lr)
    out = tmp_path / "out"
    assert main(["upscale", "-i", str(lr), "-o", str(out), "--method", "rfa", "--base", str(tiny_models / "sd"),
                 "--controlnet", str(tiny_models / "controlnet"), "--checkpoint", str(tiny_models / "rfa"),
                 "--db", str(db), "--save-reference", "--num-references", "2", "--steps", "2"]) == 0
    made = sorted(p.name for p in out.iterdir())
    assert len([m for m in made if "_reference" in m]) == 2
    main_out = [m for m in made if "_reference" not in m]
    assert len(main_out) == 1 and Image.open(out / main_out[0]).size == (64, 64)  # x16 default
    # without a database or --clip the method explains what it needs
    assert main(["upscale", "-i", str(lr), "-o", str(tmp_path / "out2"), "--method", "rfa", "--base",
                 str(tiny_models / "sd"), "--checkpoint", str(tiny_models / "rfa")]) != 0
