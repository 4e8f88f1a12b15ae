"""Robust image I/O for upscaling: read anything Pillow reads, write without losing data.

An image travels through semsr as a :class:`Picture`: the colour channels as an
``(H, W, 3)`` ``uint8`` or ``uint16`` array (grey images have three equal
channels and ``grey=True``), an optional ``(H, W)`` alpha plane of the same
dtype, and the metadata needed to write the result back faithfully (ICC
profile, EXIF, source format).

What :func:`read_image` handles:

- EXIF orientation is applied (``ImageOps.exif_transpose``) and removed from
  the EXIF that is carried to the output.
- Modes ``1``/``L``/``LA``/``P``/``PA``/``RGB``/``RGBA`` (and premultiplied
  variants), ``I;16*`` and ``I`` (16-bit grey), ``CMYK`` (converted to sRGB
  through the embedded ICC profile when there is one), ``YCbCr``/``HSV``.
- 16-bit colour PNG/TIFF, which Pillow would truncate to 8 bits, are decoded
  with OpenCV instead and stay 16-bit (:func:`write_picture` writes them back
  as 16-bit PNG with the ICC profile spliced in).
- Animated or multi-frame files, 32-bit float images, empty, truncated and
  non-image files, zero-size images and images above ``max_pixels`` raise
  :class:`~semsr.core.errors.InputError` naming the file.

Writes are atomic: :func:`atomic_write` (files) and :func:`atomic_folder`
(folders) build the result under a temporary name beside the destination and
rename it into place only once it is complete (:func:`atomic_move`). The
temporary name is ``.<name>.semsr-<pid>-<random>.tmp``; what a killed process
(``kill -9``) leaves behind is removed by :func:`sweep_temp_files`, which
commands call on their output folders at start (only names of that pattern whose
process is gone). Files and folders are created with the usual permissions
(``0666``/``0777`` minus the umask), not the private ones of :mod:`tempfile`.
:func:`check_output_folder` and :func:`check_output_file` test a destination
before any work is done.
:data:`IMAGE_EXTENSIONS` are the file suffixes :func:`read_image` tries.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import io
import logging
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from semsr.core.errors import InputError, SemsrError

log = logging.getLogger("semsr.core.io")

#: Default decompression-bomb guard: refuse inputs with more pixels than this.
DEFAULT_MAX_PIXELS = 100_000_000
#: Output formats :func:`write_picture` supports.
FORMATS = ("png", "jpg", "webp")
_EXIF_ORIENTATION = 0x0112
_SOURCE_TO_FORMAT = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp"}
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def _readable_extensions() -> frozenset[str]:
    """Lower-case suffixes (``".png"``) of the formats Pillow can open, without the stub formats
    (HDF5, GRIB, BUFR, WMF...) that need a decoder registered from outside."""
    Image.init()
    out = set()
    for ext, fmt in Image.registered_extensions().items():
        opener = Image.OPEN.get(fmt, (None,))[0]
        if opener is None or (inspect.isclass(opener) and issubclass(opener, ImageFile.StubImageFile)):
            continue
        out.add(ext.lower())
    return frozenset(out)


#: File suffixes (lower case, with the dot) of the image formats :func:`read_image` can read. Folder
#: listings (training data, degradation inputs, retrieval databases, batch upscaling) filter with it.
IMAGE_EXTENSIONS: frozenset[str] = _readable_extensions()


@dataclass
class Picture:
    """An image plus what is needed to write an upscaled copy of it faithfully.

    Attributes:
        rgb: ``(H, W, 3)`` ``uint8`` or ``uint16`` colour channels (for grey
            images the three channels are equal).
        alpha: ``(H, W)`` alpha plane with the dtype of ``rgb``, or ``None``.
        grey: the source was greyscale; it is written back as greyscale.
        icc_profile: ICC profile bytes describing ``rgb`` (or the grey plane).
        exif: EXIF block (orientation already applied and removed), or ``None``.
        format: Pillow's name of the source format (``"PNG"``, ``"JPEG"``...).
        path: the file it was read from, if any.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    grey: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None
    format: str | None = None
    path: Path | None = None

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def bit_depth(self) -> int:
        """8 or 16."""
        return 16 if self.rgb.dtype == np.uint16 else 8

    def with_pixels(self, rgb: np.ndarray, alpha: np.ndarray | None) -> Picture:
        """A copy with new pixel arrays and the same metadata."""
        return replace(self, rgb=rgb, alpha=alpha)


