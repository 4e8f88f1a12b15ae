"""The bundled default model (issue 10): architecture, identity at init, ablation switches, checkpoint layout,
typed options and reported priors, training, method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semsr.core.components import INDEX_FILE, read_index
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.outputs import SROutput
from semsr.methods import build as build_method
from semsr.methods import resolve
from semsr.methods.default_diffusion import (
    DEFAULT_TILE,
    DefaultDiffusionOptions,
    DefaultSRPipeline,
    DegradationText,
    TextTokens,
    packaged_weights,
)
from semsr.models.default_sr import (
    DefaultSR,
    blur_residual,
    finish_refinement,
    flat_weight,
    from_space,
    load_default_sr,
    save_default_sr,
    to_space,
)
from semsr.pipeline.options import latent_tile

REPO = Path(__file__).resolve().parent.parent
TINY_ARCH = {
    "stage1": "bicubic",
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "conditioning_channels": [8, 8, 8],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (two spin against each other on the shared cores, 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_tokens() -> TextTokens:
    return TextTokens()


@pytest.fixture(scope="module")
def bicubic():
    return build_method("bicubic")


def tiny_model(seed: int = 0, perturb: bool = False, **config: object) -> DefaultSR:
    torch.manual_seed(seed)
    model = DefaultSR(**{**TINY_ARCH, **config})
    if perturb:  # a "trained" model: non-zero output layer and zero convolutions
        with torch.no_grad():
            for p in [
                model.unet.conv_out.weight,
                *model.controlnet.controlnet_down_blocks.parameters(),
                *model.controlnet.controlnet_mid_block.parameters(),
                *model.controlnet.controlnet_cond_embedding.conv_out.parameters(),
            ]:
                p.normal_(0, 0.05)
    return model.eval()


def textured(h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = 0.5 + 0.3 * torch.sin(0.7 * xx + 0.4 * yy)
    return (base[None, None].repeat(1, 3, 1, 1) + 0.1 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def no_irpad(tmp_path: Path) -> DegradationText:
    return DegradationText(tmp_path / "absent")


class FixedDegradation(DegradationText):
    """A degradation description without IRPAD weights (the same text for every image)."""

    def __init__(self, text: str) -> None:
        super().__init__(enabled=False)
        self.text = text

    def __call__(self, lr: torch.Tensor) -> list[str]:
        return [self.text] * lr.shape[0]


def test_config_validation() -> None:
    model = DefaultSR()
    assert model.channels == 48 and model.multiple == 16 and model.config.default_steps == 4
    assert model.config.scheduler["prediction_type"] == "sample"  # the default schedule is recorded in the config
    with pytest.raises(SemsrError, match="power of two"):
        DefaultSR(unshuffle=3, conditioning_channels=[8, 8])
    with pytest.raises(SemsrError, match="conditioning_channels"):
        DefaultSR(unshuffle=4, conditioning_channels=[8, 8])
    with pytest.raises(SemsrError, match="unknown"):
        DefaultSR.from_options({"widths": [1]})
    with pytest.raises(SemsrError, match="default_steps"):
        DefaultSR(default_steps=0)


def test_space_roundtrip_and_forward_shapes() -> None:
    x = torch.rand(2, 3, 32, 48)
    z = to_space(x, 4)
    assert z.shape == (2, 48, 8, 12)
    assert torch.equal(from_space(z, 4), x)
    model = tiny_model(perturb=True)
    cond = {"stage1": torch.randn(2, 48, 8, 12), "tokens": torch.randn(2, 77, 384), "edges": torch.rand(2, 1, 32, 48)}
    out = model(torch.randn(2, 48, 8, 12), torch.tensor(500), cond)
    assert out.shape == (2, 48, 8, 12) and out.abs().sum() > 0


def test_fresh_model_leaves_stage1_unchanged(tmp_path: Path, text_tokens: TextTokens, bicubic) -> None:
    pipe = DefaultSRPipeline(tiny_model(), stage1=bicubic, text=text_tokens, degradation=no_irpad(tmp_path))
    assert (pipe.name, pipe.scale, pipe.tiles_itself) == ("default-diffusion", 4, True)
    lr = textured(21, 26)  # not a multiple of 4: padded, then cropped back
    y1 = bicubic(lr).images
    for scheduler in ("ddim", "dpm++"):
        out = pipe(lr, DefaultDiffusionOptions(prompt="a brick wall", steps=4, seed=3, scheduler=scheduler))
        assert isinstance(out, SROutput) and out.images.shape == (1, 3, 84, 104)
        torch.testing.assert_close(out.images, y1, atol=1e-6, rtol=0)
        assert out.timings["steps"] == 4.0 and "denoise" in out.timings


def test_ablation_switches_change_the_output(tmp_path: Path, text_tokens: TextTokens, bicubic) -> None:
    pipe = DefaultSRPipeline(tiny_model(perturb=True), stage1=bicubic, text=text_tokens, degradation=no_irpad(tmp_path))
    lr = textured()
    run = DefaultDiffusionOptions(prompt="a brick wall", steps=2, seed=1)
    full = pipe(lr, run).images
    assert torch.equal(full, pipe(lr, run).images)  # seeded: reproducible
    assert not torch.allclose(full, pipe(lr, run.replace(no_text_prior=True)).images)
    assert not torch.allclose(full, pipe(lr, run.replace(no_edge_prior=True)).images)
    assert not torch.allclose(full, pipe(lr, run.replace(steps=1)).images)
    assert not torch.allclose(full, pipe(lr, run.replace(guidance_scale=3.0)).images)
    torch.testing.assert_close(pipe(lr, run.replace(steps=0)).images, bicubic(lr).images, atol=1e-6, rtol=0)
    # tiled sampling (2 x 3 working-space tiles of 16 with overlap) covers the image with the same shape
    tiled = pipe(textured(32, 40), run.replace(steps=1, latent_tile=16, tile_overlap=4)).images
    assert tiled.shape == (1, 3, 128, 160) and torch.isfinite(tiled).all()
    # --tile is in input pixels: 16 input px are 16 * 4 / 4 working-space px, the same tiles
    assert torch.equal(pipe(textured(32, 40), run.replace(steps=1, tile=16, tile_overlap=4)).images, tiled)


def test_mean_start_is_deterministic_and_seed_free(tmp_path: Path, text_tokens: TextTokens, bicubic) -> None:
    """``start="mean"`` samples from ``r_T = 0``: the seed does not matter; ``"noise"`` depends on it."""
    lr = textured()
    run = DefaultDiffusionOptions(steps=1, seed=1)
    outs = {}
    for start in ("noise", "mean"):
        model = tiny_model(perturb=True, start=start)
        pipe = DefaultSRPipeline(model, stage1=bicubic, text=text_tokens, degradation=no_irpad(tmp_path))
        outs[start] = (pipe(lr, run).images, pipe(lr, run.replace(seed=7)).images)
    assert not torch.allclose(*outs["noise"])
    assert torch.equal(*outs["mean"])
    assert not torch.allclose(outs["mean"][0], bicubic(lr).images)  # a trained model still refines
    with pytest.raises(SemsrError, match="start"):
        DefaultSR(start="zeros")


def test_residual_blur_keeps_means_and_removes_pixel_grain() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1, 3, 32, 32, generator=g)
    assert torch.equal(blur_residual(r, 0.0), r)
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(blur_residual(flat, 0.7), flat)
    assert blur_residual(r, 0.7).std() < 0.6 * r.std()  # white noise loses most of its energy
    with pytest.raises(SemsrError, match="residual_blur"):
        DefaultSR(residual_blur=-1.0)


def test_finish_refinement_cores_the_residual_and_smooths_only_flat_regions() -> None:
    g = torch.Generator().manual_seed(0)
    y1 = torch.full((1, 3, 32, 64), 0.5)
    y1[..., 32:] += 0.2 * torch.rand(1, 3, 32, 32, generator=g)  # right half textured, left half flat
    y1[..., :32] += 0.002 * torch.randn(1, 3, 32, 32, generator=g)  # faint grain on the flat half
    residual = 0.003 * torch.randn(1, 3, 32, 64, generator=g)  # all below the core (< 6.7 sigma)
    residual[..., 10, 40] = 0.1
    plain = tiny_model().config
    torch.testing.assert_close(finish_refinement(y1, residual, plain), y1 + residual)  # defaults: unchanged
    out = finish_refinement(y1, residual, tiny_model(residual_core=0.02, residual_gain=1.5).config)
    delta = out - y1
    assert int((delta != 0).sum()) == 3 and abs(float(delta[0, 0, 10, 40]) - 1.5 * 0.08) < 1e-6
    out = finish_refinement(y1, torch.zeros_like(y1), tiny_model(flat_smooth=0.7).config)
    assert out[..., 2:-2, 2:28].std() < 0.6 * y1[..., 2:-2, 2:28].std()  # flat grain removed
    torch.testing.assert_close(out[..., 36:], y1[..., 36:])  # texture untouched
    assert flat_weight(y1, (1 / 255, 3 / 255))[..., 36:].max() == 0
    for bad in ({"residual_core": -1.0}, {"flat_gate": (0.02, 0.01)}):
        with pytest.raises(SemsrError):
            tiny_model(**bad)


def test_text_prior_off_skips_irpad_but_keeps_a_user_prompt(text_tokens: TextTokens, bicubic) -> None:
    """A checkpoint with ``text_prior=False``: no IRPAD description; a prompt the user gives still conditions."""
    lr = textured()
    pipe = DefaultSRPipeline(
        tiny_model(perturb=True, text_prior=False),
        stage1=bicubic,
        text=text_tokens,
        degradation=FixedDegradation("noisy, blurry"),
    )
    out = pipe(lr, DefaultDiffusionOptions(steps=1))
    assert out.priors["prompt"] == "" and "degradation" not in out.priors
    prompted = pipe(lr, DefaultDiffusionOptions(steps=1, prompt="a brick wall"))
    assert prompted.priors["prompt"] == "a brick wall"
    assert not torch.allclose(out.images, prompted.images)


def test_tile_uses_the_one_latent_tile_rule() -> None:
    opts = DefaultDiffusionOptions.parse({"tile": "64"})
    assert latent_tile(opts, 4, 4) == 64 and latent_tile(opts, 4, 2) == 128
    assert latent_tile(opts.replace(latent_tile=24), 4, 4) == 24
    assert latent_tile(DefaultDiffusionOptions(), 4, 4) is None and DEFAULT_TILE == 256


def test_options_are_typed_and_checked() -> None:
    spec = resolve("default-diffusion")
    assert spec.options is DefaultDiffusionOptions and spec.suggests_priors and spec.diffusion
    assert set(spec.bundled_paths) == {"checkpoint", "irpad"}
    opts = spec.parse({"steps": "3", "no_edge_prior": "true", "scheduler": "dpm++", "stage1": "bicubic"})
    assert (opts.steps, opts.no_edge_prior, opts.scheduler, opts.stage1) == (3, True, "dpm++", "bicubic")
    assert DefaultDiffusionOptions().steps is None  # None = the checkpoint's default_steps
    assert DefaultDiffusionOptions.infos()["priors_in_prompt"].hidden
    assert set(DefaultDiffusionOptions.names("build")) >= {"checkpoint", "irpad", "stage1", "device"}
    with pytest.raises(SemsrError, match="no_edge_prior"):
        spec.parse({"no_edge_priors": True})
    with pytest.raises(SemsrError, match="scheduler"):
        spec.parse({"scheduler": "euler"})


def test_reported_and_suggested_priors(tmp_path: Path, text_tokens: TextTokens, bicubic) -> None:
    deg = FixedDegradation("heavy blur")
    pipe = DefaultSRPipeline(tiny_model(perturb=True), stage1=bicubic, text=text_tokens, degradation=deg)
    lr = textured(16, 16)
    assert pipe.suggest_priors(lr) == {"prompt": "heavy blur", "degradation": "heavy blur"}
    run = DefaultDiffusionOptions(prompt="a cat", steps=1)
    out = pipe(lr, run)
    assert out.priors == {
        "prompt": "a cat, heavy blur",
        "user_prompt": "a cat",
        "degradation": "heavy blur",
        "edge_prior": True,
    }
    # the prompt already holds the (edited) description: used as given, same conditioning as the default run
    edited = pipe(lr, run.replace(prompt="a cat, heavy blur", priors_in_prompt=True))
    assert edited.priors == {"prompt": "a cat, heavy blur", "edge_prior": True}
    assert torch.equal(edited.images, out.images)
    assert pipe(lr, run.replace(no_text_prior=True, no_edge_prior=True)).priors == {"prompt": "", "edge_prior": False}
    # per-image prompts (validation captions) override options.prompt
    two = pipe(torch.cat([lr, lr]), run, prompts=["a dog", "a cat"])
    assert two.images.shape[0] == 2 and two.priors["user_prompt"] == "a dog"
    with pytest.raises(SemsrError, match="2 prompts for 1 images"):
        pipe(lr, run, prompts=["a", "b"])
    pipe.degradation = no_irpad(tmp_path)  # no IRPAD weights: no description, the prompt alone
    assert pipe.suggest_priors(lr) == {"prompt": ""}
    assert pipe(lr, run).priors == {"prompt": "a cat", "edge_prior": True}


def test_no_suggestion_without_the_text_prior(text_tokens: TextTokens, bicubic) -> None:
    """A checkpoint trained without the text prior (the shipped default) suggests no prompt and runs no IRPAD:
    the web demo's suggestion after an upload would otherwise become a text condition the model never uses."""

    class Counting(FixedDegradation):
        calls = 0

        def __call__(self, lr: torch.Tensor) -> list[str]:
            Counting.calls += 1
            return super().__call__(lr)

    pipe = DefaultSRPipeline(
        tiny_model(perturb=True, text_prior=False), stage1=bicubic, text=text_tokens, degradation=Counting("heavy blur")
    )
    lr = textured(16, 16)
    assert pipe.suggest_priors(lr) == {}
    out = pipe(lr, DefaultDiffusionOptions(steps=1))
    assert out.priors == {"prompt": "", "edge_prior": True} and Counting.calls == 0


