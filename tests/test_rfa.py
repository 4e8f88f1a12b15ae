"""RFA recipe: aligner fit, component round trips, `semsr bench retrieval`, AdaIN gates, the method contract,
end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfa_helpers import bench_retrieval, one_thread, write_blocks  # noqa: F401  (autouse fixture)
from semsr.core.components import load_checkpoint, load_component, read_index
from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.adain import AdaINAdapters, attach_adain, detach_adain
from semsr.models.rfa import EmbeddingEnhancer, ReferenceFindingAligner, align_loss, check_embedder, default_aligner_dir
from semsr.train.losses import combine_losses
from semsr.train.rfa import PairFeatures, aligner_outputs, split_by_hash


def _synthetic_pairs(n: int = 96, tokens: int = 5, tdim: int = 12, dim: int = 16, seed: int = 0):
    """LR tokens whose HR target is a fixed non-linear function of them; raw LR vector = noisy target."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(n, tokens, tdim, generator=g)
    w = torch.randn(tdim, dim, generator=g)
    hr = F.normalize(torch.tanh(tok.mean(1) @ w) + 0.5 * torch.tanh(tok[:, 0] @ w), dim=-1)
    lr_vec = F.normalize(hr + 0.8 * torch.randn(n, dim, generator=g), dim=-1)
    feats = PairFeatures(lr_vec, tok, torch.arange(n), [f"{i:04d}" for i in range(n)])
    return feats, hr


