"""Tests of the training corpus: manifest + prior cache, EET/RCC readers, crops, build-corpus."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr.cli import main
from semsr.core.errors import InputError
from semsr.data.corpus import sources as corpus_sources
from semsr.data.corpus.containers import EetFile, RccFile, eet_images, lz4_block_decompress
from semsr.data.corpus.crops import HRCropDataset, pad_to, sample_crop_boxes, texture_score
from semsr.data.corpus.manifest import Manifest, content_hash
from semsr.data.corpus.sources import Candidate, debian_licence, normalise_licence, rcc_credits_licence


def _jpeg(arr: np.ndarray, exif_orientation: int | None = None, quality: int = 95) -> bytes:
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip_and_prior_cache(tmp_path):
    path = tmp_path / "m.sqlite"
    arr = _photo(20, 30)
    key = content_hash(arr)
    assert key == content_hash(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0)
    assert key != content_hash(_photo(20, 30, seed=1))
    with Manifest(path) as m:
        m.add_image(
            path="a/x.png",
            content_hash=key,
            width=30,
            height=20,
            file_bytes=123,
            source="a",
            package="pkg",
            package_version="1.0-1",
            path_in_package="usr/share/x.edj",
            member="edje/images/3",
            source_bytes=456,
            licence="CC0-1.0",
            licence_origin="copyright",
            extra={"note": 1},
        )
        m.add_image(path="b/y.jpg", content_hash="h2", width=5, height=7, source="b", licence="GPL-2+")
        assert len(m) == 2 and key in m and "nope" not in m
        rec = m.get_image(key)
        assert (rec.path, rec.width, rec.height, rec.package, rec.member, rec.source_bytes, rec.licence) == (
            "a/x.png",
            30,
            20,
            "pkg",
            "edje/images/3",
            456,
            "CC0-1.0",
        )
        assert rec.extra == {"note": 1} and m.find_path("b/y.jpg").content_hash == "h2"
        assert [r.path for r in m.images(source="b")] == ["b/y.jpg"]
        # priors: JSON, arrays, tensors, bytes; versions are separate keys
        assert m.get_prior(key, "caption") is None
        m.put_prior(key, "caption", {"text": "a gradient", "score": 0.5})
        m.put_prior(key, "caption", "v2 caption", provider_version="v2")
        emb = np.arange(6, dtype=np.float32).reshape(2, 3)
        m.put_prior(key, "clip", emb, provider_version="ViT-L/14")
        m.put_prior(key, "tensor", torch.ones(4, dtype=torch.float16))
        m.put_prior(key, "raw", b"\x00\x01")
        assert m.get_prior(key, "caption") == {"text": "a gradient", "score": 0.5}
        assert m.get_prior(key, "caption", "v2") == "v2 caption"
        np.testing.assert_array_equal(m.get_prior(key, "clip", "ViT-L/14"), emb)
        assert m.get_prior(key, "clip") is None
        t = m.get_prior(key, "tensor")
        assert t.dtype == np.float16 and t.shape == (4,)
        assert m.get_prior(key, "raw") == b"\x00\x01"
        calls = []

        def compute():
            calls.append(1)
            return ["tag1", "tag2"]

        assert m.prior(key, "tags", compute, "ram-1") == ["tag1", "tag2"]
        assert m.prior(key, "tags", compute, "ram-1") == ["tag1", "tag2"]
        assert len(calls) == 1  # extracted once
        m.prior(key, "tags", compute, "ram-2")
        assert len(calls) == 2  # a new provider version is a new key
        assert ("tags", "ram-1") in m.prior_names(key)
        # the manifest is a PriorSink for the prior providers' on-disk cache
        from types import SimpleNamespace

        m.add_prior(
            SimpleNamespace(
                image_key=key, provider="canny", version="lo100-hi200", kind="spatial", path=tmp_path / "canny.npy"
            )
        )
        assert m.get_prior(key, "canny", "lo100-hi200")["path"] == str(tmp_path / "canny.npy")
        summary = m.summary()
        assert summary["images"] == 2 and summary["sources"]["a"]["licences"] == {"CC0-1.0": 1}
        assert summary["priors"]["tags@ram-1"] == 1
        # re-adding the same content replaces the row (content hash is the key)
        m.add_image(path="a/x2.png", content_hash=key, width=30, height=20, source="a", licence="CC0-1.0")
        assert len(m) == 2 and m.get_image(key).path == "a/x2.png"
    with Manifest(path, readonly=True) as m:  # persisted
        assert m.get_prior(key, "caption", "v2") == "v2 caption" and len(m) == 2


# ---------------------------------------------------------------- containers


def _eet_bytes(entries: list[tuple[str, bytes, int, int]]) -> bytes:
    """Build an EET v2 file: entries of (name, stored bytes, data_size, flags)."""
    n = len(entries)
    header_len = 12 + 24 * n
    names = b"".join(name.encode() + b"\0" for name, *_ in entries)
    names_off = header_len
    data_off = names_off + len(names)
    directory, blobs = b"", b""
    noff, doff = names_off, data_off
    for name, stored, dsize, flags in entries:
        directory += struct.pack(">6I", doff, len(stored), dsize, noff, len(name) + 1, flags)
        noff += len(name) + 1
        doff += len(stored)
        blobs += stored
    return struct.pack(">3I", 0x1EE70F42, n, 0) + directory + names + blobs


def test_lz4_block_decoder():
    # literals "abc", a 9-byte overlapping match at offset 3, then final literals "XYZ"
    block = bytes([0x35]) + b"abc" + bytes([3, 0]) + bytes([0x30]) + b"XYZ"
    assert lz4_block_decompress(block, 15) == b"abcabcabcabcXYZ"
    long_lit = bytes([0xF0, 5]) + bytes(range(20))
    assert lz4_block_decompress(long_lit, 20) == bytes(range(20))
    with pytest.raises(ValueError):
        lz4_block_decompress(block, 16)


def test_eet_reader_on_a_synthetic_edj(tmp_path):
    photo = _photo(24, 40)
    jpeg = _jpeg(photo)
    alpha_jpeg = _jpeg(np.full((24, 40, 3), 200, np.uint8))
    jpeg_alpha = struct.pack("<3I", 0xBEEFF00D, len(jpeg), len(alpha_jpeg)) + jpeg + alpha_jpeg
    w, h = 3, 2
    argb = np.array([[0xFF102030, 0x80FF0000, 0x00000000], [0xFFFFFFFF, 0xFF00FF00, 0xFF0000FF]], dtype="<u4")
    lossless = struct.pack("<8I", 0xAC1DFEED, w, h, 1, 9, 0, 0, 0) + zlib.compress(argb.tobytes())
    text = b"collections { group { name: bg; } }" * 3
    lz4 = bytes([0x35]) + b"abc" + bytes([3, 0]) + bytes([0x30]) + b"XYZ"
    entries = [
        ("edje/images/0", jpeg, len(jpeg), 0),
        ("edje/images/1", jpeg_alpha, len(jpeg_alpha), 0),
        ("edje/images/2", lossless, len(lossless), 0),
        ("edje/file", zlib.compress(text), len(text), 1 | (1 << 3)),  # zlib (compression type 1)
        ("edje/lz4", lz4, 15, 1 | (10 << 3)),  # LZ4 (type 10)
        ("edje/alias", b"edje/file\0", 10, 4),
    ]
    path = tmp_path / "tiny.edj"
    path.write_bytes(_eet_bytes(entries))
    eet = EetFile(path)
    assert eet.names() == [e[0] for e in entries]
    assert eet.read("edje/file") == text and eet.read("edje/alias") == text
    assert eet.read("edje/lz4") == b"abcabcabcabcXYZ"
    imgs = dict(eet_images(path))
    assert set(imgs) == {"edje/images/0", "edje/images/1", "edje/images/2"}
    assert imgs["edje/images/0"].jpeg == jpeg and imgs["edje/images/1"].jpeg == jpeg
    assert imgs["edje/images/1"].alpha_jpeg == alpha_jpeg
    decoded = np.asarray(Image.open(io.BytesIO(imgs["edje/images/0"].jpeg)))
    assert decoded.shape == photo.shape
    px = imgs["edje/images/2"].pixels
    assert px.shape == (2, 3, 4)
    assert tuple(px[0, 0]) == (0x10, 0x20, 0x30, 0xFF) and tuple(px[0, 1]) == (0xFF, 0, 0, 0x80)
    assert tuple(px[1, 2]) == (0, 0, 0xFF, 0xFF)
    with pytest.raises(InputError, match="no entry"):
        eet.read("missing")
    with pytest.raises(InputError, match="bad magic"):
        EetFile(b"\0" * 64)
    with pytest.raises(InputError, match="past the end"):
        EetFile(_eet_bytes(entries)[:-20])


def _rcc_bytes(version: int, files: dict[str, tuple[bytes, bool]]) -> bytes:
    """Build a Qt .rcc: ``files`` maps '/a/b.ext' -> (content, zlib-compress?)."""
    tree: dict = {}
    for p, v in files.items():
        node = tree
        parts = p.strip("/").split("/")
        for d in parts[:-1]:
            node = node.setdefault(d, {})
        node[parts[-1]] = v
    names, name_off = b"", {}

    def name_offset(n: str) -> int:
        nonlocal names
        if n not in name_off:
            name_off[n] = len(names)
            enc = n.encode("utf-16-be")
            names += struct.pack(">HI", len(n), zlib.crc32(n.encode())) + enc
        return name_off[n]

    # breadth-first numbering: children of each directory are contiguous
    nodes: list[tuple[str, object]] = [("", tree)]
    first_child: dict[int, int] = {}
    i = 0
    while i < len(nodes):
        _, val = nodes[i]
        if isinstance(val, dict):
            first_child[i] = len(nodes)
            nodes.extend(sorted(val.items()))
        i += 1
    data = b""
    node_size = 14 if version == 1 else 22
    tree_bytes = b""
    for idx, (n, val) in enumerate(nodes):
        noff = name_offset(n) if idx else 0
        if isinstance(val, dict):
            rec = struct.pack(">IHII", noff, 2, len(val), first_child[idx])
        else:
            content, compress = val
            payload = struct.pack(">I", len(content)) + zlib.compress(content) if compress else content
            rec = struct.pack(">IHHHI", noff, 1 if compress else 0, 0, 1, len(data))
            data += struct.pack(">I", len(payload)) + payload
        tree_bytes += rec + b"\0" * (node_size - len(rec))
    header_len = 24 if version >= 3 else 20
    tree_off = header_len
    data_off = tree_off + len(tree_bytes)
    names_off = data_off + len(data)
    header = b"qres" + struct.pack(">4I", version, tree_off, data_off, names_off)
    if version >= 3:
        header += struct.pack(">I", 0)
    return header + tree_bytes + data + names


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_reader_on_a_synthetic_archive(tmp_path, version):
    photo = _jpeg(_photo(16, 16))
    files = {
        "/gcompris/resource/sea1.jpg": (photo, False),
        "/gcompris/resource/README": (
            b"Copyright: someone\nLicense: CC-BY-SA 4.0\nFiles:\nkey.svg\n\n"
            b"Copyright: Ruthven\nLicense: CC0-1.0\nSource: https://example.org/x\n"
            b"Files:\nsea*.jpg\n",
            True,
        ),
        "/gcompris/qml/Main.qml": (b"import QtQuick 2.12\n", True),
        "/top.txt": (b"hello", False),
    }
    path = tmp_path / "tiny.rcc"
    path.write_bytes(_rcc_bytes(version, files))
    rcc = RccFile(path)
    assert rcc.version == version
    assert rcc.paths() == sorted(files)
    for p, (content, compressed) in files.items():
        assert rcc.read(p) == content
        assert rcc.entries[p].compression == ("zlib" if compressed else None)
    with pytest.raises(InputError, match="no file"):
        rcc.read("/nope")
    # per-file licences from a credits README inside the archive (GCompris style)
    lic, origin = rcc_credits_licence(rcc, "/gcompris/resource/sea1.jpg")
    assert lic == "CC0-1.0" and "Copyright: Ruthven" in origin.replace("copyright", "Copyright")
    assert rcc_credits_licence(rcc, "/top.txt") is None
    with pytest.raises(InputError, match="bad magic"):
        RccFile(b"qrez" + bytes(40))


# ---------------------------------------------------------------- licences, crops


def test_dep5_licence_matching(tmp_path):
    doc = tmp_path / "usr/share/doc/pkg"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: someone\nLicense: GPL-3+\n\n"
        "Files: src/activities/erase/resource/*.webp\n src/other/*\nCopyright: x\nLicense: CC-BY-SA-4.0\n\n"
        "Files: debian/*\nLicense: GPL-2+\n"
    )
    assert debian_licence(tmp_path, "pkg", "/gcompris/src/activities/erase/resource/gorilla.webp")[0] == "CC-BY-SA-4.0"
    lic, origin = debian_licence(tmp_path, "pkg", "usr/share/pkg/photo.jpg")
    assert lic == "GPL-3+" and "Files: *" in origin
    assert debian_licence(tmp_path, "missing", "x.jpg")[0] == "unknown"
    assert [normalise_licence(x) for x in ("Public domain", "CC-BY-SA 4.0", "CC-BY 2.0", "GPL-3+")] == [
        "public-domain",
        "CC-BY-SA-4.0",
        "CC-BY-2.0",
        "GPL-3+",
    ]


def test_texture_filter_avoids_flat_regions():
    flat = np.full((64, 64, 3), 120, np.uint8)
    textured = _photo(64, 64)
    assert texture_score(flat) == 0.0 and texture_score(textured) > 5
    img = np.concatenate([np.full((256, 256, 3), 90, np.uint8), _photo(256, 256)], axis=1)  # left half flat
    boxes = sample_crop_boxes(img, 64, count=40, rng=np.random.default_rng(0), min_texture=3.0)
    assert len(boxes) == 40
    assert all(left + 64 > 256 + 8 for _, left in boxes)  # never (almost) entirely flat
    unfiltered = sample_crop_boxes(img, 64, count=40, rng=np.random.default_rng(0), min_texture=0.0)
    assert sum(left + 64 <= 256 for _, left in unfiltered) >= 10  # without the filter many crops are flat
    assert boxes == sample_crop_boxes(img, 64, count=40, rng=np.random.default_rng(0), min_texture=3.0)
    # an entirely flat image still yields crops (the best candidates)
    assert len(sample_crop_boxes(np.zeros((80, 80, 3), np.uint8), 64, 3, np.random.default_rng(1))) == 3
    assert pad_to(np.zeros((10, 30, 3), np.uint8), 32).shape == (32, 32, 3)
    with pytest.raises(ValueError):
        sample_crop_boxes(np.zeros((10, 10, 3), np.uint8), 64)


def test_hr_crop_dataset_is_reproducible(tmp_path):
    for i in range(2):
        Image.fromarray(_photo(100, 140, seed=i)).save(tmp_path / f"{i}.png")
    Image.fromarray(_photo(40, 50, seed=5)).save(tmp_path / "small.png")
    ds = HRCropDataset(sorted(tmp_path.glob("*.png")), size=64, crops_per_image=2, seed=3)
    assert len(ds) == 6
    a, b = ds[1], ds[1]
    assert a["hr"].shape == (3, 64, 64) and torch.equal(a["hr"], b["hr"]) and a["box"] == b["box"]
    assert float(a["hr"].max()) <= 1.0
    assert ds[5]["hr"].shape == (3, 64, 64)  # smaller images are reflect-padded
    boxes0 = [ds[i]["box"] for i in range(4)]
    ds.set_epoch(1)
    assert [ds[i]["box"] for i in range(4)] != boxes0


# ---------------------------------------------------------------- build-corpus


def _fake_source(tmp_path: Path):
    rotated = _photo(30, 50, seed=2)
    plain = _jpeg(_photo(40, 60, seed=3))
    big = _photo(80, 120, seed=4)

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    def iterate(cache: Path):
        yield Candidate(
            "fake",
            "rotated",
            lambda: _jpeg(rotated, exif_orientation=6),
            "usr/share/fake/rot.jpg",
            1000,
            "CC0-1.0",
            "test",
            "fake-pkg",
            "1.0",
        )
        yield Candidate(
            "fake", "plain", lambda: plain, "usr/share/fake/plain.jpg", len(plain), "GPL-2+", "test", "fake-pkg", "1.0"
        )
        yield Candidate(
            "fake",
            "big",
            lambda: png(big),
            "usr/share/fake/c.rcc",
            2000,
            "GPL-3+",
            "test",
            "fake-pkg",
            "1.0",
            member="/res/big.webp",
            downscale=2,
        )

    return iterate, plain


def test_build_corpus_with_a_fake_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEMSR_DATA", str(tmp_path / "no-data"))  # no benchmark folder to hash
    iterate, plain = _fake_source(tmp_path)
    monkeypatch.setitem(corpus_sources.SOURCES, "fake", iterate)
    out = tmp_path / "corpus"
    assert (
        main(
            [
                "data",
                "build-corpus",
                "--out",
                str(out),
                "--sources",
                "fake",
                "--cache",
                str(tmp_path / "c"),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    assert (out / "fake/plain.jpg").read_bytes() == plain  # unchanged JPEG copied byte for byte
    with Image.open(out / "fake/rotated.png") as im:
        assert im.size == (30, 50)  # EXIF orientation 6 applied (portrait)
    with Image.open(out / "fake/big.png") as im:
        assert im.size == (60, 40)  # downscaled 2x
    with Manifest(out / "manifest.sqlite", readonly=True) as m:
        recs = {r.path: r for r in m.images()}
        assert set(recs) == {"fake/plain.jpg", "fake/rotated.png", "fake/big.png"}
        big = recs["fake/big.png"]
        assert (big.package, big.package_version, big.path_in_package, big.member, big.source_bytes) == (
            "fake-pkg",
            "1.0",
            "usr/share/fake/c.rcc",
            "/res/big.webp",
            2000,
        )
        assert big.licence == "GPL-3+" and big.extra["downscaled"] == 2
        assert recs["fake/rotated.png"].extra["exif_orientation_applied"] == 6
        assert big.file_bytes == (out / "fake/big.png").stat().st_size
        with Image.open(out / "fake/big.png") as im:
            assert big.content_hash == content_hash(np.asarray(im.convert("RGB")))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sources"]["fake"]["images"] == 3
    out_text = capsys.readouterr().out
    assert "fake: 3 added" in out_text and "fake" in out_text
    # a second run leaves everything in place; --max-side re-converts
    assert main(["data", "build-corpus", "--out", str(out), "--sources", "fake", "--cache", str(tmp_path / "c")]) == 0
    assert "0 added, 3 unchanged" in capsys.readouterr().out
    assert (
        main(
            [
                "data",
                "build-corpus",
                "--out",
                str(out),
                "--sources",
                "fake",
                "--cache",
                str(tmp_path / "c"),
                "--max-side",
                "32",
            ]
        )
        == 0
    )
    with Image.open(out / "fake/big.png") as im:
        assert max(im.size) == 32
    with Manifest(out / "manifest.sqlite", readonly=True) as m:
        assert len(m) == 3 and m.find_path("fake/big.png").width == 32  # no stale rows
    assert main(["data", "summary", str(out)]) == 0
    assert "total" in capsys.readouterr().out
    # textured crops with their own manifest, provenance inherited, reproducible
    crops = tmp_path / "crops"
    for _ in range(2):
        assert main(["data", "make-crops", str(out), "--out", str(crops), "--size", "16", "--per-image", "2"]) == 0
    with Manifest(crops / "manifest.sqlite", readonly=True) as cm, Manifest(out / "manifest.sqlite") as m:
        crecs = cm.images()
        assert len(crecs) == 6 and all((r.width, r.height) == (16, 16) for r in crecs)
        parent = m.get_image(crecs[0].extra["parent"])
        assert crecs[0].package == parent.package and crecs[0].licence == parent.licence
        top, left, size = crecs[0].extra["box"]
        with Image.open(out / parent.path) as im, Image.open(crops / crecs[0].path) as crop:
            full = np.asarray(im.convert("RGB"))
            np.testing.assert_array_equal(np.asarray(crop), full[top : top + size, left : left + size])
    assert main(["data", "build-corpus", "--out", str(out), "--sources", "nope"]) == 2


def test_build_corpus_refuses_benchmark_images(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    (root / "benchmarks" / "Set5").mkdir(parents=True)
    bench = _photo(24, 24, seed=9)
    Image.fromarray(bench).save(root / "benchmarks" / "Set5" / "baby.png")
    monkeypatch.setenv("SEMSR_DATA", str(root))

    def iterate(cache):
        buf = io.BytesIO()
        Image.fromarray(bench).save(buf, format="PNG")
        data = buf.getvalue()
        yield Candidate("fake", "copy", lambda: data, "x.png", len(data), "x", "test")

    monkeypatch.setitem(corpus_sources.SOURCES, "fake", iterate)
    out = tmp_path / "corpus"
    assert main(["data", "build-corpus", "--out", str(out), "--sources", "fake", "--cache", str(tmp_path / "c")]) == 0
    assert "refused fake/copy" in capsys.readouterr().out
    with Manifest(out / "manifest.sqlite", readonly=True) as m:
        assert len(m) == 0
    assert main(["data", "build-corpus", "--out", str(root / "benchmarks" / "x"), "--sources", "fake"]) == 2


@pytest.mark.slow
def test_build_corpus_downloads_a_real_debian_package(tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("needs apt-get and dpkg")
    out = tmp_path / "corpus"
    assert (
        main(["data", "build-corpus", "--out", str(out), "--sources", "palapeli", "--cache", str(tmp_path / "cache")])
        == 0
    )
    with Manifest(out / "manifest.sqlite", readonly=True) as m:
        recs = m.images()
        assert len(recs) == 5
        assert all(
            r.package == "palapeli-data" and r.path_in_package.startswith("usr/share/palapeli/collection/")
            for r in recs
        )
        assert {r.licence for r in recs} >= {"public-domain"}
        assert all(min(r.width, r.height) >= 600 for r in recs)
