"""Paired training data: ``semsr data make-pairs`` and the aligned crops training reads from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.train_helpers import write_textures

from semsr.core.errors import SemsrError
from semsr.ops.imresize import imresize
from semsr.train.config import DataConfig
from semsr.train.data import load_image, make_degrader, to_tensor
from semsr.train.pairs import PairedCropDataset, make_pairs, paired_validation, read_pairs, split_pairs


def _bicubic_pairs(hr: Path, out: Path, per_image: int) -> dict[str, int]:
    """``make_pairs`` of every image in ``hr`` into ``out`` with the bicubic x4 degradation."""
    return make_pairs(
        sorted(hr.iterdir()),
        out,
        degrade=make_degrader({"type": "bicubic"}, 4),
        degradation="bicubic",
        scale=4,
        per_image=per_image,
        log=lambda _: None,
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semsr.cli", *args], capture_output=True, text=True, timeout=300)


def test_make_pairs_cli_is_deterministic_and_resumable(tmp_path: Path) -> None:
    hr = write_textures(tmp_path / "hr", count=3, size=(50, 42))  # not multiples of 4: cut to 48x40
    out = tmp_path / "pairs"
    proc = _cli("data", "make-pairs", "--hr", str(hr), "--out", str(out), "--per-image", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "3 HR images x 2 (realesrgan, x4): 6 LR written, 0 kept" in proc.stdout
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["k"] for r in records} == {0, 1}
    files = sorted((out / "lr").iterdir())
    assert [Image.open(f).size for f in files] == [(12, 10)] * 6
    first = {f.name: f.read_bytes() for f in files}
    assert first[files[0].name] != first[files[1].name]  # the two variants of one image differ
    # a killed run: one LR file lost; re-running rewrites exactly that file, byte-identical
    files[2].unlink()
    mtimes = {f.name: f.stat().st_mtime_ns for f in files if f.exists()}
    proc = _cli("data", "make-pairs", "--hr", str(hr), "--out", str(out), "--per-image", "2", "--seed", "3")
    assert "1 LR written, 5 kept" in proc.stdout
    assert {f.name: f.read_bytes() for f in sorted((out / "lr").iterdir())} == first
    assert all(f.stat().st_mtime_ns == mtimes[f.name] for f in files if f.name in mtimes)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_bicubic_pairs_are_imresize_of_the_cut_hr(tmp_path: Path) -> None:
    hr = write_textures(tmp_path / "hr", count=1, size=(50, 42))
    counts = _bicubic_pairs(hr, tmp_path / "p", per_image=1)
    assert counts == {"written": 1, "kept": 0, "images": 1, "failed": 0}
    ((hr_file, (lr_file,)),) = read_pairs(tmp_path / "p").items()
    want = imresize(to_tensor(load_image(hr_file)[:40, :48])[None], scale=0.25).clamp(0, 1)[0]
    got = to_tensor(load_image(lr_file))
    assert (got - want).abs().max() <= 0.5 / 255 + 1e-6


def test_paired_crops_are_aligned_and_validation_is_fixed(tmp_path: Path) -> None:
    hr = write_textures(tmp_path / "hr", count=4, size=(96, 80))
    _bicubic_pairs(hr, tmp_path / "p", per_image=2)
    pairs = read_pairs(tmp_path / "p")
    cfg = DataConfig(crop_size=32, scale=4, val_count=1, hflip=True, min_texture=0.0)
    train, val = split_pairs(pairs, cfg)
    assert len(train) == 3 and len(val) == 1 and val[0].path.name == "img03.png"
    ds = PairedCropDataset(train, pairs, cfg, seed=0)
    for p in range(6):
        sample = ds[p]
        assert sample["hr"].shape == (3, 32, 32) and sample["lr"].shape == (3, 8, 8)
        # bicubic of the HR crop equals the LR crop away from the crop border (kernel support 2 LR px)
        down = imresize(sample["hr"][None], scale=0.25)[0]
        assert (down[:, 2:-2, 2:-2] - sample["lr"][:, 2:-2, 2:-2]).abs().max() < 2 / 255
        again = ds[p]
        assert torch.equal(again["hr"], sample["hr"]) and torch.equal(again["lr"], sample["lr"])
    (vhr, vlr), *_ = paired_validation(val, pairs, size=48, scale=4, multiple=8)
    assert vhr.shape == (3, 48, 48) and vlr.shape == (3, 12, 12)


def test_pairs_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SemsrError, match="no pairs manifest"):
        read_pairs(tmp_path)
    hr = write_textures(tmp_path / "hr", count=1, size=(40, 40))
    _bicubic_pairs(hr, tmp_path / "p", per_image=1)
    lr = next((tmp_path / "p" / "lr").iterdir())
    lr.unlink()
    with pytest.raises(SemsrError, match="missing") as err:
        read_pairs(tmp_path / "p")
    assert lr.name in str(err.value)
    np.testing.assert_equal(len(list((tmp_path / "p").iterdir())), 2)  # lr/ and pairs.jsonl only


def test_training_reads_pairs_instead_of_degrading(tmp_path: Path) -> None:
    """``data.pairs``: the trainer takes its LR crops from the pairs folder (validation too)."""
    from tests.train_helpers import tiny_config_dict

    from semsr.train.config import config_from_dict
    from semsr.train.trainer import Trainer

    hr = write_textures(tmp_path / "hr", count=4, size=(96, 96))
    _bicubic_pairs(hr, tmp_path / "p", per_image=2)
    seen: list[torch.Tensor] = []

    def spy(trainer, step, record) -> None:
        seen.append(step)

    cfg = tiny_config_dict(
        tmp_path / "nowhere",  # not read: the pairs folder replaces data.hr
        data={"pairs": str(tmp_path / "p"), "hr": []},
        degradation={"type": "realesrgan"},  # not used either: the LR images are precomputed
        train={"max_steps": 2, "grad_accum": 1, "ema_decay": 0.9, "threads": 1},
        validation={"every": 2, "count": 1, "size": 64, "steps": 1},
    )
    result = Trainer(config_from_dict(cfg), tmp_path / "run", callbacks=[spy]).fit()
    assert result.step == 2 and seen == [1, 2]
    assert (tmp_path / "run" / "final").is_dir()
