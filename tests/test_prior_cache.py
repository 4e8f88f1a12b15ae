"""The prior store (semsr.priors.cache), ``semsr priors build`` and training that reads only the store.

The chain test: make-pairs -> priors build (2 processes, one store) -> XPSR-tiny and MMSR-tiny
training with ``data.priors`` while every prior model class raises when built -> upscale; the same
for RFA stage 2 and CoSeR stage 2 with their CLIP priors (no CLIP / embedder model may be built).
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
import semsr.models.cognitive as models_cognitive
import semsr.priors.mmsr as priors_mmsr
import semsr.priors.retrieval.embedders as embedders
import semsr.train.coser as train_coser
import semsr.train.rfa as train_rfa
import semsr.train.rfa_sr as train_rfa_sr
import semsr.train.xpsr as train_xpsr
from semsr.cli import main
from semsr.core.errors import SemsrError
from semsr.priors.base import PriorResult, provider_specs
from semsr.priors.cache import PriorStore, image_id
from semsr.testing.tiny import resolve_model_path
from semsr.train.pairs import read_pairs
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


# ----------------------------------------------------------------------------- rfa / coser (CLIP priors)


def _forbid_clip_models(monkeypatch):
    """Every prior provider and every CLIP / RFA embedder constructor raise when called in training."""

    def boom(*args, **kwargs):
        raise AssertionError("a CLIP / embedder model was constructed inside training")

    for spec in provider_specs():
        monkeypatch.setattr(spec, "factory", boom)
    for module in (train_rfa_sr, train_rfa):
        monkeypatch.setattr(module, "embedder_from_spec", boom)
    monkeypatch.setattr(train_coser, "load_clip_vision", boom)
    monkeypatch.setattr(models_cognitive, "load_clip_vision", boom)
    monkeypatch.setattr(embedders, "CLIPEmbedder", boom)


def _clip_builds(tmp_path: Path, pairs: Path) -> tuple[list[str], list[str], Path]:
    """The rfa and coser build flags (tiny models resolved here: launched processes would both write them)
    and the reference database of the pairs' HR images."""
    clip = resolve_model_path("tiny://clip-vision")
    hr = tmp_path / "hr"
    db = tmp_path / "db"
    assert main(["index", "build", "--images", str(hr), "--out", str(db), "--embedder", f"clip:{clip}"]) == 0
    aligner = resolve_model_path("tiny://rfa/aligner")
    rfa = ["--recipe", "rfa", "--db", str(db), "--aligner", str(aligner), "--num-refs", "2", "--batch-size", "2"]
    cognitive = resolve_model_path("tiny://coser/cognitive")
    coser = ["--recipe", "coser", "--clip", str(clip), "--cognitive", str(cognitive), "--neighbours", "3"]
    return rfa, coser, db


def test_rfa_and_coser_build_two_processes_and_train_from_the_store(tmp_path: Path, monkeypatch, capsys):
    pairs, store = _pairs(tmp_path, count=4), tmp_path / "store"
    rfa, coser, db = _clip_builds(tmp_path, pairs)
    launch_semsr("priors", "build", "--pairs", str(pairs), "-o", str(store), *rfa)
    launch_semsr("priors", "build", "--pairs", str(pairs), "-o", str(store), *coser)
    s = PriorStore(store)
    # rfa: embedding of 4 HR + 4 LR files, tokens of 4 LR files + 4 database images, references of 4 LR files;
    # coser: pool embedding + neighbours of 4 HR images, cognitive embedding of 4 LR files
    assert s.priors() == {
        "coser-clip": 4,
        "coser-cognitive": 4,
        "coser-neighbours": 4,
        "rfa-embed": 8,
        "rfa-refs": 4,
        "rfa-tokens": 8,
    }
    for hr, lrs in read_pairs(pairs).items():
        assert image_id(hr) not in s.tags(hr, "coser-neighbours") and len(s.tags(hr, "coser-neighbours")) == 3
        refs = s.tags(lrs[0], "rfa-refs")
        assert len(refs) == 2 and image_id(hr) not in refs  # the training image itself is never a reference
        assert s.array(lrs[0], "coser-cognitive").shape[0] == 50  # (Te, D)
    capsys.readouterr()
    assert main(["priors", "build", "--pairs", str(pairs), "-o", str(store), *coser]) == 0  # nothing left to do
    out = capsys.readouterr().out
    assert "computed 0, kept 8, failed 0" in out and "coser-neighbours: computed 0, kept 4" in out
    # as after a kill: two LR files lack their references, one database image its tokens
    lost = [image_id(lrs[0]) for lrs in list(read_pairs(pairs).values())[:2]]
    db_image = image_id(next((tmp_path / "hr").iterdir()))
    with sqlite3.connect(store / "index.sqlite") as con:
        con.executemany("DELETE FROM priors WHERE image = ? AND prior = 'rfa-refs'", [(i,) for i in lost])
        con.execute("DELETE FROM priors WHERE image = ? AND prior = 'rfa-tokens'", (db_image,))
    assert main(["priors", "build", "--pairs", str(pairs), "-o", str(store), *rfa]) == 0
    assert "computed 3, kept 17, failed 0" in capsys.readouterr().out  # 4 HR + 8 LR + 4 DB + 4 refs rows

    common = ["data.hr=[]"]  # class folders are not needed here (flat pool)
    with monkeypatch.context() as m:
        _forbid_clip_models(m)
        _train("rfa-tiny.yaml", tmp_path / "rfa", pairs, store, f"model.options.db={db}", "model.options.num_refs=2")
        _train("coser-tiny.yaml", tmp_path / "coser", pairs, store, *common)
    assert (tmp_path / "rfa" / "final" / "rfa").is_dir()
    assert (tmp_path / "coser" / "final" / "cognitive").is_dir() and (tmp_path / "coser" / "final" / "aia").is_dir()

    # references retrieved with the aligner do not fit a run without one: refused before the first step
    capsys.readouterr()
    args = ["train", "--config", str(REPO / "configs" / "rfa-tiny.yaml"), "--output", str(tmp_path / "rfa2")]
    args += [f"data.pairs={pairs}", f"data.priors={store}", "validation.every=0", "data.val_count=1"]
    args += [
        f"model.options.db={db}",
        "model.options.num_refs=2",
        "model.options.aligner=",
        "model.options.no_aligner=true",
    ]
    assert main(args) != 0
    assert "retrieved with another aligner" in capsys.readouterr().err


