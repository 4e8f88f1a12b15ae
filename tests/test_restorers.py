"""Restorers: ncnn blob reader, RRDBNet parity with the ncnn runtime, .pth loading,
Real-CUGAN geometry and sanity, the method registry entries."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr import methods
from semsr.core.errors import InputError, SemsrError, UnavailableError
from semsr.core.options import MethodOptions, OptionError
from semsr.core.outputs import SROutput
from semsr.methods.restorers import BicubicOptions, RRDBOptions, RRDBPthOptions, TorchRestorer, build_ncnn
from semsr.models import catalog as cat
from semsr.models import rrdbnet as rrdbnet_module
from semsr.models.ncnn_blob import NcnnFormatError, load_ncnn, parse_param
from semsr.models.ncnn_runtime import NcnnNet
from semsr.models.realcugan import pad_reflect
from semsr.models.rrdbnet import (
    RRDBConfig,
    RRDBNet,
    _has_fused_bf16,
    fused_inference,
    rrdbnet_from_ncnn,
    rrdbnet_from_pth,
    save_pth,
)
from semsr.ops.imresize import imresize

STANDARD_KEYS = (
    "conv_first.weight",
    "body.0.rdb1.conv1.weight",
    "body.0.rdb3.conv5.bias",
    "conv_body.weight",
    "conv_up1.weight",
    "conv_up2.weight",
    "conv_hr.weight",
    "conv_last.bias",
)


def _paths(name: str) -> tuple[Path, Path]:
    info = cat.get_info(name)
    if not info.available():
        pytest.skip(f"{info.package} not installed")
    param, bin_ = info.paths()
    return param, bin_


def _set5_crop(data_dir: Path, name: str, top: int, left: int, size: int) -> torch.Tensor:
    """``(1, 3, size, size)`` float in [0, 1] crop of a Set5 image."""
    img = np.asarray(Image.open(data_dir / "benchmarks" / "Set5" / f"{name}.png").convert("RGB"))
    crop = img[top : top + size, left : left + size].astype(np.float32) / 255.0
    return torch.from_numpy(crop).permute(2, 0, 1)[None].contiguous()


def _psnr(a: torch.Tensor, b: torch.Tensor, border: int = 4) -> float:
    a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def x4plus() -> RRDBNet:
    return rrdbnet_from_ncnn(*_paths("realesrgan-x4plus"))


# --------------------------------------------------------------------------- ncnn reader


def test_param_parser_reads_rrdb_graph() -> None:
    param, bin_ = _paths("realesrgan-x4plus")
    layers = parse_param(param)
    convs = [ly for ly in layers if ly.type == "Convolution"]
    assert len(convs) == 351
    assert convs[1].params[9] == 2 and convs[1].params[10] == [0.2]  # fused LeakyReLU(0.2)
    eltwise = next(ly for ly in layers if ly.type == "Eltwise")
    assert eltwise.params[1] == [0.2, 1.0]
    weighted = load_ncnn(param, bin_)
    assert weighted[1].weights["weight"].shape == (64, 3, 3, 3)
    assert weighted[1].weights["weight"].dtype == np.float32


def test_bin_size_mismatch_is_rejected(tmp_path: Path) -> None:
    param, bin_ = _paths("realesr-animevideov3-x4")
    data = bin_.read_bytes()
    short = tmp_path / "short.bin"
    short.write_bytes(data[:-8])
    with pytest.raises(NcnnFormatError, match="truncated"):
        load_ncnn(param, short)
    long = tmp_path / "long.bin"
    long.write_bytes(data + b"\0" * 8)
    with pytest.raises(NcnnFormatError, match="left after"):
        load_ncnn(param, long)
    bad = tmp_path / "bad.param"
    bad.write_text("123\n1 1\nInput x 0 1 x\n")
    with pytest.raises(NcnnFormatError, match="magic"):
        parse_param(bad)


def test_rrdb_loader_rejects_other_graphs() -> None:
    with pytest.raises(NcnnFormatError, match="not an RRDBNet"):
        rrdbnet_from_ncnn(*_paths("realesr-animevideov3-x4"))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("name", "size"), [("realesrgan-x4plus", 48), ("realsr-df2k-x4", 16)])
def test_rrdb_matches_ncnn_runtime(name: str, size: int, data_dir: Path, x4plus: RRDBNet) -> None:
    """PyTorch RRDBNet with weights from the blob == ncnn's own output (< 1e-3)."""
    param, bin_ = _paths(name)
    model = x4plus if name == "realesrgan-x4plus" else rrdbnet_from_ncnn(param, bin_)
    x = _set5_crop(data_dir, "baby", 200, 180, size)
    with torch.inference_mode():
        ours = model(x)
    ref = NcnnNet(param, bin_, "data", "output", threads=2)(x)
    assert ours.shape == ref.shape == (1, 3, 4 * size, 4 * size)
    assert float((ours - ref).abs().max()) < 1e-3
    assert float(ours.std()) > 0.05  # a real picture came out, not a constant


