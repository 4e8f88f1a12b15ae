"""Hardening of training (issue 23): checkpoints never unpickle, unreadable ones are skipped, exports are whole.

Kill items use real signals to real subprocesses. docs/security.md lists which test checks which promise.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import semsr
from semsr.cli import main
from semsr.core.errors import SemsrError
from semsr.train.config import config_from_dict
from train_helpers import fresh_training_state, tiny_config_dict, write_textures


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    with fresh_training_state():
        yield


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_textures(tmp_path_factory.mktemp("hr"), count=4)


def _cfg(hr_dir: Path, steps: int, every: int) -> dict:
    return tiny_config_dict(
        hr_dir,
        train={"max_steps": steps, "grad_accum": 1, "ema_decay": 0.9, "threads": 1},
        data={"batch_size": 1},
        checkpoint={"every": every, "keep": 2},
    )


def _train(cfg: dict, output: Path, resume: bool = False):
    from semsr.train.trainer import Trainer

    return Trainer(config_from_dict(cfg), output, resume=resume).fit()


def _yaml(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    src = str(Path(semsr.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class _Payload:
    """Unpickling this creates ``path``: proof that code from the checkpoint ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_hold_only_json_and_safetensors(tmp_path: Path, hr_dir: Path) -> None:
    run = tmp_path / "run"
    _train(_cfg(hr_dir, 2, 2), run)
    folder = run / "checkpoints" / "step_00000002"
    names = sorted(p.name for p in folder.iterdir())
    assert {"model.safetensors", "optimizer.safetensors", "ema.safetensors", "random_states_0.json"} <= set(names)
    for path in folder.iterdir():
        assert path.suffix in (".json", ".safetensors"), path.name
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path.name} looks like a pickle"  # protocol 2+, torch zip
        if path.suffix == ".json":
            json.loads(path.read_text())


def test_crafted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path: Path, hr_dir: Path) -> None:
    run = tmp_path / "run"
    _train(_cfg(hr_dir, 2, 2), run)
    folder = run / "checkpoints" / "step_00000002"
    sentinel = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (folder / name).write_bytes(pickle.dumps(_Payload(sentinel)))
    with pytest.raises(SemsrError, match="unknown file 'custom_checkpoint_0.pkl' in the checkpoint") as err:
        _train(_cfg(hr_dir, 3, 2), run, resume=True)
    assert str(folder) in str(err.value)
    assert not sentinel.exists(), "code from the checkpoint ran"


def test_unreadable_newest_checkpoint_falls_back_and_says_so(
    tmp_path: Path, hr_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A truncated newest checkpoint: `semsr train --resume` continues from the newest intact one, names
    both, and a `step_*` folder left empty by a prune that was killed is removed."""
    run = tmp_path / "run"
    cfg = _cfg(hr_dir, 4, 2)
    _train(cfg, run)
    newest = run / "checkpoints" / "step_00000004"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    (run / "checkpoints" / "step_00000001").mkdir()  # a prune killed half-way: no marker, nothing inside
    cfg["train"]["max_steps"] = 5
    rc = main(["train", "--config", str(_yaml(cfg, tmp_path / "c.yaml")), "--output", str(run), "--resume"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "step_00000004 is unreadable" in err and "model.safetensors" in err
    assert "resumed from" in out and "step_00000002 at step 2" in out and "skipped unreadable step_00000004" in out
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


def test_output_that_is_a_file_is_one_line(tmp_path: Path, hr_dir: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    cfg = _yaml(_cfg(hr_dir, 1, 0), tmp_path / "c.yaml")
    assert main(["train", "--config", str(cfg), "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"semsr: error: {target}: --output is a file, not a run folder"
    assert main(["train", "--config", str(cfg), "--output", str(target / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("semsr: error: ") and "is a file, not a folder" in err and len(err.splitlines()) == 1


def test_kill_during_export_leaves_no_partial_final_folder(tmp_path: Path, hr_dir: Path) -> None:
    """SIGKILL while `final/` is being written: no `final/` appears; the next run removes the staging folder
    and writes `final/` whole, with the permissions of ordinary files (0644/0755 under umask 022)."""
    run = tmp_path / "run"
    cfg = _cfg(hr_dir, 2, 2)
    code = textwrap.dedent(f"""
        import os, signal, sys, json
        from pathlib import Path
        from semsr.train.config import config_from_dict
        from semsr.train.trainer import Trainer

        def export(model, folder):
            (Path(folder) / "config.json").write_text("{{}}")
            os.kill(os.getpid(), signal.SIGKILL)

        build = Trainer._build
        def _build(self):
            build(self)
            self.task.export = export
        Trainer._build = _build
        Trainer(config_from_dict(json.loads({json.dumps(json.dumps(cfg))})), {str(run)!r}).fit()
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (run / "final").exists()
    assert [p.name for p in run.iterdir() if p.name.startswith(".final.")], "the kill left no staging folder"
    old_mask = os.umask(0o022)
    try:
        _train(cfg, run, resume=True)
    finally:
        os.umask(old_mask)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    for folder in ("final", "final_ema"):
        assert stat.S_IMODE((run / folder).stat().st_mode) == 0o755
        files = list((run / folder).iterdir())
        assert {p.name for p in files} == {"config.json", "diffusion_pytorch_model.safetensors"}
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
    ckpt_files = list((run / "checkpoints" / "step_00000002").iterdir())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in ckpt_files)


def test_resume_with_ema_from_a_checkpoint_without_ema_is_one_line(tmp_path: Path, hr_dir: Path) -> None:
    run = tmp_path / "run"
    cfg = _cfg(hr_dir, 1, 1)
    cfg["train"]["ema_decay"] = 0.0
    _train(cfg, run)
    cfg["train"].update(ema_decay=0.9, max_steps=2)
    with pytest.raises(SemsrError, match="checkpoint has no EMA state"):
        _train(cfg, run, resume=True)


def test_kill_during_pruning_leaves_no_stale_checkpoint_folder(tmp_path: Path, hr_dir: Path) -> None:
    """SIGKILL while an old checkpoint is being deleted (its marker already gone): the next run removes what
    is left, so no `step_*` folder lingers that no listing shows and nothing ever deletes."""
    run = tmp_path / "run"
    cfg = _cfg(hr_dir, 3, 1)
    cfg["checkpoint"]["keep"] = 1
    code = textwrap.dedent(f"""
        import json, os, shutil, signal
        from pathlib import Path
        from semsr.train.config import config_from_dict
        from semsr.train.trainer import Trainer

        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            marker = Path(path) / "trainer.json"
            if "step_" in Path(path).name and marker.is_file():
                marker.unlink()  # deletion under way, then the kill
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree
        Trainer(config_from_dict(json.loads({json.dumps(json.dumps(cfg))})), {str(run)!r}).fit()
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    _train(cfg, run, resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]


def test_negative_train_threads_are_refused(hr_dir: Path) -> None:
    cfg = _cfg(hr_dir, 1, 0)
    cfg["train"]["threads"] = -3
    with pytest.raises(SemsrError, match="train.threads must be >= 0"):
        config_from_dict(cfg)
