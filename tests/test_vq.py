"""VQ tokenizers: shapes, quantiser mechanics, persistence, the shipped edge tokenizer, diffusers VQModel,
the ``edge-vq`` training task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semsr.core.components import load_component
from semsr.core.errors import SemsrError, UnavailableError
from semsr.models.vq import (
    CodebookEMA,
    EdgeVQ,
    EMAQuantizer,
    SpatialTokenizer,
    load_tokenizer,
    prepare_maps,
    shipped_edge_vq_path,
)

SMALL = {"channels": (8, 16), "image_size": 64}  # 64 / 2 (patch) / 2 = 16x16 grid


@pytest.fixture
def one_thread():
    """Train with one thread: on a busy 2-core machine a second thread mostly spins."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_edge_vq_shapes():
    torch.manual_seed(0)
    model = EdgeVQ().eval()
    assert isinstance(model, SpatialTokenizer)
    assert (model.grid, model.codebook_size, model.embed_dim) == (16, 1024, 256)
    assert tuple(model.quantizer.codebook.shape) == (1024, 256)
    ids = model.encode(torch.rand(2, 1, 200, 300))  # any size, resized to 128x128
    assert ids.shape == (2, 16, 16) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 1024
    emb = model.embed(ids)
    assert emb.shape == (2, 256, 256)
    assert torch.equal(emb[1, 17], model.quantizer.codebook[ids[1, 1, 1]])  # row-major token order
    rec = model.decode(ids)
    assert rec.shape == (2, 1, 128, 128) and float(rec.min()) >= 0 and float(rec.max()) <= 1
    assert model.encode(torch.rand(1, 3, 64, 64)).shape == (1, 16, 16)  # RGB maps are made grey


def test_config_checks_geometry():
    with pytest.raises(ValueError):
        EdgeVQ(image_size=100)


def test_prepare_maps_channels_and_size():
    x = torch.rand(2, 3, 40, 50)
    assert prepare_maps(x, 16, 1).shape == (2, 1, 16, 16)
    assert torch.allclose(
        prepare_maps(x, 40, 1)[..., :40, :40],
        F.interpolate(x.mean(1, keepdim=True), (40, 40), mode="bilinear", antialias=True),
    )
    g = torch.rand(1, 1, 8, 8)
    assert torch.equal(prepare_maps(g, 8, 3), g.expand(1, 3, 8, 8))


def test_quantizer_first_batch_initialises_codes_and_ema_moves_them():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=8, dim=4)
    ema = CodebookEMA(8, 4, decay=1.0)  # decay 1: the EMA keeps the initial codes
    z = torch.randn(2, 4, 4, 4, requires_grad=True)  # 32 vectors
    gen = torch.Generator().manual_seed(0)
    zq, ids, commit = q(z, ema, gen)
    flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    # the first training batch initialised every code to one of its vectors
    assert bool(ema.initialised)
    dist = torch.cdist(q.codebook, flat).min(1).values
    assert float(dist.max()) < 1e-3  # (cdist itself is only accurate to ~1e-4 here)
    assert ids.shape == (2, 4, 4) and zq.shape == z.shape and float(commit.detach()) > 0
    # straight-through: the decoder gradient reaches the encoder output
    (zq.sum() + commit).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    before = q.codebook.clone()
    ema.decay = 0.9
    q(torch.randn(2, 4, 4, 4), ema, gen)
    assert not torch.equal(before, q.codebook)
    frozen = q.codebook.clone()
    q(torch.randn(2, 4, 4, 4))
    assert torch.equal(frozen, q.codebook)  # no EMA state: no updates (inference)
    # the EMA state is training state: it is not part of the tokenizer's weights
    assert set(q.state_dict()) == {"codebook"} and set(ema.state_dict()) == {"count", "total", "initialised"}


