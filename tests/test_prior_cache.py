"""The prior store (semsr.priors.cache), ``semsr priors build`` and training that reads only the store.

The chain test: make-pairs -> priors build (2 processes, one store) -> XPSR-tiny and MMSR-tiny
training with ``data.priors`` while every prior model class raises when built -> upscale.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import semsr.priors.mmsr as priors_mmsr
import semsr.train.xpsr as train_xpsr
from semsr.cli import main
from semsr.core.errors import SemsrError
from semsr.priors.base import PriorResult, provider_specs
from semsr.priors.cache import PriorStore, image_id
from semsr.testing.tiny import resolve_model_path
from train_helpers import REPO, launch_semsr, write_textures

MMSR_BUILD = ("--recipe", "mmsr", "--depth-model", "tiny://depth", "--seg-model", "tiny://seg", "--batch-size", "1")
XPSR_BUILD = ("--recipe", "xpsr", "--vlm", "tiny://vlm", "--vlm-max-new-tokens", "4", "--batch-size", "2")


def _pairs(tmp_path: Path, count: int = 4) -> Path:
    hr = write_textures(tmp_path / "hr", count=count, size=(96, 80))
    out = tmp_path / "pairs"
    args = ["data", "make-pairs", "--hr", str(hr), "--out", str(out), "--per-image", "1", "--degradation", "bicubic"]
    assert main(args) == 0
    return out


def test_store_round_trip_and_missing_prior_is_one_line(tmp_path: Path):
    store = PriorStore(tmp_path / "store", create=True)
    img = tmp_path / "a.png"
    spatial = torch.rand(1, 1, 8, 6)
    store.put_many(
        [
            (img, "caption", PriorResult("text", "a cat")),
            (img, "tags", PriorResult("tags", ("cat", "sofa"))),
            (img, "depth", PriorResult("spatial", spatial)),
            (img, "clip", PriorResult("embedding", torch.ones(1, 4))),
        ]
    )
    again = PriorStore(tmp_path / "store")  # a second connection (another process) sees the rows
    assert again.text(img, "caption") == "a cat" and again.tags(img, "tags") == ("cat", "sofa")
    assert torch.allclose(again.spatial(img, "depth")[None], spatial, atol=0.5 / 255 + 1e-6)
    assert again.array(img, "clip").tolist() == [1.0] * 4  # without the batch dimension
    assert again.done("depth") == {image_id(img)}
    with pytest.raises(SemsrError, match="no 'quality' of this image") as err:
        again.text(img, "quality")
    assert "\n" not in str(err.value)
    with pytest.raises(SemsrError, match="no prior store"):
        PriorStore(tmp_path / "nothing")


def test_build_needs_pairs_for_lr_priors(tmp_path: Path, capsys):
    hr = write_textures(tmp_path / "hr", count=1, size=(32, 32))
    assert main(["priors", "build", "--recipe", "xpsr", "-i", str(hr), "-o", str(tmp_path / "s")]) != 0
    assert "needs priors of LR files: give --pairs" in capsys.readouterr().err


def _count(store: Path) -> int:
    """Rows stored so far by a running build; 0 while its index exists but has no table yet."""
    try:
        return len(_rows(store))
    except sqlite3.OperationalError:  # the file is made before the schema (connect, then CREATE TABLE)
        return 0


def _rows(store: Path) -> dict[tuple[str, str], str]:
    with sqlite3.connect(store / "index.sqlite") as db:
        return {(i, p): a for i, p, a in db.execute("SELECT image, prior, array FROM priors")}


def test_killed_build_resumes_without_recomputing(tmp_path: Path):
    pairs, store = _pairs(tmp_path, count=6), tmp_path / "store"
    cmd = [sys.executable, "-m", "semsr.cli", "priors", "build", "--pairs", str(pairs), "-o", str(store), *MMSR_BUILD]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (store / "index.sqlite").is_file() and _count(store) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    before = _rows(store)
    assert 3 <= len(before) < 18  # 6 LR files x (canny, depth, seg)
    mtimes = {k: (store / a).stat().st_mtime_ns for k, a in before.items()}
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"computed {18 - len(before)}, kept {len(before)}," in done.stdout
    after = _rows(store)
    assert len(after) == 18
    assert {k: (store / after[k]).stat().st_mtime_ns for k in before} == mtimes  # finished ones untouched


def _forbid_prior_models(monkeypatch):
    """Every prior provider factory, TextPriors and ModalityTokens' providers raise when built."""

    def boom(*args, **kwargs):
        raise AssertionError("a prior model was constructed inside training")

    for spec in provider_specs():
        monkeypatch.setattr(spec, "factory", boom)
    monkeypatch.setattr(priors_mmsr, "get_provider", boom)
    monkeypatch.setattr(train_xpsr, "TextPriors", boom)


def _train(config: str, out: Path, pairs: Path, store: Path, *extra: str) -> None:
    args = ["train", "--config", str(REPO / "configs" / config), "--output", str(out), "--max-steps", "2"]
    args += [f"data.pairs={pairs}", f"data.priors={store}", "validation.every=0", "checkpoint.every=2"]
    assert main([*args, "data.val_count=1", "train.grad_accum=1", *extra]) == 0


def test_chain_pairs_build_two_processes_train_from_cache_upscale(tmp_path: Path, monkeypatch):
    pairs, store = _pairs(tmp_path, count=4), tmp_path / "store"
    # the tiny models are written here first: two launched processes would both write them
    local = [str(resolve_model_path(a)) if a.startswith("tiny://") else a for a in (*XPSR_BUILD, *MMSR_BUILD)]
    xpsr, mmsr = local[: len(XPSR_BUILD)], local[len(XPSR_BUILD) :]
    launch_semsr("priors", "build", "--pairs", str(pairs), "-o", str(store), *xpsr)
    launch_semsr("priors", "build", "--pairs", str(pairs), "-o", str(store), *mmsr)
    assert PriorStore(store).priors() == {"canny": 4, "caption": 4, "depth": 4, "quality": 8, "seg": 4}

    with monkeypatch.context() as m:
        _forbid_prior_models(m)
        _train("xpsr-tiny.yaml", tmp_path / "xpsr", pairs, store)
        _train("mmsr-tiny.yaml", tmp_path / "mmsr", pairs, store)
    assert (tmp_path / "xpsr" / "final" / "model_index.json").is_file()
    assert (tmp_path / "mmsr" / "final" / "model_index.json").is_file()

    out = tmp_path / "sr"
    lr = next((pairs / "lr").iterdir())
    args = ["upscale", "-i", str(lr), "-o", str(out), "-n", "mmsr", "--checkpoint", str(tmp_path / "mmsr" / "final")]
    args += ["--base", str(resolve_model_path("tiny://")), "--modalities", "caption,edge", "--steps", "1"]
    assert main([*args, "--no-progress"]) == 0
    assert len(list(out.iterdir())) == 1


def test_training_fails_in_one_line_when_a_prior_is_missing(tmp_path: Path, capsys):
    pairs, store = _pairs(tmp_path, count=3), tmp_path / "store"
    PriorStore(store, create=True).close()  # empty store
    args = ["train", "--config", str(REPO / "configs" / "xpsr-tiny.yaml"), "--output", str(tmp_path / "run")]
    args += [f"data.pairs={pairs}", f"data.priors={store}", "validation.every=0", "data.val_count=1"]
    assert main(args) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("semsr")]
    assert len(err) == 1 and "has no 'caption' of this image (run semsr priors build" in err[0]
