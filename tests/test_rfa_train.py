"""RFA training through the shared trainer: text alignment in CLIP space, rfa-aligner, rfa-enhancer and
rfa-sr tasks (tiny runs, resume, exports loaded by `semsr bench retrieval` and the rfa method)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfa_helpers import bench_retrieval, one_thread  # noqa: F401  (autouse fixture)
from semsr.cli import main
from semsr.core.components import load_checkpoint, load_component
from semsr.models.rfa import EmbeddingEnhancer, ReferenceFindingAligner
from train_helpers import REPO, load_safetensors, write_textures


@pytest.fixture(scope="module")
def text_models(tiny_models: Path):
    """(tiny GPT-2, its tokenizer, tiny SD's CLIP text encoder, the vocabulary bridge)."""
    from semsr.models.rfa import load_text_decoder
    from semsr.models.rfa_text import VocabBridge, load_clip_text

    lm, tok = load_text_decoder(tiny_models / "text-decoder")
    clip = load_clip_text(tiny_models / "sd")
    return lm, tok, clip, VocabBridge(tok, clip.tokenizer, lm.get_input_embeddings().num_embeddings)


# ----------------------------------------------------------------------------- CLIP text alignment


def test_soft_decoding_is_greedy_decoding_and_its_clip_embedding_is_exact(text_models) -> None:
    from semsr.models.rfa import generate_text
    from semsr.models.rfa_text import SoftDecoding, soft_decode

    lm, tok, clip, bridge = text_models
    prefix = torch.randn(3, 2, lm.config.n_embd, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    dec = soft_decode(lm, prefix, 5, tok.eos_token_id)
    # forward = greedy decoding (what the rfa method decodes at inference)
    texts = [tok.decode(dec.ids[b, : dec.lengths[b]], skip_special_tokens=True).strip() for b in range(3)]
    assert texts == generate_text(lm, tok, prefix.detach(), max_new_tokens=5)
    assert torch.equal(dec.weights.detach(), F.one_hot(dec.ids, dec.weights.shape[-1]).float())
    # forward value = the CLIP text encoder on [BOS, pieces..., EOS]
    emb = clip.embed_decoded(dec, bridge)
    for b in range(3):
        pieces = [p for t in range(int(dec.lengths[b])) for p in bridge.pieces[int(dec.ids[b, t])]]
        ids = torch.tensor([[clip.bos_id, *pieces, clip.eos_id]])
        torch.testing.assert_close(emb[b], clip.model(input_ids=ids).pooler_output[0])
    # and gradients reach the prefix through the straight-through steps
    emb.sum().backward()
    assert prefix.grad is not None and float(prefix.grad.abs().sum()) > 0
    # text made of whole-word tokens is encoded exactly as the string itself
    words = [
        v
        for v in range(len(tok))
        if tok.decode([v]).startswith(" ") and tok.decode([v])[1:].isalpha() and len(bridge.pieces[v]) == 1
    ][:4]
    assert len(words) >= 3
    ids = torch.tensor([words])
    manual = SoftDecoding(ids, F.one_hot(ids, len(bridge.pieces)).float(), torch.tensor([len(words)]))
    torch.testing.assert_close(clip.embed_decoded(manual, bridge), clip.embed([tok.decode(words).strip()]))


def test_text_clip_loss_steers_the_enhancer_text_toward_the_caption(text_models) -> None:
    """``rfa_text_clip`` alone trains the enhancer so its decoded text's CLIP embedding nears the caption's."""
    from semsr.models.rfa_text import soft_decode
    from semsr.train.losses import get_loss
    from semsr.train.tasks import import_task_modules

    import_task_modules()
    lm, tok, clip, bridge = text_models
    g = torch.Generator().manual_seed(0)
    lr_tok, refs = torch.randn(4, 5, 12, generator=g), torch.randn(4, 2, 5, 12, generator=g)
    torch.manual_seed(0)
    model = EmbeddingEnhancer(
        token_dim=12,
        out_dim=16,
        num_tokens=5,
        lm_dim=lm.config.n_embd,
        num_refs=2,
        width=32,
        depth=1,
        heads=2,
        prefix_len=2,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    caption = clip.embed(["a photo of a cat"] * 4)
    loss_fn = get_loss("rfa_text_clip")
    losses = []
    for _ in range(25):
        _, prefix = model(lr_tok, refs)
        text = clip.embed_decoded(soft_decode(lm, prefix, 3, tok.eos_token_id), bridge)
        loss = loss_fn({"text_embed": text, "caption_embed": caption})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # straight-through steps flip tokens now and then: compare medians (a dead gradient path keeps it flat)
    assert np.median(losses[-8:]) < np.median(losses[:3]) - 0.05, losses


def test_load_clip_text_layouts_and_errors(tiny_models: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from semsr.core.errors import SemsrError, UnavailableError
    from semsr.models.rfa_text import load_clip_text

    folder = tmp_path / "clip-text"
    cfg = CLIPTextConfig(
        vocab_size=len(load_clip_text(tiny_models / "sd").tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_models / "sd" / "tokenizer" / name).is_file():
            shutil.copy(tiny_models / "sd" / "tokenizer" / name, folder / name)
    proj = load_clip_text(folder)
    assert proj.projected and proj.dim == 16 and proj.embed(["a cat"]).shape == (1, 16)
    with pytest.raises(UnavailableError):
        load_clip_text(tmp_path)
    with pytest.raises(SemsrError, match="not CLIP"):
        load_clip_text(tiny_models / "text-decoder")


# ----------------------------------------------------------------------------- trainer tasks


@pytest.fixture(scope="module")
def rfa_runs(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Textures, a reference database of them, and tiny rfa-aligner runs: 4 steps + resume to 6, and 6 straight."""
    root = tmp_path_factory.mktemp("rfa-runs")
    imgs = write_textures(root / "imgs", count=6, size=(72, 72))
    clip = f"clip:{tiny_models / 'clip-vision'}"
    assert main(["index", "build", "--images", str(imgs), "--out", str(root / "db"), "--embedder", clip]) == 0
    common = [
        "--config",
        str(REPO / "configs" / "rfa-aligner-tiny.yaml"),
        f"model.options.embedder={clip}",
        f"data.hr=[{imgs}]",
        "data.val_count=2",
        "data.limit=0",
        "checkpoint.every=2",
    ]
    assert main(["train", *common, "--output", str(root / "al"), "--max-steps", "4"]) == 0
    assert main(["train", *common, "--output", str(root / "al"), "--max-steps", "6", "--resume"]) == 0
    assert main(["train", *common, "--output", str(root / "al-straight"), "--max-steps", "6"]) == 0
    return {
        "root": root,
        "imgs": imgs,
        "db": root / "db",
        "aligner_run": root / "al",
        "straight": root / "al-straight",
        "clip": Path(clip[5:]),
    }


def _train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_aligner_task_resumes_exactly_and_exports_a_loadable_aligner(rfa_runs, capsys) -> None:
    resumed, straight = _train_records(rfa_runs["aligner_run"]), _train_records(rfa_runs["straight"])
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert "rfa_align_l2" in resumed[0]["terms"]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    final = rfa_runs["aligner_run"] / "final" / "aligner"
    weights = "diffusion_pytorch_model.safetensors"
    a, b = load_safetensors(final / weights), load_safetensors(rfa_runs["straight"] / "final" / "aligner" / weights)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if k.startswith("head."))  # trained off zero init
    model = load_component(ReferenceFindingAligner, final)
    assert model.config.embedder == f"clip:{rfa_runs['clip'].resolve()}"
    # `semsr bench retrieval` scores the run on its held-out (validation) and training images
    out = rfa_runs["root"] / "r.json"
    assert (
        bench_retrieval(["--aligner", str(rfa_runs["aligner_run"]), "--db", str(rfa_runs["db"]), "--json", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    assert (res["heldout_pairs"], res["train_pairs"], res["database_size"]) == (2, 4, 6)
    assert "aligned" in res["heldout"] and "top-4" in capsys.readouterr().out
    # an aligner folder alone is scored on all images
    assert (
        bench_retrieval(
            [
                "--aligner",
                str(final),
                "--db",
                str(rfa_runs["db"]),
                "--images",
                str(rfa_runs["imgs"]),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["all_pairs"] == 6


def test_stage1_tasks_reject_bad_options(tiny_models: Path, tmp_path: Path) -> None:
    from semsr.core.errors import SemsrError
    from semsr.train.config import load_config
    from semsr.train.tasks import build_task

    base = [f"model.options.embedder=clip:{tiny_models / 'clip-vision'}", f"data.hr=[{tmp_path}]"]
    for extra, message in (
        (["validation.every=2"], "renders no images"),
        (["model.options.colour=1"], "unknown model.options"),
    ):
        cfg = load_config(REPO / "configs" / "rfa-aligner-tiny.yaml", base + extra)
        with pytest.raises(SemsrError, match=message):
            build_task(cfg)
    cfg = load_config(REPO / "configs" / "rfa-enhancer-tiny.yaml", base + ["model.options.db="])
    with pytest.raises(SemsrError, match="needs model.options.db"):
        build_task(cfg)


def test_reference_tokens_skip_the_training_image_itself(rfa_runs) -> None:
    from semsr.priors.retrieval.embedders import embedder_from_spec
    from semsr.priors.retrieval.index import ReferenceDB, file_sha256, load_rgb
    from semsr.priors.retrieval.references import ReferenceTokens

    emb = embedder_from_spec(f"clip:{rfa_runs['clip']}")
    files = sorted(rfa_runs["imgs"].iterdir())[:2]
    vec, tok = emb.encode(torch.cat([load_rgb(f) for f in files]))
    with ReferenceDB(rfa_runs["db"]) as db:
        refs = ReferenceTokens(db, emb, None, k=2)
        own = refs(tok, vec, [None, None])
        other = refs(tok, vec, [file_sha256(f) for f in files])
        # the HR image itself is every query's best hit; excluded, the next ones take its place
        for b, f in enumerate(files):
            self_tok = emb.encode(load_rgb(f))[1][0]
            assert torch.allclose(own[b, 0], self_tok, atol=1e-5)
            assert not any(torch.allclose(other[b, j], self_tok, atol=1e-5) for j in range(2))
    assert other.shape == (2, 2, emb.num_tokens, emb.token_dim)


def test_enhancer_and_sr_tasks_train_and_the_rfa_method_loads_the_three_runs(
    rfa_runs, tiny_models: Path, tmp_path: Path
) -> None:
    from semsr.methods import build, resolve

    run = tmp_path / "en"
    assert (
        main(
            [
                "train",
                "--config",
                str(REPO / "configs" / "rfa-enhancer-tiny.yaml"),
                "--output",
                str(run),
                "--max-steps",
                "2",
                f"model.pretrained={tiny_models / 'sd'}",
                f"model.options.embedder=clip:{rfa_runs['clip']}",
                f"model.options.db={rfa_runs['db']}",
                f"model.options.text_decoder={tiny_models / 'text-decoder'}",
                f"model.options.aligner={rfa_runs['aligner_run'] / 'final' / 'aligner'}",
                f"data.hr=[{rfa_runs['imgs']}]",
                "data.val_count=2",
                "data.limit=0",
                "losses.rfa_caption_nll=0.1",
            ]
        )
        == 0
    )
    records = _train_records(run)
    assert [r["step"] for r in records] == [1, 2]
    assert set(records[0]["terms"]) == {"rfa_image_cos", "rfa_text_clip", "rfa_caption_nll"}
    assert all(0.0 <= r["terms"]["rfa_text_clip"] <= 2.0 for r in records)
    enhancer = load_component(EmbeddingEnhancer, run / "final" / "enhancer")
    assert enhancer.config.embedder == f"clip:{rfa_runs['clip'].resolve()}"
    # stage 2 (rfa-sr: ControlNet + AdaIN adapters on UNet and ControlNet) exports the RFA checkpoint with the
    # stage-1 parts it is given
    sr = tmp_path / "sr"
    assert (
        main(
            [
                "train",
                "--config",
                str(REPO / "configs" / "rfa-tiny.yaml"),
                "--output",
                str(sr),
                "--max-steps",
                "3",  # step 1 warms up at lr 0; the ControlNet adapters see a gradient once the zero convs moved
                f"model.pretrained={tiny_models / 'sd'}",
                f"model.options.embedder=clip:{rfa_runs['clip']}",
                f"model.options.aligner={rfa_runs['aligner_run'] / 'final' / 'aligner'}",
                f"model.options.enhancer={run / 'final' / 'enhancer'}",
                f"model.options.db={rfa_runs['db']}",
                f"model.options.text_decoder={tiny_models / 'text-decoder'}",
                f"data.hr=[{rfa_runs['imgs']}]",
                "data.val_count=2",
                "data.limit=0",
                "validation.every=0",
            ]
        )
        == 0
    )
    ckpt = sr / "final" / "rfa"
    parts, index = load_checkpoint(ckpt, "rfa")
    assert set(parts) == {"aligner", "enhancer", "adain", "controlnet_adain"}
    assert (ckpt / index.meta["text_decoder"]).is_dir()
    for name in ("adain", "controlnet_adain"):
        gates = {
            k: v
            for k, v in load_safetensors(ckpt / name / "diffusion_pytorch_model.safetensors").items()
            if v.numel() == 1
        }
        assert gates and any(float(v.abs()) > 0 for v in gates.values())  # the gates left their zero initialisation
    # part of the ControlNet trained (hint encoder, zero convolutions); its UNet-copied body stayed frozen
    trained = load_safetensors(sr / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")
    unet = load_safetensors(tiny_models / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    body = [k for k in trained if k.startswith(("down_blocks.", "mid_block.", "conv_in.", "time_embedding."))]
    assert body and all(torch.equal(trained[k], unet[k]) for k in body)
    zero = [k for k in trained if k.startswith("controlnet_down_blocks.")]
    assert zero and any(float(trained[k].abs().max()) > 0 for k in zero)
    method = build(
        "rfa",
        {
            "base": tiny_models / "sd",
            "controlnet": sr / "final" / "controlnet",
            "checkpoint": ckpt,
            "db": rfa_runs["db"],
        },
    )
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, 4, 4), dtype=np.float32))
    out = method(x, resolve("rfa").parse({"steps": 1}))
    assert out.images.shape == (1, 3, 64, 64) and out.priors["prompt_source"] == "text decoder"
    assert len(out.side_images) == 4


def test_rfa_sr_conditions_on_the_enhancer_output_of_the_lr_crop(rfa_runs, tiny_models: Path, tmp_path: Path) -> None:
    """Training feeds the AdaIN adapters what inference feeds them: the enhancer's embedding of the LR crop and its
    references (not the HR crop's embedding); the training image itself is never a reference."""
    from torch.utils.data import default_collate

    from semsr.models.rfa import encode
    from semsr.train.config import load_config
    from semsr.train.data import CropDataset, list_images, make_degrader
    from semsr.train.tasks import build_task

    cfg = load_config(
        REPO / "configs" / "rfa-tiny.yaml",
        [
            f"model.pretrained={tiny_models / 'sd'}",
            f"model.options.embedder=clip:{rfa_runs['clip']}",
            f"model.options.aligner={tiny_models / 'rfa' / 'aligner'}",
            f"model.options.enhancer={tiny_models / 'rfa' / 'enhancer'}",
            f"model.options.db={rfa_runs['db']}",
            f"data.hr=[{rfa_runs['imgs']}]",
            "data.val_count=2",
            "data.limit=0",
            "validation.every=0",
        ],
    )
    task = build_task(cfg)
    task.setup(torch.device("cpu"), torch.float32)
    # ControlNet: only the hint encoder and the zero convolutions train; all adapters train
    model = task.trainable
    cn = {n for n, p in model.controlnet.named_parameters() if p.requires_grad}
    assert cn and all(
        n.startswith(("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid")) for n in cn
    )
    assert all(p.requires_grad for p in (*model.adain.parameters(), *model.controlnet_adain.parameters()))
    items, _ = list_images(cfg.data, cfg.data.crop_size)
    data = CropDataset(items, cfg.data, make_degrader(cfg.degradation, cfg.data.scale), cfg.seed)
    batch = default_collate([data[p] for p in range(2)])
    seen: dict[str, torch.Tensor] = {}
    for name in ("adain", "controlnet_adain"):
        adapters = getattr(model, name)
        adapters.control = lambda emb, _n=name, _c=adapters.control: (seen.__setitem__(_n, emb), _c(emb))[1]
    task.compute(model, batch)
    enhancer, emb = task.enhanced.enhancer, task.embedder
    vec, tok = encode(emb, batch["lr"].float())
    excluded = [task.hashes(int(p)) for p in batch["position"]]
    want = F.normalize(enhancer(tok, task.enhanced.refs(tok, vec, excluded))[0], dim=-1)
    for name in ("adain", "controlnet_adain"):
        torch.testing.assert_close(seen[name], want)
        hr = emb.embed(batch["hr"].float())
        assert (seen[name] - hr).abs().max() > 1e-3  # not the HR crop's embedding
    assert task.control(batch["lr"], [int(p) for p in batch["position"]]).shape == want.shape


def test_rfa_stage2_configs_use_the_papers_bicubic_lr() -> None:
    from semsr.train.config import load_config

    for name, crop, scale in (("rfa", 512, 16), ("rfa-tiny", 64, 4)):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.task == "rfa-sr" and cfg.degradation["type"] == "bicubic"
        assert (cfg.data.crop_size, cfg.data.scale) == (crop, scale)
        assert {"enhancer", "db", "aligner"} <= set(cfg.model.options)


def test_stage1_and_stage2_tasks_need_an_aligner_or_the_opt_out(rfa_runs, tiny_models: Path) -> None:
    from semsr.core.errors import SemsrError
    from semsr.train.config import load_config
    from semsr.train.tasks import build_task

    common = [
        f"model.pretrained={tiny_models / 'sd'}",
        f"model.options.embedder=clip:{rfa_runs['clip']}",
        f"model.options.db={rfa_runs['db']}",
        f"data.hr=[{rfa_runs['imgs']}]",
    ]
    extra = {
        "rfa-enhancer-tiny": [f"model.options.text_decoder={tiny_models / 'text-decoder'}"],
        "rfa-tiny": [f"model.options.enhancer={tiny_models / 'rfa' / 'enhancer'}", "validation.every=0"],
    }
    for name, more in extra.items():
        with pytest.raises(SemsrError, match="needs model.options.aligner .*no_aligner: true"):
            build_task(load_config(REPO / "configs" / f"{name}.yaml", common + more + ["model.options.aligner="]))
        task = build_task(
            load_config(
                REPO / "configs" / f"{name}.yaml",
                common + more + ["model.options.aligner=", "model.options.no_aligner=true"],
            )
        )
        assert task is not None


@pytest.mark.parametrize("name", ["rfa-aligner", "rfa-aligner-tiny", "rfa-enhancer", "rfa-enhancer-tiny"])
def test_stage1_configs_parse_and_name_known_tasks_and_losses(name: str) -> None:
    from semsr.train.config import load_config
    from semsr.train.losses import get_loss
    from semsr.train.tasks import available_tasks

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.task in available_tasks() and cfg.validation.every == 0
    for loss in cfg.losses:
        get_loss(loss)
    assert cfg.data.crop_size // cfg.data.scale == (32 if "tiny" not in name else 16)