def test_training_learns_a_line_pattern(one_thread):
    """30 steps on one batch get well below the best constant prediction (BCE 0.23 here)."""
    torch.manual_seed(0)
    model = EdgeVQ(channels=(8, 16), image_size=64, codebook_size=64, embed_dim=32)
    ema = model.new_ema(fresh=True)
    x = torch.zeros(4, 1, 64, 64)
    x[..., 20:22, :] = 1.0
    x[..., :, 40:42] = 1.0
    p = float(x.mean())
    best_constant = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        logits, _, commit = model(x, ema)
        loss = F.binary_cross_entropy_with_logits(logits, x) + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.25 * best_constant


def test_component_round_trip(tmp_path):
    torch.manual_seed(0)
    model = EdgeVQ(**SMALL)
    model(torch.rand(2, 1, 64, 64), model.new_ema(fresh=True))  # initialise the codebook from data
    model.eval()
    model.save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["_class_name"] == "EdgeVQ" and config["channels"] == [8, 16]
    back = load_tokenizer(tmp_path / "vq")
    assert isinstance(back, EdgeVQ) and not back.training
    maps = torch.rand(3, 1, 50, 70)
    assert torch.equal(model.encode(maps), back.encode(maps))
    assert torch.allclose(model.decode(model.encode(maps)), back.decode(back.encode(maps)))
    # a loaded tokenizer continues training from its codebook
    ema = back.new_ema(fresh=False)
    assert bool(ema.initialised) and torch.equal(ema.total, back.quantizer.codebook)
    with pytest.raises(UnavailableError):
        load_tokenizer(tmp_path / "missing")


# ------------------------------------------------------------ shipped weights


def _heldout_maps(data_dir: Path, n: int) -> torch.Tensor:
    """Canny maps of ``n`` held-out BSDS500 images (the report's list), made as in training."""
    from semsr.core.io import read_image
    from semsr.ops.imresize import imresize
    from semsr.priors.base import get_provider, picture_tensor

    report = json.loads((shipped_edge_vq_path() / "report.json").read_text())
    folder = data_dir / "train" / "bsds500"
    canny = get_provider("canny")
    maps = []
    for name in report["heldout_images"][:n]:
        img = imresize(picture_tensor(read_image(folder / name)), scale=report["config"]["lr_scale"]).clamp(0, 1)
        maps.append(prepare_maps(canny(img).value, 128, 1))
    return torch.cat(maps)


def test_shipped_tokenizer_is_small_and_loads():
    folder = shipped_edge_vq_path()
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.is_file(), "shipped weights missing (see semsr.train.vq)"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    tok = load_tokenizer()
    assert isinstance(tok, EdgeVQ) and isinstance(load_component(EdgeVQ, folder), EdgeVQ)
    assert (tok.grid, tok.codebook_size, tok.embed_dim) == (16, 1024, 256)
    report = json.loads((folder / "report.json").read_text())
    assert Path(report["config"]["data"]).parts[-2:] == ("train", "bsds500")  # never a benchmark set
    assert len(report["heldout_images"]) == report["config"]["holdout"] == 40


def test_shipped_tokenizer_reconstructs_heldout_edges(data_dir):
    from semsr.train.vq import map_scores

    maps = _heldout_maps(data_dir, 6)
    tok = load_tokenizer()
    ids = tok.encode(maps)
    rec = tok.decode(ids)
    vq = map_scores(rec, maps)
    own_mean = maps.mean(dim=(1, 2, 3), keepdim=True).expand_as(maps)  # best constant map per image
    const = map_scores(own_mean, maps)
    assert vq["psnr"] > const["psnr"] + 1.0
    assert vq["iou_tol1"] > const["iou_tol1"] + 0.2
    assert ids.unique().numel() > 50  # many codes in use, not a collapsed codebook


# ------------------------------------------------------------------ diffusers


@pytest.fixture(scope="module")
def tiny_vqgan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from semsr.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-vq"), ["vqgan"]) / "vqgan"


