"""Metrics: MATLAB conventions and published anchors, NIQE, and the loading paths of the deep metrics.

Deep metrics are exercised with randomly initialised networks saved in the exact
published formats (torchvision backbone state dicts, the lpips package's heads,
dists-pytorch's alpha/beta, pytorch-fid's Inception layout, a transformers CLIP folder).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from scipy.signal import correlate2d

from semsr.core import weights as W
from semsr.core.errors import InputError, SemsrError, UnavailableError
from semsr.eval.metrics import get_metric, list_images, list_metrics, load_eval_image, metric_info
from semsr.eval.metrics.backbones import AlexNetFeatures, InceptionV3Pool3, VGG16Features
from semsr.eval.metrics.dists import CHANNELS as DISTS_CHANNELS
from semsr.eval.metrics.fid import fid_from_features, frechet_distance, gaussian_stats
from semsr.eval.metrics.niqe import aggd_fit
from semsr.ops.color import rgb2ycbcr, round_half_up, y_channel_255, ycbcr2rgb
from semsr.ops.imresize import imresize

# --------------------------------------------------------------------------- helpers


def bicubic_x4(hr: torch.Tensor, scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The published bicubic baseline: mod-crop, MATLAB imresize down and up, uint8 rounding after each."""
    h, w = hr.shape[-2:]
    hr = hr[..., : h - h % scale, : w - w % scale]
    x = hr.double() * 255
    lr = round_half_up(imresize(x, scale=1 / scale).clamp(0, 255))
    sr = round_half_up(imresize(lr, scale=scale).clamp(0, 255))
    return sr / 255, hr


def set_means(folder: Path) -> tuple[float, float]:
    psnry, ssim = get_metric("psnry"), get_metric("ssim")
    p, s = [], []
    for path in list_images(folder):
        sr, hr = bicubic_x4(load_eval_image(path))
        p.append(psnry(sr, hr, crop_border=4))
        s.append(ssim(sr, hr, crop_border=4))
    return sum(p) / len(p), sum(s) / len(s)


def noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture
def niqe_params() -> Path:
    """Published NIQE parameters (found in a cache or fetched once per session with pip)."""
    try:
        return W.registry_file("niqe/niqe_pris_params.npz")
    except UnavailableError as err:
        pytest.skip(f"NIQE parameters unavailable here: {err}")


@pytest.fixture
def no_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the user's ~/.cache/semsr and torch hub cache so lookups see only the test folders."""
    monkeypatch.setattr(Path, "home", staticmethod(lambda: tmp_path / "home"))
    monkeypatch.setattr(W, "_torch_hub_checkpoints", lambda: tmp_path / "hub")


# --------------------------------------------------------------------------- registry


def test_list_metrics_names_and_orientation() -> None:
    infos = {m.name: m for m in list_metrics()}
    expected = {
        "psnr": (True, True), "psnry": (True, True), "ssim": (True, True), "lpips": (False, True),
        "lpips-vgg": (False, True), "dists": (False, True), "niqe": (False, False), "fid": (False, True),
        "noise_sigma": (False, False), "gmsd": (False, True), "ms-ssim": (True, True),
        "clipiqa": (True, False), "musiq": (True, False), "maniqa": (True, False),
    }  # fmt: skip
    assert {n: (i.higher_better, i.needs_gt) for n, i in infos.items()} == expected
    assert infos["fid"].kind == "distribution" and infos["lpips"].kind == "deep" and infos["psnr"].kind == "pixel"
    with pytest.raises(SemsrError, match="unknown metric"):
        get_metric("psnr-rgbx")
    assert metric_info("PSNRY").name == "psnry"