def test_restorer_dtypes_agree(data_dir: Path, x4plus: RRDBNet) -> None:
    x = _set5_crop(data_dir, "bird", 100, 100, 24)
    cpu = torch.device("cpu")
    fp32 = TorchRestorer("x4", copy.deepcopy(x4plus), cpu, torch.float32)(x).images
    bf16 = TorchRestorer("x4", copy.deepcopy(x4plus), cpu, torch.bfloat16)(x).images
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.shape == (1, 3, 96, 96)
    diff = (fp32 - bf16).abs()
    assert 0 < float(diff.mean()) < 0.01 and float(diff.max()) < 0.15


# --------------------------------------------------------------------------- .pth


def test_pth_round_trip_standard_keys(tmp_path: Path, x4plus: RRDBNet) -> None:
    path = tmp_path / "RealESRGAN_x4plus.pth"
    save_pth(x4plus, path, key="params_ema")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"params_ema"}
    assert all(k in raw["params_ema"] for k in STANDARD_KEYS)
    assert "body.22.rdb3.conv5.weight" in raw["params_ema"]
    loaded = rrdbnet_from_pth(path)
    assert loaded.config == RRDBConfig(23, 64, 32, 4)
    for key, val in x4plus.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], val), key
    method = methods.build("realesrgan-pth", {"weights": str(path), "channels_last": False})
    assert method.name == "realesrgan-pth" and method.scale == 4
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        # same weights, same layout; the tolerance only covers oneDNN picking
        # a different convolution algorithm between calls
        assert float((method(x).images - x4plus(x).clamp(0, 1)).abs().max()) < 1e-4
    # --checkpoint is the shared spelling of a weights file
    assert methods.build("realesrgan-pth", {"checkpoint": str(path)}).scale == 4
    assert methods.resolve("realesrgan-pth").weight_paths == ("weights", "checkpoint")


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_pth_params_key_and_scales(tmp_path: Path, scale: int) -> None:
    torch.manual_seed(0)
    model = RRDBNet(RRDBConfig(num_block=2, num_feat=16, num_grow_ch=8, scale=scale)).eval()
    path = tmp_path / f"tiny_x{scale}.pth"
    save_pth(model, path, key="params")
    loaded = rrdbnet_from_pth(path)
    assert loaded.config == model.config
    x = torch.rand(1, 3, 13, 10)  # odd size: pixel-unshuffle padding for x1/x2
    with torch.inference_mode():
        out = loaded(x)
        assert out.shape == (1, 3, 13 * scale, 10 * scale)
        assert torch.equal(out, model(x))


