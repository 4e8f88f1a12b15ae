"""Pixel-space tiling: seamless results, quantised outputs, self-tiling methods, bounded memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semsr import methods
from semsr.core.errors import SemsrError
from semsr.core.options import MethodOptions
from semsr.core.outputs import SROutput
from semsr.pipeline.tiling import (
    AUTO_TILE_PAD,
    count_tiles,
    resolve_tile,
    resolve_tile_pad,
    tile_spans,
    upscale_tiled,
)


def tiled(method, x: torch.Tensor, options=None, **kw) -> torch.Tensor:
    """The upscaled tensor of :func:`upscale_tiled`."""
    return upscale_tiled(method, x, options, **kw).images


class ConvNet2x:
    """Test-only method: three 3x3 convs (receptive radius 3) then nearest 2x upsampling."""

    name = "test-conv2x"
    scale = 2
    tiles_itself = False

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(3, 3, 3, 3, generator=g) * 0.2 for _ in range(3)]
        self.calls = 0

    def __call__(self, x: torch.Tensor, options=None, *, progress=False) -> SROutput:
        self.calls += 1
        for w in self.weights:
            x = torch.tanh(F.conv2d(x, w, padding=1)) * 0.5 + x
        return SROutput(
            F.interpolate(x.clamp(0, 1), scale_factor=2, mode="nearest"),
            timings={"conv": 1.0},
            priors={"calls": self.calls},
        )


class SelfTiler:
    """Test-only method that tiles itself and records the options and progress it got."""

    name = "test-self-tiler"
    scale = 2
    tiles_itself = True
    options_class = MethodOptions

    def __init__(self) -> None:
        self.seen: list[tuple[MethodOptions, object]] = []

    def __call__(self, x: torch.Tensor, options=None, *, progress=False) -> SROutput:
        self.seen.append((options, progress))
        return SROutput(
            F.interpolate(x, scale_factor=2, mode="nearest"),
            priors={"prompt": "p"},
            side_images={"ref": torch.zeros(1, 3, 2, 2)},
        )


@pytest.mark.parametrize("length,tile", [(10, 0), (10, 10), (10, 3), (1000, 256), (7, 2), (1, 4)])
def test_tile_spans_cover_evenly(length: int, tile: int) -> None:
    spans = tile_spans(length, tile)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1
    if tile > 0:
        assert max(sizes) <= tile
    assert count_tiles(length, length, tile) == len(spans) ** 2


def test_bicubic_tiled_equals_untiled() -> None:
    method = methods.build("bicubic")
    x = torch.rand(1, 3, 53, 70, generator=torch.Generator().manual_seed(1))
    whole = tiled(method, x, tile=0)
    by_tiles = tiled(method, x, tile=16, tile_pad=4)
    assert whole.shape == (1, 3, 212, 280)
    assert (by_tiles - whole).abs().max().item() < 1e-5
    # the tile settings of the options object are used when no argument overrides them
    options = methods.resolve("bicubic").parse({"tile": "16", "tile_pad": "4"})
    assert torch.equal(tiled(method, x, options), by_tiles)
    assert torch.equal(tiled(method, x, options, tile=0), whole)


def test_convnet_tiled_is_seamless_with_enough_context() -> None:
    method = ConvNet2x()
    x = torch.rand(2, 3, 37, 45, generator=torch.Generator().manual_seed(2))
    whole = tiled(method, x, tile=0)
    good = upscale_tiled(method, x, tile=12, tile_pad=3)
    assert (good.images - whole).abs().max().item() < 1e-5
    # 4 x 4 tiles: timings summed over the calls, priors of the first call
    assert good.timings == {"conv": 16.0} and good.priors == {"calls": 2}
    # without context the tile seams show (proves the comparison can fail)
    bad = tiled(method, x, tile=12, tile_pad=0)
    assert (bad - whole).abs().max().item() > 1 / 255
    seen: list[tuple[int, int]] = []
    tiled(method, x, tile=12, tile_pad=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 16) for i in range(1, 17)]


def test_integer_output_is_rounded_into_a_numpy_view() -> None:
    method = ConvNet2x()
    x = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(3))
    ref = tiled(method, x, tile=0)
    arr = np.zeros((40, 48, 3), np.uint8)
    view = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    assert tiled(method, x, tile=8, tile_pad=3, out=view) is view
    expected = (ref[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.abs(arr.astype(int) - expected.astype(int)).max() <= 1
    assert (arr == expected).mean() > 0.999


def test_method_output_shape_is_checked() -> None:
    class Wrong(ConvNet2x):
        scale = 3

    with pytest.raises(RuntimeError, match="expected"):
        upscale_tiled(Wrong(), torch.rand(1, 3, 8, 8), tile=0)
    with pytest.raises(ValueError, match="out has shape"):
        upscale_tiled(ConvNet2x(), torch.rand(1, 3, 8, 8), out=torch.empty(1, 3, 8, 8))


def test_self_tiling_method_is_called_once_with_tile_options() -> None:
    method = SelfTiler()
    options = MethodOptions(threads=3, tile=8, tile_pad=2)
    report = lambda done, total: None  # noqa: E731
    out = upscale_tiled(method, torch.rand(1, 3, 30, 30), options, progress=report)
    assert out.images.shape == (1, 3, 60, 60)
    assert out.priors == {"prompt": "p"} and set(out.side_images) == {"ref"}
    assert len(method.seen) == 1
    got, progress = method.seen[0]
    assert got == options and progress is report  # the same options object's values, its progress
    # automatic tiles: the method's own choice (0); without options: its options class's defaults
    upscale_tiled(method, torch.rand(1, 3, 30, 30), MethodOptions(threads=3))
    assert method.seen[-1][0] == MethodOptions(threads=3, tile=0, tile_pad=0)
    upscale_tiled(method, torch.rand(1, 3, 30, 30), tile=5)
    assert method.seen[-1][0] == MethodOptions(tile=5, tile_pad=0)


def test_auto_tile_and_pad() -> None:
    assert resolve_tile(ConvNet2x(), None) == 512
    assert resolve_tile(SelfTiler(), None) == 0
    assert resolve_tile(ConvNet2x(), 64) == 64
    assert resolve_tile_pad(ConvNet2x(), None) == AUTO_TILE_PAD
    assert resolve_tile_pad(ConvNet2x(), 3) == 3
    assert resolve_tile_pad(SelfTiler(), None) == 0
    narrow = ConvNet2x()
    narrow.tile_pad = 3
    assert resolve_tile_pad(narrow, None) == 3


@pytest.mark.slow
def test_realesrgan_tiled_vs_untiled_with_default_pad() -> None:
    """The real default restorer on a photo: with the default context, 2x2 tiles match the
    untiled result within 1/255 everywhere (Real-ESRGAN's customary pad of 10 does not)."""
    from PIL import Image

    from semsr.core.paths import assets_dir

    try:
        method = methods.build("realesrgan-x4plus")
    except SemsrError as err:
        pytest.skip(f"realesrgan-x4plus unavailable: {err}")
    with Image.open(assets_dir() / "sample.png") as im:
        a = np.asarray(im.convert("RGB"))[8:168, 16:176]
    x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255
    whole = tiled(method, x, tile=0)
    by_tiles = tiled(method, x, tile=80)  # default tile_pad
    assert (by_tiles - whole).abs().max().item() < 1 / 255
    seamy = tiled(method, x, tile=80, tile_pad=10)
    assert (seamy - whole).abs().max().item() > 1 / 255


_RSS_SCRIPT = r"""
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"rc": rc, "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_4000x3000_input_stays_under_4gib(tmp_path: Path) -> None:
    """Whole CLI run (read, tiled 4x, 16000x12000 PNG write) in a subprocess; peak RSS < 4 GiB."""
    from PIL import Image

    yy, xx = np.mgrid[0:3000, 0:4000]
    img = np.stack([(xx * 255 // 3999), (yy * 255 // 2999), ((xx + yy) % 256)], axis=2).astype(np.uint8)
    src = tmp_path / "big.jpg"
    Image.fromarray(img).save(src, quality=90)
    del img, yy, xx
    report = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "semsr",
        "upscale",
        "-i",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "-n",
        "bicubic",
        "--tile",
        "256",
        "--ext",
        "png",
        "--json",
        str(report),
        "--no-progress",
    ]
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *cmd], capture_output=True, text=True, check=True)
    stats = json.loads(res.stdout)
    assert stats["rc"] == 0, res.stderr
    head = (tmp_path / "out" / "big_out.png").read_bytes()[:24]  # PNG IHDR: width, height
    assert struct.unpack(">II", head[16:24]) == (16000, 12000)
    assert stats["peak_mb"] < 4096, stats
    entry = json.loads(report.read_text())["results"][0]
    assert entry["status"] == "ok" and entry["peak_rss_mb"] < 4096