def _fit(
    feats: PairFeatures, hr: torch.Tensor, *, steps: int, lr: float, residual: bool
) -> tuple[ReferenceFindingAligner, list[float]]:
    """Full-batch AdamW on the ``rfa-aligner`` task's step (``aligner_outputs`` + ``rfa_align_l2``)."""
    torch.manual_seed(0)
    n, tokens, tdim = feats.lr_tokens.shape
    model = ReferenceFindingAligner(
        token_dim=tdim, out_dim=hr.shape[1], num_tokens=tokens, width=32, depth=1, heads=2, residual=residual
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    losses = []
    for _ in range(steps):
        loss, _ = combine_losses({"rfa_align_l2": 1.0}, aligner_outputs(model, feats.lr_tokens, feats.lr_vec, hr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


@pytest.mark.parametrize("residual", [True, False])
def test_aligner_loss_falls(residual: bool) -> None:
    feats, hr = _synthetic_pairs(n=48)
    model, losses = _fit(feats, hr, steps=60, lr=3e-3, residual=residual)
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        pred = model(feats.lr_tokens, feats.lr_vec)
    assert float(align_loss(pred, hr)) < float(align_loss(feats.lr_vec, hr))


def test_residual_aligner_starts_as_identity_and_round_trips(tmp_path: Path) -> None:
    model = ReferenceFindingAligner(
        token_dim=12, out_dim=16, num_tokens=5, width=32, depth=1, heads=2, embedder="x"
    ).eval()
    feats, _ = _synthetic_pairs(n=4)
    with torch.no_grad():
        assert torch.allclose(model(feats.lr_tokens, feats.lr_vec), feats.lr_vec)
        model.head.bias.fill_(0.1)
        ref = model(feats.lr_tokens, feats.lr_vec)
    model.save_pretrained(tmp_path / "al")
    again = load_component(ReferenceFindingAligner, tmp_path / "al")  # the structure comes from config.json alone
    with torch.no_grad():
        assert torch.allclose(again(feats.lr_tokens, feats.lr_vec), ref)
    check_embedder(again, SimpleNamespace(spec="x", token_dim=12, num_tokens=5, dim=16))
    with pytest.raises(SemsrError, match="gives 16-d embeddings, the embedder x 24-d"):
        check_embedder(again, SimpleNamespace(spec="x", token_dim=12, num_tokens=5, dim=24))
    with pytest.raises(SemsrError, match="trained for embedder"):
        check_embedder(again, SimpleNamespace(spec="other-embedder", token_dim=12, num_tokens=5))
    with pytest.raises(SemsrError, match="tokens"):
        check_embedder(again, SimpleNamespace(spec="x", token_dim=12, num_tokens=7))
    with pytest.raises(SemsrError):
        again(feats.lr_tokens[:, :3], feats.lr_vec)


def test_shipped_aligner_is_a_component() -> None:
    folder = default_aligner_dir("hed-vgg")
    model = load_component(ReferenceFindingAligner, folder)
    assert (model.config.embedder, model.config.token_dim, model.config.num_tokens) == ("hed-vgg", 512, 64)
    assert next(model.parameters()).dtype == torch.float32  # stored in fp16, computed in fp32
    assert (folder / "report.json").is_file()


def test_split_by_hash_is_deterministic_and_disjoint() -> None:
    shas = [f"{i:08x}" for i in range(50)]
    tr, ho = split_by_hash(shas, 0.2, seed=3)
    assert (tr, ho) == split_by_hash(list(shas), 0.2, seed=3)
    assert len(ho) == 10 and not set(tr) & set(ho) and len(tr) + len(ho) == 50


def test_bench_retrieval_cli(tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture) -> None:
    from semsr.cli import main

    imgs = write_blocks(tmp_path / "imgs", 10)
    out = tmp_path / "r.json"
    rc = bench_retrieval(
        [
            "--images",
            str(imgs),
            "--db",
            str(tmp_path / "db"),
            "--embedder",
            f"clip:{tiny_models / 'clip-vision'}",
            "--steps",
            "10",
            "--holdout",
            "0.3",
            "--json",
            str(out),
            "--lr-size",
            "8",  # below the tiny CLIP's 32 px input: LR and HR embeddings differ
            "--save-aligner",
            str(tmp_path / "aligner"),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["database_size"] == 10 and res["heldout_pairs"] == 3 and res["train_pairs"] == 7
    assert res["steps"] == 10 and np.isfinite(res["loss_first"]) and np.isfinite(res["loss_last"])
    assert load_component(ReferenceFindingAligner, tmp_path / "aligner").config.embedder == res["embedder"]
    for q in ("raw", "aligned"):
        assert 0.0 <= res["heldout"][q]["top1"] <= res["heldout"][q]["top4"] <= 1.0
    assert "top-4" in capsys.readouterr().out
    # the saved aligner serves LR queries in `semsr index search --aligner`
    assert (
        main(
            [
                "index",
                "search",
                str(imgs / "3.png"),
                "--db",
                str(tmp_path / "db"),
                "-k",
                "2",
                "--json",
                "--aligner",
                str(tmp_path / "aligner"),
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2


def test_adain_gates_at_init_leave_unet_unchanged_and_learn(tiny_models: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    keys = set(unet.state_dict())
    adapters = attach_adain(unet, AdaINAdapters.for_model(unet, control_dim=16))
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
    assert adapters.state.embedding is None  # the control is set inside the block only
    with torch.no_grad():
        assert torch.allclose(unet(x, t, encoder_hidden_states=ctx).sample, ref, atol=1e-5)  # off outside it


def test_fp32_adain_adapters_run_on_a_bf16_model(tiny_models: Path) -> None:
    """Mixed-precision training: trainable fp32 adapters on the frozen bf16 UNet (outside autocast)."""
    from diffusers import UNet2DConditionModel

    from semsr.testing.tiny_rfa import open_adapters

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd" / "unet").eval().to(torch.bfloat16)
    adapters = attach_adain(unet, open_adapters(AdaINAdapters.for_model(unet, control_dim=16)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g).bfloat16()
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g).bfloat16()
    with adapters.control(torch.randn(1, 16, generator=g)):
        out = unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    assert all(v.grad is not None and v.grad.dtype == torch.float32 for v in adapters.gates().values())


def test_adain_adapters_are_a_component_checked_against_the_model(tiny_models: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sd" / "unet").eval()
    adapters = AdaINAdapters.for_model(unet, control_dim=16)
    with torch.no_grad():
        for v in adapters.gates().values():
            v.fill_(0.3)
    adapters.save_pretrained(tmp_path / "adain")
    again = load_component(AdaINAdapters, tmp_path / "adain")  # built from its config, without the UNet
    assert again.state_dict().keys() == adapters.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in adapters.state_dict().items())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    ctrl = torch.randn(1, 16, generator=g)
    outs = []
    for ad in (adapters, again):
        attach_adain(unet, ad)
        with torch.no_grad(), ad.control(ctrl):
            outs.append(unet(x, torch.tensor([20]), encoder_hidden_states=ctx).sample)
    assert torch.equal(outs[0], outs[1])
    detach_adain(unet)
    other = AdaINAdapters(control_dim=16, block_widths={"down_blocks__0__attentions__0__transformer_blocks__0": [8, 8]})
    with pytest.raises(SemsrError, match="do not fit"):
        attach_adain(unet, other)


def test_enhancer_loss_falls_and_text_decodes(tiny_models: Path) -> None:
    from semsr.models.rfa import caption_loss, enhancer_loss, generate_text, load_text_decoder

    lm, tok = load_text_decoder(tiny_models / "text-decoder")
    g = torch.Generator().manual_seed(0)
    lr_tok, refs = torch.randn(8, 5, 12, generator=g), torch.randn(8, 4, 5, 12, generator=g)
    hr = F.normalize(torch.tanh(refs.mean((1, 2)) @ torch.randn(12, 16, generator=g)), dim=-1)
    torch.manual_seed(0)
    model = EmbeddingEnhancer(
        token_dim=12, out_dim=16, num_tokens=5, lm_dim=lm.config.n_embd, width=32, depth=1, heads=2, prefix_len=2
    )
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


@pytest.fixture(scope="module")
def reference_db(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference database of 3 block images (tiny CLIP embedder)."""
    from semsr.cli import main

    root = tmp_path_factory.mktemp("rfa-db")
    refs = write_blocks(root / "refs", 3, px=12, seed=1, prefix="r")
    assert (
        main(
            [
                "index",
                "build",
                "--images",
                str(refs),
                "--out",
                str(root / "db"),
                "--embedder",
                f"clip:{tiny_models / 'clip-vision'}",
            ]
        )
        == 0
    )
    return root / "db"


def test_rfa_method_returns_references_and_keeps_no_state(tiny_models: Path, reference_db: Path) -> None:
    from semsr.methods import build, resolve

    spec = resolve("rfa")
    assert spec.scale == 16 and spec.suggests_priors and spec.diffusion
    method = build(
        "rfa",
        {
            "base": tiny_models / "sd",
            "controlnet": tiny_models / "controlnet",
            "checkpoint": tiny_models / "rfa",
            "db": reference_db,
        },
    )
    assert method.name == "rfa" and method.scale == 16 and method.tiles_itself
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    before = dict(vars(method))
    out = method(x, spec.parse({"num_references": 2, "steps": 1}))
    assert out.images.shape == (1, 3, 64, 64)
    assert sorted(out.side_images) == ["reference1", "reference2"]  # always, whether or not they are saved
    pri = out.priors
    assert pri["prompt_source"] == "text decoder" and len(pri["reference_paths"]) == 2
    assert len(pri["reference_scores"]) == 2 and pri["negative_prompt"]
    assert all(torch.equal(pri[k], v) and v.shape[:2] == (1, 3) for k, v in out.side_images.items())
    assert {"retrieve", "denoise", "decode"} <= set(out.timings)
    # nothing of the call stays on the method: no last_* / side_outputs, the AdaIN control is off again
    assert vars(method).keys() == before.keys() and not hasattr(method, "side_outputs")
    assert method.adapters.state.embedding is None
    user = method(x, spec.parse({"prompt": "a wall", "num_references": 1, "steps": 1}))
    assert user.priors["prompt"] == "a wall" and user.priors["prompt_source"] == "user"
    assert sorted(user.side_images) == ["reference1"]
    sugg = method.suggest_priors(x)
    assert set(sugg) >= {"negative_prompt", "reference_paths", "reference_scores"}
    assert len(sugg["reference_paths"]) == 3  # the default 4 references, of 3 in the database
    with pytest.raises(SemsrError):
        method.suggest_priors(x[0])


def test_rfa_build_errors(tiny_models: Path, reference_db: Path, tmp_path: Path) -> None:
    from semsr.methods import build
    from semsr.models.rfa import save_rfa_checkpoint

    base = {"base": tiny_models / "sd", "checkpoint": tiny_models / "rfa"}
    # no database: an error naming --db and the opt-out (before: ran without references)
    with pytest.raises(UnavailableError, match="--db DB .*--no-database"):
        build("rfa", base)
    with pytest.raises(UnavailableError, match="--no-database needs --clip"):
        build("rfa", {**base, "no_database": True})
    with pytest.raises(SemsrError, match="--db and --no-database contradict"):
        build("rfa", {**base, "db": reference_db, "no_database": True})
    with pytest.raises(SemsrError, match="nothing is retrieved"):
        build("rfa", {**base, "no_database": True, "no_aligner": True, "clip": tiny_models / "clip-vision"})
    with pytest.raises(UnavailableError, match="--checkpoint"):
        build("rfa", {"base": tiny_models / "sd", "db": reference_db})
    parts, index = load_checkpoint(tiny_models / "rfa", "rfa")
    assert set(parts) == {"aligner", "enhancer", "adain", "controlnet_adain"}
    assert index.meta == {"text_decoder": "text-decoder"}
    # no aligner: an error naming --aligner and --no-aligner (before: the raw LR embedding, silently)
    save_rfa_checkpoint(tmp_path / "bare", {k: v for k, v in parts.items() if k != "aligner"})
    assert read_index(tmp_path / "bare").meta == {}
    bare = {**base, "checkpoint": tmp_path / "bare", "db": reference_db, "text_decoder": tiny_models / "text-decoder"}
    with pytest.raises(UnavailableError, match="--aligner DIR .*--no-aligner"):
        build("rfa", bare)
    # no text decoder: an error naming --text-decoder and --no-text-decoder (before: the empty prompt, silently)
    with pytest.raises(UnavailableError, match="--text-decoder DIR, or --no-text-decoder"):
        build("rfa", {**bare, "text_decoder": None, "no_aligner": True})
    for name in ("enhancer", "controlnet_adain"):  # ControlNet adapters are part of the recipe
        save_rfa_checkpoint(tmp_path / f"no-{name}", {k: v for k, v in parts.items() if k != name})
        with pytest.raises(UnavailableError, match=name):
            build("rfa", {**base, "checkpoint": tmp_path / f"no-{name}", "db": reference_db})


def test_rfa_opt_outs_run_and_are_recorded_in_priors(tiny_models: Path, reference_db: Path, tmp_path: Path) -> None:
    from semsr.methods import build, resolve
    from semsr.models.rfa import save_rfa_checkpoint

    parts, _ = load_checkpoint(tiny_models / "rfa", "rfa")
    save_rfa_checkpoint(tmp_path / "bare", {k: v for k, v in parts.items() if k != "aligner"})
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    run = resolve("rfa").parse({"steps": 1, "num_references": 2})
    common = {"base": tiny_models / "sd", "controlnet": tiny_models / "controlnet"}
    raw = build("rfa", {**common, "checkpoint": tmp_path / "bare", "db": reference_db, "no_aligner": True,
                        "no_text_decoder": True})  # fmt: skip
    out = raw(x, run)
    assert out.priors["no_aligner"] is True and out.priors["no_text_decoder"] is True
    assert out.priors["prompt_source"] == "none" and len(out.side_images) == 2
    assert "no_database" not in out.priors
    alone = build(
        "rfa", {**common, "checkpoint": tiny_models / "rfa", "no_database": True, "clip": tiny_models / "clip-vision"}
    )
    out = alone(x, run)
    assert out.priors["no_database"] is True and not out.side_images and "reference_paths" not in out.priors
    assert out.priors["prompt_source"] == "text decoder" and out.images.shape == (1, 3, 64, 64)
    full = build("rfa", {**common, "checkpoint": tiny_models / "rfa", "db": reference_db})
    assert not {"no_aligner", "no_database", "no_text_decoder"} & set(full(x, run).priors)


def test_rfa_control_embedding_changes_the_output_through_unet_and_controlnet(
    tiny_models: Path, reference_db: Path
) -> None:
    """The tiny checkpoint's adapters are open: a broken retrieval -> enhancer -> AdaIN path changes the result."""
    from semsr.methods import build, resolve

    method = build(
        "rfa",
        {
            "base": tiny_models / "sd",
            "controlnet": tiny_models / "controlnet",
            "checkpoint": tiny_models / "rfa",
            "db": reference_db,
        },
    )
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    run = resolve("rfa").parse({"steps": 1, "prompt": "a wall", "num_references": 2, "seed": 0})
    ref = method(x, run).images
    assert torch.equal(method(x, run).images, ref)  # deterministic
    retriever = method.retriever
    found = retriever(x, 2)
    other = F.normalize(torch.randn(found.embedding.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
    method.retriever = lambda lr, k: type(found)(other, found.text, found.hits, found.references)
    try:
        changed = method(x, run).images
    finally:
        method.retriever = retriever
    assert (changed - ref).abs().max() > 1e-3
    # the ControlNet carries adapters of its own (the paper's adapters on ControlNet and UNet)
    assert method.controlnet_adapters is not method.adapters and method.controlnet_adapters.gates()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, method.unet.config.cross_attention_dim, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)

    def residuals(control: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad(), method.controlnet_adapters.control(control):
            down, mid = method.controlnet(
                z, torch.tensor([500]), encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False
            )
        return torch.cat([d.flatten() for d in (*down, mid)])

    base = residuals(found.embedding)
    assert (residuals(other) - base).abs().max() > 1e-5
    assert (residuals(None) - base).abs().max() > 1e-5


def test_rfa_end_to_end_saves_references(tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from semsr.cli import main

    rng = np.random.default_rng(1)
    refs = write_blocks(tmp_path / "refs", 3, px=12, seed=1, prefix="r")
    db = tmp_path / "db"
    assert (
        main(
            [
                "index",
                "build",
                "--images",
                str(refs),
                "--out",
                str(db),
                "--embedder",
                f"clip:{tiny_models / 'clip-vision'}",
            ]
        )
        == 0
    )
    lr = tmp_path / "lr.png"
    Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).save(lr)
    out = tmp_path / "out"
    assert (
        main(
            [
                "upscale",
                "-i",
                str(lr),
                "-o",
                str(out),
                "--method",
                "rfa",
                "--base",
                str(tiny_models / "sd"),
                "--controlnet",
                str(tiny_models / "controlnet"),
                "--checkpoint",
                str(tiny_models / "rfa"),
                "--db",
                str(db),
                "--save-reference",
                "--num-references",
                "2",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    made = sorted(p.name for p in out.iterdir())
    assert len([m for m in made if "_reference" in m]) == 2
    main_out = [m for m in made if "_reference" not in m]
    assert len(main_out) == 1 and Image.open(out / main_out[0]).size == (64, 64)  # x16 default
    # without a database and without the opt-out: exit status 2 and one line naming --db and --no-database
    capsys.readouterr()
    rc = main(
        [
            "upscale",
            "-i",
            str(lr),
            "-o",
            str(tmp_path / "out2"),
            "--method",
            "rfa",
            "--base",
            str(tiny_models / "sd"),
            "--checkpoint",
            str(tiny_models / "rfa"),
            "--clip",
            str(tiny_models / "clip-vision"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--db" in err[0] and "--no-database" in err[0], err
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())
