"""Bad input never crashes `semsr upscale`: one line naming the file, non-zero exit, no partial output."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from _upscale_helpers import files_in, make_image, run_cli
from semsr.core.errors import InputError


def _one_line_error(err: str, path: Path, words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("semsr: error: ") and str(path) in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in err


def _zero_width_png(path: Path) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def _truncated_png(path: Path) -> Path:
    full = make_image(path, 64, 48).read_bytes()
    path.write_bytes(full[: len(full) * 6 // 10])
    return path


def _bad_files(folder: Path) -> dict[str, str]:
    """Create one file per kind of bad input; return {name: expected words in the error}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    _truncated_png(folder / "truncated.png")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    _zero_width_png(folder / "zero.png")
    frames = [Image.new("RGB", (8, 8), (60 * i, 0, 0)) for i in range(2)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    return {
        "empty.png": "empty",
        "truncated.png": "truncated",
        "text.jpg": "not a readable image",
        "zero.png": "",
        "anim.gif": "animated",
    }


@pytest.mark.parametrize("name", ["empty.png", "truncated.png", "text.jpg", "zero.png", "anim.gif"])
def test_single_bad_file_is_one_line_error_and_writes_nothing(tmp_path: Path, capsys, name: str) -> None:
    words = _bad_files(tmp_path / "in")[name]
    src = tmp_path / "in" / name
    rc, out, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "outdir", "-n", "bicubic")
    assert rc != 0
    _one_line_error(err, src, words)
    assert not (tmp_path / "outdir").exists()


def test_missing_path(tmp_path: Path, capsys) -> None:
    src = tmp_path / "nope.png"
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic")
    assert rc != 0
    _one_line_error(err, src, "no such file")


def test_glob_matching_nothing(tmp_path: Path, capsys) -> None:
    pattern = str(tmp_path / "*.png")
    rc, _, err = run_cli(capsys, "upscale", "-i", pattern, "-o", tmp_path / "o", "-n", "bicubic")
    assert rc != 0
    _one_line_error(err, Path(pattern), "no files match")


def test_empty_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    rc, _, err = run_cli(capsys, "upscale", "-i", tmp_path / "in", "-o", tmp_path / "o", "-n", "bicubic")
    assert rc != 0
    _one_line_error(err, tmp_path / "in", "no image files")


def test_max_pixels_guard_on_the_command_line(tmp_path: Path, capsys) -> None:
    src = make_image(tmp_path / "a.png", 20, 12)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--max-pixels", "200")
    assert rc != 0
    _one_line_error(err, src, "--max-pixels")
    rc, _, _ = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--max-pixels", "1M")
    assert rc == 0


def test_one_by_one_image_is_upscaled(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 100, 50)).save(src)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic")
    assert rc == 0, err
    with Image.open(tmp_path / "o" / "dot_out.png") as im:
        assert im.size == (4, 4) and im.getpixel((2, 2)) == (200, 100, 50)


def test_folder_mixing_good_and_bad_files(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    expected = _bad_files(folder)
    make_image(folder / "good1.png", 8, 6)
    make_image(folder / "good2.jpg", 7, 5, seed=1)
    report = tmp_path / "r.json"
    rc, out, err = run_cli(capsys, "upscale", "-i", folder, "-o", tmp_path / "o", "-n", "bicubic", "--json", report)
    assert rc != 0
    assert files_in(tmp_path / "o") == ["good1_out.png", "good2_out.jpg"]  # no partial or temporary files
    assert "done: 2 ok, 0 skipped, 5 failed" in out
    for name, words in expected.items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"failed: {folder / name}:"))
        assert words in line
        assert sum(str(folder / name) in ln for ln in err.splitlines()) == 1
    assert "Traceback" not in err
    statuses = {Path(r["input"]).name: r["status"] for r in json.loads(report.read_text())["results"]}
    assert statuses == {**{n: "failed" for n in expected}, "good1.png": "ok", "good2.jpg": "ok"}


def test_interrupted_write_leaves_no_partial_output(tmp_path: Path, capsys, monkeypatch) -> None:
    src = make_image(tmp_path / "a.png")

    def interrupted_save(self, fp, format=None, **kw):
        Path(fp).write_bytes(b"\x89PNG half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic")
    assert rc == 130 and "interrupted" in err
    assert files_in(tmp_path / "o") == []


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        run_cli(capsys, "--debug", "upscale", "-i", tmp_path / "empty.png", "-o", tmp_path / "o", "-n", "bicubic")
