"""The bundled default model (issue 10): architecture, identity at init, ablation switches, training, method."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semsr.core.errors import SemsrError, UnavailableError
from semsr.models.default_sr import (
    DefaultSR,
    DefaultSRConfig,
    DefaultSRPipeline,
    DegradationText,
    TextTokens,
    from_space,
    to_space,
)

REPO = Path(__file__).resolve().parent.parent
TINY_ARCH = {
    "stage1": "bicubic", "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "conditioning_channels": [8, 8, 8],
    "cross_attention_dim": 32, "attention_head_dim": 8,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # noqa: ANN201
    """Tiny tensors: one intra-op thread (two spin against each other on the shared cores, 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_tokens() -> TextTokens:
    return TextTokens()


@pytest.fixture(scope="module")
def bicubic():  # noqa: ANN201
    from semsr.methods import get_method

    return get_method("bicubic")


def tiny_model(seed: int = 0, perturb: bool = False) -> DefaultSR:
    torch.manual_seed(seed)
    model = DefaultSR(DefaultSRConfig(**TINY_ARCH))
    if perturb:  # a "trained" model: non-zero output layer and zero convolutions
        with torch.no_grad():
            for p in [model.unet.conv_out.weight, *model.controlnet.controlnet_down_blocks.parameters(),
                      *model.controlnet.controlnet_mid_block.parameters(),
                      *model.controlnet.controlnet_cond_embedding.conv_out.parameters()]:
                p.normal_(0, 0.05)
    return model.eval()


def textured(h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(0.7 * xx + 0.4 * yy)
    return (base[None, None].repeat(1, 3, 1, 1) + 0.1 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def no_irpad(tmp_path: Path) -> DegradationText:
    return DegradationText(tmp_path / "absent")


def test_config_validation() -> None:
    assert DefaultSRConfig().channels == 48 and DefaultSRConfig().multiple == 16
    with pytest.raises(SemsrError, match="power of two"):
        DefaultSRConfig(unshuffle=3, conditioning_channels=[8, 8])
    with pytest.raises(SemsrError, match="conditioning_channels"):
        DefaultSRConfig(unshuffle=4, conditioning_channels=[8, 8])
    with pytest.raises(SemsrError, match="unknown"):
        DefaultSRConfig.from_dict({"widths": [1]})


def test_space_roundtrip_and_forward_shapes() -> None:
    x = torch.rand(2, 3, 32, 48)
    z = to_space(x, 4)
    assert z.shape == (2, 48, 8, 12)
    assert torch.equal(from_space(z, 4), x)
    model = tiny_model(perturb=True)
    cond = {"stage1": torch.randn(2, 48, 8, 12), "tokens": torch.randn(2, 77, 384), "edges": torch.rand(2, 1, 32, 48)}
    out = model(torch.randn(2, 48, 8, 12), torch.tensor(500), cond)
    assert out.shape == (2, 48, 8, 12) and out.abs().sum() > 0


def test_fresh_model_leaves_stage1_unchanged(tmp_path: Path, text_tokens: TextTokens, bicubic) -> None:  # noqa: ANN001
    pipe = DefaultSRPipeline(tiny_model(), stage1=bicubic, text=text_tokens, degradation=no_irpad(tmp_path))
    lr = textured(21, 26)  # not a multiple of 4: padded, then cropped back
    y1 = bicubic(lr)
    for scheduler in ("ddim", "dpm++"):
        sr = pipe(lr, prompt="a brick wall", steps=4, seed=3, scheduler=scheduler)
        assert sr.shape == (1, 3, 84, 104)
        torch.testing.assert_close(sr, y1, atol=1e-6, rtol=0)


def test_ablation_switches_change_the_output(tmp_path: Path, text_tokens: TextTokens, bicubic) -> None:  # noqa: ANN001
    pipe = DefaultSRPipeline(tiny_model(perturb=True), stage1=bicubic, text=text_tokens,
                             degradation=no_irpad(tmp_path))
    lr = textured()
    run = dict(prompt="a brick wall", steps=2, seed=1)
    full = pipe(lr, **run)
    assert torch.equal(full, pipe(lr, **run))  # seeded: reproducible
    assert not torch.allclose(full, pipe(lr, **{**run, "use_text": False}))
    assert not torch.allclose(full, pipe(lr, **{**run, "use_edges": False}))
    assert not torch.allclose(full, pipe(lr, **{**run, "steps": 1}))
    torch.testing.assert_close(pipe(lr, **{**run, "steps": 0}), bicubic(lr), atol=1e-6, rtol=0)
    # tiled sampling (2 x 3 working-space tiles of 16 with overlap) covers the image with the same shape
    tiled = pipe(textured(32, 40), **{**run, "steps": 1}, tile=16, tile_overlap=4)
    assert tiled.shape == (1, 3, 128, 160) and torch.isfinite(tiled).all()


def test_missing_irpad_gives_empty_description(tmp_path: Path) -> None:
    deg = DegradationText(tmp_path / "none")
    assert not deg.available and "IRPAD" in deg.reason
    assert deg(torch.rand(2, 3, 16, 16)) == ["", ""]
    assert DegradationText(enabled=False)(torch.rand(1, 3, 8, 8)) == [""]


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = tiny_model(perturb=True)
    model.save(tmp_path / "ck")
    loaded = DefaultSR.load(tmp_path / "ck")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(UnavailableError):
        DefaultSR.load(tmp_path)


def test_method_without_weights_is_one_line_error(tmp_path: Path) -> None:
    from semsr.methods import get_method

    with pytest.raises(UnavailableError, match="default-model weights"):
        get_method("default-diffusion", checkpoint=str(tmp_path))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a``: 1 step then resumed to 2; ``b``: 2 steps straight (configs/default-tiny.yaml on 4 textures)."""
    from semsr.cli import main
    from tests.train_helpers import write_textures

    root = tmp_path_factory.mktemp("default-runs")
    hr = write_textures(root / "hr", count=4, size=(64, 64))
    common = ["--config", str(REPO / "configs" / "default-tiny.yaml"), f"data.hr=[{hr}]", "data.limit=0",
              "data.val_count=1", "validation.every=2", "checkpoint.every=1", "train.ema_decay=0"]
    assert main(["train", "--output", str(root / "a"), "--max-steps", "1", *common]) == 0
    assert main(["train", "--output", str(root / "a"), "--max-steps", "2", "--resume", *common]) == 0
    assert main(["train", "--output", str(root / "b"), "--max-steps", "2", *common]) == 0
    return root


def test_resumed_run_equals_straight_run(tiny_runs: Path) -> None:
    from safetensors.torch import load_file

    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tiny_runs / "a" / "final" / name)), load_file(str(tiny_runs / "b" / "final" / name))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("conv_out"))  # training moved the zero layer


def test_tiny_config_trains_and_method_runs(tiny_runs: Path, tmp_path: Path) -> None:
    import json

    from PIL import Image

    from semsr.cli import main

    out = tiny_runs / "b"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert any("loss" in r for r in records) and any(r.get("type") == "val" for r in records)
    assert (out / "final" / "config.json").is_file() and (out / "final" / "unet").is_dir()
    Image.fromarray((textured(16, 20)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "a.png")
    assert main(["upscale", "-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "sr"), "--method",
                 "default-diffusion", "--checkpoint", str(out / "final"), "--steps", "2",
                 "--no-edge-prior"]) == 0
    assert Image.open(tmp_path / "sr" / "a_out.png").size == (80, 64)


def test_texture_energy_is_phase_free_but_sees_blur() -> None:
    """The loss is 0 for the HR image, small for the same texture moved inside its cells, large for a blur."""
    import torch.nn.functional as F

    from semsr.train.default import local_gradient_energy, texture_energy

    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=g)
    assert local_gradient_energy(hr).shape == (2, 1, 8, 8)
    shifted = torch.roll(hr, shifts=(1, 1), dims=(-2, -1))
    blurred = F.avg_pool2d(F.pad(hr, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    same = texture_energy({"sr": hr, "hr": hr})
    moved = texture_energy({"sr": shifted, "hr": hr})
    blur = texture_energy({"sr": blurred, "hr": hr})
    mse_moved = F.mse_loss(shifted, hr)
    assert float(same) == 0.0
    assert float(blur) > 10 * float(moved)
    assert float(mse_moved) > 0.1  # the shift is a large error for a pixel-wise loss
    sr = blurred.clone().requires_grad_(True)
    texture_energy({"sr": sr, "hr": hr}).backward()
    assert sr.grad is not None and float(sr.grad.abs().sum()) > 0
    with pytest.raises(SemsrError, match="texture_energy"):
        texture_energy({"sr": hr})


def test_gradient_l1_is_aligned_and_differentiable() -> None:
    """Zero for the HR image, larger for a shifted copy than for itself, gradient reaches the prediction."""
    from semsr.train.default import gradient_l1

    g = torch.Generator().manual_seed(1)
    hr = torch.rand(1, 3, 32, 32, generator=g)
    assert float(gradient_l1({"sr": hr, "hr": hr})) == 0.0
    assert float(gradient_l1({"sr": torch.roll(hr, 1, dims=-1), "hr": hr})) > 0.1
    flat = torch.full_like(hr, 0.5).requires_grad_(True)
    gradient_l1({"sr": flat, "hr": hr}).backward()
    assert float(flat.grad.abs().sum()) > 0


def test_default_steps_come_from_the_checkpoint(tmp_path: Path) -> None:
    """Without --steps the method samples with the checkpoint's ``default_steps``; --steps overrides it."""
    from semsr.methods import get_method

    cfg = DefaultSRConfig(**{**TINY_ARCH, "default_steps": 2})
    DefaultSR(cfg).save(tmp_path / "ck")
    assert DefaultSR.load(tmp_path / "ck").config.default_steps == 2
    method = get_method("default-diffusion", checkpoint=tmp_path / "ck")
    seen: list[int] = []
    real = method.pipeline.__call__

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs["steps"])
        return real(*args, **kwargs)

    method.pipeline = type("Spy", (), {"__call__": staticmethod(spy), "config": method.pipeline.config,
                                       "degradation": method.pipeline.degradation})()
    x = torch.rand(1, 3, 16, 16)
    method(x)
    method(x, steps=1)
    assert seen == [2, 1]
    with pytest.raises(SemsrError, match="default_steps"):
        DefaultSRConfig(default_steps=0)
