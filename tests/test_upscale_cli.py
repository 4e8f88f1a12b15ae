"""``semsr upscale`` and ``semsr.upscale``: outputs, naming, scales, skip/overwrite, reports, options."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import semsr
from _upscale_helpers import files_in, make_image, run_cli
from semsr import api
from semsr.commands.upscale import parse_method_options
from semsr.core import machine
from semsr.core.errors import SemsrError
from semsr.core.options import MethodOptions, OptionError, option
from semsr.core.outputs import SROutput
from semsr.eval.runner import BenchConfig, plan_methods
from semsr.methods import REGISTRY, MethodSpec, build, register, resolve
from semsr.ui.server import DemoApp

# ---------------------------------------------------------------- a test-only method with options


@dataclass(kw_only=True, frozen=True)
class RecorderOptions(MethodOptions):
    """Options of ``test-recorder``: a build path, run options of each kind, switches."""

    test_weights: Path | None = option(None, stage="build", metavar="DIR", help="weights folder")
    test_strength: float = option(0.5, min=0, max=1, help="a run option")
    prompt: str = option("", help="positive prompt")
    seed: int = option(0, min=0, help="seed")
    colour_fix: str = option("adain", choices=("adain", "wavelet", "none"), flags=("--color-fix",), help="colour")
    labels: tuple[str, ...] = option((), help="a list")
    temps: dict[str, float] | None = option(None, help="per-name numbers")
    sharpen: bool = option(False, help="a switch")
    start_from_lr: bool = option(True, help="a switch that is on by default")
    save_reference: bool = option(False, help="write the reference beside the output")


class Recorder:
    """Nearest-neighbour 2x method that records its build and run options; returns a side image."""

    name = "test-recorder"
    scale = 2
    tiles_itself = False
    calls: list[dict[str, Any]] = []

    def __init__(self, options: RecorderOptions) -> None:
        self.build = options

    def __call__(self, x: torch.Tensor, options: RecorderOptions | None = None, *, progress: Any = False) -> SROutput:
        Recorder.calls.append({"build": self.build, "run": options})
        return SROutput(
            F.interpolate(x, scale_factor=2, mode="nearest"), side_images={"reference": torch.full((1, 3, 5, 6), 0.5)}
        )


@pytest.fixture
def recorder():
    spec = register(MethodSpec("test-recorder", Recorder, RecorderOptions, 2, "test only"))
    Recorder.calls = []
    api.clear_cache()
    yield spec
    REGISTRY.entries.pop("test-recorder", None)
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
    rc, _, _ = run_cli(
        capsys, "upscale", "-i", tmp_path / "in", "-o", tmp_path / "o", "-n", "bicubic", "--json", report
    )
    assert rc == 1
    data = json.loads(report.read_text())
    assert data["method"] == "bicubic" and data["summary"] == {"ok": 1, "skipped": 0, "failed": 1, "not_run": 0}
    by_name = {Path(r["input"]).name: r for r in data["results"]}
    ok, bad = by_name["good.png"], by_name["bad.png"]
    assert ok["status"] == "ok" and ok["output"] == str(tmp_path / "o" / "good_out.png") and ok["error"] is None
    assert ok["seconds"] >= 0 and ok["peak_rss_mb"] > 10
    assert bad["status"] == "failed" and bad["output"] is None and "empty" in bad["error"]
    assert set(ok) == {"input", "output", "status", "error", "seconds", "peak_rss_mb", "stages"}
    assert set(ok["stages"]) >= {"write"} and bad["stages"] is None
    assert data["load_seconds"] >= 0  # building the method, apart from the per-input seconds
    # a second run reports the existing output as skipped
    run_cli(capsys, "upscale", "-i", good, "-o", tmp_path / "o", "-n", "bicubic", "--json", report)
    assert json.loads(report.read_text())["results"][0]["status"] == "skipped"


def test_suffix_ext_glob_and_folder(tmp_path: Path, capsys) -> None:
    make_image(tmp_path / "in" / "a.png")
    make_image(tmp_path / "in" / "b.jpg")
    (tmp_path / "in" / "notes.txt").write_text("not an image, not picked from a folder")
    rc, _, err = run_cli(
        capsys,
        "upscale",
        "-i",
        str(tmp_path / "in" / "*.png"),
        "-o",
        tmp_path / "g",
        "-n",
        "bicubic",
        "--suffix",
        "",
        "--ext",
        "webp",
    )
    assert rc == 0, err
    assert files_in(tmp_path / "g") == ["a.webp"]
    rc, out, err = run_cli(
        capsys, "upscale", "-i", tmp_path / "in", "-o", tmp_path / "f", "-n", "bicubic", "--suffix", "x4"
    )
    assert rc == 0, err
    assert files_in(tmp_path / "f") == ["a_x4.png", "b_x4.jpg"]  # --ext auto keeps the format
    assert "done: 2 ok, 0 skipped, 0 failed" in out
    assert "img/s" not in err and "img]" not in err  # not a terminal: no bar
    rc, out, err = run_cli(
        capsys, "upscale", "-i", tmp_path / "in", "-o", tmp_path / "n", "-n", "bicubic", "--no-progress"
    )
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


def test_method_options_are_parsed_by_its_options_class(tmp_path: Path, capsys, recorder) -> None:
    src = make_image(tmp_path / "a.png", 6, 4)
    rc, out, err = run_cli(
        capsys,
        "upscale",
        "-i",
        src,
        "-o",
        tmp_path / "o",
        "-n",
        "test-recorder",
        "--test-weights",
        "/w",
        "--test-strength",
        "0.7",
        "--prompt",
        "a cat",
        "--color-fix",
        "wavelet",
        "--seed",
        "3",
        "--dtype",
        "bf16",
        "-t",
        "0",
        "--sharpen",
        "--no-start-from-lr",
        "--labels",
        "a,b",
        "--temps",
        "depth=0.5",
    )
    assert rc == 0, err
    call = Recorder.calls[-1]
    assert call["build"] == call["run"]  # one options object: built with its build part, called with all of it
    assert call["run"] == RecorderOptions(
        test_weights=Path("/w"),
        test_strength=0.7,
        prompt="a cat",
        colour_fix="wavelet",
        seed=3,
        dtype="bf16",
        tile=0,
        sharpen=True,
        start_from_lr=False,
        labels=("a", "b"),
        temps={"depth": 0.5},
    )
    assert files_in(tmp_path / "o") == ["a_out.png"]  # no --save-reference: no side image


def test_options_not_given_keep_their_defaults(tmp_path: Path, capsys, recorder) -> None:
    src = make_image(tmp_path / "a.png", 6, 4)
    assert run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-recorder", "--fp32")[0] == 0
    assert Recorder.calls[-1]["run"] == RecorderOptions(dtype="fp32")
    rc, _, err = run_cli(
        capsys,
        "upscale",
        "-i",
        src,
        "-o",
        tmp_path / "o",
        "-n",
        "test-recorder",
        "--fp32",
        "--dtype",
        "bf16",
        "--overwrite",
    )
    assert rc == 0, err
    assert Recorder.calls[-1]["run"].dtype == "bf16"  # --dtype wins over --fp32


def test_dtype_auto_is_the_default_and_reported(tmp_path: Path, capsys, recorder, monkeypatch) -> None:
    monkeypatch.delenv("SEMSR_DTYPE", raising=False)
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512_bf16"})
    src = make_image(tmp_path / "a.png", 6, 4)
    assert run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-recorder")[0] == 0
    assert Recorder.calls[-1]["run"].dtype == "auto"
    rep = tmp_path / "r.json"
    args = ("upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-recorder", "--overwrite", "--json", rep)
    assert run_cli(capsys, *args, "--dtype", "auto")[0] == 0
    assert Recorder.calls[-1]["run"].dtype == "auto"
    precision = json.loads(rep.read_text())["precision"]
    assert precision == {"dtype_requested": "auto", "dtype": "bf16", "dtype_reason": precision["dtype_reason"]}
    assert "native bf16" in precision["dtype_reason"]


def test_save_reference_writes_the_side_images(tmp_path: Path, capsys, recorder) -> None:
    src = make_image(tmp_path / "a.png", 6, 4)
    rc, out, err = run_cli(
        capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-recorder", "--save-reference"
    )
    assert rc == 0, err
    assert files_in(tmp_path / "o") == ["a_out.png", "a_out_reference.png"]
    assert str(tmp_path / "o" / "a_out_reference.png") in out
    with Image.open(tmp_path / "o" / "a_out_reference.png") as im:
        assert im.size == (6, 5)


def test_unknown_option_is_one_line_naming_the_closest(tmp_path: Path, capsys) -> None:
    src = make_image(tmp_path / "a.png")
    rc, out, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--steps", "3")
    near = resolve("bicubic").parse  # the one message of the options parser, in flag style
    with pytest.raises(OptionError) as expected:
        near({"steps": 3}, style="flag")
    assert rc == 2 and err == f"semsr: error: {expected.value}\n"
    assert err.startswith("semsr: error: method 'bicubic' has no option --steps; did you mean --")
    assert not (tmp_path / "o").exists()
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "sd-controlnet", "--setps", "3")
    assert rc == 2 and err == "semsr: error: method 'sd-controlnet' has no option --setps; did you mean --steps?\n"
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--tile=abc")
    assert rc == 2 and err == "semsr: error: option --tile: expected an integer, got 'abc'\n"
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--scale", "0")
    assert rc == 2 and err.count("\n") == 1 and "option scale: must be > 0" in err
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--tile")
    assert rc == 2 and err.count("\n") == 1 and "--tile" in err and "expected one argument" in err


def test_help_lists_the_common_options_and_with_a_method_its_options(capsys, recorder) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "upscale", "--help")
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--outscale" in out and "--max-pixels" in out and "--fp32" in out and "options of default:" not in out
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "upscale", "-n", "test-recorder", "-h")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--outscale" in out
    section = out.split("options of test-recorder:", 1)[1]
    for flag in (
        "--test-weights DIR",
        "--test-strength",
        "-t N, --tile N",
        "--tile-pad",
        "--device",
        "--dtype",
        "--threads",
        "--color-fix",
        "--sharpen",
        "--start-from-lr, --no-start-from-lr",
        "--save-reference",
    ):
        assert flag in section, flag
    assert "a run option (range 0..1; default 0.5)" in " ".join(section.split())
    with pytest.raises(SystemExit):
        run_cli(capsys, "upscale", "-n", "sd-controlnet", "-h")
    section = capsys.readouterr().out.split("options of sd-controlnet:", 1)[1]
    assert "--steps N" in section and "--base PATH" in section and "--prompt" in section


def test_input_is_required(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "upscale", "-n", "bicubic")
    assert exit_.value.code == 2 and "-i/--input" in capsys.readouterr().err


def test_cli_web_and_bench_give_equal_options(tmp_path: Path) -> None:
    """The same settings as CLI words, web-form JSON and bench-bracket text parse to equal option objects."""
    spec = resolve("sd-controlnet")
    cli = parse_method_options(
        spec,
        [
            "--steps",
            "3",
            "--seed",
            "2",
            "--color-fix",
            "wavelet",
            "--guidance-scale",
            "1.5",
            "--no-start-from-lr",
            "--prompt",
            "a cat",
            "-t",
            "64",
            "--scheduler",
            "ddim",
        ],
    )
    (plan,) = plan_methods(
        BenchConfig(
            methods=[
                "sd-controlnet[steps=3,seed=2,colour_fix=wavelet,guidance_scale=1.5,"
                "start_from_lr=false,prompt=a cat,tile=64,tile_pad=16,"
                "scheduler=ddim]"
            ],
            datasets=[],
        )
    )
    app = DemoApp()
    try:
        entry = next(e for e in app.methods() if e["name"] == "sd-controlnet")
        web = app.options(
            entry,
            {
                "method": "sd-controlnet",
                "steps": 3,
                "seed": "2",
                "colour_fix": "wavelet",
                "guidance_scale": 1.5,
                "prompt": "a cat",
                "tile": "64",
                "negative_prompt": "",
                "options": {"start_from_lr": False, "scheduler": "ddim", "tile_pad": 16},
            },
        )
    finally:
        app.close()
    expected = spec.parse(
        {
            "steps": 3,
            "seed": 2,
            "colour_fix": "wavelet",
            "guidance_scale": 1.5,
            "start_from_lr": False,
            "prompt": "a cat",
            "tile": 64,
            "scheduler": "ddim",
        }
    )
    assert cli == expected
    assert web == dataclasses.replace(expected, tile_pad=16) == plan.options


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
    assert semsr.load("test-recorder", test_weights="/b").method is not first.method
    assert semsr.load("test-recorder", test_weights="/a", seed=4).method is first.method  # run options: same build


def test_api_passes_one_options_object(recorder) -> None:
    semsr.upscale(np.zeros((3, 3, 3), np.uint8), model="test-recorder", test_weights="/w", prompt="p", seed=5)
    call = Recorder.calls[-1]
    assert call["build"].test_weights == Path("/w")
    assert call["run"] == RecorderOptions(test_weights=Path("/w"), prompt="p", seed=5)


def test_api_bad_input_raises_semsr_error(tmp_path: Path) -> None:
    with pytest.raises(SemsrError, match="no such file"):
        semsr.upscale(tmp_path / "missing.png", model="bicubic")


# ---------------------------------------------------------------- the real default


def test_default_method_on_a_tiny_image(tmp_path: Path) -> None:
    """Acceptance: `semsr upscale -i img.png -o outdir` with the bundled default writes one 4x image."""
    try:
        method = build("default")
    except SemsrError as err:
        pytest.skip(f"default method unavailable: {err}")
    assert method.scale == 4
    with Image.open(semsr.core.paths.assets_dir() / "sample.png") as im:
        im.convert("RGB").crop((64, 64, 96, 96)).save(tmp_path / "img.png")
    res = subprocess.run(
        [sys.executable, "-m", "semsr", "upscale", "-i", str(tmp_path / "img.png"), "-o", str(tmp_path / "outdir")],
        capture_output=True,
        text=True,
        timeout=300,
    )
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
