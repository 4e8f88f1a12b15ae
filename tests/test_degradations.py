"""Tests of the Real-ESRGAN degradation model (semsr.data.degradations) and `semsr degrade`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semsr.cli import main
from semsr.data.degradations import (
    KERNEL_TYPES,
    DegradationConfig,
    RealESRGANDegradation,
    add_gaussian_noise,
    add_poisson_noise,
    filter2d,
    gaussian_kernel,
    generalized_gaussian_kernel,
    image_seed,
    jpeg_compress,
    plateau_kernel,
    sample_params,
    sinc_kernel,
)
from semsr.data.degradations.kernels import KernelSpec, sample_kernel


def _natural_image(h: int = 96, w: int = 128, seed: int = 0) -> torch.Tensor:
    """A smooth colour field with edges and mild texture: ``(1, 3, h, w)`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(
        torch.rand(1, 3, h // 16, w // 16, generator=g), size=(h, w), mode="bicubic", align_corners=False
    )
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    stripes = ((xx // 9 + yy // 13) % 2).float()[None, None] * 0.25
    tex = torch.rand(1, 3, h, w, generator=g) * 0.08
    return (0.15 + 0.5 * base + stripes + tex).clamp(0, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / F.mse_loss(a.double(), b.double())))


# ---------------------------------------------------------------- kernels


def _second_moments(k: np.ndarray) -> np.ndarray:
    ax = np.arange(k.shape[0]) - k.shape[0] // 2
    xx, yy = np.meshgrid(ax, ax)
    return np.array([[np.sum(k * xx * xx), np.sum(k * xx * yy)], [np.sum(k * xx * yy), np.sum(k * yy * yy)]])


@pytest.mark.parametrize("kind", KERNEL_TYPES + ("sinc", "identity"))
def test_every_kernel_kind_is_normalised_odd_square_and_point_symmetric(kind):
    spec = KernelSpec(
        kind,
        15,
        21,
        sigma_x=2.0,
        sigma_y=0.7 if "aniso" in kind else 2.0,
        theta=0.6 if "aniso" in kind else 0.0,
        beta=1.7,
        omega_c=1.3,
    )
    k = spec.build()
    assert k.shape == (21, 21)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # point symmetric
    assert np.unravel_index(np.argmax(k), k.shape) == (10, 10)
    if kind != "identity":  # padded border stays zero when size < pad_to
        assert np.all(k[:3] == 0) and np.all(k[:, -3:] == 0)


def test_gaussian_covariance_matches_rotated_sigma():
    sx, sy, theta = 3.0, 1.2, math.pi / 6
    k = gaussian_kernel(41, sx, sy, theta)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    expected = rot @ np.diag([sx**2, sy**2]) @ rot.T
    np.testing.assert_allclose(_second_moments(k), expected, rtol=0.02, atol=0.02)
    iso = gaussian_kernel(21, 2.0)
    np.testing.assert_allclose(iso, iso.T, atol=1e-15)


def test_generalized_and_plateau_shapes():
    np.testing.assert_allclose(generalized_gaussian_kernel(21, 2.0, beta=1.0), gaussian_kernel(21, 2.0), atol=1e-14)
    heavy = generalized_gaussian_kernel(21, 2.0, beta=0.5)
    flat = generalized_gaussian_kernel(21, 2.0, beta=4.0)
    # beta < 1 puts more mass in the tails than beta > 1
    assert heavy[10, 0] > flat[10, 0]
    assert flat[10, 10] == pytest.approx(flat[10, 11], rel=0.05)  # flat top
    p = plateau_kernel(21, 2.0, beta=2.0)
    row = p[10, 10:]
    assert np.all(np.diff(row) <= 0)  # decreasing from the centre


def test_sinc_kernel_is_a_low_pass_with_ringing():
    omega = math.pi / 2
    k = sinc_kernel(65, omega)
    assert k.sum() == pytest.approx(1.0)
    assert k.min() < 0  # negative lobes: the ringing the final sinc adds
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    resp = np.abs(np.fft.fft2(k, s=(256, 256)))
    freqs = np.fft.fftfreq(256) * 2 * math.pi
    passband = resp[0, np.abs(freqs) < 0.6 * omega]
    stopband = resp[0, np.abs(freqs) > 1.4 * omega]
    assert passband.min() > 0.9 and stopband.max() < 0.1
    # the cut-off moves with omega_c
    narrow = np.abs(np.fft.fft2(sinc_kernel(65, math.pi / 4), s=(256, 256)))[0]
    assert narrow[np.argmin(np.abs(freqs - 0.4 * math.pi))] < 0.1 < resp[0, np.argmin(np.abs(freqs - 0.4 * math.pi))]


def test_sampled_kernel_kinds_follow_the_configured_probabilities():
    cfg = DegradationConfig().stage1
    rng = np.random.default_rng(0)
    n = 4000
    specs = [
        sample_kernel(
            rng, 21, cfg.kernel_list, cfg.kernel_prob, cfg.sinc_prob, cfg.blur_sigma, cfg.betag_range, cfg.betap_range
        )
        for _ in range(n)
    ]
    freq = {k: sum(s.kind == k for s in specs) / n for k in KERNEL_TYPES + ("sinc",)}
    assert freq["sinc"] == pytest.approx(0.1, abs=0.02)
    for kind, p in zip(cfg.kernel_list, cfg.kernel_prob):
        assert freq[kind] == pytest.approx(0.9 * p, abs=0.025), kind
    assert {s.size for s in specs} == set(range(7, 22, 2))
    assert all(0.2 <= s.sigma_x <= 3.0 for s in specs if s.kind != "sinc")
    assert all(math.pi / 5 <= s.omega_c <= math.pi for s in specs if s.kind == "sinc")
    assert all(s.omega_c >= math.pi / 3 for s in specs if s.kind == "sinc" and s.size < 13)


def test_filter2d_matches_direct_convolution_and_handles_per_image_kernels():
    x = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(1))
    k21 = torch.stack(
        [torch.from_numpy(gaussian_kernel(21, 2.5, 1.0, 0.4)), torch.from_numpy(sinc_kernel(21, 1.0))]
    ).float()
    padded = F.pad(x, (10, 10, 10, 10), mode="reflect").reshape(1, 6, 60, 72)
    direct = F.conv2d(padded, k21.repeat_interleave(3, 0)[:, None], groups=6).reshape(2, 3, 40, 52)
    torch.testing.assert_close(filter2d(x, k21), direct, atol=2e-6, rtol=0)
    torch.testing.assert_close(filter2d(x[1:], k21[1]), direct[1:], atol=2e-6, rtol=0)
    ident = torch.from_numpy(KernelSpec("identity", 21, 21).build())
    torch.testing.assert_close(filter2d(x, ident), x, atol=1e-6, rtol=0)
    small = torch.from_numpy(gaussian_kernel(5, 1.0)).float()
    assert filter2d(x, small).shape == x.shape
    assert filter2d(torch.rand(1, 3, 4, 4), k21[0]).shape == (1, 3, 4, 4)  # tiny images: replicate padding


# ---------------------------------------------------------------- noise


@pytest.mark.parametrize("sigma", [2.0, 10.0, 25.0])
def test_gaussian_noise_sigma_estimate_matches_request(sigma):
    x = torch.full((2, 3, 128, 128), 0.5)
    g = torch.Generator().manual_seed(0)
    y = add_gaussian_noise(x, [sigma, sigma], grey=[False, True], generator=g)
    noise = (y - x) * 255.0
    assert float(noise[0].std()) == pytest.approx(sigma, rel=0.03)
    assert float(noise[1].std()) == pytest.approx(sigma, rel=0.03)
    # grey noise is shared by the channels, colour noise is independent per channel
    torch.testing.assert_close(noise[1, 0], noise[1, 2])
    corr = np.corrcoef(noise[0, 0].flatten().numpy(), noise[0, 1].flatten().numpy())[0, 1]
    assert abs(corr) < 0.05


def test_poisson_noise_variance_follows_the_signal():
    ramp = torch.linspace(0.2, 0.8, 256).view(1, 1, 1, 256).expand(1, 3, 256, 256).contiguous()
    scale = 2.0
    y = add_poisson_noise(ramp, scale, grey=False, generator=torch.Generator().manual_seed(0))
    noise = y - ramp
    levels = 256.0  # 154 distinct 8-bit values -> next power of two
    expected_var = float(ramp.mean()) / levels * scale**2
    assert float(noise.var()) == pytest.approx(expected_var, rel=0.06)
    assert float(noise.mean()) == pytest.approx(0.0, abs=2e-3)
    # brighter columns are noisier (shot noise grows with the signal)
    assert float(noise[..., 200:].var()) > 1.5 * float(noise[..., :50].var())
    grey = add_poisson_noise(ramp, scale, grey=True, generator=torch.Generator().manual_seed(0)) - ramp
    torch.testing.assert_close(grey[:, 0], grey[:, 1])


# ---------------------------------------------------------------- JPEG


def test_jpeg_quality_range_effect_and_8bit_output():
    x = _natural_image()
    qualities = [10, 30, 50, 70, 95]
    outs = [jpeg_compress(x, q) for q in qualities]
    psnrs = [_psnr(o, x) for o in outs]
    assert psnrs == sorted(psnrs) and psnrs[-1] - psnrs[0] > 6, psnrs
    for o in outs:
        assert o.shape == x.shape and float(o.min()) >= 0.0 and float(o.max()) <= 1.0
        torch.testing.assert_close(o * 255.0, (o * 255.0).round(), atol=1e-4, rtol=0)
    # per-image qualities in one batch equal separate calls; odd sizes are handled
    batch = torch.cat([x, x.flip(-1)])[..., :93, :117]
    both = jpeg_compress(batch, torch.tensor([35.5, 80.0]))
    torch.testing.assert_close(both[1:], jpeg_compress(batch[1:], 80.0))


def test_jpeg_matches_libjpeg_distortion():
    cv2 = pytest.importorskip("cv2")
    x = _natural_image(128, 160, seed=3)
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for q in (30, 60, 90):
        ok, enc = cv2.imencode(".jpg", arr[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        ref = torch.from_numpy(cv2.imdecode(enc, 1)[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
        ours = jpeg_compress(x, q)
        assert _psnr(ours, x) == pytest.approx(_psnr(ref, x), abs=0.3)
        assert _psnr(ours, ref) > 36


# ---------------------------------------------------------------- pipeline


def test_default_config_is_real_esrgan_x4plus():
    cfg = DegradationConfig()
    s1, s2 = cfg.stage1, cfg.stage2
    assert cfg.scale == 4 and cfg.final_sinc_prob == 0.8
    assert s1.kernel_size == 21 and s1.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (s1.sinc_prob, s1.blur_sigma, s1.betag_range, s1.betap_range) == (0.1, (0.2, 3.0), (0.5, 4.0), (1.0, 2.0))
    assert (s1.resize_prob, s1.resize_range) == ((0.2, 0.7, 0.1), (0.15, 1.5))
    assert (s1.gaussian_noise_prob, s1.noise_range, s1.poisson_scale_range) == (0.5, (1.0, 30.0), (0.05, 3.0))
    assert (s1.gray_noise_prob, s1.jpeg_range, s1.blur_prob) == (0.4, (30.0, 95.0), 1.0)
    assert (s2.blur_prob, s2.blur_sigma, s2.resize_prob, s2.resize_range) == (
        0.8,
        (0.2, 1.5),
        (0.3, 0.4, 0.3),
        (0.3, 1.2),
    )
    assert (s2.noise_range, s2.poisson_scale_range, s2.jpeg_range) == ((1.0, 25.0), (0.05, 2.5), (30.0, 95.0))


def test_config_from_real_esrgan_names_and_yaml(tmp_path):
    cfg = DegradationConfig.from_dict(
        {"blur_sigma2": [0.3, 1.0], "second_blur_prob": 0.5, "noise_range": [2, 9], "scale": 2}
    )
    assert cfg.stage2.blur_sigma == (0.3, 1.0) and cfg.stage2.blur_prob == 0.5
    assert cfg.stage1.noise_range == (2, 9) and cfg.scale == 2
    assert DegradationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DegradationConfig.from_dict({"blur_sgima": [1, 2]})
    with pytest.raises(ValueError, match="resize_prob"):
        DegradationConfig.from_dict({"stage1": {"resize_prob": [1, 0]}})
    opts = tmp_path / "train_realesrgan.yml"
    opts.write_text(
        "scale: 4\nl1_gt_usm: True\njpeg_range2: [40, 90]\n"
        "datasets:\n  train:\n    name: DF2K\n    blur_kernel_size: 15\n    sinc_prob2: 0.2\n"
    )
    loaded = DegradationConfig.from_yaml(opts)
    assert loaded.stage1.kernel_size == 15 and loaded.stage2.sinc_prob == 0.2
    assert loaded.stage2.jpeg_range == (40, 90)


def test_pipeline_shapes_range_and_determinism():
    deg = RealESRGANDegradation()
    hr = torch.cat([_natural_image(128, 96, s) for s in range(3)])
    lr, params = deg(hr, seed=11, return_params=True)
    assert lr.shape == (3, 3, 32, 24) and lr.dtype == torch.float32
    assert float(lr.min()) >= 0 and float(lr.max()) <= 1
    torch.testing.assert_close(lr * 255, (lr * 255).round(), atol=1e-4, rtol=0)
    assert torch.equal(lr, deg(hr, seed=11))  # same seed -> identical
    assert torch.equal(lr[2:], deg(hr[2:], seed=13))  # image i of a batch uses seed + i
    assert torch.equal(lr[1:2], deg(hr[1:2], seed=[params[1].seed]))
    assert not torch.equal(lr, deg(hr, seed=12))
    json.dumps([p.to_dict() for p in params])  # degradation labels are JSON-serialisable
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lr, deg(hr, seed=11))  # independent of the thread count
    finally:
        torch.set_num_threads(threads)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(deg(hr, seed=g1), deg(hr, seed=g2))


def test_pipeline_parameter_ranges_and_trace():
    cfg = DegradationConfig()
    ps = [sample_params(cfg, s) for s in range(300)]
    assert sum(p.final_sinc is not None for p in ps) / 300 == pytest.approx(0.8, abs=0.07)
    assert sum(p.stage2.kernel is not None for p in ps) / 300 == pytest.approx(0.8, abs=0.07)
    assert all(p.stage1.kernel is not None for p in ps)
    assert all(30 <= p.stage1.jpeg_quality <= 95 for p in ps)
    assert all(1 <= p.stage2.noise_level <= 25 for p in ps if p.stage2.noise_type == "gaussian")
    assert {p.final_order for p in ps} == {"resize_sinc_then_jpeg", "jpeg_then_resize_sinc"}
    deg = RealESRGANDegradation(cfg)
    trace = {}
    hr = _natural_image(64, 80)
    out = deg.apply(hr, ps[0], trace=trace)
    assert set(trace) == {"input", "stage1", "stage2", "lr"} and torch.equal(trace["lr"], out)
    assert out.shape == (1, 3, 16, 20)
    # with blur/noise/resizes switched off (JPEG q100 keeps 4:2:0 chroma loss) LR ~ area-downscaled HR,
    # while the default model degrades far more
    no_deg = RealESRGANDegradation(
        {
            "stage1": {
                "blur_prob": 0.0,
                "noise_range": [0.01, 0.02],
                "gaussian_noise_prob": 1.0,
                "jpeg_range": [100, 100],
                "resize_prob": [0, 0, 1],
            },
            "stage2": {
                "blur_prob": 0.0,
                "noise_range": [0.01, 0.02],
                "gaussian_noise_prob": 1.0,
                "jpeg_range": [100, 100],
                "resize_prob": [0, 0, 1],
            },
            "final_sinc_prob": 0.0,
            "sharpen_input": False,
            "resize_modes": ["area"],
        }
    )
    clean = no_deg(hr, seed=0)
    area = F.interpolate(hr, size=(16, 20), mode="area")
    assert _psnr(clean, area) > 30
    assert np.mean([_psnr(deg(hr, seed=s), area) for s in range(6)]) < _psnr(clean, area) - 5


def test_image_seed_is_stable():
    assert image_seed(0, "baby.png") == image_seed(0, "baby.png")
    assert image_seed(0, "baby.png") != image_seed(1, "baby.png") != image_seed(0, "bird.png")
    assert 0 <= image_seed(123, "x") < 2**63


# ---------------------------------------------------------------- CLI


def test_degrade_cli_on_set5_is_byte_identical(data_dir, tmp_path, capsys):
    set5 = data_dir / "benchmarks" / "Set5"
    if not set5.is_dir():
        pytest.skip("Set5 not available")
    out1, out2, out3 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["degrade", "-i", str(set5), "-o", str(out1), "--seed", "0", "--params", str(tmp_path / "p.json")]) == 0
    assert main(["degrade", "-i", str(set5), "-o", str(out2), "--seed", "0"]) == 0
    files = sorted(p.name for p in out1.iterdir())
    assert files == ["baby.png", "bird.png", "butterfly.png", "head.png", "woman.png"]
    for name in files:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()
    from PIL import Image

    with Image.open(out1 / "woman.png") as im:
        with Image.open(set5 / "woman.png") as hr:
            assert im.size == (hr.width // 4, hr.height // 4)
    params = json.loads((tmp_path / "p.json").read_text())
    assert set(params["images"]) == {f for f in files}
    # another seed gives other images; a single file works too
    assert (
        main(["degrade", "-i", str(set5 / "bird.png"), "-o", str(out3), "--seed", "1", "--scale", "2", "--no-sharpen"])
        == 0
    )
    assert [p.name for p in out3.iterdir()] == ["bird.png"]
    with Image.open(out3 / "bird.png") as im:
        assert im.size == (144, 144)


def test_degrade_cli_grid_and_errors(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "hr"
    src.mkdir()
    arr = (_natural_image(64, 96)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(src / "a.png")
    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "degrade",
                "-i",
                str(src),
                "-o",
                str(tmp_path / "lr"),
                "--seed",
                "2",
                "--grid",
                str(grid),
                "--grid-seeds",
                "3",
                "--grid-tile",
                "64",
            ]
        )
        == 0
    )
    with Image.open(grid) as im:
        assert im.size == (4 * 64, 3 * (64 + 14) + 14)
    capsys.readouterr()
    assert main(["degrade", "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "no such file" in err[0]
    Image.fromarray(arr).save(src / "a.jpg")
    assert main(["degrade", "-i", str(src), "-o", str(tmp_path / "z")]) == 2
    assert "a.png" in capsys.readouterr().err
    (src / "a.jpg").unlink()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: {kernel_list: [square]}\n")
    assert main(["degrade", "-i", str(src), "-o", str(tmp_path / "y"), "--config", str(bad)]) == 2
    assert "unknown kernels" in capsys.readouterr().err
