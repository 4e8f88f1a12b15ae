"""Hardening of the command line (issue 23): interrupts, checks before work, one-line errors, no silent partial results.

Kill items use real signals to real subprocesses. docs/security.md lists which test checks which promise.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import semsr
import semsr.commands.upscale as upscale_cmd
import semsr.core.io as core_io
from _upscale_helpers import files_in, make_image, run_cli
from semsr import api
from semsr.cli import main
from semsr.core.errors import InputError, UnavailableError
from semsr.core.options import OptionError
from semsr.core.weights import load_state_dict
from semsr.eval.runner import BenchConfig, plan_methods
from semsr.models.rrdbnet import rrdbnet_from_pth


def _env() -> dict[str, str]:
    """The environment of a subprocess that imports the semsr under test."""
    src = str(Path(semsr.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _one_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semsr: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `semsr upscale` loads a method (the checks must come first)."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the method was loaded before the destinations were checked")

    monkeypatch.setattr(upscale_cmd, "load_method", refuse)


def _hold_temp_file(target: Path) -> subprocess.Popen:
    """A subprocess inside ``atomic_write(target)``: it has written its temporary file and sleeps."""
    code = textwrap.dedent(f"""
        import time
        from semsr.core.io import atomic_write
        with atomic_write({str(target)!r}) as tmp:
            tmp.write_bytes(b"partial")
            print("ready", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _hidden(folder: Path) -> list[str]:
    return [n for n in files_in(folder) if n.startswith(".")]


# ---------------------------------------------------------------- item 5: interrupts


def test_sigterm_keeps_summary_and_report_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """SIGTERM to a running `semsr upscale`: the current file is finished or dropped, the summary and the
    --json report (interrupted, the rest not_run) are written, exit code 143, no hidden file left."""
    src = tmp_path / "in"
    for i in range(300):
        make_image(src / f"im{i:03d}.png", 96, 96, seed=i)
    out, report = tmp_path / "out", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "semsr.cli", "upscale", "-i", str(src), "-o", str(out), "-n", "bicubic"]
    proc = subprocess.Popen(
        [*cmd, "--no-progress", "--json", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("wrote "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "semsr: terminated" in err
    assert "interrupted: " in rest and "not run" in rest
    doc = json.loads(report.read_text())
    assert doc["interrupted"] is True and doc["summary"]["ok"] >= 1 and doc["summary"]["not_run"] >= 1
    assert sum(doc["summary"].values()) == 300
    written = [n for n in files_in(out) if not n.startswith(".")]
    assert len(written) == doc["summary"]["ok"] and not _hidden(out) and not _hidden(tmp_path)


def test_temp_files_of_killed_runs_are_swept_at_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """kill -9 inside an atomic write leaves a hidden temp file; the next run into that folder removes it,
    while the temp file of a process that is still running is kept."""
    out = tmp_path / "out"
    out.mkdir()
    dead = _hold_temp_file(out / "a_out.png")
    _kill9(dead)
    left = _hidden(out)
    assert len(left) == 1 and left[0].startswith(".a_out.png.") and left[0].endswith(".tmp")
    alive = _hold_temp_file(out / "b_out.png")
    try:
        src = make_image(tmp_path / "c.png")
        rc, _, _ = run_cli(capsys, "upscale", "-i", src, "-o", out, "-n", "bicubic", "--json", out / "r.json")
        assert rc == 0
        hidden = _hidden(out)
        assert len(hidden) == 1 and hidden[0].startswith(".b_out.png."), hidden  # the live writer's file stays
    finally:
        _kill9(alive)
    assert core_io.sweep_temp_files(out) and not _hidden(out)


def test_bench_sweeps_temp_files_of_killed_runs_from_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEMSR_CACHE", str(cache))
    lr_folder = cache / "bench" / "lr" / "someset"
    lr_folder.mkdir(parents=True)
    _kill9(_hold_temp_file(lr_folder / "im0.png"))
    assert _hidden(lr_folder)
    data = tmp_path / "hr"
    make_image(data / "im0.png", 32, 32)
    args = ["bench", "--methods", "bicubic", "--datasets", str(data), "--metrics", "psnr", "--no-isolate", "-q"]
    assert main(args) == 0
    assert not _hidden(lr_folder)


# ---------------------------------------------------------------- items 6, 7, 9: checks before work, one line


def test_output_that_is_a_file_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    src = make_image(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", blocker, "-n", "bicubic")
    assert rc == 2 and _one_line(err, str(blocker), "-o/--output is a file")
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", blocker / "sub", "-n", "bicubic")
    line = _one_line(err, str(blocker / "sub"), "is a file, not a folder")
    assert rc == 2 and str(src) not in line and ".tmp" not in line


def test_unwritable_output_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    """/sys refuses new files even to root (the tests may run as root, where chmod does not bite)."""
    target = Path("/sys/semsr-test-output")
    try:
        (Path("/sys") / ".semsr-probe").write_bytes(b"")
    except OSError:
        pass
    else:
        pytest.skip("/sys is writable here")
    src = make_image(tmp_path / "a.png")
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", target, "-n", "bicubic")
    line = _one_line(err, str(target), "-o/--output: cannot write here")
    assert rc == 2 and str(src) not in line and ".tmp" not in line


def test_json_report_path_is_checked_before_work(tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None) -> None:
    src = make_image(tmp_path / "a.png")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", out, "-n", "bicubic", "--json", tmp_path)
    assert rc == 2 and _one_line(err, "--json is a folder", str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", out, "-n", "bicubic", "--json", blocker / "r.json")
    assert rc == 2 and _one_line(err, "--json", "is a file, not a folder")
    assert not out.exists()


def test_full_disk_names_the_output_and_keeps_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing an output or the --json report: one line naming the file meant (never the
    temporary file), the summary is printed, exit code 1."""
    src = tmp_path / "in"
    for i in range(2):
        make_image(src / f"im{i}.png", seed=i)
    out = tmp_path / "out"

    def full(path: Path, *_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path).parent / ".x.semsr-1-abc.tmp"))

    monkeypatch.setattr(upscale_cmd, "write_picture", lambda pic, path, *a, **k: full(path))
    rc, stdout, err = run_cli(capsys, "upscale", "-i", src, "-o", out, "-n", "bicubic", "--json", tmp_path / "r.json")
    assert rc == 1 and "done: 0 ok, 0 skipped, 2 failed" in stdout
    assert f"cannot write {out / 'im0_out.png'}: no space left on the device" in err and ".tmp" not in err
    monkeypatch.undo()

    class FullDisk:
        def __init__(self, path: Path) -> None:
            self.path = path

        def __enter__(self) -> Path:
            full(self.path)
            return self.path

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(upscale_cmd, "atomic_write", FullDisk)
    report = tmp_path / "r.json"
    rc, stdout, err = run_cli(capsys, "upscale", "-i", src, "-o", out, "-n", "bicubic", "--json", report)
    assert rc == 1 and "done: 2 ok, 0 skipped, 0 failed" in stdout and "Traceback" not in err
    assert _one_line(err, "--json", f"cannot write {report}: no space left on the device") and ".tmp" not in err


@pytest.mark.parametrize("value", ["-5", "0", "500", "abc"])
def test_quality_is_checked_up_front(value: str, tmp_path: Path, capsys: pytest.CaptureFixture, no_model: None) -> None:
    src = make_image(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_:
        main(
            ["upscale", "-i", str(src), "-o", str(tmp_path / "o"), "-n", "bicubic", "--ext", "jpg", "--quality", value]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --quality" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_negative_threads_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_image(tmp_path / "a.png")
    rc, _, err = run_cli(capsys, "eval", "--pred", src, "--gt", src, "--threads", "-3")
    assert rc == 2 and _one_line(err, "--threads must be >= 1, got -3")
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--threads", "-3")
    assert rc == 2 and _one_line(err, "threads")


def test_eval_json_at_a_folder_is_one_line_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_image(tmp_path / "a.png")
    rc, stdout, err = run_cli(capsys, "eval", "--pred", src, "--gt", src, "--json", tmp_path)
    assert rc == 2 and _one_line(err, "--json is a folder") and stdout == ""


# ---------------------------------------------------------------- item 8: unknown run options


def test_unknown_run_options_name_the_closest_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--steps`/`--prompt` on a restorer, `setps=` in the API, `bicubic[foo=1]` in bench: one error each."""
    src = make_image(tmp_path / "a.png")
    for flag in ("--steps", "--prompt"):
        rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", flag, "3")
        assert rc == 2 and _one_line(err, f"method 'bicubic' has no option {flag}")
    with pytest.raises(TypeError, match="unexpected keyword argument 'setps'; did you mean 'steps'"):
        api.upscale(np.zeros((8, 8, 3), np.uint8), "default", setps=3)
    with pytest.raises(OptionError, match="method 'bicubic' has no option foo"):
        plan_methods(BenchConfig(methods=["bicubic[foo=1]"], datasets=[]))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- item 12: no silent partial results


def test_broken_symlink_in_an_input_folder_gets_a_report_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    make_image(src / "a.png")
    (src / "gone.png").symlink_to(tmp_path / "missing.png")
    report = tmp_path / "r.json"
    rc, stdout, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--json", report)
    assert rc == 1 and "broken symbolic link" in err and "gone.png" in stdout
    doc = json.loads(report.read_text())
    assert doc["summary"] == {"ok": 1, "skipped": 0, "failed": 1, "not_run": 0}
    with pytest.raises(InputError, match="broken symbolic link"):
        core_io.read_image(src / "gone.png")


def test_same_folder_in_and_out_skips_earlier_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "photos"
    make_image(folder / "a.png")
    rc, _, _ = run_cli(capsys, "upscale", "-i", folder, "-o", folder, "-n", "bicubic")
    assert rc == 0 and files_in(folder) == ["a.png", "a_out.png"]
    rc, stdout, _ = run_cli(capsys, "upscale", "-i", folder, "-o", folder, "-n", "bicubic", "--overwrite")
    assert rc == 0 and files_in(folder) == ["a.png", "a_out.png"]  # no a_out_out.png
    assert "skipping 1 file(s)" in stdout and "a_out.png" in stdout


# ---------------------------------------------------------------- item 13: messages


def test_decompression_bomb_message_quotes_semsrs_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_image(tmp_path / "big.png", 100, 100)  # 10000 pixels: above twice the limit, Pillow refuses
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic", "--max-pixels", "1000")
    line = _one_line(err, str(src), "10000 pixels", "--max-pixels limit of 1000 pixels")
    assert rc == 2 and "2000" not in line


class _NotATensor:
    pass


def test_unsafe_pth_refusal_does_not_advise_weights_only_false(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"params": {"w": torch.ones(1)}, "extra": _NotATensor()}, path)
    for load, error in ((rrdbnet_from_pth, InputError), (load_state_dict, UnavailableError)):
        with pytest.raises(error) as err:
            load(path)
        text = str(err.value)
        assert "pickled Python objects" in text and "weights_only=False" not in text and len(text.splitlines()) == 1


# ---------------------------------------------------------------- item 11: memory bound


def test_upscale_beyond_available_memory_is_refused_with_the_number(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, no_model: None
) -> None:
    """The whole-image buffers are estimated before the model loads; more than the available memory is one
    line with both numbers (here 200x200 at 4x: 0.2 MB in, 2 x 1.9 MB out, against 1 MiB available)."""
    src = make_image(tmp_path / "a.png", 200, 200)
    monkeypatch.setattr(core_io, "available_memory", lambda: 2**20)
    rc, _, err = run_cli(capsys, "upscale", "-i", src, "-o", tmp_path / "o", "-n", "bicubic")
    assert rc == 2 and _one_line(err, str(src), "800x800", "needs about 4 MiB", "1 MiB is available")
    pic = core_io.read_image(src)
    assert core_io.picture_memory(pic, (800, 800), resized=False) == 200 * 200 * 3 * 2 + 800 * 800 * 3 * 2
    assert core_io.picture_memory(pic, (700, 700), resized=True) == 200 * 200 * 3 * 2 + 700 * 700 * 3 * 3