def test_missing_irpad_gives_empty_description(tmp_path: Path) -> None:
    deg = DegradationText(tmp_path / "none")
    assert not deg.available and "IRPAD" in deg.reason
    assert deg(torch.rand(2, 3, 16, 16)) == ["", ""]
    assert DegradationText(enabled=False)(torch.rand(1, 3, 8, 8)) == [""]


def test_checkpoint_layout_roundtrip(tmp_path: Path) -> None:
    model = tiny_model(perturb=True, default_steps=3)
    save_default_sr(model, tmp_path / "ck")
    index = read_index(tmp_path / "ck", "default-sr")
    assert index.components == {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "controlnet": ("diffusers", "ControlNetModel"),
        "text_proj": ("semsr", "DefaultSRTextProj"),
    }
    assert index.meta["default_steps"] == 3 and index.meta["stage1"] == "bicubic"
    loaded = load_default_sr(tmp_path / "ck")
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == json.loads(
        json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")})
    )
    assert not any(p.requires_grad for p in loaded.parameters())
    want = model.state_dict()
    assert sorted(loaded.state_dict()) == sorted(want)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(UnavailableError, match="default-model checkpoint"):
        load_default_sr(tmp_path)


def test_packaged_weights_are_a_default_sr_checkpoint() -> None:
    folder = packaged_weights()
    index = read_index(folder, "default-sr")
    assert set(index.components) == {"unet", "controlnet", "text_proj"}
    assert index.meta["default_steps"] == 1 and index.meta["stage1"] == "realesrgan-x4plus"
    # shipped settings (model card): deterministic start, cored residual, flat-region noise gate, no text prior
    assert index.meta["start"] == "mean" and index.meta["text_prior"] is False
    assert index.meta["residual_core"] > 0 and index.meta["flat_smooth"] > 0
    model = load_default_sr(folder)
    assert model.config.scale == 4 and model.channels == 48
    assert sum(p.numel() for p in model.parameters()) > 5_000_000


