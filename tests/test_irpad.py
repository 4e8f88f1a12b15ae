"""IRPAD: level table and descriptions, the synthetic degradation, the component and the shipped weights,
accuracy on held-out synthetic data (the ``semsr bench irpad`` acceptance with a smaller n), the ``irpad``
provider and the ``irpad`` training task of the shared trainer."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from semsr.commands.bench_irpad import register_kind
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.fingerprint import fingerprint
from semsr.core.paths import assets_dir
from semsr.data.degradations import RealESRGANDegradation, filter2d, gaussian_kernel
from semsr.data.degradations.pipeline import sample_params as realesrgan_params
from semsr.priors.base import cached, get_provider, picture_tensor
from semsr.priors.irpad import (
    DEGRADATION_TYPES,
    LEVELS,
    IRPADEstimator,
    IRPADNet,
    IRPADProvider,
    crop_grid,
    default_weights_dir,
    describe,
    level_of,
    load_irpad,
)
from semsr.train.config import load_config
from semsr.train.data import ImageItem
from semsr.train.irpad import (
    DOWN_MODES,
    RESAMPLING_BLUR,
    IRPADParams,
    IRPADTask,
    degrade,
    degraded_window,
    fit_resampling_blur,
    irpad_ce,
    is_held_out,
    list_photos,
    resampling_blur,
    sample_params,
)
from semsr.train.irpad_realesrgan import (
    _no_noise,
    downscale_factor,
    fit_blur,
    label_sample,
    make_realesrgan_set,
    white_noise_std,
)
from semsr.train.trainer import Trainer
from train_helpers import fresh_training_state

REPO = Path(__file__).resolve().parent.parent


def bench_irpad(argv: list[str]) -> int:
    """``semsr bench irpad ARGV`` through the kind's own parser (independent of the rest of the CLI)."""
    parser = argparse.ArgumentParser(prog="semsr bench")
    register_kind(parser.add_subparsers(dest="kind"))
    args = parser.parse_args(["irpad", *argv])
    threads = torch.get_num_threads()
    try:
        return args.func(args)
    finally:
        torch.set_num_threads(threads)


def train_irpad(output: Path, overrides: list[str]) -> Path:
    """One run of configs/irpad-tiny.yaml with ``overrides`` through the shared trainer; returns ``output/final``."""
    with fresh_training_state():
        Trainer(load_config(REPO / "configs" / "irpad-tiny.yaml", overrides), output).fit()
    return output / "final"


def _sample_image() -> torch.Tensor:
    from semsr.core.io import read_image

    return picture_tensor(read_image(assets_dir() / "sample.png"))