# ---------------------------------------------------------------- reading


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set Pillow's own bomb guard to ``max_pixels`` while a file is opened.

    Pillow warns above the limit and raises above twice the limit; semsr does
    its own exact check (:func:`check_size`), so the warning is silenced.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} pixels"


def check_size(w: int, h: int, max_pixels: int | None, path: Path | None) -> None:
    """Raise :class:`InputError` for zero-size images or more than ``max_pixels`` pixels."""
    if w < 1 or h < 1:
        raise InputError(f"image has zero size ({w}x{h})", path)
    if max_pixels and w * h > max_pixels:
        raise InputError(
            f"image is {w}x{h} ({_megapixels(w * h)}), above the --max-pixels limit of "
            f"{_megapixels(max_pixels)}; raise --max-pixels if you trust this file",
            path,
        )


def check_frames(im: Image.Image, path: Path | None) -> None:
    """Raise :class:`InputError` for animated / multi-frame images.

    MPO files (the JPEGs of many phones and cameras, with extra frames for
    previews or depth) are accepted: their first frame is the photo.
    """
    n = getattr(im, "n_frames", 1)
    if n > 1 and im.format != "MPO":
        raise InputError(
            f"animated or multi-frame image ({n} frames) is not supported; extract one frame first",
            path,
        )


def _source_bit_depth(im: Image.Image, path: Path | None) -> int:
    """Bits per sample stored in the file (PNG IHDR, TIFF BitsPerSample), else 8."""
    if im.format == "PNG" and path is not None:
        with open(path, "rb") as fh:
            head = fh.read(26)
        if len(head) == 26 and head[12:16] == b"IHDR":
            return int(head[24])
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        if bits:
            return int(max(bits) if isinstance(bits, tuple) else bits)
    return 8


def grey_to_rgb(plane: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 1)`` -> ``(H, W, 3)`` with three equal channels."""
    return np.repeat(plane.reshape(plane.shape[0], plane.shape[1], 1), 3, axis=2)


def orient_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an ``(H, W[, C])`` array, as ``exif_transpose`` does."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(arr))


def _exif_without_orientation(im: Image.Image) -> bytes | None:
    exif = im.getexif()
    exif.pop(_EXIF_ORIENTATION, None)
    return exif.tobytes() if len(exif) else None


def _read_16bit_colour(path: Path, im: Image.Image) -> Picture:
    """Decode a 16-bit colour/alpha PNG or TIFF with OpenCV (Pillow would truncate it)."""
    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InputError("cannot decode 16-bit image", path)
    if arr.dtype != np.uint16:
        arr = arr.astype(np.uint16) * 257 if arr.dtype == np.uint8 else arr.astype(np.uint16)
    grey = im.mode in ("L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N")
    alpha = None
    if arr.ndim == 2:
        rgb = grey_to_rgb(arr)
    elif arr.shape[2] == 2:
        rgb, alpha = grey_to_rgb(arr[..., 0]), arr[..., 1]
    elif arr.shape[2] == 3:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    else:
        rgb, alpha = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2RGB), arr[..., 3]
    if grey:
        rgb = grey_to_rgb(rgb[..., 0])
    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    rgb = orient_array(rgb, orientation)
    alpha = None if alpha is None else orient_array(alpha, orientation)
    return Picture(
        rgb=rgb,
        alpha=alpha,
        grey=grey,
        icc_profile=im.info.get("icc_profile"),
        exif=_exif_without_orientation(im),
        format=im.format,
    )


def _srgb_profile_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def icc_colour_space(icc: bytes | None) -> str | None:
    """The ICC header's data colour space (``"RGB"``, ``"GRAY"``, ``"CMYK"``...), or ``None``."""
    if not icc or len(icc) < 20:
        return None
    return icc[16:20].decode("ascii", "replace").strip()


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None, path: Path | None) -> tuple[Image.Image, bytes | None]:
    """Convert CMYK to RGB, colour-managed through the embedded profile when possible."""
    if icc_colour_space(icc) == "CMYK":
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))  # type: ignore[arg-type]
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            assert out is not None
            return out, _srgb_profile_bytes()
        except (ImageCms.PyCMSError, OSError) as err:
            log.warning("%s: embedded CMYK profile unusable (%s); converting without it", path, err)
    return im.convert("RGB"), None


