"""Readers for the two container formats that hold photos in Debian packages.

**EET** (Enlightenment's ``.eet`` / ``.edj``), format version 2. Big-endian
32-bit integers::

    header      magic 0x1ee70f42, n_entries, n_dictionary
    directory   n_entries x (offset, size, data_size, name_offset, name_size, flags)
    dictionary  n_dictionary x (hash, offset, size, prev, next)   (strings of eet data, unused here)
    ...         entry names (NUL-terminated) and entry data at the given offsets

``flags``: bit 0 compressed, bit 1 ciphered, bit 2 alias (the data is the
name of another entry), bits 3.. compression type (10, 11: LZ4 block;
otherwise zlib). ``size`` is the stored size, ``data_size`` the decompressed
one. Edje themes store images as entries ``edje/images/<n>`` in Eet's image
encodings: a plain JPEG stream (lossy, no alpha); ``0xbeeff00d`` + two sizes +
colour JPEG + alpha JPEG (lossy with alpha); or ``0xac1dfeed`` + width,
height, alpha, compression, ... + ARGB32 pixels, zlib-compressed when
compression > 0 (lossless). Those headers are little-endian.

**Qt RCC** (``.rcc`` resource archives), versions 1-3. Big-endian::

    "qres", version, tree_offset, data_offset, names_offset, [v3: overall flags]
    tree   nodes of 14 bytes (v1) or 22 bytes (v2+, + 8-byte mtime):
           name_offset(4) flags(2) then
             directory: child_count(4) first_child(4)
             file:      country(2) language(2) data_offset(4)
    names  length(2) hash(4) UTF-16BE name
    data   length(4) payload; zlib-flagged payloads are qCompress'ed
           (4-byte big-endian uncompressed length + zlib stream)

Node flags: 1 zlib-compressed, 2 directory, 4 zstd-compressed.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semsr.core.errors import InputError, UnavailableError

EET_MAGIC_FILE2 = 0x1EE70F42
EET_IMAGE_LOSSLESS = 0xAC1DFEED
EET_IMAGE_JPEG_ALPHA = 0xBEEFF00D
_EET_LZ4_TYPES = (10, 11)

RCC_MAGIC = b"qres"
RCC_COMPRESSED = 0x01
RCC_DIRECTORY = 0x02
RCC_COMPRESSED_ZSTD = 0x04


def _load(source: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as err:
        raise InputError(f"cannot read container ({err.strerror})", path) from None


def lz4_block_decompress(src: bytes, size: int) -> bytes:
    """Decompress one raw LZ4 block whose decompressed ``size`` is known."""
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        out += src[i : i + lit]
        i += lit
        if i >= n:  # the last sequence has literals only
            break
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        if offset == 0 or offset > len(out):
            raise ValueError("corrupt LZ4 block (bad match offset)")
        mlen = token & 15
        if mlen == 15:
            while True:
                b = src[i]
                i += 1
                mlen += b
                if b != 255:
                    break
        mlen += 4
        start = len(out) - offset
        if offset >= mlen:
            out += out[start : start + mlen]
        else:  # overlapping copy repeats the last `offset` bytes
            for k in range(mlen):
                out.append(out[start + k])
    if len(out) != size:
        raise ValueError(f"LZ4 block decompressed to {len(out)} bytes, expected {size}")
    return bytes(out)


# ----------------------------------------------------------------------------- EET


@dataclass(frozen=True)
class EetEntry:
    """One directory entry of an EET file."""

    name: str
    offset: int
    size: int
    data_size: int
    compressed: bool
    ciphered: bool
    alias: bool
    compression_type: int


class EetFile:
    """Read-only view of an EET (``.eet``/``.edj``) file.

    Args:
        source: file path or the file's bytes.
    """

    def __init__(self, source: str | Path | bytes) -> None:
        self.data, self.name = _load(source)
        self.entries: dict[str, EetEntry] = {}
        self._parse()

    def _fail(self, why: str) -> InputError:
        return InputError(f"not a valid EET file ({why})", self.name)

    def _parse(self) -> None:
        d = self.data
        if len(d) < 12:
            raise self._fail("too short")
        magic, n_entries, n_dict = struct.unpack_from(">3I", d, 0)
        if magic != EET_MAGIC_FILE2:
            raise self._fail(f"bad magic 0x{magic:08x}")
        if 12 + 24 * n_entries + 20 * n_dict > len(d):
            raise self._fail("directory larger than the file")
        for i in range(n_entries):
            off, size, dsize, noff, nsize, flags = struct.unpack_from(">6I", d, 12 + 24 * i)
            if nsize == 0 or noff + nsize > len(d) or d[noff + nsize - 1] != 0:
                raise self._fail(f"bad name of entry {i}")
            if off + size > len(d):
                raise self._fail(f"entry {i} extends past the end")
            name = d[noff : noff + nsize - 1].decode("utf-8", errors="replace")
            self.entries[name] = EetEntry(
                name, off, size, dsize, bool(flags & 1), bool(flags & 2), bool(flags & 4), (flags >> 3) & 0xFF
            )

    def names(self) -> list[str]:
        """Entry names in directory order."""
        return list(self.entries)

    def read(self, name: str, _depth: int = 0) -> bytes:
        """The decoded data of entry ``name`` (decompressed, aliases followed)."""
        try:
            e = self.entries[name]
        except KeyError:
            raise InputError(f"no entry {name!r} in EET file", self.name) from None
        if e.ciphered:
            raise UnavailableError(f"entry {name!r} is encrypted", self.name)
        raw = self.data[e.offset : e.offset + e.size]
        if e.compressed:
            try:
                if e.compression_type in _EET_LZ4_TYPES:
                    raw = lz4_block_decompress(raw, e.data_size)
                else:
                    raw = zlib.decompress(raw)
            except (ValueError, IndexError, zlib.error) as err:
                raise InputError(f"cannot decompress entry {name!r} ({err})", self.name) from None
        if e.alias:
            if _depth > 8:
                raise self._fail("alias loop")
            return self.read(raw.rstrip(b"\0").decode("utf-8"), _depth + 1)
        return raw


@dataclass(frozen=True)
class EetImage:
    """An image stored in an EET entry.

    ``encoding`` is ``"jpeg"`` (``jpeg`` holds the colour stream; ``alpha_jpeg``
    the alpha plane for lossy images with alpha) or ``"lossless"`` (``pixels``
    is ``(H, W, 4)`` uint8 RGBA).
    """

    encoding: str
    jpeg: bytes | None = None
    alpha_jpeg: bytes | None = None
    pixels: np.ndarray | None = None


def decode_eet_image(data: bytes) -> EetImage | None:
    """Decode Eet's image encodings; ``None`` for data that is not one of them."""
    if data[:3] == b"\xff\xd8\xff":
        return EetImage("jpeg", jpeg=data)
    if len(data) >= 12:
        magic = struct.unpack_from("<I", data, 0)[0]
        if magic == EET_IMAGE_JPEG_ALPHA:
            s1, s2 = struct.unpack_from("<2I", data, 4)
            if 12 + s1 + s2 <= len(data) and data[12:15] == b"\xff\xd8\xff":
                return EetImage("jpeg", jpeg=data[12 : 12 + s1], alpha_jpeg=data[12 + s1 : 12 + s1 + s2] or None)
        if magic == EET_IMAGE_LOSSLESS and len(data) >= 32:
            _, w, h, _alpha, compress = struct.unpack_from("<5I", data, 0)
            payload = data[32:]
            if compress:
                payload = zlib.decompress(payload)
            if len(payload) != 4 * w * h:
                raise ValueError(f"lossless EET image: {len(payload)} bytes for {w}x{h}")
            argb = np.frombuffer(payload, dtype="<u4").reshape(h, w)
            rgba = np.stack([(argb >> 16) & 255, (argb >> 8) & 255, argb & 255, argb >> 24], axis=-1)
            return EetImage("lossless", pixels=rgba.astype(np.uint8))
    return None