def _params(**kw: object) -> IRPADParams:
    base = dict(
        blur=0.0,
        aniso=1.0,
        theta=0.0,
        noise=0.0,
        grey=False,
        jpeg=100.0,
        downscale=1.0,
        down_mode="imresize",
        up_mode="bicubic",
        noise_seed=0,
        labels=(0, 0, 0, 0),
    )
    base.update(kw)
    return IRPADParams(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- levels and text


def test_describe_joins_the_level_phrases_in_type_order() -> None:
    text = describe({"blur": 1, "noise": 3, "jpeg": 2, "downscale": 0})
    assert text == "slight blur, heavy noise, moderate jpeg compression artifacts, full resolution"
    assert (
        describe({"blur": 0, "noise": 2, "jpeg": 0, "downscale": 3}, omit_none=True)
        == "moderate noise, very low resolution"
    )
    assert describe({t: 0 for t in DEGRADATION_TYPES}, omit_none=True) == "clean image"


def test_level_of_inside_intervals_and_nearest_in_gaps() -> None:
    for t, levels in LEVELS.items():
        for i, lv in enumerate(levels):
            assert level_of(t, (lv.low + lv.high) / 2) == i
    assert level_of("blur", 0.2) == 0 and level_of("blur", 0.5) == 1  # gap 0 .. 0.9
    assert level_of("blur", 1.5) == 1 and level_of("blur", 1.8) == 2  # gap 1.3 .. 2.0
    assert level_of("jpeg", 97) == 0 and level_of("jpeg", 72) == 1 and level_of("jpeg", 47) == 2
    assert level_of("jpeg", 5) == 3
    assert level_of("downscale", 2.4) == 1 and level_of("downscale", 2.6) == 2


def test_sampled_parameters_lie_in_their_level_interval() -> None:
    rng = np.random.default_rng(0)
    seen = {t: set() for t in DEGRADATION_TYPES}
    for _ in range(400):
        p = sample_params(rng)
        for t, value, label in zip(DEGRADATION_TYPES, p.values(), p.labels):
            lv = LEVELS[t][label]
            assert min(lv.low, lv.high) <= value <= max(lv.low, lv.high)
            seen[t].add(label)
    assert all(len(s) == len(LEVELS[t]) for t, s in seen.items())
    rng = np.random.default_rng(1)
    gap_values = 0
    for _ in range(400):  # contiguous: values also fall into the gaps, labels by nearest interval
        p = sample_params(rng, contiguous=True)
        assert p.labels == tuple(level_of(t, v) for t, v in zip(DEGRADATION_TYPES, p.values()))
        lv = LEVELS["noise"][p.labels[1]]
        gap_values += not (min(lv.low, lv.high) <= p.noise <= max(lv.low, lv.high))
    assert gap_values > 20


def test_blur_label_is_the_total_blur_including_the_resampling() -> None:
    rng = np.random.default_rng(3)
    for _ in range(400):
        p = sample_params(rng)
        rs = resampling_blur(p.downscale, p.down_mode, p.up_mode)
        assert (rs > 0) == (p.downscale > 1.0)
        assert p.total_blur() == pytest.approx(float(np.hypot(p.blur, rs)))
        if p.downscale > 1.0:  # resampling blurs by itself: never "no blur", and only the levels it can reach
            assert p.labels[0] >= 1 and LEVELS["blur"][p.labels[0]].high > rs
    heavy = [sample_params(rng) for _ in range(600)]
    assert {p.labels[0] for p in heavy if p.labels[3] == 3} == {2, 3}  # 4x smaller: at least moderate blur


def test_resampling_blur_table_matches_a_fit_on_a_photo() -> None:
    x = _sample_image()
    sigmas = tuple(np.arange(0.3, 2.61, 0.05))
    fits = {}
    for down, up in RESAMPLING_BLUR:
        for d in (2.0, 4.0):
            fits[down, up, d] = fit_resampling_blur([x], d, down, up, sigmas)
            assert fits[down, up, d] == pytest.approx(resampling_blur(d, down, up), rel=0.2), (down, up, d)
    for down in DOWN_MODES:  # a bilinear enlargement is softer than a bicubic one
        assert fits[down, "bilinear", 4.0] > fits[down, "bicubic", 4.0]


# ----------------------------------------------------------------------------- degradation


def test_degrade_identity_and_each_type_has_its_effect() -> None:
    x = _sample_image()[..., 32:128, 32:128]
    q = (x * 255).round() / 255
    assert torch.equal(degrade(q, _params()), q)

    def hf(img: torch.Tensor) -> float:  # high-frequency energy
        return float((img[..., 1:, :] - img[..., :-1, :]).abs().mean())

    blurred = degrade(q, _params(blur=2.0))
    noisy = degrade(q, _params(noise=20.0, noise_seed=3))
    jpeg = degrade(q, _params(jpeg=15.0))
    small = degrade(q, _params(downscale=4.0))
    for y in (blurred, noisy, jpeg, small):
        assert y.shape == q.shape
        assert torch.equal((y * 255).round() / 255, y)  # 8-bit values
    assert hf(blurred) < 0.6 * hf(q) and hf(small) < 0.7 * hf(q)
    assert hf(noisy) > 1.5 * hf(q)
    assert 0 < float((jpeg - q).abs().mean()) < 0.1
    # noise added on the small image is enlarged with it: grain of a 4x-downscaled image is coarse
    n1 = degrade(q, _params(noise=20.0)) - q
    n4 = degrade(q, _params(noise=20.0, downscale=4.0)) - degrade(q, _params(downscale=4.0))
    assert hf(n4) < 0.5 * hf(n1)


def test_held_out_split_is_stable_and_benchmarks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"{i:06d}.jpg" for i in range(2000)]
    share = np.mean([is_held_out(n) for n in names])
    assert 0.12 < share < 0.18
    assert is_held_out("a/b/123456.jpg") == is_held_out("c/123456.JPG")
    bench = tmp_path / "data" / "benchmarks" / "Set5"
    bench.mkdir(parents=True)
    monkeypatch.setenv("SEMSR_DATA", str(tmp_path / "data"))
    with pytest.raises(SemsrError, match="not training data"):
        list_photos([bench], held_out=False)


