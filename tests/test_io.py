"""Image I/O matrix: orientation, alpha, grey, palette, CMYK, 16-bit, ICC, animation, bombs, atomic writes."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from semsr.api import upscale_picture
from semsr.core.errors import InputError
from semsr.core.io import (
    Picture,
    atomic_write,
    choose_format,
    encode_picture,
    icc_colour_space,
    orient_array,
    picture_from_array,
    picture_to_pil,
    read_image,
    write_picture,
)
from semsr.methods import build

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _rng_image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def bicubic():
    return build("bicubic", {"scale": 2})


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_array_matches_pillow_exif_transpose(tmp_path: Path, orientation: int) -> None:
    arr = _rng_image(5, 7, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(orient_array(arr, orientation), expected)


def test_exif_rotated_jpeg_is_upright_and_orientation_dropped(tmp_path: Path) -> None:
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # left half red, right half blue
    arr[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    exif[0x010F] = "TestCam"
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    pic = read_image(path)
    assert (pic.width, pic.height) == (10, 20)
    # rotated clockwise: the left (red) half is now on top
    assert pic.rgb[2, 5, 0] > 200 and pic.rgb[2, 5, 2] < 60
    assert pic.rgb[17, 5, 2] > 200 and pic.rgb[17, 5, 0] < 60
    out = write_picture(pic, tmp_path / "o.jpg")
    with Image.open(out) as im:
        ex = im.getexif()
        assert 0x0112 not in ex and ex[0x010F] == "TestCam"
        assert im.size == (10, 20)


# ---------------------------------------------------------------- modes


def test_rgba_alpha_is_upscaled_and_reattached(tmp_path: Path, bicubic) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = _rng_image(16, 16)
    rgba[:, 8:, 3] = 255  # right half opaque, left half transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    pic = read_image(path)
    assert pic.alpha is not None and not pic.grey
    out = upscale_picture(bicubic, pic)
    write_picture(out, tmp_path / "a_out.png")
    with Image.open(tmp_path / "a_out.png") as im:
        assert im.mode == "RGBA" and im.size == (32, 32)
        a = np.asarray(im)[..., 3]
    assert (a[:, :12] == 0).all() and (a[:, 20:] == 255).all()


def test_rgba_alpha_through_the_model(tmp_path: Path, bicubic) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, 4:, 3] = 255
    pic = picture_from_array(rgba)
    out = upscale_picture(bicubic, pic, alpha="model")
    assert out.alpha is not None and out.alpha.shape == (16, 16)
    assert (out.alpha[:, :6] == 0).all() and (out.alpha[:, 10:] == 255).all()


def test_la_stays_grey_with_alpha(tmp_path: Path, bicubic) -> None:
    la = np.stack([_rng_image(8, 8, 1)[..., 0], np.full((8, 8), 128, np.uint8)], axis=2)
    Image.fromarray(la).save(tmp_path / "la.png")
    pic = read_image(tmp_path / "la.png")
    assert pic.grey and pic.alpha is not None
    assert (pic.rgb[..., 0] == pic.rgb[..., 1]).all()
    write_picture(upscale_picture(bicubic, pic), tmp_path / "la_out.png")
    with Image.open(tmp_path / "la_out.png") as im:
        assert im.mode == "LA" and im.size == (16, 16)
        assert (np.asarray(im)[..., 1] == 128).all()


def test_grey_l_is_written_back_grey(tmp_path: Path, bicubic) -> None:
    Image.fromarray(_rng_image(8, 9, 1)[..., 0]).save(tmp_path / "g.png")
    out = upscale_picture(bicubic, read_image(tmp_path / "g.png"))
    write_picture(out, tmp_path / "g_out.png")
    with Image.open(tmp_path / "g_out.png") as im:
        assert im.mode == "L" and im.size == (18, 16)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    base = Image.fromarray(_rng_image(6, 6)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    base.save(tmp_path / "p.png")
    pic = read_image(tmp_path / "p.png")
    assert pic.alpha is None and pic.rgb.shape == (6, 6, 3)
    np.testing.assert_array_equal(pic.rgb, np.asarray(base.convert("RGB")))
    base.save(tmp_path / "pt.png", transparency=0)
    pic_t = read_image(tmp_path / "pt.png")
    assert pic_t.alpha is not None
    idx = np.asarray(base)
    np.testing.assert_array_equal(pic_t.alpha == 0, idx == 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    pic = read_image(tmp_path / "c.jpg")
    assert pic.rgb.shape == (8, 8, 3)
    r, g, b = pic.rgb[4, 4].astype(int)
    assert r > 240 and g < 15 and b < 15  # pure CMY red -> RGB red


def test_cmyk_with_unusable_profile_warns_and_converts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_icc = b"\x00" * 16 + b"CMYK" + b"\x00" * 200  # says CMYK, is not a valid profile
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", icc_profile=bad_icc)
    with caplog.at_level(logging.WARNING, logger="semsr.core.io"):
        pic = read_image(tmp_path / "c.jpg")
    assert "CMYK profile unusable" in caplog.text
    assert pic.icc_profile is None and pic.rgb[0, 0, 0] > 240


def test_16bit_rgb_png_stays_16bit(tmp_path: Path, bicubic) -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    png = tmp_path / "d.png"
    cv2.imwrite(str(png), cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))
    pic = read_image(png)
    assert pic.rgb.dtype == np.uint16 and pic.bit_depth == 16
    np.testing.assert_array_equal(pic.rgb, arr)
    pic.icc_profile = SRGB
    out = write_picture(upscale_picture(bicubic, pic), tmp_path / "d_out.png")
    back = cv2.cvtColor(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    assert back.dtype == np.uint16 and back.shape == (24, 20, 3)
    assert (back % 257 != 0).mean() > 0.9  # real 16-bit values, not 8-bit ones scaled up
    with Image.open(out) as im:  # our spliced iCCP chunk is valid PNG
        assert im.info.get("icc_profile") == SRGB


def test_16bit_rgba_png_keeps_alpha_and_depth(tmp_path: Path) -> None:
    arr = np.random.default_rng(4).integers(0, 65536, (6, 5, 4), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "a16.png"), arr)  # BGRA on disk
    pic = read_image(tmp_path / "a16.png")
    assert pic.bit_depth == 16 and pic.alpha is not None
    np.testing.assert_array_equal(pic.alpha, arr[..., 3])
    np.testing.assert_array_equal(pic.rgb, arr[..., 2::-1])
    write_picture(pic, tmp_path / "a16_out.png")
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "a16_out.png"), cv2.IMREAD_UNCHANGED), arr)


def test_16bit_grey_png_stays_16bit_grey(tmp_path: Path, bicubic) -> None:
    g = np.random.default_rng(5).integers(0, 65536, (7, 9), dtype=np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    pic = read_image(tmp_path / "g16.png")
    assert pic.grey and pic.bit_depth == 16
    np.testing.assert_array_equal(pic.rgb[..., 1], g)
    out = write_picture(upscale_picture(bicubic, pic), tmp_path / "g16_out.png")
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.shape == (14, 18)
    with Image.open(out) as im:
        assert im.mode.startswith("I;16")


def test_16bit_to_jpg_is_8bit_with_note(tmp_path: Path) -> None:
    pic = picture_from_array(np.full((4, 4, 3), 0.5))
    assert pic.bit_depth == 16
    fmt, note = choose_format("jpg", pic)
    assert fmt == "jpg" and "8-bit" in (note or "")
    write_picture(pic, tmp_path / "x.jpg")
    with Image.open(tmp_path / "x.jpg") as im:
        assert abs(int(np.asarray(im)[0, 0, 0]) - 128) <= 1


# ---------------------------------------------------------------- ICC and formats


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_icc_profile_is_carried_over(tmp_path: Path, fmt: str, bicubic) -> None:
    src = tmp_path / f"icc.{fmt}"
    Image.fromarray(_rng_image(8, 8)).save(src, icc_profile=SRGB)
    pic = read_image(src)
    assert pic.icc_profile == SRGB and icc_colour_space(SRGB) == "RGB"
    fmt_out, note = choose_format("auto", pic)
    assert fmt_out == fmt and note is None
    out = write_picture(upscale_picture(bicubic, pic), tmp_path / f"icc_out.{fmt}")
    with Image.open(out) as im:
        assert im.info.get("icc_profile") == SRGB and im.size == (16, 16)


def test_icc_profile_of_wrong_colour_space_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    pic = picture_from_array(np.zeros((4, 4), np.uint8))
    pic.icc_profile = SRGB  # an RGB profile on a grey image
    with caplog.at_level(logging.WARNING, logger="semsr.core.io"):
        im = picture_to_pil(pic)
    assert im.mode == "L" and "icc_profile" not in im.info and "dropped" in caplog.text


def test_alpha_never_goes_to_jpeg() -> None:
    pic = picture_from_array(np.zeros((4, 4, 4), np.uint8))
    fmt, note = choose_format("jpg", pic)
    assert fmt == "png" and "alpha" in (note or "")
    assert choose_format("auto", pic)[0] == "png"
    with pytest.raises(InputError, match="alpha"):
        encode_picture(pic, "jpg")
    with Image.open(io.BytesIO(encode_picture(pic, "webp"))) as im:
        assert im.mode == "RGBA"


def test_picture_from_array_variants() -> None:
    assert picture_from_array(np.zeros((3, 4), np.uint8)).grey
    f = picture_from_array(np.ones((3, 4, 3), np.float32))
    assert f.rgb.dtype == np.uint16 and (f.rgb == 65535).all()
    with pytest.raises(InputError):
        picture_from_array(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(InputError):
        picture_from_array(np.zeros((3, 4), np.int64))


# ---------------------------------------------------------------- rejections


def test_animated_gif_is_rejected(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 255 - 80 * i)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with pytest.raises(InputError, match=r"animated.*3 frames") as info:
        read_image(tmp_path / "anim.gif")
    assert "anim.gif" in str(info.value)


def test_camera_mpo_jpeg_is_read_as_its_first_frame(tmp_path: Path) -> None:
    main, preview = Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 255, 0))
    main.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[preview])
    pic = read_image(tmp_path / "phone.jpg")
    assert pic.rgb.shape == (12, 16, 3) and pic.rgb[5, 5, 0] > 240
    assert choose_format("auto", pic)[0] == "jpg"


def test_single_frame_gif_is_fine(tmp_path: Path) -> None:
    Image.new("P", (8, 8), 3).save(tmp_path / "still.gif")
    assert read_image(tmp_path / "still.gif").rgb.shape == (8, 8, 3)


@pytest.mark.parametrize("limit", [3000, 9000])  # semsr's own check, and Pillow's bomb error (> 2x)
def test_max_pixels_guard(tmp_path: Path, limit: int) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="--max-pixels") as info:
        read_image(tmp_path / "big.png", max_pixels=limit)
    assert "big.png" in str(info.value) and "\n" not in str(info.value)
    assert read_image(tmp_path / "big.png", max_pixels=None).width == 100
    assert Image.MAX_IMAGE_PIXELS != limit  # Pillow's global guard restored


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_leaves_nothing_behind_on_error(tmp_path: Path, exc: type[BaseException]) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"partial")
            raise exc()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_atomic_write_replaces_and_is_readable(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o044  # not left 0600 by mkstemp
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_write_picture_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, fp, format=None, **kw):
        Path(fp).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        write_picture(Picture(rgb=_rng_image(4, 4)), tmp_path / "o.png")
    assert list(tmp_path.iterdir()) == []