def test_lr_embedding_option():
    from semsr.train.config import load_config
    from semsr.train.priors import lr_embedding_mode

    cfg = load_config(REPO / "configs" / "coser-tiny.yaml")
    store = object()  # only its presence counts
    assert lr_embedding_mode(cfg, store, None) == "image" and lr_embedding_mode(cfg, None, None) == "crop"  # type: ignore[arg-type]
    assert lr_embedding_mode(cfg, store, "crop") == "crop"  # type: ignore[arg-type]
    with pytest.raises(SemsrError, match="reads the LR embeddings from data.priors"):
        lr_embedding_mode(cfg, None, "image")
    with pytest.raises(SemsrError, match="must be image or crop"):
        lr_embedding_mode(cfg, store, "tile")  # type: ignore[arg-type]


def test_coser_stored_neighbours_equal_the_live_ranking(tmp_path: Path):
    """The store's pool (read, no CLIP) and the live one (CLIP in the cache's store) pick the same references."""
    from semsr.train.config import load_config

    pairs, store = _pairs(tmp_path, count=5), tmp_path / "store"
    _, coser, _ = _clip_builds(tmp_path, pairs)
    assert main(["priors", "build", "--pairs", str(pairs), "-o", str(store), *coser[:2], *coser[2:4]]) == 0
    cfg = load_config(REPO / "configs" / "coser-tiny.yaml", [f"data.pairs={pairs}", "data.hr=[]", "data.val_count=1"])
    clip = models_cognitive.load_clip_vision(resolve_model_path("tiny://clip-vision"), require_processor=True)
    live = train_coser.NeighbourReferences(cfg, clip, 3)
    stored = train_coser.NeighbourReferences(cfg, None, 3, store=PriorStore(store))
    assert [r.tolist() for r in live.neighbours] == [r.tolist() for r in stored.neighbours]
    assert len(live.neighbours) == 4 and all(len(r) == 3 for r in live.neighbours)
    # the paper's per-crop cognitive embedding with the pool from the store (built without --cognitive)
    overrides = [f"data.pairs={pairs}", f"data.priors={store}", "data.hr=[]", "data.val_count=1"]
    overrides += [f"model.pretrained={resolve_model_path('tiny://')}", "model.options.lr_embedding=crop"]
    task = train_coser.CoSeRSRTask(load_config(REPO / "configs" / "coser-tiny.yaml", overrides))
    assert task.lr_embedding == "crop" and task.cognitive.clip is not None
    assert [r.tolist() for r in task.references.neighbours] == [r.tolist() for r in live.neighbours]


def test_rfa_and_coser_training_fail_in_one_line_when_a_prior_is_missing(tmp_path: Path, capsys):
    pairs, store = _pairs(tmp_path, count=3), tmp_path / "store"
    _, _, db = _clip_builds(tmp_path, pairs)
    PriorStore(store, create=True).close()  # empty store
    for config, extra, prior in (
        ("rfa-tiny.yaml", [f"model.options.db={db}"], "rfa-tokens"),
        ("coser-tiny.yaml", ["data.hr=[]"], "coser-cognitive"),
    ):
        args = ["train", "--config", str(REPO / "configs" / config), "--output", str(tmp_path / config)]
        args += [f"data.pairs={pairs}", f"data.priors={store}", "validation.every=0", "data.val_count=1", *extra]
        assert main(args) != 0
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("semsr")]
        assert len(err) == 1 and f"has no '{prior}' of this image (run semsr priors build" in err[0], err
        assert "/lr/" in err[0]  # names the LR file


def test_clip_priors_of_a_batch_equal_those_of_single_images():
    """``priors build`` embeds a batch of differently sized images in one pass: the same values as one by one."""
    from semsr.priors.base import get_provider

    clip = resolve_model_path("tiny://clip-vision")
    images = [torch.rand(1, 3, 24 + 4 * i, 20 + 8 * i, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for name, kw in (
        ("rfa-embed", {"embedder": f"clip:{clip}"}),
        ("rfa-tokens", {"embedder": f"clip:{clip}"}),
        ("coser-clip", {"clip": clip}),
    ):
        provider = get_provider(name, **kw)
        for batched, single in zip(provider.many(images), [provider(i) for i in images], strict=True):
            torch.testing.assert_close(batched.value, single.value, atol=1e-5, rtol=1e-4)