def eet_images(source: str | Path | bytes, prefix: str = "edje/images/") -> Iterator[tuple[str, EetImage]]:
    """Yield ``(entry name, image)`` for every decodable image entry under ``prefix``."""
    eet = source if isinstance(source, EetFile) else EetFile(source)
    for name in eet.names():
        if name.startswith(prefix):
            img = decode_eet_image(eet.read(name))
            if img is not None:
                yield name, img


# ----------------------------------------------------------------------------- RCC


@dataclass(frozen=True)
class RccEntry:
    """One file in a Qt resource archive (``path`` starts with ``/``)."""

    path: str
    data_offset: int
    flags: int
    country: int
    language: int

    @property
    def compression(self) -> str | None:
        if self.flags & RCC_COMPRESSED_ZSTD:
            return "zstd"
        if self.flags & RCC_COMPRESSED:
            return "zlib"
        return None


class RccFile:
    """Read-only view of a Qt ``.rcc`` binary resource archive.

    Args:
        source: file path or the file's bytes.
    """

    def __init__(self, source: str | Path | bytes) -> None:
        self.data, self.name = _load(source)
        self.entries: dict[str, RccEntry] = {}
        self._parse()

    def _fail(self, why: str) -> InputError:
        return InputError(f"not a valid Qt resource file ({why})", self.name)

    def _name(self, offset: int) -> str:
        base = self.names_offset + offset
        if base + 6 > len(self.data):
            raise self._fail("name offset out of range")
        (n,) = struct.unpack_from(">H", self.data, base)
        return self.data[base + 6 : base + 6 + 2 * n].decode("utf-16-be")

    def _parse(self) -> None:
        d = self.data
        if len(d) < 20 or d[:4] != RCC_MAGIC:
            raise self._fail("bad magic")
        self.version, self.tree_offset, self.data_offset, self.names_offset = struct.unpack_from(">4I", d, 4)
        if self.version not in (1, 2, 3):
            raise self._fail(f"unsupported version {self.version}")
        self.node_size = 14 if self.version == 1 else 22
        for off in (self.tree_offset, self.data_offset, self.names_offset):
            if off > len(d):
                raise self._fail("section offset past the end")
        stack = [(0, "")]
        seen = set()
        while stack:
            node, parent = stack.pop()
            if node in seen:
                raise self._fail("cycle in the resource tree")
            seen.add(node)
            base = self.tree_offset + node * self.node_size
            if base + 14 > len(d):
                raise self._fail("tree node out of range")
            name_off, flags = struct.unpack_from(">IH", d, base)
            path = parent if node == 0 else f"{parent}/{self._name(name_off)}"
            if flags & RCC_DIRECTORY:
                count, first = struct.unpack_from(">II", d, base + 6)
                stack.extend((first + k, path) for k in range(count))
            else:
                country, language, doff = struct.unpack_from(">HHI", d, base + 6)
                self.entries[path] = RccEntry(path, doff, flags, country, language)

    def paths(self) -> list[str]:
        """All file paths, sorted."""
        return sorted(self.entries)

    def read(self, path: str) -> bytes:
        """The (decompressed) content of the file at ``path``."""
        try:
            e = self.entries[path]
        except KeyError:
            raise InputError(f"no file {path!r} in resource archive", self.name) from None
        base = self.data_offset + e.data_offset
        if base + 4 > len(self.data):
            raise self._fail(f"data of {path!r} out of range")
        (n,) = struct.unpack_from(">I", self.data, base)
        payload = self.data[base + 4 : base + 4 + n]
        if len(payload) != n:
            raise self._fail(f"data of {path!r} truncated")
        if e.compression == "zlib":
            try:
                return zlib.decompress(payload[4:])
            except zlib.error as err:
                raise InputError(f"cannot decompress {path!r} ({err})", self.name) from None
        if e.compression == "zstd":
            try:
                import zstandard  # optional dependency (zstd-compressed members only)
            except ImportError:
                raise UnavailableError(
                    f"{path!r} is zstd-compressed; `pip install zstandard` to read it", self.name
                ) from None
            return zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 30)
        return payload