def test_method_without_weights_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="default-model weights"):
        build_method("default-diffusion", {"checkpoint": str(tmp_path)})


def test_default_steps_come_from_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without steps the method samples with the checkpoint's ``default_steps``; the steps option overrides it."""
    save_default_sr(tiny_model(default_steps=2), tmp_path / "ck")
    assert load_default_sr(tmp_path / "ck").config.default_steps == 2
    method = build_method("default-diffusion", {"checkpoint": str(tmp_path / "ck"), "irpad": str(tmp_path / "none")})
    assert isinstance(method, DefaultSRPipeline) and method.stage1.name == "bicubic"
    seen: list[int] = []
    real = method.refine

    def spy(*args, **kwargs):
        seen.append(kwargs["steps"])
        return real(*args, **kwargs)

    monkeypatch.setattr(method, "refine", spy)
    x = torch.rand(1, 3, 16, 16)
    assert method(x).timings["steps"] == 2.0
    method(x, DefaultDiffusionOptions(steps=1))
    assert seen == [2, 1]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a``: 1 step then resumed to 2; ``b``: 2 steps straight (configs/default-tiny.yaml on 4 textures)."""
    from tests.train_helpers import write_textures

    from semsr.cli import main

    root = tmp_path_factory.mktemp("default-runs")
    hr = write_textures(root / "hr", count=4, size=(64, 64))
    common = [
        "--config",
        str(REPO / "configs" / "default-tiny.yaml"),
        f"data.hr=[{hr}]",
        "data.limit=0",
        "data.val_count=1",
        "validation.every=2",
        "checkpoint.every=1",
        "train.ema_decay=0",
    ]
    assert main(["train", "--output", str(root / "a"), "--max-steps", "1", *common]) == 0
    assert main(["train", "--output", str(root / "a"), "--max-steps", "2", "--resume", *common]) == 0
    assert main(["train", "--output", str(root / "b"), "--max-steps", "2", *common]) == 0
    shipped = [f"model.options.{k}={v}" for k, v in SHIPPED_INFERENCE.items()]
    assert main(["train", "--output", str(root / "c"), "--max-steps", "2", *common, *shipped]) == 0
    return root


#: Inference settings of the shipped checkpoint as ``model.options`` overrides (configs/default.yaml sets them).
SHIPPED_INFERENCE = {
    "start": "mean",
    "text_prior": "false",
    "default_steps": "1",
    "residual_core": "0.016",
    "residual_gain": "1.5",
    "flat_smooth": "0.5",
}


def test_inference_settings_reach_the_checkpoint_but_not_the_training(tiny_runs: Path) -> None:
    """A run with the shipped inference settings trains the same weights and records the settings."""
    from safetensors.torch import load_file

    for part in ("unet", "controlnet", "text_proj"):
        name = f"{part}/diffusion_pytorch_model.safetensors"
        b, c = load_file(str(tiny_runs / "b" / "final" / name)), load_file(str(tiny_runs / "c" / "final" / name))
        assert sorted(b) == sorted(c) and all(torch.equal(b[k], c[k]) for k in b), part
    config = load_default_sr(tiny_runs / "c" / "final").config
    assert (config.start, config.text_prior, config.default_steps) == ("mean", False, 1)
    assert (config.residual_core, config.residual_gain, config.flat_smooth) == (0.016, 1.5, 0.5)
    assert load_default_sr(tiny_runs / "b" / "final").config.residual_core == 0.0


def test_training_config_gives_the_shipped_checkpoint_config() -> None:
    """``semsr train --config configs/default.yaml`` builds a model whose config (architecture and inference
    settings, what its export writes as meta) is the shipped checkpoint's."""
    from semsr.train.config import load_config
    from semsr.train.tasks import build_task

    task = build_task(load_config(REPO / "configs" / "default.yaml"))
    built = {k: v for k, v in task.trainable.config.items() if not k.startswith("_")}
    shipped = read_index(packaged_weights()).meta
    assert json.loads(json.dumps(built)) == json.loads(json.dumps(dict(shipped)))