@pytest.mark.parametrize("name", ["musiq", "maniqa"])
def test_musiq_maniqa_report_why_unavailable(name: str, tmp_path: Path, no_home_cache: None) -> None:
    with pytest.raises(UnavailableError, match="not obtainable offline"):
        get_metric(name, weights_dir=tmp_path)
    (tmp_path / f"{name}_koniq.pth").write_bytes(b"x")
    with pytest.raises(UnavailableError, match="not implemented"):
        get_metric(name, weights_dir=tmp_path)


# --------------------------------------------------------------------------- colour and pixel metrics


def test_rgb2ycbcr_matlab_values() -> None:
    px = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    ycc = rgb2ycbcr(px) * 255
    assert torch.allclose(ycc[0, :, 0, 0], torch.tensor([16.0, 128.0, 128.0]), atol=1e-4)
    assert torch.allclose(ycc[0, :, 0, 1], torch.tensor([235.0, 128.0, 128.0]), atol=1e-3)
    assert torch.allclose(ycc[0, :, 0, 2], torch.tensor([16 + 65.481, 128 - 37.797, 128 + 112.0]), atol=1e-3)
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    assert torch.allclose(ycbcr2rgb(rgb2ycbcr(x)), x, atol=1e-10)


def test_y_channel_rounds_like_matlab_uint8_and_keeps_grey() -> None:
    rgb = torch.randint(0, 256, (1, 3, 6, 6), generator=torch.Generator().manual_seed(1)).double()
    y = y_channel_255(rgb / 255)
    r, g, b = rgb[0]
    expected = np.floor(16 + (65.481 * r + 128.553 * g + 24.966 * b).numpy() / 255 + 0.5)
    assert np.array_equal(y[0, 0].numpy(), expected)
    grey = torch.arange(0, 36).reshape(1, 1, 6, 6).double() * 7
    assert torch.equal(y_channel_255(grey / 255), grey)


def test_psnr_known_value_and_identity() -> None:
    gt = torch.full((1, 3, 16, 16), 100 / 255)
    pred = torch.full((1, 3, 16, 16), 110 / 255)
    assert get_metric("psnr")(pred, gt) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)
    assert get_metric("psnry")(gt, gt) == math.inf
    with pytest.raises(InputError, match="ground truth"):
        get_metric("psnr")(pred)
    with pytest.raises(InputError, match="16x16"):
        get_metric("psnr")(pred, gt[..., :8])
    with pytest.raises(InputError, match="crop_border"):
        get_metric("psnr")(pred, gt, crop_border=8)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Straight transcription of ssim_index.m: 2-D Gaussian window, 'valid' filtering."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda z: correlate2d(z, w, mode="valid")  # noqa: E731
    mu1, mu2 = f(a), f(b)
    s11, s22, s12 = f(a * a) - mu1**2, f(b * b) - mu2**2, f(a * b) - mu1 * mu2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return float(m.mean())


def test_ssim_matches_direct_transcription() -> None:
    gt = torch.rand(1, 3, 40, 33, generator=torch.Generator().manual_seed(2))
    pred = noisy(gt, 0.1)
    ours = get_metric("ssim")(pred, gt, crop_border=2)
    ya, yb = (y_channel_255(t)[0, 0, 2:-2, 2:-2].numpy() for t in (pred, gt))
    assert ours == pytest.approx(_ssim_reference(ya, yb), abs=1e-12)
    assert get_metric("ssim")(gt, gt) == pytest.approx(1.0)
    rgb = get_metric("ssim", y_channel=False)(pred, gt)
    assert 0 < rgb < 1 and rgb != ours


