"""``semsr upscale`` and ``semsr.upscale``: outputs, naming, scales, skip/overwrite, reports, options."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import semsr
from semsr import api
from semsr.core.errors import SemsrError
from semsr.methods import MethodSpec, _REGISTRY, get_method, register

from _upscale_helpers import files_in, make_image, run_cli


# ---------------------------------------------------------------- a test-only method with options


class Recorder:
    """Nearest-neighbour 2x method that records its build and run options."""

    scale = 2
    tiles_itself = False
    calls: list[dict[str, Any]] = []

    def __init__(self, name: str, build: dict[str, Any]) -> None:
        self.name = name
        self.build = build

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        Recorder.calls.append({"build": self.build, "run": run_opts})
        return F.interpolate(x, scale_factor=2, mode="nearest")


def _recorder_factory(device: str = "cpu", dtype: Any = None, threads: Any = None,
                      test_weights: str | None = None) -> Recorder:
    return Recorder("test-recorder", {"device": device, "dtype": dtype, "test_weights": test_weights})


@pytest.fixture
def recorder():
    spec = register(MethodSpec(
        "test-recorder", _recorder_factory, 2, "test only",
        extra={"cli_options": [
            {"flags": ["--test-weights"], "target": "build", "help": "weights folder"},
            {"flags": ["--test-strength"], "type": float, "help": "a run option"},
        ]},
    ))
    Recorder.calls = []
    api.clear_cache()
    yield spec
    _REGISTRY.pop("test-recorder", None)
    api.clear_cache()


# ---------------------------------------------------------------- the basics


def test_writes_one_4x_image_and_prints_where(tmp_path: Path, capsys) -> None:
    src = make_image(tmp_path / "img.png", 20, 12)
    out_dir = tmp_path / "outdir"
    rc, out, err = run_cli(capsys, "upscale", "-i", src, "-o", out_dir, "--method", "bicubic")
    assert rc == 0, err
    assert files_in(out_dir) == ["img_out.png"]
    with Image.open(out_dir / "img_out.png") as im:
        assert im.size == (80, 48) and im.mode == "RGB"
    assert str(out_dir / "img_out.png") in out


def test_bicubic_output_is_matlab_imresize(tmp_path: Path, capsys) -> None:
    from semsr.ops.imresize import imresize_np

    src = make_image(tmp_path / "m.png", 9, 7)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path, "-n", "bicubic", "-t", "4", "--tile-pad", "3")
    assert rc == 0, err
    expected = imresize_np(np.asarray(Image.open(src)), scale=4)
    got = np.asarray(Image.open(tmp_path / "m_out.png"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("outscale,size", [("3.5", (116, 74)), ("1.3", (43, 27)), ("0.5", (17, 11)), ("4", (132, 84))])
def test_outscale_gives_the_exact_size(tmp_path: Path, capsys, outscale: str, size: tuple[int, int]) -> None:
    src = make_image(tmp_path / "s.png", 33, 21)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "-s", outscale)
    assert rc == 0, err
    with Image.open(tmp_path / "o" / "s_out.png") as im:
        assert im.size == size


def test_skip_existing_then_overwrite(tmp_path: Path, capsys) -> None:
    src = make_image(tmp_path / "a.png")
    args = ["upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic"]
    assert run_cli(capsys, *args)[0] == 0
    target = tmp_path / "o" / "a_out.png"
    target.write_bytes(b"sentinel")
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and "skipped" in out and "--overwrite" in out
    assert target.read_bytes() == b"sentinel"
    rc, out, _ = run_cli(capsys, *args, "--overwrite")
    assert rc == 0 and "wrote" in out
    with Image.open(target) as im:
        assert im.size == (80, 48)


def test_json_report(tmp_path: Path, capsys) -> None:
    good = make_image(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"")
    report = tmp_path / "rep" / "report.json"
    rc, _, _ = run_cli(capsys, "upscale", "-i", tmp_path / "in", "-o", tmp_path / "o", "-n", "bicubic", "--json", report)
    assert rc == 1
    data = json.loads(report.read_text())
    assert data["method"] == "bicubic" and data["summary"] == {"ok": 1, "skipped": 0, "failed": 1}
    by_name = {Path(r["input"]).name: r for r in data["results"]}
    ok, bad = by_name["good.png"], by_name["bad.png"]
    assert ok["status"] == "ok" and ok["output"] == str(tmp_path / "o" / "good_out.png") and ok["error"] is None
    assert ok["seconds"] >= 0 and ok["peak_rss_mb"] > 10
    assert bad["status"] == "failed" and bad["output"] is None and "empty" in bad["error"]
    assert set(ok) == {"input", "output", "status", "error", "seconds", "peak_rss_mb"}
    # a second run reports the existing output as skipped
    run_cli(capsys, "upscale", "-i", good, "-o", tmp_path / "o", "-n", "bicubic", "--json", report)
    assert json.loads(report.read_text())["results"][0]["status"] == "skipped"


def test_suffix_ext_glob_and_folder(tmp_path: Path, capsys) -> None:
    make_image(tmp_path / "in" / "a.png")
    make_image(tmp_path / "in" / "b.jpg")
    (tmp_path / "in" / "notes.txt").write_text("not an image, not picked from a folder")
    rc, _, err = run_cli(capsys, "upscale", "-i", str(tmp_path / "in" / "*.png"), "-o", tmp_path / "g",
                         "-n", "bicubic", "--suffix", "", "--ext", "webp")
    assert rc == 0, err
    assert files_in(tmp_path / "g") == ["a.webp"]
    rc, out, err = run_cli(capsys, "upscale", "-i", tmp_path / "in", "-o", tmp_path / "f", "-n", "bicubic", "--suffix", "x4")
    assert rc == 0, err
    assert files_in(tmp_path / "f") == ["a_x4.png", "b_x4.jpg"]  # --ext auto keeps the format
    assert "done: 2 ok, 0 skipped, 0 failed" in out
    assert "img/s" not in err and "img]" not in err  # not a terminal: no bar
    rc, out, err = run_cli(capsys, "upscale", "-i", tmp_path / "in", "-o", tmp_path / "n", "-n", "bicubic",
                           "--no-progress")
    assert rc == 0 and "done: 2 ok" in out
    assert "img/s" not in err and "img]" not in err  # --no-progress: never a bar


def test_rgba_with_ext_jpg_is_written_as_png(tmp_path: Path, capsys) -> None:
    src = make_image(tmp_path / "t.png", mode="RGBA")
    rc, out, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--ext", "jpg")
    assert rc == 0
    assert files_in(tmp_path / "o") == ["t_out.png"]
    assert "JPEG cannot store alpha" in err


def test_output_may_not_replace_the_input(tmp_path: Path, capsys) -> None:
    src = make_image(tmp_path / "same.png")
    before = src.read_bytes()
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path, "-n", "bicubic", "--suffix", "", "--overwrite")
    assert rc != 0 and "overwrite the input" in err
    assert src.read_bytes() == before


def test_unknown_method_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    src = make_image(tmp_path / "a.png")
    rc, out, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "no-such-method")
    assert rc != 0 and err.count("\n") == 1 and "unknown method" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- options reach the method


def test_method_cli_options_and_generic_options_are_forwarded(tmp_path: Path, capsys, recorder) -> None:
    src = make_image(tmp_path / "a.png", 6, 4)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-recorder",
                         "--test-weights", "/w", "--test-strength", "0.7", "--prompt", "a cat",
                         "--color-fix", "wavelet", "--seed", "3", "--dtype", "bf16", "--tile", "0")
    assert rc == 0, err
    call = Recorder.calls[-1]
    assert call["build"] == {"device": "cpu", "dtype": torch.bfloat16, "test_weights": "/w"}
    assert call["run"] == {"test_strength": 0.7, "prompt": "a cat", "colour_fix": "wavelet", "seed": 3}


def test_options_not_given_are_not_forwarded(tmp_path: Path, capsys, recorder) -> None:
    src = make_image(tmp_path / "a.png", 6, 4)
    assert run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-recorder", "--fp32")[0] == 0
    call = Recorder.calls[-1]
    assert call["run"] == {} and call["build"]["test_weights"] is None and call["build"]["dtype"] == torch.float32


def test_method_options_show_in_help(capsys, recorder) -> None:
    with pytest.raises(SystemExit):
        run_cli(capsys, "upscale", "--help")
    out = capsys.readouterr().out
    assert "options of test-recorder" in out and "--test-strength" in out and "--colour-fix" in out


def test_path_option_a_method_does_not_take_is_refused_or_ignored(tmp_path: Path, capsys, recorder) -> None:
    src = make_image(tmp_path / "a.png", 6, 4)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-recorder",
                         "--controlnet", "/c")
    assert rc == 0 and "does not take option 'controlnet'" in err


# ---------------------------------------------------------------- Python API


def test_api_accepts_path_pil_and_numpy(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.png", 10, 6)
    from_path = semsr.upscale(src, model="bicubic")
    assert isinstance(from_path, Image.Image) and from_path.size == (40, 24)
    from_pil = semsr.upscale(Image.open(src), model="bicubic", outscale=3.5)
    assert from_pil.size == (35, 21)
    from_np = semsr.upscale(np.asarray(Image.open(src)), model="bicubic", tile=4)
    np.testing.assert_array_equal(np.asarray(from_np), np.asarray(from_path))
    grey = semsr.upscale(np.zeros((5, 5), np.uint8), model="bicubic")
    assert grey.mode == "L" and grey.size == (20, 20)
    rgba = semsr.upscale(Image.open(make_image(tmp_path / "t.png", mode="RGBA")), model="bicubic")
    assert rgba.mode == "RGBA"


def test_api_caches_built_methods(recorder) -> None:
    first = semsr.load("test-recorder", test_weights="/a")
    assert semsr.load("test-recorder", test_weights="/a") is first
    assert semsr.load("test-recorder", test_weights="/b") is not first


def test_api_splits_build_and_run_options(recorder) -> None:
    semsr.upscale(np.zeros((3, 3, 3), np.uint8), model="test-recorder", test_weights="/w", prompt="p", steps=5)
    call = Recorder.calls[-1]
    assert call["build"]["test_weights"] == "/w"
    assert call["run"] == {"prompt": "p", "steps": 5}


def test_api_bad_input_raises_semsr_error(tmp_path: Path) -> None:
    with pytest.raises(SemsrError, match="no such file"):
        semsr.upscale(tmp_path / "missing.png", model="bicubic")


# ---------------------------------------------------------------- the real default


def test_default_method_on_a_tiny_image(tmp_path: Path) -> None:
    """Acceptance: `semsr upscale -i img.png -o outdir` with the bundled default writes one 4x image."""
    try:
        method = get_method("default")
    except SemsrError as err:
        pytest.skip(f"default method unavailable: {err}")
    assert method.scale == 4
    with Image.open(semsr.core.paths.assets_dir() / "sample.png") as im:
        im.convert("RGB").crop((64, 64, 96, 96)).save(tmp_path / "img.png")
    res = subprocess.run([sys.executable, "-m", "semsr", "upscale", "-i", str(tmp_path / "img.png"),
                          "-o", str(tmp_path / "outdir")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert files_in(tmp_path / "outdir") == ["img_out.png"]
    assert str(tmp_path / "outdir" / "img_out.png") in res.stdout
    with Image.open(tmp_path / "outdir" / "img_out.png") as im:
        assert im.size == (128, 128)
        out = np.asarray(im).astype(float)
    # not a blank or a copy: close to the input at low resolution
    lr = np.asarray(Image.open(tmp_path / "img.png")).astype(float)
    down = np.asarray(Image.fromarray(out.astype(np.uint8)).resize((32, 32), Image.BICUBIC)).astype(float)
    assert np.abs(down - lr).mean() < 12


# ---------------------------------------------------------------- README and CI stay in step


def test_readme_quick_start_has_two_commands_and_ci_runs_the_test_one() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```bash\n")[1:]
    commands = [ln for b in blocks for ln in b.split("```", 1)[0].splitlines() if ln.strip()]
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    sample = install_and_run.split("-i ", 1)[1].split()[0]
    assert "semsr upscale" in install_and_run and (root / sample).is_file()
    ci = [ln for ln in (root / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert install_and_test in ci and "pytest" in install_and_test
