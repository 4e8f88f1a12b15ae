"""Reference database: round trip, incremental add, de-duplication, mmap opening, kinds, shards, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semsr.cli import main
from semsr.priors.retrieval.embedders import embedder_from_spec
from semsr.priors.retrieval.index import ReferenceDB, add_images, list_image_files, merge_databases, shard_files


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct smooth random RGB images (48x40) in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.random((6, 5, 3))
        arr = np.kron(base, np.ones((8, 8, 1)))
        arr = (arr * 255).astype(np.uint8)
        p = folder / f"img{seed}_{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def clip_spec(tiny_models: Path) -> str:
    return f"clip:{tiny_models / 'clip-vision'}"


def _build(folder: Path, files: list[Path], spec: str, kind: str = "auto") -> ReferenceDB:
    db = ReferenceDB(folder, create=True, embedder=embedder_from_spec(spec).spec, kind=kind)
    add_images(db, files, embedder_from_spec(spec))
    return db


def test_round_trip_each_image_finds_itself(tmp_path: Path, clip_spec: str) -> None:
    files = _write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "img0_002.txt").write_text("a red square\n")
    with _build(tmp_path / "db", files, clip_spec) as db:
        assert len(db) == 6
    with ReferenceDB(tmp_path / "db") as db:  # reopened from disk
        emb = embedder_from_spec(db.embedder_spec)
        from semsr.priors.retrieval.index import load_rgb

        q = np.concatenate([emb.embed(load_rgb(p)).numpy() for p in files])
        hits = db.search(q, k=4)
        assert all(len(h) == 4 for h in hits)
        for p, h in zip(files, hits):
            assert h[0].entry.path == str(p.resolve())
            assert h[0].score == pytest.approx(1.0, abs=1e-4)
            assert [x.score for x in h] == sorted((x.score for x in h), reverse=True)
        assert db.entries([2])[0].caption == "a red square"
        assert db.info()["kind"] == "flat"


def test_incremental_add_and_dedup(tmp_path: Path, clip_spec: str) -> None:
    files = _write_images(tmp_path / "a", 4)
    _write_images(tmp_path / "b", 3, seed=1)
    shutil.copy(files[0], tmp_path / "b" / "copy_of_first.png")  # same content, other name
    emb = embedder_from_spec(clip_spec)
    with _build(tmp_path / "db", files, clip_spec) as db:
        again = add_images(db, files, emb)
        assert again == {"added": 0, "duplicates": 4, "failed": 0}
        counts = add_images(db, list_image_files(tmp_path / "b"), emb)
        assert counts["added"] == 3 and counts["duplicates"] == 1
        assert len(db) == 7
        assert db.index().ntotal == 7
        assert len({e.sha256 for e in db.entries()}) == 7


def test_mmap_open_and_rebuild_after_lost_index(tmp_path: Path, clip_spec: str) -> None:
    import faiss

    files = _write_images(tmp_path / "imgs", 5)
    _build(tmp_path / "db", files, clip_spec).close()
    with ReferenceDB(tmp_path / "db") as db:
        assert isinstance(db.vectors(), np.memmap)
        idx = faiss.read_index(str(tmp_path / "db" / "index.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        ref = db.vectors()[3:4]
        _, ids = idx.search(np.ascontiguousarray(ref), 1)
        assert ids[0, 0] == 3
    (tmp_path / "db" / "index.faiss").unlink()
    with ReferenceDB(tmp_path / "db") as db:
        assert db.search(np.asarray(db.vectors()[1:2]), k=1)[0][0].entry.vid == 1


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_forced_kinds_search(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((300, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    from semsr.priors.retrieval.index import Entry

    entries = [Entry(-1, f"/x/{i}.png", f"{i:064x}", 8, 8) for i in range(300)]
    with ReferenceDB(tmp_path / "db", create=True, embedder="synthetic", kind=kind) as db:
        assert db.add_vectors(entries, vecs) == 300
        assert db.info()["kind"] == kind
        hits = db.search(vecs[:20], k=4)
    top1 = np.mean([h[0].entry.vid == i for i, h in enumerate(hits)])
    assert top1 >= (0.95 if kind == "hnsw" else 0.6)


def test_shards_merge_equal_single_build(tmp_path: Path, clip_spec: str) -> None:
    files = _write_images(tmp_path / "imgs", 7)
    shards = []
    for rank in range(3):
        d = tmp_path / f"shard{rank}"
        _build(d, shard_files(files, rank, 3), clip_spec).close()
        shards.append(d)
    shards.append(shards[0])  # merging a shard twice adds nothing
    counts = merge_databases(tmp_path / "merged", shards)
    assert counts == {"added": 7, "duplicates": 3}
    with ReferenceDB(tmp_path / "merged") as db:
        assert sorted(e.path for e in db.entries()) == sorted(str(p.resolve()) for p in files)
        v = db.vectors()
        hits = db.search(np.asarray(v), k=1)
        assert [h[0].entry.vid for h in hits] == list(range(7))


def test_cli_build_twice_search_json_info(tmp_path: Path, clip_spec: str, capsys: pytest.CaptureFixture) -> None:
    files = _write_images(tmp_path / "imgs", 5)
    db = tmp_path / "db"
    for _ in range(2):
        assert (
            main(["index", "build", "--images", str(tmp_path / "imgs"), "--out", str(db), "--embedder", clip_spec]) == 0
        )
    assert main(["index", "info", "--db", str(db), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["images"] == 5
    assert main(["index", "search", str(files[1]), "--db", str(db), "-k", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert len(res) == 4 and res[0]["path"] == str(files[1].resolve())
    assert all({"path", "score"} <= set(r) for r in res)
    assert main(["index", "search", str(files[1]), "--db", str(tmp_path / "nope")]) != 0
    assert "not a reference database" in capsys.readouterr().err


def test_clip_embedding_is_the_pre_projection_cls_token(tmp_path: Path, tiny_models: Path) -> None:
    """With a CLIP folder that holds the image projection, the embedding is the seed's CLS token (``hidden_size``
    values, e.g. 1024 for ViT-L/14), not the projected one (768); a database of another size is refused."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from semsr.core.errors import SemsrError
    from semsr.testing.tiny_coser import TINY_CLIP_VISION

    folder = tmp_path / "clip-proj"
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_CLIP_VISION, "projection_dim": 16})).eval()
    model.save_pretrained(folder)
    shutil.copy(tiny_models / "clip-vision" / "preprocessor_config.json", folder)
    emb = embedder_from_spec(f"clip:{folder}")
    assert emb.dim == TINY_CLIP_VISION["hidden_size"] == 32 and emb.token_dim == 32
    img = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    vec, tok = emb.encode(img)
    with torch.no_grad():
        out = model(pixel_values=emb._pixels(img), output_hidden_states=True)
        inner = getattr(model, "vision_model", model)
        want = torch.nn.functional.normalize(inner.post_layernorm(out.last_hidden_state[:, 0]), dim=-1)
    assert vec.shape == (2, 32) and torch.allclose(vec, want, atol=1e-5)
    assert not torch.allclose(vec[:, :16], torch.nn.functional.normalize(out.image_embeds, dim=-1), atol=1e-3)
    assert torch.allclose(tok, out.last_hidden_state, atol=1e-5)
    # a database holding the projected 16-d vectors (an older semsr's) is refused with a rebuild hint
    db = ReferenceDB(tmp_path / "old-db", create=True, embedder=emb.spec)
    from semsr.priors.retrieval.index import Entry

    db.add_vectors([Entry(-1, "x.png", "0" * 64, 8, 8)], np.ones((1, 16), dtype=np.float32) / 4)
    with pytest.raises(SemsrError, match="16-d vectors .*gives 32-d .*rebuild"):
        db.check_dim(emb.dim)
    with pytest.raises(SemsrError, match="rebuild"):
        db.search(vec.numpy(), k=1)
    db.close()