def test_diffusers_vqmodel_tokenizer(tiny_vqgan):
    from semsr.models.vq import DiffusersVQTokenizer

    tok = load_tokenizer(tiny_vqgan)
    assert isinstance(tok, DiffusersVQTokenizer) and isinstance(tok, SpatialTokenizer)
    assert (tok.grid, tok.codebook_size, tok.embed_dim, tok.image_size) == (16, 1024, 256, 32)
    maps = torch.rand(2, 1, 80, 60)
    ids = tok.encode(maps)
    assert ids.shape == (2, 16, 16) and int(ids.max()) < 1024
    # the ids are the nearest codebook entries of the encoder output
    x = prepare_maps(maps, 32, 3) * 2 - 1
    with torch.no_grad():
        h = tok.model.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, 256)
    ref = torch.cdist(h, tok.model.quantize.embedding.weight).argmin(1).view(2, 16, 16)
    assert torch.equal(ids, ref)
    emb = tok.embed(ids)
    assert emb.shape == (2, 256, 256) and torch.equal(emb[0, 0], tok.model.quantize.embedding.weight[ids[0, 0, 0]])
    rec = tok.decode(ids)
    assert rec.shape == (2, 3, 32, 32) and float(rec.min()) >= 0 and float(rec.max()) <= 1


def test_diffusers_tokenizer_reports_bad_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnavailableError):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------- training


def _rectangles(folder: Path, count: int = 3) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = np.full((48, 64, 3), 40, np.uint8)
        y, x = rng.integers(4, 20, 2)
        arr[y : y + 20, x : x + 30] = 220
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def test_edge_vq_task_runs_through_semsr_train(tmp_path):
    from semsr.cli import main

    imgs = _rectangles(tmp_path / "imgs")
    repo = Path(__file__).resolve().parents[1]
    args = [
        "train",
        "--config",
        str(repo / "configs" / "edge-vq-tiny.yaml"),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        f"data.hr=[{imgs}]",
        "data.crop_size=48",
        "data.limit=0",
        "model.options.lr_scale=1.0",
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(set(r["terms"]) == {"vq_bce", "vq_commit"} for r in records)
    final = tmp_path / "run" / "final"
    report = json.loads((final / "report.json").read_text())
    assert report["heldout_images"] == ["2.png"]
    assert set(report["scores_heldout"]) == {"vq", "baseline_own_mean", "baseline_pool16_bilinear"}
    tok = load_tokenizer(final)
    assert isinstance(tok, EdgeVQ) and tok.encode(torch.rand(1, 1, 30, 30)).shape == (1, 16, 16)
    assert set(tok.state_dict()) == set(
        EdgeVQ(channels=(8, 16), image_size=64, codebook_size=64, embed_dim=32).state_dict()
    )  # no EMA statistics


def test_edge_vq_task_draws_per_sample_and_initialises_the_codebook(tmp_path):
    from semsr.train.config import config_from_dict
    from semsr.train.tasks import build_task

    cfg = config_from_dict(
        {
            "name": "t",
            "task": "edge-vq",
            "seed": 0,
            "model": {
                "options": {
                    "modalities": ["canny"],
                    "lr_scale": 1.0,
                    "crop_min": 16,
                    "vq": {"channels": [8, 16], "image_size": 64, "codebook_size": 16, "embed_dim": 8},
                }
            },
            "data": {"hr": [str(tmp_path)], "crop_size": 48, "scale": 1, "batch_size": 2},
        }
    )
    task = build_task(cfg)
    task.setup(torch.device("cpu"), torch.float32)
    model = task.trainable
    assert not bool(model.ema.initialised)
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 48, 48, generator=g)
    hr[:, :, 10:30, 12:40] = 1.0
    out = task.compute(model, {"hr": hr, "seed": torch.tensor([5, 6])})
    assert out["logits"].shape == out["maps"].shape == (2, 1, 64, 64) and out["commit"].ndim == 0
    assert bool(model.ema.initialised)
    # a sample's map depends on its own seed only (not on the batch it is in)
    one = task.compute(model, {"hr": hr[1:], "seed": torch.tensor([6])})
    assert torch.equal(one["maps"][0], out["maps"][1])
    with pytest.raises(SemsrError, match="unknown model.options"):
        build_task(config_from_dict({"name": "t", "task": "edge-vq", "model": {"options": {"foo": 1}}}))