def test_resumed_run_equals_straight_run(tiny_runs: Path) -> None:
    from safetensors.torch import load_file

    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tiny_runs / "a" / "final" / name)), load_file(str(tiny_runs / "b" / "final" / name))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("conv_out"))  # training moved the zero layer


def test_tiny_config_trains_and_method_runs(tiny_runs: Path, tmp_path: Path) -> None:
    from PIL import Image

    from semsr.cli import main

    out = tiny_runs / "b"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert any("loss" in r for r in records) and any(r.get("type") == "val" for r in records)
    assert (out / "final" / INDEX_FILE).is_file() and (out / "final" / "unet").is_dir()
    assert load_default_sr(out / "final").config.stage1 == "bicubic"
    Image.fromarray((textured(16, 20)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "a.png")
    assert (
        main(
            [
                "upscale",
                "-i",
                str(tmp_path / "a.png"),
                "-o",
                str(tmp_path / "sr"),
                "--method",
                "default-diffusion",
                "--checkpoint",
                str(out / "final"),
                "--steps",
                "2",
                "--no-edge-prior",
            ]
        )
        == 0
    )
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


def test_detail_blends_stage1_and_the_refinement_and_zero_is_stage1_exactly(
    tmp_path: Path, text_tokens: TextTokens, bicubic
) -> None:
    pipe = DefaultSRPipeline(tiny_model(perturb=True), stage1=bicubic, text=text_tokens, degradation=no_irpad(tmp_path))
    lr = textured(21, 26)
    run = DefaultDiffusionOptions(steps=2, seed=1)
    assert run.detail == 1.0
    y1 = bicubic(lr).images.float().clamp(0, 1)
    full = pipe(lr, run).images
    assert torch.equal(pipe(lr, run.replace(detail=1.0)).images, full)
    assert torch.equal(pipe(lr, run.replace(detail=0.0)).images, y1)  # bit for bit, not just close
    half = pipe(lr, run.replace(detail=0.5)).images
    inside = (full > 0.01) & (full < 0.99) & (y1 > 0.01) & (y1 < 0.99)  # away from the clamp
    torch.testing.assert_close(half[inside], (y1 + 0.5 * (full - y1))[inside], atol=1e-5, rtol=0)
    assert (half - y1).abs().mean() < (full - y1).abs().mean()
    spec = resolve("default-diffusion")
    assert spec.parse({"detail": "0.25"}).detail == 0.25
    info = DefaultDiffusionOptions.infos()["detail"]
    assert (info.min, info.max, info.widget) == (0.0, 1.0, "slider")
    with pytest.raises(SemsrError, match="detail"):
        spec.parse({"detail": "1.5"})


def test_dtype_is_the_stage1_precision() -> None:
    spec = resolve("default-diffusion")
    method = spec.build(spec.parse({"stage1": "bicubic", "dtype": "bf16"}))
    assert method.stage1.dtype == torch.bfloat16
    assert method.model.unet.dtype == torch.float32  # the refiner stays fp32