def picture_from_pil(im: Image.Image, path: Path | None = None) -> Picture:
    """Turn a (loaded) Pillow image into a :class:`Picture`; see the module doc for modes."""
    fmt = im.format
    im = ImageOps.exif_transpose(im)
    icc = im.info.get("icc_profile")
    exif = _exif_without_orientation(im)
    mode = im.mode
    has_trns = "transparency" in im.info
    alpha: np.ndarray | None = None
    grey = False
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode.startswith("I;16"):
        rgb, grey = grey_to_rgb(np.asarray(im).astype(np.uint16)), True
    elif mode == "I":
        rgb, grey = grey_to_rgb(np.clip(np.asarray(im), 0, 65535).astype(np.uint16)), True
    elif mode == "F":
        raise InputError("32-bit float images are not supported; convert to 16-bit PNG first", path)
    elif mode in ("L", "LA", "La"):
        grey = True
        if mode != "L" or has_trns:
            la = np.asarray(im.convert("LA"))
            rgb, alpha = grey_to_rgb(la[..., 0]), la[..., 1].copy()
        else:
            rgb = grey_to_rgb(np.asarray(im))
    elif mode == "CMYK":
        conv, icc = _cmyk_to_rgb(im, icc, path)
        rgb = np.asarray(conv)
    elif mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and has_trns):
        rgba = np.asarray(im.convert("RGBA"))
        rgb, alpha = np.ascontiguousarray(rgba[..., :3]), rgba[..., 3].copy()
    else:
        try:
            rgb = np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as err:
            raise InputError(f"unsupported colour mode {mode!r} ({err})", path) from err
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        rgb = np.array(rgb, order="C")  # Pillow's arrays are read-only views
    return Picture(
        rgb=rgb,
        alpha=alpha,
        grey=grey,
        icc_profile=icc,
        exif=exif,
        format=fmt,
        path=path,
    )


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Picture:
    """Read an image file into a :class:`Picture`.

    Args:
        path: file to read.
        max_pixels: refuse images with more pixels than this (``None``/0: no limit).

    Raises:
        InputError: missing, empty, corrupt, truncated, animated, too large or
            otherwise unusable input; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"broken symbolic link (its target {os.readlink(path)} does not exist)", path)
        raise InputError("no such file or folder", path)
    if path.is_dir():
        raise InputError("is a folder, not an image file", path)
    if path.stat().st_size == 0:
        raise InputError("file is empty (0 bytes)", path)
    with _pillow_pixel_limit(max_pixels):
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise InputError("not a readable image (unknown format or corrupt header)", path) from None
        except Image.DecompressionBombError as err:
            m = re.search(r"\((\d+) pixels\)", str(err))  # Pillow's text quotes its own limit (2x ours)
            size = f"{_megapixels(int(m.group(1)))}, " if m else ""
            raise InputError(
                f"image is too large ({size}above the --max-pixels limit of {_megapixels(max_pixels or 0)}); "
                "raise --max-pixels if you trust this file",
                path,
            ) from None
        except OSError as err:
            raise InputError(f"cannot open image: {err}", path) from None
        with im:
            check_size(im.width, im.height, max_pixels, path)
            check_frames(im, path)
            try:
                if _source_bit_depth(im, path) == 16 and not im.mode.startswith("I"):
                    pic = _read_16bit_colour(path, im)
                else:
                    im.load()
                    pic = picture_from_pil(im, path)
            except (InputError, MemoryError):
                raise
            except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, zlib.error...
                raise InputError(f"corrupt or truncated image ({err})", path) from None
    pic.path = path
    return pic


def picture_from_array(arr: np.ndarray) -> Picture:
    """Wrap an ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array (RGB order).

    ``uint8``/``uint16`` arrays are taken as they are; float arrays are taken as
    values in [0, 1] and stored as ``uint16``.
    """
    a = np.asarray(arr)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise InputError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = (np.clip(a, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
    elif a.dtype not in (np.uint8, np.uint16):
        raise InputError(f"unsupported array dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    check_size(a.shape[1], a.shape[0], None, None)
    if a.ndim == 2 or a.shape[2] == 1:
        return Picture(rgb=grey_to_rgb(a), grey=True)
    alpha = a[..., 3].copy() if a.shape[2] == 4 else None
    return Picture(rgb=np.ascontiguousarray(a[..., :3]), alpha=alpha)


# ---------------------------------------------------------------- memory


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def picture_memory(pic: Picture, out_hw: tuple[int, int], resized: bool) -> int:
    """Bytes of the whole-image buffers an upscale of ``pic`` to ``out_hw`` holds at its peak.

    The method itself works tile by tile (its working set is bounded by the tile
    size, not the image); what grows with the image are the decoded input and
    its copy, the assembled output, one converted copy for encoding (two for
    16-bit PNG: colour order and the encoded stream), and the resized copy when
    ``--outscale`` differs from the native scale. Alpha planes count the same way.
    """
    b = pic.bit_depth // 8
    channels = 3 + (pic.alpha is not None)
    copies_out = (2 if b == 1 else 3) + int(resized)
    h, w = out_hw
    return pic.width * pic.height * channels * b * 2 + h * w * channels * b * copies_out


def check_memory(pic: Picture, out_hw: tuple[int, int], resized: bool, path: Path | None) -> int:
    """Refuse an upscale whose buffers (:func:`picture_memory`) exceed the memory available now.

    Returns the estimate in bytes. Raises :class:`InputError` naming both numbers.
    """
    need = picture_memory(pic, out_hw, resized)
    free = available_memory()
    if free is not None and need > free:
        h, w = out_hw
        raise InputError(
            f"upscaling to {w}x{h} ({_megapixels(w * h)}) needs about {_size(need)} of memory for the "
            f"image buffers; {_size(free)} is available. Use a smaller --outscale or free memory",
            path,
        )
    return need


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------- writing


def to_8bit(a: np.ndarray) -> np.ndarray:
    """``uint16`` -> ``uint8`` with rounding (``uint8`` passes through)."""
    if a.dtype == np.uint8:
        return a
    return cv2.convertScaleAbs(a, alpha=255.0 / 65535.0)


def _grey_plane(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(H, W)`` BT.601 luma in the same dtype (exact for equal channels)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def picture_to_pil(pic: Picture) -> Image.Image:
    """A Pillow image of ``pic`` (``L``/``LA``/``RGB``/``RGBA``, or ``I;16`` for 16-bit grey).

    Pillow has no 16-bit colour modes, so 16-bit colour pictures come back as
    8-bit; use :func:`write_picture` to keep 16 bits on disk.
    """
    if pic.grey and pic.bit_depth == 16 and pic.alpha is None:
        im = Image.fromarray(_grey_plane(pic.rgb))
        assert im.mode.startswith("I;16")
    else:
        rgb8 = to_8bit(pic.rgb)
        im = Image.fromarray(_grey_plane(rgb8)) if pic.grey else Image.fromarray(rgb8)
        if pic.alpha is not None:
            im.putalpha(Image.fromarray(to_8bit(pic.alpha)))
    icc = _icc_for(pic, "GRAY" if im.mode in ("L", "LA", "I;16") else "RGB")
    if icc:
        im.info["icc_profile"] = icc
    if pic.exif:
        im.info["exif"] = pic.exif
    return im


def _icc_for(pic: Picture, space: str) -> bytes | None:
    """The picture's ICC profile if it describes ``space`` (``"RGB"``/``"GRAY"``), else ``None``."""
    if not pic.icc_profile:
        return None
    found = icc_colour_space(pic.icc_profile)
    if found != space:
        log.warning("%s: ICC profile is for %s data, output is %s; profile dropped", pic.path, found, space)
        return None
    return pic.icc_profile


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Temporary names of :func:`atomic_write` / :func:`atomic_folder`: ``.<name>.semsr-<pid>-<random>.tmp``.
TEMP_NAME_RE = re.compile(r"^\..+\.semsr-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.semsr-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_temp_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove temporary files and folders of :func:`atomic_write`/:func:`atomic_folder` whose process is gone.

    Only names matching :data:`TEMP_NAME_RE` are touched; those of a running process
    (another semsr writing into the same folder) are kept. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    entries = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for entry in list(entries):
        m = TEMP_NAME_RE.match(entry.name)
        if m and not _process_alive(int(m.group("pid"))):
            _remove(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) left by interrupted runs in %s", len(removed), folder)
    return removed


def _probe_writable(folder: Path) -> None:
    fd, name = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(folder / "probe"), suffix=".tmp")
    os.close(fd)
    os.unlink(name)


