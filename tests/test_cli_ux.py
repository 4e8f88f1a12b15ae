"""The command line as a new user meets it (issue 24): stage lines on a terminal, Real-ESRGAN's
habits (model names, underscore flags, ``-o FILE``), ``models list`` in 100 columns, missing extras.

Every test runs ``semsr`` in a subprocess; the stage-line tests give it a pseudo-terminal (``pty``).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from _upscale_helpers import files_in, make_image

ROOT = Path(__file__).resolve().parent.parent

# A test-only method registered before the CLI runs: loads for 0.6 s, then reports "priors" and
# "stage1" timings and STEPS sampler steps of DELAY seconds each through progress(done, total).
_WRAPPER = """
import os, sys, time
import torch.nn.functional as F
from semsr.cli import main
from semsr.core.method import MethodSpec
from semsr.core.options import MethodOptions
from semsr.core.outputs import SROutput
from semsr.methods import register

DELAY = float(os.environ.get("TEST_STEP_DELAY", "0.3"))

class Steps:
    name, scale, tiles_itself = "test-steps", 2, True

    def __init__(self, options):
        time.sleep(0.6)

    def __call__(self, x, options=None, *, progress=False):
        timings = {"priors": 0.2, "stage1": 0.2}
        time.sleep(0.4)
        t0 = time.perf_counter()
        for i in range(4):
            time.sleep(DELAY)
            if callable(progress):
                progress(i + 1, 4)
        timings.update(denoise=time.perf_counter() - t0, steps=4.0)
        return SROutput(F.interpolate(x, scale_factor=2, mode="nearest"), timings=timings)

register(MethodSpec("test-steps", Steps, MethodOptions, 2, "test only", diffusion=True))
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _semsr(*args: object, wrapper: str | None = None) -> list[str]:
    head = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "semsr"]
    return [*head, *(str(a) for a in args)]