def test_crop_grid_covers_the_image() -> None:
    assert crop_grid(96, 96, 64) == [(0, 0), (0, 32), (32, 0), (32, 32)]
    assert crop_grid(40, 200, 64) == [(0, 0), (0, 45), (0, 91), (0, 136)]
    assert len(crop_grid(1000, 1000, 64, max_crops=16)) == 16


# ----------------------------------------------------------------------------- shipped weights


def test_shipped_weights_beat_dalpsr_on_held_out_synthetic_data(data_dir: Path, tmp_path: Path) -> None:
    """DaLPSR's IRPAD reaches 63-69 % per type; the issue's target is 90 % (2000 samples, docs/irpad.md: 0.938 for
    the weakest type); on this smaller sample every type must stay above 88 % and JPEG above 95 %."""
    out = tmp_path / "r.json"
    assert bench_irpad(["--n", "400", "--json", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 400 and set(res["per_type"]) == set(DEGRADATION_TYPES)
    assert all(acc >= 0.88 for acc in res["per_type"].values()), res["per_type"]
    assert res["per_type"]["jpeg"] >= 0.95, res["per_type"]
    assert res["passed"] == all(acc >= res["target"] for acc in res["per_type"].values())
    assert res["target"] == 0.90 and res["source"].startswith("held-out split")
    assert res["fingerprint"] == fingerprint([default_weights_dir()]) and res["flips"] == 8
    png = Path(res["confusion_png"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for conf in res["confusion"].values():
        assert np.asarray(conf).sum() == 400
    for grid in res["by_downscale_noise"].values():
        cells = np.asarray(grid, dtype=float)
        assert cells.shape == (4, 4) and np.nanmin(cells) >= 0 and np.nanmax(cells) <= 1
    # no noise is where resampling and blur are confusable: downscale is weakest there
    down = np.asarray(res["by_downscale_noise"]["downscale"], dtype=float)
    assert np.nanmean(down[:, 0]) < np.nanmean(down[:, 1:])


def test_shipped_weights_are_small_and_self_describing() -> None:
    folder = default_weights_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size <= 5 * 1024 * 1024
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == "IRPADNet" and cfg["types"] == list(DEGRADATION_TYPES)
    assert "command" in cfg["training"] and "train-irpad" in cfg["training"]["command"]  # how they were trained
    model = load_irpad()
    assert model.types == DEGRADATION_TYPES and list(model.level_table()) == list(DEGRADATION_TYPES)
    assert model.level_table() == LEVELS and model.config.crop == 96


def test_irpad_is_a_component_and_keeps_its_type_order(tmp_path: Path) -> None:
    """The config JSON is written with sorted keys; the head and phrase order survives through ``types``."""
    torch.manual_seed(0)
    model = IRPADNet(channels=(8, 8, 16), crop=48).eval()
    model.save_pretrained(tmp_path / "w", safe_serialization=True)
    loaded = load_irpad(tmp_path / "w")
    assert loaded.types == DEGRADATION_TYPES and list(loaded.heads) == list(DEGRADATION_TYPES)
    assert list(loaded.config.channels) == [8, 8, 16] and loaded.config.crop == 48
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert list(b) == list(DEGRADATION_TYPES) and all(torch.allclose(a[t], b[t]) for t in a)
    with pytest.raises(ValueError, match="types"):
        IRPADNet(types=["blur", "noise"])
    provider = IRPADProvider(weights=tmp_path / "w")
    assert fingerprint([tmp_path / "w"]) in provider.version
    assert IRPADEstimator(loaded).windows(torch.rand(1, 3, 64, 64)).shape == (4, 3, 48, 48)


def test_irpad_provider_text_format_and_cache(tmp_path: Path) -> None:
    provider = get_provider("irpad")
    assert isinstance(provider, IRPADProvider) and provider.kind == "text"
    image = _sample_image()
    result = provider(image)
    phrases = (
        [re.escape(lv.text) for lv in LEVELS["blur"]],
        [re.escape(lv.text) for lv in LEVELS["noise"]],
        [re.escape(lv.text) for lv in LEVELS["jpeg"]],
        [re.escape(lv.text) for lv in LEVELS["downscale"]],
    )
    pattern = ", ".join("(" + "|".join(p) + ")" for p in phrases)
    assert re.fullmatch(pattern, result.value), result.value
    assert set(result.meta["levels"]) == set(DEGRADATION_TYPES)
    for t, probs in result.meta["probs"].items():
        assert len(probs) == len(LEVELS[t]) and abs(sum(probs) - 1) < 1e-3
    # known degradations of a sharp version of the photo are recognised
    from semsr.ops.imresize import imresize

    sharp = imresize(image, scale=0.5).clamp(0, 1)
    for params, expected in [
        (_params(noise=20.0, noise_seed=1), {"blur": "none", "noise": "heavy", "jpeg": "none", "downscale": "none"}),
        (_params(jpeg=35.0), {"noise": "none", "jpeg": "heavy", "downscale": "none"}),
        (
            _params(blur=2.3, downscale=3.0, noise=10.0),
            {"blur": "moderate", "noise": "moderate", "jpeg": "none", "downscale": "moderate"},
        ),
    ]:
        levels = provider(degrade(sharp, params)).meta["levels"]
        assert {t: levels[t] for t in expected} == expected, (params, levels)
    c = cached(provider, root=tmp_path)
    first, second = c(image), c(image)
    assert (c.misses, c.hits) == (1, 1) and first.value == second.value == result.value
    assert get_provider("irpad", omit_none="true")(image).value == describe(
        {t: LEVELS[t].index(next(lv for lv in LEVELS[t] if lv.name == n)) for t, n in result.meta["levels"].items()},
        omit_none=True,
    )


def test_missing_weights_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="no IRPAD weights"):
        load_irpad(tmp_path)
    with pytest.raises(UnavailableError, match="no IRPAD weights"):
        bench_irpad(["--weights", str(tmp_path), "--n", "2"])


# ----------------------------------------------------------------------------- training


def _photos(folder: Path) -> tuple[list[str], list[str]]:
    """Training and held-out copies of the sample photo in ``folder``: ``(train names, held-out names)``."""
    from PIL import Image

    folder.mkdir()
    img = (_sample_image()[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    names = [f"p{i:03d}.png" for i in range(40)]
    train_names = [n for n in names if not is_held_out(n)][:3]
    held_names = [n for n in names if is_held_out(n)][:1]
    for n in train_names + held_names:
        Image.fromarray(img).save(folder / n)
    return train_names, held_names


def test_irpad_task_samples_are_per_sample_and_labelled() -> None:
    """Each sample is a function of its own seed (not of the batch), labels follow the head order."""
    cfg = load_config(REPO / "configs" / "irpad-tiny.yaml")
    task = IRPADTask(cfg)
    assert task.types == DEGRADATION_TYPES and task.crop == 32
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 3, 96, 96, generator=g)
    seeds = torch.tensor([11, 12, 13])
    x, labels = task.samples({"hr": hr, "seed": seeds})
    assert x.shape == (3, 3, 32, 32) and labels.shape == (3, 4) and labels.dtype == torch.int64
    assert torch.equal((x * 255).round() / 255, x)  # 8-bit values
    x1, l1 = task.samples({"hr": hr[1:2], "seed": seeds[1:2]})
    assert torch.equal(x1, x[1:2]) and torch.equal(l1, labels[1:2])
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(12))))
    window, p = degraded_window(hr[1:2], 32, rng, (1.5, 2.5))
    assert torch.equal(window, x[1:2]) and list(p.labels) == labels[1].tolist()
    out = task.compute(task.trainable, {"hr": hr, "seed": seeds})
    assert [k for k in out if k.startswith("logits.")] == [f"logits.{t}" for t in DEGRADATION_TYPES]
    loss = irpad_ce(out)
    assert loss.ndim == 0 and float(loss.detach()) > 0
    loss.backward()
    assert task.trainable.heads["blur"].weight.grad is not None
    items = [ImageItem(Path(f"{i:06d}.jpg")) for i in range(200)]
    kept = task.train_items(items)
    assert 0 < len(kept) < len(items) and not any(is_held_out(it.path) for it in kept)
    with pytest.raises(SemsrError, match="validation.every"):
        IRPADTask(load_config(REPO / "configs" / "irpad-tiny.yaml", ["validation.every=1"]))
    with pytest.raises(SemsrError, match="unknown model.options"):
        IRPADTask(load_config(REPO / "configs" / "irpad-tiny.yaml", ["model.options.epochs=3"]))
    with pytest.raises(SemsrError, match="crop_size"):
        IRPADTask(load_config(REPO / "configs" / "irpad-tiny.yaml", ["model.options.crop=64"]))


def test_irpad_trains_with_the_shared_trainer(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    train_names, _ = _photos(photos)
    assert [p.name for p in list_photos([photos], held_out=False)] == sorted(train_names)
    common = [f"data.hr=[{photos}]", "data.limit=0"]
    final = train_irpad(tmp_path / "run", common)
    model = load_irpad(final)
    assert list(model.config.channels) == [8, 8, 16] and model.config.crop == 32
    rec = model.config.training
    assert rec["task"] == "irpad" and rec["config"]["model"]["options"]["crop"] == 32 and "previous" not in rec
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all("irpad_ce" in r["terms"] for r in log)
    pred = IRPADEstimator(model)(torch.rand(1, 3, 70, 90))
    assert set(pred.levels) == set(DEGRADATION_TYPES)
    res = tmp_path / "r.json"
    assert (
        bench_irpad(
            [
                "--weights",
                str(final),
                "--hr",
                str(photos),
                "--n",
                "8",
                "--size",
                "64",
                "--json",
                str(res),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert json.loads(res.read_text())["n"] == 8
    # continue from those weights on a larger window: architecture from the weights, the window becomes the
    # model's analysis window, the earlier record is kept
    wide = load_irpad(
        train_irpad(
            tmp_path / "run2", [*common, f"model.options.init={final}", "model.options.crop=48", "data.crop_size=128"]
        )
    )
    assert list(wide.config.channels) == [8, 8, 16] and wide.config.crop == 48
    assert wide.config.training["previous"] == json.loads(json.dumps(rec))
    assert any(not torch.equal(a, b) for a, b in zip(wide.state_dict().values(), model.state_dict().values()))
    assert IRPADEstimator(wide).windows(torch.rand(1, 3, 64, 64)).shape == (4, 3, 48, 48)


def test_noise_label_is_the_noise_the_jpeg_left_visible() -> None:
    from semsr.train.irpad import degrade_visible

    q = (_sample_image()[..., 32:128, 32:128] * 255).round() / 255
    y, visible = degrade_visible(q, _params(noise=20.0, noise_seed=4))
    assert visible == 20.0 and torch.equal(y, degrade(q, _params(noise=20.0, noise_seed=4)))
    _, light = degrade_visible(q, _params(noise=20.0, noise_seed=4, jpeg=55.0))
    _, heavy = degrade_visible(q, _params(noise=20.0, noise_seed=4, jpeg=10.0))
    assert 0.0 < heavy < light < 20.0
    p = _params(noise=4.0, noise_seed=4, jpeg=10.0)
    _, vis = degrade_visible(q, p)
    relabelled = p.with_visible_noise(vis)
    assert relabelled.noise_visible == vis and relabelled.labels[DEGRADATION_TYPES.index("noise")] == level_of(
        "noise", vis
    )
    assert relabelled.labels[DEGRADATION_TYPES.index("jpeg")] == p.labels[DEGRADATION_TYPES.index("jpeg")]


def test_render_visible_lands_the_visible_noise_in_the_drawn_interval() -> None:
    from semsr.train.irpad import degrade_visible, render_visible

    q = (_sample_image()[..., 32:128, 32:128] * 255).round() / 255
    slight = LEVELS["noise"][1]
    p = _params(noise=4.0, noise_seed=4, jpeg=85.0, labels=(0, 1, 1, 0))
    _, before = degrade_visible(q, p)
    assert before < slight.low  # the codec removes most of a slight noise on this crop ...
    y, out = render_visible(q, p)
    assert p.noise < out.noise <= 2 * slight.high and out.noise_visible is not None  # ... so more is added
    assert slight.low <= out.noise_visible <= slight.high and out.labels[1] == 1
    assert torch.equal(y, degrade(q, out))
    # a strong JPEG: the added std stops at twice the interval's top, the label is the nearest visible level
    strong = render_visible(q, replace(p, jpeg=35.0, labels=(0, 1, 3, 0)))[1]
    assert strong.noise == 2 * slight.high and strong.labels[1] == level_of("noise", strong.noise_visible)
    # without a JPEG (or with contiguous sampling) nothing is re-rendered
    clean = _params(noise=4.0, noise_seed=4, labels=(0, 1, 0, 0))
    assert render_visible(q, clean)[1] == clean.with_visible_noise(4.0)
    assert render_visible(q, p, contiguous=True)[1].noise == p.noise


def test_samples_are_cut_from_a_larger_degraded_region() -> None:
    """With a context the degradation sees the surroundings (no border padding inside the sample)."""
    from semsr.train.irpad import _context_start, generate

    rng = np.random.default_rng(0)
    for _ in range(200):
        side, size, ctx = int(rng.integers(96, 300)), 64, 128
        ctx = min(ctx, side)
        start = int(rng.integers(0, side - size + 1))
        c = _context_start(rng, start, size, ctx, side)
        assert 0 <= c <= start and start + size <= c + ctx <= side
    photo = Path(assets_dir() / "sample.png")
    got: dict[int, list[np.ndarray]] = {}
    for context in (64, 192):
        got[context] = []
        generate(
            [photo],
            6,
            size=64,
            seed=3,
            context=context,
            min_texture=0.0,
            sink=lambda i, arr, p, c=context: got[c].append(arr),
        )
        assert all(a.shape == (64, 64, 3) for a in got[context])
    assert any(not np.array_equal(a, b) for a, b in zip(got[64], got[192]))


# ----------------------------------------------------------------------------- Real-ESRGAN LR in IRPAD's label space


def test_realesrgan_labels_blur_noise_and_downscale_as_the_lr_shows_them() -> None:
    x = _sample_image()[..., :96, :96]
    g = filter2d(x, torch.from_numpy(gaussian_kernel(2 * 3 * 2 + 1, 1.5)))
    assert fit_blur(x, g) == pytest.approx(1.5, abs=0.1) and fit_blur(x, x) == 0.0
    white = torch.randn(1, 3, 200, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    assert white_noise_std(white) == pytest.approx(10.0, rel=0.05)
    smooth = torch.nn.functional.avg_pool2d(white, 4, 1)  # correlated noise: little pixel-level grain
    assert white_noise_std(smooth) < 0.5 * float(smooth.std())
    deg = RealESRGANDegradation()
    base = realesrgan_params(deg.config, 5)
    down = replace(base, stage1=replace(base.stage1, resize_factor=0.5), stage2=replace(base.stage2, resize_factor=0.4))
    assert downscale_factor(down, 4) == pytest.approx(2.5)  # smallest grid 0.4 of the LR: enlarged 2.5x
    keep = replace(base, stage1=replace(base.stage1, resize_factor=1.0), stage2=replace(base.stage2, resize_factor=1.0))
    assert downscale_factor(keep, 4) == 1.0
    hr = _sample_image()[..., :128, :128]
    lr, label = label_sample(deg, hr, _no_noise(keep))
    assert lr.shape == (1, 3, 32, 32) and label["values"][1] < 0.5  # no noise drawn: none visible
    _, noisy = label_sample(deg, hr, keep)
    assert noisy["values"][1] > label["values"][1] and noisy["values"][2] == keep.stage2.jpeg_quality


def test_bench_irpad_on_realesrgan_lr(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    data = make_realesrgan_set(list_photos([photos], held_out=False), 6, hr_size=64, seed=3)
    assert data.images.shape == (6, 16, 16, 3) and data.labels.shape == (6, 4)
    assert len(data.meta["final_order"]) == 6 and data.meta["degradation"] == "realesrgan"
    again = make_realesrgan_set(list_photos([photos], held_out=False), 6, hr_size=64, seed=3)
    assert np.array_equal(data.images, again.images) and np.array_equal(data.labels, again.labels)
    out = tmp_path / "r.json"
    argv = ["--degradation", "realesrgan", "--hr", str(photos), "--n", "6", "--hr-size", "64", "--threads", "1"]
    assert bench_irpad([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["degradation"] == "realesrgan" and res["n"] == 6 and res["size"] == 16
    assert sum(r["n"] for r in res["by_final_order"].values()) == 6
    assert set(res["label_values"]) == {*DEGRADATION_TYPES, "noise_std"}
    with pytest.raises(SemsrError, match="hr-size"):
        bench_irpad([*argv[:-4], "--hr-size", "30"])