def test_grey_ground_truth_is_measured_on_grey_values(tmp_path: Path) -> None:
    grey = (torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(3)) * 255).round() / 255
    path = tmp_path / "g.png"
    Image.fromarray((grey[0, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(path)
    loaded = load_eval_image(path)
    assert loaded.shape == (1, 1, 24, 24) and torch.allclose(loaded, grey)
    pred = noisy(grey, 0.05)
    direct = get_metric("psnry")(pred, grey)
    # a colour result of a grey image (equal channels) scores like its grey plane
    assert get_metric("psnry")(pred.expand(-1, 3, -1, -1), grey) == pytest.approx(direct, abs=1e-9)
    assert get_metric("psnr")(pred, grey) == pytest.approx(direct, abs=1e-9)


def test_load_eval_image_modes(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    x = load_eval_image(tmp_path / "a.png")
    assert x.shape == (1, 3, 5, 6) and torch.allclose(
        x[0].permute(1, 2, 0) * 255, torch.from_numpy(rgba[..., :3]).float()
    )
    g16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    y = load_eval_image(tmp_path / "g16.png")
    assert y.shape == (1, 1, 2, 2) and torch.allclose(y[0, 0], torch.from_numpy(g16 / 65535).float())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError):
        load_eval_image(tmp_path / "bad.png")


@pytest.mark.parametrize("name, psnr_pub, ssim_pub", [("Set5", 28.42, 0.8104), ("Set14", 26.00, 0.7027)])
def test_bicubic_x4_reproduces_published_anchor(data_dir: Path, name: str, psnr_pub: float, ssim_pub: float) -> None:
    folder = data_dir / "benchmarks" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    psnr, ssim = set_means(folder)
    assert abs(psnr - psnr_pub) <= 0.01, psnr
    assert abs(ssim - ssim_pub) <= 0.001, ssim


# --------------------------------------------------------------------------- NIQE


def test_aggd_fit_recovers_gaussian_and_laplacian_shapes() -> None:
    rng = np.random.default_rng(0)
    gauss = rng.normal(0, 2.0, (1, 200_000))
    alpha, bl, br = aggd_fit(gauss)
    assert alpha[0] == pytest.approx(2.0, abs=0.05)
    assert bl[0] == pytest.approx(2.0 * math.sqrt(2), rel=0.02) and br[0] == pytest.approx(2.0 * math.sqrt(2), rel=0.02)
    lap = rng.laplace(0, 1.0, (1, 200_000))
    assert aggd_fit(lap)[0][0] == pytest.approx(1.0, abs=0.05)


def test_niqe_baboon_matches_matlab(data_dir: Path, niqe_params: Path) -> None:
    path = data_dir / "benchmarks" / "Set14" / "baboon.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    niqe = get_metric("niqe")
    assert niqe(load_eval_image(path)) == pytest.approx(5.7296, abs=0.001)


def test_niqe_prefers_natural_over_noisy(niqe_params: Path, data_dir: Path) -> None:
    path = data_dir / "benchmarks" / "Set5" / "baby.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    img = load_eval_image(path)[..., :192, :192]
    niqe = get_metric("niqe", params_path=niqe_params)
    assert niqe(noisy(img, 0.1)) > niqe(img) + 1
    with pytest.raises(InputError, match="96x96"):
        niqe(img[..., :90, :90])


def test_niqe_params_missing_is_unavailable(
    tmp_path: Path, no_home_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an empty cache of its own: the session cache may already hold the params another test fetched
    monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UnavailableError, match="fetch-weights niqe"):
        get_metric("niqe", weights_dir=tmp_path, fetch=False)


def test_registry_assets_found_in_weights_dir_and_extracted_from_archives(
    tmp_path: Path, no_home_cache: None, niqe_params: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wd = tmp_path / "w"
    (wd / "niqe").mkdir(parents=True)
    (wd / "niqe" / "niqe_pris_params.npz").write_bytes(niqe_params.read_bytes())
    assert W.registry_file("niqe/niqe_pris_params.npz", wd, fetch=False) == wd / "niqe" / "niqe_pris_params.npz"

    # a wheel and an sdist with the published member names
    whl = tmp_path / "lpips-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("lpips/weights/v0.1/alex.pth", b"A")
        zf.writestr("lpips/weights/v0.1/vgg.pth", b"V")
    assert W._read_members(whl, W.REGISTRY_ASSETS["lpips"].members) == {
        "lpips/v0.1/alex.pth": b"A", "lpips/v0.1/vgg.pth": b"V"}  # fmt: skip
    sdist = tmp_path / "basicsr-1.4.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"NPZ"))
    assert W._read_members(sdist, W.REGISTRY_ASSETS["niqe"].members) == {"niqe/niqe_pris_params.npz": b"NPZ"}

    # pip failing (no network) becomes an UnavailableError with pip's last line
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(W.subprocess, "run", failing_run)
    with pytest.raises(UnavailableError, match="network unreachable"):
        W.fetch_asset("dists")


# --------------------------------------------------------------------------- deep metrics: published formats


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random networks saved exactly as the published files are laid out."""
    wd = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    alex = {f"features.{k}": v for k, v in AlexNetFeatures().features.state_dict().items()}
    alex["classifier.1.weight"] = torch.zeros(4, 4)  # the published file also holds the classifier
    torch.save(alex, wd / "alexnet-owt-7be5be79.pth")
    torch.save(
        {f"features.{k}": v for k, v in VGG16Features().features.state_dict().items()}, wd / "vgg16-397923af.pth"
    )
    (wd / "lpips" / "v0.1").mkdir(parents=True)
    for net, chans in (("alex", AlexNetFeatures.CHANNELS), ("vgg", VGG16Features.CHANNELS)):
        heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(chans)}
        torch.save(heads, wd / "lpips" / "v0.1" / f"{net}.pth")
    (wd / "dists").mkdir()
    n = sum(DISTS_CHANNELS)
    torch.save({"alpha": torch.rand(1, n, 1, 1), "beta": torch.rand(1, n, 1, 1)}, wd / "dists" / "weights.pt")
    inc = InceptionV3Pool3("fid").state_dict()
    inc.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(inc, wd / "pt_inception-2015-12-05-6726825d.pth")
    return wd


@pytest.mark.parametrize("name", ["lpips", "lpips-vgg", "dists"])
def test_full_reference_deep_metrics_load_published_formats(name: str, weights_dir: Path) -> None:
    metric = get_metric(name, weights_dir=weights_dir, fetch=False)
    assert metric.name == name and not metric.higher_better
    gt = torch.rand(1, 3, 64, 72, generator=torch.Generator().manual_seed(4))
    assert metric(gt, gt) == pytest.approx(0.0, abs=1e-5)
    d_small, d_large = metric(noisy(gt, 0.05), gt), metric(noisy(gt, 0.3), gt)
    assert 0 < d_small < d_large
    assert metric(gt, noisy(gt, 0.05)) == pytest.approx(d_small, rel=1e-4, abs=1e-6)
    grey = gt[:, :1]
    assert metric(noisy(grey, 0.1), grey) > 0


def test_lpips_net_option_equals_lpips_vgg(weights_dir: Path) -> None:
    a = get_metric("lpips", net="vgg", weights_dir=weights_dir, fetch=False)
    b = get_metric("lpips-vgg", weights_dir=weights_dir, fetch=False)
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    assert a.name == "lpips-vgg" and a(noisy(x, 0.1), x) == pytest.approx(b(noisy(x, 0.1), x))


def test_missing_or_foreign_weights_are_unavailable(tmp_path: Path, weights_dir: Path, no_home_cache: None) -> None:
    with pytest.raises(UnavailableError, match="alexnet-owt-7be5be79.pth"):
        get_metric("lpips", weights_dir=tmp_path, fetch=False)
    with pytest.raises(UnavailableError, match="vgg16-397923af.pth"):
        get_metric("dists", weights_dir=tmp_path, fetch=False)
    with pytest.raises(UnavailableError, match="pt_inception"):
        get_metric("fid", weights_dir=tmp_path)
    # heads of the wrong network
    with pytest.raises(UnavailableError, match="lin1.model.1.weight"):
        get_metric("lpips", weights_dir=weights_dir, heads_path=weights_dir / "lpips" / "v0.1" / "vgg.pth")
    # a VGG file where an AlexNet is expected
    with pytest.raises(UnavailableError, match="not a AlexNet state dict"):
        get_metric("lpips", backbone_path=weights_dir / "vgg16-397923af.pth", weights_dir=weights_dir, fetch=False)


# --------------------------------------------------------------------------- FID


def test_frechet_distance_of_known_gaussians() -> None:
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + np.eye(5), b @ b.T + np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # closed form of the 2-Wasserstein distance with the symmetric square root
    r1 = np.real(scipy.linalg.sqrtm(s1))
    cross = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * cross)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    feats = rng.normal(size=(50, 3))
    mu, sigma = gaussian_stats(feats)
    assert np.allclose(mu, feats.mean(0)) and np.allclose(sigma, np.cov(feats.T))
    with pytest.raises(InputError, match="at least 2"):
        gaussian_stats(feats[:1])


@pytest.mark.parametrize("n_a, n_b", [(4, 6), (40, 30)])
def test_fid_from_features_equals_frechet_of_stats(n_a: int, n_b: int) -> None:
    rng = np.random.default_rng(n_a)
    fa, fb = rng.normal(size=(n_a, 12)), rng.normal(1.0, 2.0, size=(n_b, 12))
    ref = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb), eps=0.0)
    assert fid_from_features(fa, fb) == pytest.approx(ref, rel=1e-6)
    assert fid_from_features(fa, fa) == pytest.approx(0.0, abs=1e-9)


def _write_images(folder: Path, seed: int, n: int = 3, blur: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (40, 48, 3)).astype(np.float64)
        if blur:
            arr = np.full_like(arr, arr.mean())
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"img{i}.png")


def test_fid_loads_published_layout_and_compares_folders(tmp_path: Path, weights_dir: Path) -> None:
    fid = get_metric("fid", weights_dir=weights_dir, image_size=75)
    assert fid.variant == "fid"
    _write_images(tmp_path / "a", 0)
    _write_images(tmp_path / "b", 1, blur=True)
    diff = fid.compute_folders(tmp_path / "a", tmp_path / "b")
    assert diff > 0
    tensors = [load_eval_image(p) for p in list_images(tmp_path / "a")]
    feats = fid.features(tensors)
    assert feats.shape == (3, 2048)
    assert abs(fid_from_features(feats, feats)) < 1e-6 * diff
    assert fid.compute_sets(tensors, list_images(tmp_path / "b")) == pytest.approx(diff, rel=1e-4)
    with pytest.raises(SemsrError, match="two image sets"):
        fid(tensors[0], tensors[1])
    _write_images(tmp_path / "one", 2, n=1)
    with pytest.raises(InputError, match="at least 2"):
        fid.compute_folders(tmp_path / "a", tmp_path / "one")


def test_fid_torchvision_layout_with_aux_head(tmp_path: Path) -> None:
    sd = InceptionV3Pool3("torchvision").state_dict()
    sd.update({"AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1), "fc.weight": torch.zeros(1000, 2048)})
    torch.save(sd, tmp_path / "inception_v3_google-0cc3c7bd.pth")
    fid = get_metric("fid", weights_dir=tmp_path, image_size=75)
    assert fid.variant == "torchvision"


# --------------------------------------------------------------------------- CLIP-IQA


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_clipiqa_on_a_local_clip_folder(tmp_path: Path, no_home_cache: None) -> None:
    with pytest.raises(UnavailableError, match="CLIP"):
        get_metric("clipiqa", weights_dir=tmp_path)
    _tiny_clip(tmp_path / "clip")
    metric = get_metric("clipiqa", weights_dir=tmp_path)
    x = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(6))
    score = metric(x)
    assert 0 < score < 1 and metric(x) == score and metric.higher_better and not metric.needs_gt
    assert 0 < metric(x[:, :1]) < 1