def run_piped(*args: object, wrapper: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``semsr *args`` with stdout and stderr piped (not a terminal)."""
    return subprocess.run(
        _semsr(*args, wrapper=wrapper), capture_output=True, text=True, timeout=240, env=_env(**env), check=False
    )


def run_tty(*args: object, wrapper: str | None = None, interrupt_on: str | None = None, **env: str) -> tuple[int, str]:
    """``semsr *args`` on a pseudo-terminal (stdout and stderr); returns ``(exit code, everything printed)``.

    ``interrupt_on``: send SIGINT (Ctrl-C) once this text has been printed.
    """
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        _semsr(*args, wrapper=wrapper), stdin=slave, stdout=slave, stderr=slave, env=_env(**env), close_fds=True
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 240
    sent = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                out += data
            if interrupt_on and not sent and interrupt_on.encode() in out:
                proc.send_signal(signal.SIGINT)
                sent = True
            if proc.poll() is not None and not ready:
                break
    finally:
        os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


# ---------------------------------------------------------------- 1: stages on a terminal


def test_stage_lines_on_a_terminal_with_elapsed_time_and_eta(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.png")
    report = tmp_path / "r.json"
    rc, out = run_tty(
        "upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-steps", "--json", report, wrapper=_WRAPPER
    )
    assert rc == 0, out
    assert "loading test-steps  elapsed " in out and "loaded test-steps in " in out
    assert "a.png  upscale  elapsed" in out
    for k in (1, 2, 3):
        assert f"a.png  denoise {k}/4  elapsed " in out
    assert "denoise 3/4  elapsed" in out and "  ETA " in out  # an ETA once two steps are known
    # after the fact: the method's own stages (timings), then write
    assert "a.png  priors 0.2s, stage1 0.2s, denoise " in out and "(4 steps), write " in out
    assert f"wrote {tmp_path / 'o' / 'a_out.png'} (40x24)" in out
    # the --json report is the same as without a terminal
    data = json.loads(report.read_text())
    keys = {"semsr_version", "method", "outscale", "tile", "tile_pad", "precision", "interrupted", "summary", "results"}
    assert set(data) == keys | {"load_seconds"}
    assert data["load_seconds"] >= 0 and set(data["results"][0]["stages"]) == {
        "priors",
        "stage1",
        "denoise",
        "steps",
        "write",
    }
    assert data["summary"] == {"ok": 1, "skipped": 0, "failed": 0, "not_run": 0}


def test_several_inputs_are_counted_and_the_first_stage_is_named_from_the_last_image(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_image(tmp_path / "in" / f"{name}.png")
    rc, out = run_tty("upscale", "-i", tmp_path / "in", "-o", tmp_path / "o", "-n", "test-steps", wrapper=_WRAPPER)
    assert rc == 0, out
    assert "[1/2] a.png  denoise 1/4" in out and "[2/2] b.png  denoise 1/4" in out
    assert "[2/2] b.png  upscale: priors, stage1  elapsed" in out  # the stages the method reported for a.png
    assert "done: 2 ok, 0 skipped, 0 failed" in out


def test_a_restorer_shows_its_tiles(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.png", w=40, h=24)
    rc, out = run_tty("upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--tile", "12")
    assert rc == 0, out
    assert "loaded bicubic in " in out and "a.png  tile 1/" in out and "write " in out


def test_no_stage_lines_when_piped_or_with_no_progress(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.png")
    res = run_piped("upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-steps", wrapper=_WRAPPER)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout == f"wrote {tmp_path / 'o' / 'a_out.png'} (40x24)\n"
    args = ("upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-steps", "--overwrite", "--no-progress")
    rc, out = run_tty(*args, wrapper=_WRAPPER)
    assert rc == 0 and "elapsed" not in out and "denoise" not in out and "\r\x1b[K" not in out
    assert out.strip() == f"wrote {tmp_path / 'o' / 'a_out.png'} (40x24)"


def test_ctrl_c_during_the_denoise_stops_cleanly(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.png")
    args = ("upscale", "-i", src, "-o", tmp_path / "o", "-n", "test-steps", "--json", tmp_path / "r.json")
    rc, out = run_tty(*args, wrapper=_WRAPPER, interrupt_on="denoise 1/4", TEST_STEP_DELAY="1.0")
    assert rc == 130, out
    assert "Traceback" not in out and out.rstrip().endswith("semsr: interrupted")
    assert files_in(tmp_path / "o") == []  # nothing half-written
    assert json.loads((tmp_path / "r.json").read_text())["interrupted"] is True


# ---------------------------------------------------------------- 2: Real-ESRGAN habits


def test_upstream_model_names_are_aliases_and_underscore_flags_work(tmp_path: Path) -> None:
    src = make_image(tmp_path / "a.png")
    res = run_piped(
        "upscale", "-i", src, "-o", tmp_path / "o", "-n", "RealESRGAN_x4plus_anime_6B", "--tile_pad", "4",
        "--alpha_upsampler", "realesrgan", "--tile=0",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert files_in(tmp_path / "o") == ["a_out.png"]
    from semsr.methods import resolve

    assert resolve("RealESRGAN_x4plus").name == "realesrgan-x4plus"
    assert resolve("RealESRGAN_x4plus_anime_6B").name == "realesrgan-x4plus-anime"
    assert resolve("realesr-animevideov3").name == "realesr-animevideov3-x4"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("RealESRNet_x4plus", "semsr does not ship the weights of RealESRNet_x4plus; the closest method is "),
        ("realesr-general-x4v3", "semsr does not ship the weights of realesr-general-x4v3; the closest method is "),
        ("realesrgan-x4pluss", "unknown method 'realesrgan-x4pluss'; did you mean 'realesrgan-x4plus'?"),
    ],
)
def test_unknown_model_names_get_one_line_with_the_closest(tmp_path: Path, name: str, expected: str) -> None:
    res = run_piped("upscale", "-i", make_image(tmp_path / "a.png"), "-o", tmp_path / "o", "-n", name)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"semsr: error: {expected}")
    assert "realcugan" not in res.stderr  # not the list of every method


def test_face_enhance_is_one_line_not_supported(tmp_path: Path) -> None:
    res = run_piped("upscale", "-i", make_image(tmp_path / "a.png"), "-o", tmp_path / "o", "--face_enhance")
    assert res.returncode != 0 and res.stderr == (
        "semsr: error: --face-enhance is not supported: semsr has no face restorer (GFPGAN)\n"
    )
    assert not (tmp_path / "o").exists()


def test_output_file_for_one_input_and_an_error_for_several(tmp_path: Path) -> None:
    a, b = make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png")
    res = run_piped("upscale", "-i", a, "-n", "bicubic", "-o", tmp_path / "out" / "result.jpg")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "result.jpg").is_file() and files_in(tmp_path / "out") == ["result.jpg"]
    from PIL import Image

    with Image.open(tmp_path / "out" / "result.jpg") as im:
        assert im.format == "JPEG" and im.size == (80, 48)
    res = run_piped("upscale", "-i", a, b, "-n", "bicubic", "-o", tmp_path / "x.png")
    assert res.returncode == 2 and res.stderr == (
        f"semsr: error: -o {tmp_path / 'x.png'} names one output file, but 2 inputs were given; give a folder as -o\n"
    )
    assert not (tmp_path / "x.png").exists()


def test_help_lists_common_options_and_says_how_to_see_a_methods() -> None:
    res = run_piped("upscale", "-h")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    listed = text.split("Only the options every method shares")[0]
    assert "--outscale" in listed and "--steps" not in listed and "--tile-pad" not in listed
    assert "options of default:" not in text
    assert "`semsr upscale -n NAME -h` adds the options of method NAME" in text
    res = run_piped("upscale", "-n", "RealESRGAN_x4plus", "-h")
    assert res.returncode == 0 and "options of realesrgan-x4plus:" in res.stdout and "--tile-pad" in res.stdout


def test_models_list_fits_100_columns_and_marks_methods_that_need_weights() -> None:
    res = run_piped("models", "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = {line.split()[0]: line for line in lines[2:] if line and not line.startswith(" ")}
    for name in ("xpsr", "mmsr", "coser", "rfa", "sd-controlnet", "dalpsr", "realesrgan-pth"):
        assert "needs weights" in rows[name] and " yes " not in rows[name], rows[name]
    assert " yes " in rows["realesrgan-x4plus"] and " yes " in rows["default"]
    assert any(line.startswith("  sd-controlnet: weights: --base PATH") for line in lines)
    assert "RealESRGAN_x4plus = realesrgan-x4plus" in res.stdout
    listed = {r["name"]: r for r in json.loads(run_piped("models", "list", "--json").stdout)}
    assert listed["xpsr"]["available"] is False and "--base PATH" in listed["xpsr"]["needs"]
    assert listed["realesrgan-x4plus"]["available"] is True


# ---------------------------------------------------------------- 7: a missing optional package


_NO_FAISS = "import sys; sys.modules['faiss'] = None; from semsr.cli import main; sys.exit(main(sys.argv[1:]))"


def test_a_missing_optional_package_is_one_line_naming_its_extra(tmp_path: Path) -> None:
    make_image(tmp_path / "imgs" / "a.png", w=32, h=32)
    res = run_piped("index", "build", "--images", tmp_path / "imgs", "--out", tmp_path / "db", wrapper=_NO_FAISS)
    assert res.returncode == 3
    assert (
        res.stderr == "semsr: error: semsr index build needs the optional package faiss: pip install 'semsr[index]'\n"
    )


def test_missing_extra_message_maps_modules_to_extras() -> None:
    import argparse

    from semsr.cli import missing_extra_message

    def message(module: str, **ns: str) -> str | None:
        return missing_extra_message(
            ModuleNotFoundError(f"No module named {module!r}", name=module), argparse.Namespace(**ns)
        )

    assert message("matplotlib.pyplot", command="train") == (
        "semsr train needs the optional package matplotlib: pip install 'semsr[train]'"
    )
    assert message("matplotlib", command="bench", kind="report") == (
        "semsr bench needs the optional package matplotlib: pip install 'semsr[report]'"
    )
    assert message("torch", command="upscale") is None  # not an optional package: a real error


def test_stage_reporter_eta_is_the_mean_step_time_times_the_steps_left(monkeypatch) -> None:
    import io

    from semsr.commands import _progress

    now = [100.0]
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    rep = _progress.StageReporter(stream, enabled=True)
    rep.begin("a.png  ", "upscale", eta_rest=10.0)  # 10 s for the images after this one
    now[0] = 104.0
    rep.count("denoise", 1, 5)  # the first report: no ETA of the steps yet, only the rest
    assert stream.getvalue().endswith("a.png  denoise 1/5  elapsed 4.0s  ETA 10.0s")
    now[0] = 106.0
    rep.count("denoise", 3, 5)  # 2 steps in 2 s: 2 steps left = 2 s, plus 10 s
    assert stream.getvalue().endswith("a.png  denoise 3/5  elapsed 6.0s  ETA 12.0s")
    now[0] = 106.5
    rep.stage("write")
    rep.done("a.png  denoise 2.0s")
    assert stream.getvalue().endswith("\r\x1b[Ka.png  denoise 2.0s\n")
    assert _progress.seconds(125) == "2m05s" and _progress.seconds(3720) == "1h02m"
    rep.begin("[2/2] b.png  ", "upscale: priors, stage1", expected=5.0)  # the mean of the images before
    now[0] = 108.0
    rep.stage("upscale: priors, stage1")
    assert stream.getvalue().endswith("[2/2] b.png  upscale: priors, stage1  elapsed 1.5s  ETA 3.5s")
    quiet = io.StringIO()
    off = _progress.StageReporter(quiet, enabled=False)
    off.begin("a.png  ", "upscale")
    off.count("denoise", 1, 2)
    off.done("x")
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------- quick exit of the console entry


def _entry(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (which ends by calling :func:`semsr.cli.run`) in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, **env},
    )


def test_quick_exit_runs_exit_handlers_flushes_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """``semsr`` ends with ``os._exit`` after the command: atexit handlers still run (their output and files
    appear), buffered output is flushed, and the command's exit code is the process's."""
    code = (
        "import atexit, sys\n"
        "from pathlib import Path\n"
        "from semsr import cli\n"
        "atexit.register(lambda: Path('handler-ran').write_text('yes'))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "sys.argv = ['semsr', 'upscale', '-i', 'missing.png', '-o', 'out']\n"
        "cli.run()\n"
    )
    for slow in ("0", "1"):
        proc = _entry(code, tmp_path, SEMSR_SLOW_EXIT=slow)
        assert proc.returncode != 0 and "missing.png" in proc.stderr, proc.stderr
        assert proc.stdout.startswith("buffered, no newline")
        assert (tmp_path / "handler-ran").read_text() == "yes"
        (tmp_path / "handler-ran").unlink()


def test_quick_exit_waits_for_a_running_non_daemon_thread(tmp_path: Path) -> None:
    """A non-daemon thread still working when the command returns is not cut off: the usual exit waits for it."""
    code = (
        "import sys, threading, time\n"
        "from pathlib import Path\n"
        "from semsr import cli\n"
        "def work():\n"
        "    time.sleep(1.0)\n"
        "    Path('thread-done').write_text('done')\n"
        "threading.Thread(target=work).start()\n"
        "sys.argv = ['semsr', 'models', 'list']\n"
        "cli.run()\n"
    )
    proc = _entry(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "thread-done").read_text() == "done"


def test_python_dash_m_semsr_uses_the_quick_exit(tmp_path: Path) -> None:
    """``python -m semsr`` and the ``semsr`` script share :func:`semsr.cli.run`."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["semsr"] == "semsr.cli:run"
    assert "run()" in (ROOT / "src" / "semsr" / "__main__.py").read_text()
    proc = subprocess.run([sys.executable, "-m", "semsr", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip()
