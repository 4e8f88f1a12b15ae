"""noise_sigma, GMSD and MS-SSIM: reference values and orientation on synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from semsr.core.errors import InputError
from semsr.eval.metrics import get_metric, metric_info
from semsr.eval.metrics.structure import dwt_detail_dd, estimate_noise_sigma, gmsd_255, ms_ssim_255


def _texture(size: int = 192, seed: int = 0) -> np.ndarray:
    """Smooth random texture with edges, ``(size, size)`` float64 in [0, 1]."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.uniform(0, 1, (size, size)), 3)
    x = (x - x.min()) / (x.max() - x.min())
    return np.clip(x * 1.2 - 0.1, 0.0, 1.0)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).to(torch.float32)[None, None]


def _noisy(x: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return x + np.random.default_rng(seed).normal(0.0, sigma, x.shape)


def test_db2_detail_matches_pywavelets_values() -> None:
    # reference from pywt 1.9.0: pywt.dwtn(x, "db2")["dd"] and skimage's median(|dd|) / norm.ppf(0.75)
    x = (np.arange(40 * 33).reshape(40, 33) ** 2 * 37 % 251).astype(np.float64)
    dd = dwt_detail_dd(x)
    assert dd.shape == (21, 18)
    np.testing.assert_allclose(dd[0, [0, 2]], [-25.5, -54.3430941], atol=1e-6)
    np.testing.assert_allclose(dd[-1, -2:], [34.23187816, -59.73187816], atol=1e-6)
    assert estimate_noise_sigma(x) == pytest.approx(80.5691918545469, rel=1e-12)


def test_noise_sigma_flat_is_zero_and_recovers_added_noise() -> None:
    m = get_metric("noise_sigma", quantize=False)
    assert not metric_info("noise_sigma").higher_better and not metric_info("noise_sigma").needs_gt
    assert m(torch.full((1, 3, 96, 96), 0.4)) < 1e-9
    flat = np.full((256, 256), 0.5)
    for sigma in (2.0, 5.0, 10.0):
        est = m(_t(_noisy(flat, sigma / 255)))
        assert est == pytest.approx(sigma, rel=0.04)
    # 8-bit rounding (the default) keeps the estimate close for visible noise
    assert get_metric("noise_sigma")(_t(np.clip(_noisy(flat, 5 / 255), 0, 1))) == pytest.approx(5.0, rel=0.06)


def test_noise_sigma_ranks_grain_above_clean_texture() -> None:
    m = get_metric("noise_sigma")
    img = _texture()
    assert m(_t(np.clip(_noisy(img, 4 / 255), 0, 1))) > m(_t(img)) + 2


def test_gmsd_zero_for_identical_and_grows_with_blur_and_noise() -> None:
    m = get_metric("gmsd")
    assert not metric_info("gmsd").higher_better and metric_info("gmsd").needs_gt
    img = _texture()
    gt = _t(img)
    assert m(gt, gt) == 0.0
    blur = [m(_t(ndimage.gaussian_filter(img, s)), gt) for s in (0.7, 1.5, 3.0)]
    noise = [m(_t(np.clip(_noisy(img, s / 255), 0, 1)), gt) for s in (2.0, 6.0, 15.0)]
    assert 0 < blur[0] < blur[1] < blur[2]
    assert 0 < noise[0] < noise[1] < noise[2]
    # colour input: measured on Y
    rgb = gt.expand(-1, 3, -1, -1)
    assert m(rgb, rgb) == 0.0


def test_gmsd_matches_direct_transcription() -> None:
    # GMSD.m transcribed with explicit loops-free numpy on an odd-sized image
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 255, (37, 29)), rng.uniform(0, 255, (37, 29))

    def direct(y: np.ndarray) -> np.ndarray:
        p = np.pad(y, ((0, 1), (0, 1)))
        ave = (p[:-1, :-1] + p[1:, :-1] + p[:-1, 1:] + p[1:, 1:]) / 4
        d = np.pad(ave[::2, ::2], 1)
        gx = (d[:, :-2] - d[:, 2:])[:-2] + (d[:, :-2] - d[:, 2:])[1:-1] + (d[:, :-2] - d[:, 2:])[2:]
        gy = (d[:-2] - d[2:])[:, :-2] + (d[:-2] - d[2:])[:, 1:-1] + (d[:-2] - d[2:])[:, 2:]
        return np.sqrt(gx**2 + gy**2) / 3

    g1, g2 = direct(a), direct(b)
    want = np.std((2 * g1 * g2 + 170) / (g1**2 + g2**2 + 170), ddof=1)
    assert gmsd_255(a, b) == pytest.approx(want, rel=1e-12)


def test_ms_ssim_one_for_identical_and_falls_with_blur_and_noise() -> None:
    m = get_metric("ms-ssim")
    assert metric_info("ms-ssim").higher_better
    img = _texture(200)
    gt = _t(img)
    assert m(gt, gt) == pytest.approx(1.0, abs=1e-12)
    b1, b2 = m(_t(ndimage.gaussian_filter(img, 1.0)), gt), m(_t(ndimage.gaussian_filter(img, 2.5)), gt)
    n1, n2 = m(_t(np.clip(_noisy(img, 3 / 255), 0, 1)), gt), m(_t(np.clip(_noisy(img, 12 / 255), 0, 1)), gt)
    assert 1 > b1 > b2 and 1 > n1 > n2
    with pytest.raises(InputError, match="176x176"):
        ms_ssim_255(np.zeros((100, 300)), np.zeros((100, 300)))