def check_output_folder(path: str | Path, what: str, create: bool = True) -> Path:
    """Make sure ``path`` is (or can be created as) a folder this process can write into.

    ``create=True`` creates it (with parents) when missing; otherwise the nearest
    existing parent must be a writable folder. ``what`` names the option in the
    message (``"-o/--output"``).

    Raises:
        SemsrError: naming ``path`` and the problem (a file, not writable, cannot be created).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SemsrError(f"{what} is a file, not a folder", path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SemsrError(f"{what}: {existing} is a file, not a folder", path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            existing = path
        _probe_writable(existing)
    except OSError as err:
        raise SemsrError(f"{what}: cannot write here ({err.strerror or err})", path) from None
    return path


def check_output_file(path: str | Path, what: str, create: bool = True) -> Path:
    """Make sure a file can be written at ``path`` (its folder is created when missing and ``create``).

    Raises:
        SemsrError: ``path`` is a folder, its parent is a file or not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise SemsrError(f"{what} is a folder; give a file name", path)
    check_output_folder(path.parent, f"the folder of {what}", create=create)
    return path


def write_error_message(err: OSError, path: Path) -> str:
    """One line for a failed write of ``path`` (never the temporary file's name)."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return f"cannot write {path}: {reason}"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any error (or ``KeyboardInterrupt``) the temporary file is removed and
    ``path`` is left untouched, so a reader never sees a partial file. The
    parent folder must exist. The file gets ``0666`` minus the umask.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_move(src: str | Path, dst: str | Path, *, replace: bool = True) -> Path:
    """Put the finished file or folder ``src`` at ``dst`` with one rename (same file system).

    An existing ``dst`` is replaced (it is first renamed aside, then deleted), so
    a reader sees the old or the new content, never a mix. With
    ``replace=False`` an existing ``dst`` wins: ``src`` is deleted (several
    processes racing to produce the same file). Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        if not replace:
            _remove(src)
            return dst
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.rename(dst, old / dst.name)
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(old / dst.name, dst)  # put the previous content back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return dst
    try:
        os.rename(src, dst)
    except OSError:
        if replace or not dst.exists():  # replace=False: another process may have finished first
            raise
        _remove(src)
    return dst


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, staging: str | Path | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; move it to ``path`` (:func:`atomic_move`) on success.

    On any error (or ``KeyboardInterrupt``) the staging folder is deleted and
    ``path`` is left untouched. ``staging`` names the staging folder (emptied
    first) when several processes write into it and must know its name;
    by default it is a fresh temporary folder. ``replace=False``: an existing
    ``path`` is kept and the staged folder discarded. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    else:
        tmp = Path(staging)
        if tmp.exists():
            _remove(tmp)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        _public_permissions(tmp)
        atomic_move(tmp, path, replace=replace)
    except BaseException:
        _remove(tmp)
        raise