# ------------------------------------------------- taming / latent-diffusion VQGAN


def _taming_encoder_reference(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """taming-transformers' ``Encoder.forward`` + ``quant_conv`` written out on the raw taming-named tensors
    (``taming/modules/diffusionmodules/model.py``): the reference the key mapping must reproduce."""

    def gn(h, name):
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def conv(h, name, padding=1, stride=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)

    def resnet(h, name):
        y = conv(F.silu(gn(h, f"{name}.norm1")), f"{name}.conv1")
        y = conv(F.silu(gn(y, f"{name}.norm2")), f"{name}.conv2")
        if f"{name}.nin_shortcut.weight" in sd:
            h = conv(h, f"{name}.nin_shortcut", padding=0)
        return h + y

    def attn(h, name):
        b, c, hh, ww = h.shape
        n = gn(h, f"{name}.norm")
        q, k, v = (conv(n, f"{name}.{p}", padding=0).reshape(b, c, hh * ww) for p in ("q", "k", "v"))
        w = torch.softmax(q.permute(0, 2, 1) @ k * c**-0.5, dim=2)  # (b, hw_q, hw_k)
        out = (v @ w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return h + conv(out, f"{name}.proj_out", padding=0)

    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    h = conv(x, "encoder.conv_in")
    for i in range(levels):
        for j in range(blocks):
            h = resnet(h, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"encoder.down.{i}.attn.{j}")
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", padding=0, stride=2)
    h = resnet(h, "encoder.mid.block_1")
    h = attn(h, "encoder.mid.attn_1")
    h = resnet(h, "encoder.mid.block_2")
    h = conv(F.silu(gn(h, "encoder.norm_out")), "encoder.conv_out")
    return conv(h, "quant_conv", padding=0)


@pytest.fixture(scope="module")
def tiny_taming(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from semsr.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-taming"), ["vqgan-taming"]) / "vqgan-taming"


def test_taming_vqgan_loads_as_the_papers_tokenizer(tiny_taming):
    from safetensors.torch import load_file

    from semsr.models.vq import DiffusersVQTokenizer

    sd = load_file(str(tiny_taming / "vqgan.safetensors"))
    assert "encoder.down.1.attn.0.q.weight" in sd and "loss.discriminator.main.0.weight" in sd  # taming layout
    for tok in (load_tokenizer(tiny_taming), load_tokenizer(tiny_taming / "vqgan.safetensors")):
        assert isinstance(tok, DiffusersVQTokenizer) and isinstance(tok, SpatialTokenizer)
        assert (tok.grid, tok.codebook_size, tok.embed_dim, tok.image_size, tok.in_channels) == (16, 1024, 256, 32, 3)
    maps = torch.rand(2, 3, 40, 44, generator=torch.Generator().manual_seed(0))
    x = prepare_maps(maps, 32, 3) * 2 - 1
    with torch.no_grad():
        ref = _taming_encoder_reference(sd, x)  # (2, 256, 16, 16)
        got = tok.model.quant_conv(tok.model.encoder(x))
    assert ref.shape == got.shape == (2, 256, 16, 16)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    # the token ids are taming's nearest codebook entries (L2), and embed() returns those entries
    flat = ref.permute(0, 2, 3, 1).reshape(-1, 256)
    expect = torch.cdist(flat, sd["quantize.embedding.weight"]).argmin(1).view(2, 16, 16)
    ids = tok.encode(maps)
    assert (ids == expect).float().mean() > 0.99  # ties of float rounding aside
    assert torch.equal(tok.embed(ids)[0, 5], sd["quantize.embedding.weight"][ids[0, 0, 5]])
    assert tok.decode(ids).shape == (2, 3, 32, 32)


def test_taming_vqgan_loading_is_strict(tiny_taming, tmp_path):
    from safetensors.torch import load_file, save_file

    from semsr.models.vq import TAMING_CONVERSION

    sd = load_file(str(tiny_taming / "vqgan.safetensors"))
    extra = dict(sd, **{"encoder.down.0.block.0.extra.weight": torch.zeros(1)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UnavailableError, match=r"keys of no taming VQGAN part: encoder\.down\.0\.block\.0\.extra"):
        load_tokenizer(tmp_path / "extra.safetensors")
    missing = {k: v for k, v in sd.items() if k != "decoder.up.0.block.1.conv2.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UnavailableError, match=r"missing decoder\.up_blocks\.1\.resnets\.1\.conv2\.bias"):
        load_tokenizer(tmp_path / "missing.safetensors")
    (tmp_path / "last.ckpt").write_bytes(b"not read")
    with pytest.raises(UnavailableError, match="pickled checkpoints are not read") as err:
        load_tokenizer(tmp_path / "last.ckpt")
    assert TAMING_CONVERSION in str(err.value) and "safetensors" in TAMING_CONVERSION


def test_mmsr_runs_on_a_taming_vqgan_for_every_map(tiny_models, tiny_taming, one_thread, tmp_path):
    from semsr.methods.mmsr import MMSR, MMSROptions

    pipe = MMSR.from_pretrained(tiny_models / "sd", tiny_models / "mmsr", vq=tiny_taming / "vqgan.safetensors")
    assert len({id(t) for t in pipe.tokenizers.values()}) == 1 and set(pipe.tokenizers) == {"edge", "depth", "seg"}
    out = pipe(torch.rand(1, 3, 12, 16), MMSROptions(steps=1, prompt="a cat"))
    assert out.images.shape == (1, 3, 48, 64)
    # an earlier checkpoint's single meta.tokenizer path still counts for every map
    ckpt = tmp_path / "old"
    shutil.copytree(tiny_models / "mmsr", ckpt)
    index = json.loads((ckpt / "model_index.json").read_text())
    for name in ("vq_depth", "vq_seg"):
        del index[name]
    index["meta"] = {"modalities": ["edge", "depth", "seg"], "edge": "canny", "tokenizer": str(tiny_taming)}
    (ckpt / "model_index.json").write_text(json.dumps(index))
    old = MMSR.from_pretrained(tiny_models / "sd", ckpt)
    assert {type(t).__name__ for t in old.tokenizers.values()} == {"DiffusersVQTokenizer"}


# ------------------------------------------------------------ depth / seg tokenizer training


@pytest.mark.parametrize("kind", ["depth", "seg"])
def test_depth_and_seg_vq_tasks_run_through_semsr_train(kind, tiny_models, tmp_path, one_thread):
    from semsr.cli import main
    from semsr.models.vq import DepthVQ, SegVQ

    imgs = _rectangles(tmp_path / "imgs")
    repo = Path(__file__).resolve().parents[1]
    args = [
        "train",
        "--config",
        str(repo / "configs" / f"{kind}-vq-tiny.yaml"),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        f"data.hr=[{imgs}]",
        "data.crop_size=48",
        "data.limit=0",
        "model.options.lr_scale=1.0",
        f"model.options.model={tiny_models / kind}",
    ]
    assert main(args) == 0
    tok = load_tokenizer(tmp_path / "run" / "final")
    cls, channels = (DepthVQ, 1) if kind == "depth" else (SegVQ, 3)
    assert type(tok) is cls and tok.in_channels == channels
    report = json.loads((tmp_path / "run" / "final" / "report.json").read_text())
    assert report["task"] == f"{kind}-vq" and report["modalities"] == [kind]