def test_pth_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        rrdbnet_from_pth(tmp_path / "missing.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="cannot read"):
        rrdbnet_from_pth(empty)
    other = tmp_path / "other.pth"
    torch.save({"params": {"weight": torch.zeros(3)}}, other)
    with pytest.raises(InputError, match="missing 'conv_first.weight'"):
        rrdbnet_from_pth(other)
    wrong = tmp_path / "wrong.pth"
    torch.save({"something": 1}, wrong)
    with pytest.raises(InputError, match="params_ema"):
        rrdbnet_from_pth(wrong)


# --------------------------------------------------------------------------- Real-CUGAN


@pytest.mark.parametrize("name", ["realcugan-2x", "realcugan-3x", "realcugan-4x", "realcugan-pro-3x"])
def test_realcugan_aligned_and_sane(name: str, data_dir: Path) -> None:
    """Output is scale*H x scale*W, aligned with the input and close to the truth."""
    method = methods.build(name, {"threads": 2})
    s = method.scale
    hr = _set5_crop(data_dir, "bird", 100, 100, 96)
    lr = imresize(hr, scale=1 / s).clamp(0, 1)
    out = method(lr).images
    assert out.shape == (1, 3, 96, 96)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    bicubic = imresize(lr, scale=s).clamp(0, 1)
    psnr = _psnr(out, hr)
    # Real-CUGAN sharpens (anime-trained GAN): a few dB under bicubic on a
    # bicubic-degraded photo, but nowhere near garbage (swapped channels ~9 dB,
    # a missing 4x residual ~5 dB).
    assert psnr > _psnr(bicubic, hr) - 7, psnr
    assert psnr > 20, psnr
    for shift in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        assert psnr > _psnr(torch.roll(out, shift, dims=(-2, -1)), hr)


def test_realcugan_all_variants_any_size() -> None:
    x = torch.rand(1, 3, 17, 22)
    for info in cat.catalog():
        if info.name.startswith("realcugan"):
            out = methods.build(info.name)(x).images
            assert out.shape == (1, 3, 17 * info.scale, 22 * info.scale), info.name
            assert torch.isfinite(out).all()
    for name in ("realcugan-2x", "realcugan-3x", "realcugan-4x"):
        method = methods.build(name)
        for h, w in ((1, 1), (5, 3)):
            assert method(torch.rand(1, 3, h, w)).images.shape == (1, 3, h * method.scale, w * method.scale)


def test_pad_reflect_small_images() -> None:
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    out = pad_reflect(x, 19, 20, 18, 19)
    assert out.shape == (1, 1, 2 + 37, 3 + 39)
    assert torch.equal(out[..., 18:20, 19:22], x)
    assert torch.equal(pad_reflect(x, 1, 1, 0, 0)[0, 0, 0], torch.tensor([1.0, 0, 1, 2, 1]))


# --------------------------------------------------------------------------- registry


def test_registry_has_restorers() -> None:
    names = {s.name for s in methods.specs()}
    required = {
        "bicubic",
        "realesrgan-x4plus",
        "realsr-df2k-x4",
        "realesrgan-pth",
        "default",
        "realcugan-2x",
        "realcugan-3x-conservative",
        "realcugan-4x-denoise3x",
        "realcugan-pro-2x",
    }
    assert required <= names
    assert sum(n.startswith("realcugan") for n in names) == 17
    assert methods.resolve("default").scale == 4


def test_default_builds_target() -> None:
    spec = methods.resolve("default")
    target = methods.resolve(cat.DEFAULT_TARGET)
    assert spec.alias_of == cat.DEFAULT_TARGET and spec.info.alias_of == cat.DEFAULT_TARGET
    assert spec.options is target.options and spec.factory is target.factory  # the target's options, no copies
    try:
        method = methods.build("default")
    except SemsrError as err:  # the target's weights are not on this machine
        pytest.skip(f"default unavailable: {err}")
    assert method.name == cat.DEFAULT_TARGET and method.scale == 4


def test_outputs_are_ordinary_tensors() -> None:
    """Callers (tiling) may write into results in place: no inference tensors, no grad."""
    tiny = TorchRestorer("tiny", RRDBNet(RRDBConfig(1, 8, 4, 4)), torch.device("cpu"), torch.float32)
    for method in (tiny, methods.build("bicubic"), methods.build("realcugan-2x")):
        out = method(torch.rand(1, 3, 6, 5))
        assert isinstance(out, SROutput) and out.priors == {} and out.side_images == {}
        assert not out.images.requires_grad and not out.images.is_inference()
        out.images.mul_(0.5)


def test_restorer_options_classes() -> None:
    assert methods.resolve("bicubic").options is BicubicOptions
    assert methods.resolve("realesrgan-x4plus").options is RRDBOptions
    assert methods.resolve("realesrgan-pth").options is RRDBPthOptions
    assert methods.resolve("realcugan-2x").options is MethodOptions
    assert BicubicOptions.infos()["scale"].stage == "build" and RRDBOptions().channels_last is True
    assert methods.resolve("realesrgan-x4plus").parse({"channels_last": "false"}).channels_last is False


def test_bicubic_method() -> None:
    x = torch.rand(2, 3, 9, 7)
    four = methods.build("bicubic")
    assert four.scale == 4 and four.tiles_itself is False
    assert torch.allclose(four(x).images, imresize(x, scale=4).clamp(0, 1))
    two = methods.build("bicubic", {"scale": "2", "dtype": "fp32", "device": "cpu", "threads": None})
    assert two.scale == 2 and two(x).images.shape == (2, 3, 18, 14)
    assert methods.build("bicubic", {"scale": 1.5}).scale == 1.5
    for bad in (0, -1, "0"):
        with pytest.raises(OptionError, match="must be > 0"):
            methods.build("bicubic", {"scale": bad})


def test_build_options_validated() -> None:
    with pytest.raises(OptionError, match="has no option tiles; did you mean tile"):
        methods.build("realcugan-2x", {"tiles": 64})
    with pytest.raises(OptionError, match="choose one of auto, fp32, bf16, fp16"):
        methods.build("bicubic", {"dtype": "int7"})
    with pytest.raises(SemsrError, match="fp16 needs a GPU"):
        methods.build("realesrgan-x4plus", {"dtype": "fp16"})
    with pytest.raises(UnavailableError, match="pass --weights PATH"):
        methods.build("realesrgan-pth")
    if not torch.cuda.is_available():
        with pytest.raises(UnavailableError, match="cuda"):
            methods.build("bicubic", {"device": "cuda"})


def test_unavailable_package_reported(tmp_path: Path) -> None:
    info = cat.ModelInfo(
        "ghost", 4, "ncnn", package="no-such-pkg", module="semsr_no_such_module", files=("X.param", "X.bin")
    )
    assert info.available() is False
    assert info.file_sizes() == {"X.param": None, "X.bin": None}
    with pytest.raises(UnavailableError, match="pip install no-such-pkg"):
        build_ncnn(info, MethodOptions())


def test_copied_blob_loads_from_any_folder(tmp_path: Path) -> None:
    """The reader works on plain files, not only inside the wheel."""
    param, bin_ = _paths("realesrgan-x4plus-anime")
    shutil.copy(param, tmp_path / "a.param")
    shutil.copy(bin_, tmp_path / "a.bin")
    model = rrdbnet_from_ncnn(tmp_path / "a.param", tmp_path / "a.bin")
    assert model.config == RRDBConfig(6, 64, 32, 4)


# --------------------------------------------------------------------------- oneDNN fast path


def test_fused_rrdb_fp32_is_bit_exact_and_bf16_close(data_dir: Path, x4plus: RRDBNet) -> None:
    """The fused inference path (channels-last, no autograd) gives the plain forward bit for bit in fp32;
    in bf16 (on a CPU with oneDNN's bf16 kernels) it stays as close to fp32 as the plain bf16 forward."""
    x = _set5_crop(data_dir, "bird", 100, 100, 24)
    dtypes = [torch.float32] + ([torch.bfloat16] if _has_fused_bf16() else [])
    outs = {}
    for dtype in dtypes:
        model = copy.deepcopy(x4plus).to(dtype=dtype, memory_format=torch.channels_last)
        inp = x.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            if not fused_inference(inp):
                pytest.skip("this PyTorch has no oneDNN fused convolutions")
            outs[dtype, True] = model(inp).float()
        with torch.enable_grad():  # autograd on: the plain forward (oneDNN fused ops have no backward)
            assert not fused_inference(inp)
            outs[dtype, False] = model(inp).detach().float()
    assert torch.equal(outs[torch.float32, True], outs[torch.float32, False])
    small = _set5_crop(data_dir, "bird", 100, 100, 16).contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(x4plus).to(memory_format=torch.channels_last)
    with torch.no_grad():  # 16x16 is below oneDNN's size in ATen: the plain forward's kernels, bit for bit
        fast = model(small)
    with torch.enable_grad():
        assert torch.equal(fast, model(small).detach())
    if torch.bfloat16 not in dtypes:
        pytest.skip("this CPU has no oneDNN bf16 convolutions (needs avx512bw/vl/dq or avx_ne_convert)")
    ref = outs[torch.float32, False]
    fused, plain = (float((outs[torch.bfloat16, f] - ref).abs().max()) for f in (True, False))
    assert 0 < fused < 0.15 and fused <= 1.5 * plain


def test_bf16_without_onednn_bf16_runs_the_plain_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU whose oneDNN has no bf16 convolutions the fused op would raise: bf16 input takes the plain
    modules (fp32 input still takes the fused path), and the forward runs."""
    monkeypatch.setattr(rrdbnet_module, "_has_fused_bf16", lambda: False)
    torch.manual_seed(0)
    model = RRDBNet(RRDBConfig(num_block=1, num_feat=8, num_grow_ch=4)).to(memory_format=torch.channels_last).eval()
    x = torch.rand(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert not fused_inference(x.bfloat16())
        assert fused_inference(x) == torch.backends.mkldnn.is_available()
        out = model.bfloat16()(x.bfloat16())
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out.float()).all()


def test_fused_inference_only_for_channels_last_cpu_inference() -> None:
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert not fused_inference(x)  # NCHW: the plain forward (as before)
        assert not fused_inference(x.half().contiguous(memory_format=torch.channels_last))
        cl = x.contiguous(memory_format=torch.channels_last)
        assert fused_inference(cl) == torch.backends.mkldnn.is_available()
    assert not fused_inference(cl)  # autograd enabled