def _public_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions of ordinary new files (``0666``/``0777`` minus
    the umask): :mod:`tempfile` (used here and by the libraries that save weights) creates them private."""
    mask = _current_umask()
    for entry in [root, *root.rglob("*")]:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_insert_after_ihdr(png: bytes, chunks: list[bytes]) -> bytes:
    """Insert ready-made chunks right after IHDR (where iCCP and eXIf may go)."""
    ihdr_end = 8 + 8 + 13 + 4
    if png[12:16] != b"IHDR":
        raise ValueError("not a PNG stream")
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def _encode_png16(pic: Picture) -> bytes:
    """16-bit PNG bytes (grey, RGB or RGBA) with ICC and EXIF chunks."""
    if pic.grey and pic.alpha is None:
        arr, space = _grey_plane(pic.rgb), "GRAY"
    else:
        space = "RGB"  # PNG has no 16-bit grey+alpha writer in OpenCV: grey+alpha goes out as RGBA
        arr = cv2.cvtColor(pic.rgb, cv2.COLOR_RGB2BGR)
        if pic.alpha is not None:
            arr = np.dstack([arr, pic.alpha])
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise OSError("OpenCV could not encode the 16-bit PNG")
    chunks = []
    icc = _icc_for(pic, space)
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if pic.exif:
        exif = pic.exif[6:] if pic.exif.startswith(b"Exif\x00\x00") else pic.exif
        chunks.append(_png_chunk(b"eXIf", exif))
    return _png_insert_after_ihdr(buf.tobytes(), chunks)


def choose_format(ext: str, pic: Picture) -> tuple[str, str | None]:
    """Pick the output format for ``--ext`` and say why when it differs from the request.

    Args:
        ext: ``"auto"`` (keep the input's format: png/jpg/webp, png otherwise)
            or one of :data:`FORMATS` (``"jpeg"`` is accepted for ``"jpg"``).
        pic: the image about to be written.

    Returns:
        ``(format, note)``; ``note`` explains a forced change (JPEG cannot hold
        alpha, so alpha images are written as PNG rather than losing the alpha).
    """
    ext = ext.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext == "auto":
        fmt = _SOURCE_TO_FORMAT.get(pic.format or "", "png")
        if pic.bit_depth == 16 and fmt != "png":
            fmt = "png"
        return fmt, None
    if ext not in FORMATS:
        raise InputError(f"unsupported output format {ext!r}; choose auto, png, jpg or webp")
    if ext == "jpg" and pic.alpha is not None:
        return "png", "JPEG cannot store alpha; written as PNG to keep it"
    if ext != "png" and pic.bit_depth == 16:
        return ext, f"{ext.upper()} holds 8 bits per channel; the 16-bit result is written as 8-bit"
    return ext, None


def _save_picture(pic: Picture, fmt: str, quality: int, target: Path | io.BytesIO) -> None:
    """Encode ``pic`` as ``fmt`` into ``target`` (a file path or a buffer)."""
    if fmt not in FORMATS:
        raise InputError(f"unsupported output format {fmt!r}; choose png, jpg or webp")
    if fmt == "png" and pic.bit_depth == 16:
        data = _encode_png16(pic)
        if isinstance(target, Path):
            target.write_bytes(data)
        else:
            target.write(data)
        return
    if fmt == "jpg" and pic.alpha is not None:
        raise InputError("JPEG cannot store alpha; write PNG or WebP", pic.path)
    im = picture_to_pil(replace(pic, rgb=to_8bit(pic.rgb), alpha=None if pic.alpha is None else to_8bit(pic.alpha)))
    opts: dict[str, Any] = {}
    if "icc_profile" in im.info:
        opts["icc_profile"] = im.info["icc_profile"]
    if pic.exif:
        opts["exif"] = pic.exif
    if fmt == "jpg":
        opts.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        opts.update(quality=quality, method=4)
    im.save(target, format=_PIL_FORMAT[fmt], **opts)


def encode_picture(pic: Picture, fmt: str, quality: int = 95) -> bytes:
    """``pic`` encoded as ``fmt`` (png/jpg/webp) bytes, keeping ICC/EXIF; 16-bit stays 16-bit in PNG."""
    buf = io.BytesIO()
    _save_picture(pic, "jpg" if fmt == "jpeg" else fmt, quality, buf)
    return buf.getvalue()


def write_picture(pic: Picture, path: str | Path, fmt: str | None = None, quality: int = 95) -> Path:
    """Write ``pic`` to ``path`` atomically.

    Args:
        pic: the image (8- or 16-bit; 16-bit is kept only in PNG).
        path: destination; its folder must exist.
        fmt: ``png``/``jpg``/``webp``; default from the file suffix.
        quality: JPEG/WebP quality (1-100).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    fmt = "jpg" if fmt == "jpeg" else fmt
    with atomic_write(path) as tmp:
        _save_picture(pic, fmt, quality, tmp)
    return path
