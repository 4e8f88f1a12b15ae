"""Tests of the benchmark harness: datasets, LR sets, runner (cache/resume), report, `semsr bench`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr import methods
from semsr.cli import main
from semsr.errors import SemsrError
from semsr.eval.datasets import resolve_dataset
from semsr.eval.lrsets import MANIFEST, load_lr, prepare
from semsr.eval.runner import BenchConfig, ResultCache, run_bench

# Published bicubic x4 anchors (EDSR/RCAN/SwinIR tables): PSNR-Y, SSIM-Y
ANCHORS = {"Set5": (28.42, 0.8104), "Set14": (26.00, 0.7027)}


# --------------------------------------------------------------------------- fixtures


def _write_images(folder: Path, n: int, size: tuple[int, int] = (96, 80), grey: tuple[int, ...] = (), seed: int = 0) -> Path:
    """Smooth random test images (a structured pattern plus noise), uint8 PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = 128 + 90 * np.sin(xx / (3 + i) + yy / 7.0)[..., None] * np.array([1.0, 0.8, 0.6])
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        if i in grey:
            Image.fromarray(img[..., 1]).save(folder / f"img{i:02d}.png")
        else:
            Image.fromarray(img).save(folder / f"img{i:02d}.png")
    return folder


class _Nearest:
    """Nearest-neighbour x4 upscaler that counts its calls."""

    calls = 0
    name = "test-nearest"
    scale = 4
    tiles_itself = False

    def __call__(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        type(self).calls += 1
        return x.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)


@pytest.fixture()
def nearest_method():
    _Nearest.calls = 0
    methods.register(methods.MethodSpec("test-nearest", lambda **_: _Nearest(), 4, "test upscaler"))
    yield _Nearest
    methods._REGISTRY.pop("test-nearest", None)


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEMSR_CACHE", str(cache))
    return cache


def _config(datasets: list[str], **kw: object) -> BenchConfig:
    from semsr.eval.datasets import parse_datasets

    base = dict(methods=["test-nearest"], datasets=parse_datasets(datasets), isolate=False,
                metrics=["psnr", "psnry", "ssim"])
    base.update(kw)
    return BenchConfig(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- anchor (needs the shared data)


def test_bicubic_anchor_set5_set14_via_cli(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The acceptance command reproduces the published bicubic x4 PSNR-Y/SSIM-Y; JSON schema holds."""
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:  # one thread: much faster than oversubscribed OpenMP on a busy 2-core machine
        code = main(["bench", "--methods", "bicubic", "--datasets", "Set5,Set14", "--degradation", "bicubic",
                     "--scale", "4", "--metrics", "psnr,psnry,ssim", "--json", str(out), "-q", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"rows"}
    rows = {r["dataset"]: r for r in doc["rows"]}
    assert set(rows) == {"Set5", "Set14"}
    for name, (psnry, ssim) in ANCHORS.items():
        r = rows[name]
        assert set(r) >= {"method", "dataset", "degradation", "scale", "metrics", "seconds_per_image",
                          "peak_rss_mb", "n_images"}
        assert (r["method"], r["degradation"], r["scale"]) == ("bicubic", "bicubic", 4)
        assert r["n_images"] == {"Set5": 5, "Set14": 14}[name]
        assert set(r["metrics"]) == {"psnr", "psnry", "ssim"}
        assert abs(r["metrics"]["psnry"] - psnry) <= 0.01, r["metrics"]
        assert abs(r["metrics"]["ssim"] - ssim) <= 0.001, r["metrics"]
        assert r["metrics"]["psnr"] < r["metrics"]["psnry"]  # RGB PSNR is lower than Y PSNR here
        assert r["seconds_per_image"] > 0 and 50 < r["peak_rss_mb"] < 4000
    table = capsys.readouterr().out
    assert "| bicubic |" in table and "psnry↑" in table and "28.42" in table


def test_realsrset_gets_only_no_reference_metrics(data_dir: Path, fresh_cache: Path) -> None:
    ds = resolve_dataset("realsrset")
    assert ds.name == "RealSRSet" and not ds.has_gt and len(ds.files) == 20
    assert resolve_dataset("B100").has_gt
    (row,) = run_bench(_config(["RealSRSet"], methods=["bicubic"], metrics=["psnry", "ssim", "niqe"], limit=1)).rows
    assert row.dataset == "RealSRSet" and row.degradation == "real" and row.n_images == 1
    assert list(row.metrics) == ["niqe"] and row.metrics["niqe"] > 0


# --------------------------------------------------------------------------- runner on synthetic folders


def test_resume_reuses_cache(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]) -> None:
    folder = _write_images(tmp_path / "hr", 3, size=(128, 112))
    first = run_bench(_config([str(folder)]))
    assert nearest_method.calls == 3 and first.stats.upscaled == 3
    assert first.stats.metrics_computed == 9
    second = run_bench(_config([str(folder)]))
    assert nearest_method.calls == 3, "second run must not call the method again"
    assert second.stats.upscale_cached == 3 and second.stats.metrics_computed == 0
    assert second.rows[0].metrics == first.rows[0].metrics
    # an extra metric is computed for the cached outputs only
    third = run_bench(_config([str(folder)], metrics=["psnr", "psnry", "ssim", "niqe"]))
    assert nearest_method.calls == 3 and third.stats.metrics_computed == 3
    # an edited source image is detected by its hash and redone
    Image.fromarray(np.zeros((128, 112, 3), np.uint8)).save(folder / "img01.png")
    run_bench(_config([str(folder)]))
    assert nearest_method.calls == 4


def test_limit_and_folder_dataset(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]) -> None:
    folder = _write_images(tmp_path / "photos", 4)
    result = run_bench(_config([str(folder)], limit=2))
    (row,) = result.rows
    assert row.dataset == "photos" and row.n_images == 2 and nearest_method.calls == 2
    assert row.degradation == "bicubic" and set(row.metrics) == {"psnr", "psnry", "ssim"}
    assert 10 < row.metrics["psnry"] < 60 and 0 < row.metrics["ssim"] < 1


def test_lr_only_set_gets_no_reference_metrics(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]) -> None:
    folder = _write_images(tmp_path / "real", 2, size=(48, 40))
    result = run_bench(_config(["lr:" + str(folder)], metrics=["psnry", "ssim", "niqe"]))
    (row,) = result.rows
    assert row.degradation == "real" and list(row.metrics) == ["niqe"]
    assert row.metrics["niqe"] is not None and row.metrics["niqe"] > 0


def test_grey_images_evaluated_on_raw_values(tmp_path: Path, fresh_cache: Path) -> None:
    """A grey ('L') ground truth is scored on its grey values: PSNR-Y equals RGB-free PSNR."""
    folder = _write_images(tmp_path / "grey", 1, grey=(0,))
    lrset = prepare(resolve_dataset(str(folder)), "bicubic", 4)
    assert lrset.images[0].grey and load_lr(lrset.images[0]).shape[1] == 1
    result = run_bench(_config([str(folder)], methods=["bicubic"]))
    m = result.rows[0].metrics
    assert m["psnry"] == pytest.approx(m["psnr"], abs=1e-9)


def test_lrset_manifest_and_realesrgan_determinism(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write_images(tmp_path / "hr", 2, size=(64, 64))
    ds = resolve_dataset(str(folder))
    shas = []
    for i in range(2):
        monkeypatch.setenv("SEMSR_CACHE", str(tmp_path / f"cache{i}"))
        lrset = prepare(ds, "realesrgan", 4, seed=3)
        manifest = json.loads((lrset.images[0].lr_path.parent / MANIFEST).read_text())
        assert manifest["degradation"] == "realesrgan" and manifest["scale"] == 4 and manifest["seed"] == 3
        entry = manifest["images"]["img00.png"]
        assert entry["lr_size"] == [16, 16] and len(entry["source_sha256"]) == 64
        shas.append([manifest["images"][n]["lr_sha256"] for n in ("img00.png", "img01.png")])
    assert shas[0] == shas[1], "the same seed must give byte-identical LR inputs"
    assert shas[0][0] != shas[0][1]
    other = prepare(ds, "realesrgan", 4, seed=4)
    assert json.loads((other.images[0].lr_path.parent / MANIFEST).read_text())["images"]["img00.png"]["lr_sha256"] != shas[0][0]


def test_report_files(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]) -> None:
    from semsr.eval.report import write_report

    hr = _write_images(tmp_path / "hr", 3, size=(128, 128))
    real = _write_images(tmp_path / "real", 2, size=(40, 40), seed=1)
    result = run_bench(_config([str(hr), "lr:" + str(real)], methods=["bicubic", "test-nearest"],
                               metrics=["psnry", "niqe"]))
    out = tmp_path / "report"
    with ResultCache() as cache:
        files = write_report(result, cache, out, images_per_set=2, crop=64)
    assert all(f.is_file() for f in files)
    pages = sorted(out.glob("*.html"))
    assert {p.name for p in pages} == {"index.html", "hr_bicubic_x4.html", "real_real_x4.html"}
    for page in pages:
        text = page.read_text()
        for ref in re.findall(r"(?:src|href)='([^']+)'", text):
            assert (out / ref).is_file(), f"{page.name} references missing {ref}"
    grids = sorted(out.glob("hr_bicubic_x4_img*.png"))
    assert len(grids) == 2
    with Image.open(grids[0]) as im:  # LR | bicubic | nearest | GT, 64 px crops at 2x
        assert im.width >= 4 * 128 and im.height > 128
    assert (out / "hr_bicubic_x4_speed.png").is_file()
    md = (out / "results_bicubic_x4.md").read_text()
    assert "test-nearest" in md and "niqe↓" in md


# --------------------------------------------------------------------------- CLI errors


def test_bad_method_name_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _write_images(tmp_path / "hr", 1)
    code = main(["bench", "--methods", "bicubic,no-such-method", "--datasets", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("semsr: error:") and "no-such-method" in err


def test_bad_dataset_is_one_line_error(capsys: pytest.CaptureFixture) -> None:
    code = main(["bench", "--methods", "bicubic", "--datasets", "NoSuchSet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "unknown dataset" in err


def test_scale_mismatch_is_reported(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]) -> None:
    folder = _write_images(tmp_path / "hr", 1)
    with pytest.raises(SemsrError, match="x4"):
        run_bench(_config([str(folder)], scale=2))


# --------------------------------------------------------------------------- unavailable and set-level metrics


def test_unavailable_metric_is_reported_not_skipped(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]) -> None:
    from semsr.eval.runner import rows_to_json

    folder = _write_images(tmp_path / "hr", 1)
    (row,) = run_bench(_config([str(folder)], metrics=["psnry", "lpips"], weights_dir=tmp_path / "no-weights")).rows
    assert row.metrics["lpips"] is None and "lpips" in row.unavailable
    assert "alexnet" in row.unavailable["lpips"].lower()
    doc = rows_to_json([row])
    assert doc["rows"][0]["metrics"]["lpips"] is None and "lpips" in doc["rows"][0]["unavailable"]


def test_set_level_metric_gets_folders_of_sr_and_gt(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """FID-like metrics receive one folder of SR outputs and one of ground truths (cached per image set)."""
    import semsr.eval.metrics as metrics_pkg
    from semsr.eval.metrics.image import list_images

    calls = []

    class FakeFID:
        def compute_folders(self, a: Path, b: Path) -> float:
            sr, gt = list_images(a), list_images(b)
            assert all(p.resolve().is_file() for p in sr + gt)
            with Image.open(sr[0]) as im_sr, Image.open(gt[0]) as im_gt:
                assert im_sr.size == im_gt.size
            calls.append((len(sr), len(gt)))
            return 10.0 * len(sr) + len(gt)

    real_get = metrics_pkg.get_metric
    monkeypatch.setattr(metrics_pkg, "get_metric", lambda n, **kw: FakeFID() if n == "fid" else real_get(n, **kw))
    folder = _write_images(tmp_path / "hr", 3)
    (row,) = run_bench(_config([str(folder)], metrics=["psnry", "fid"])).rows
    assert row.metrics["fid"] == 33.0 and calls == [(3, 3)]
    run_bench(_config([str(folder)], metrics=["psnry", "fid"]))
    assert calls == [(3, 3)], "set-level value must come from the cache"
    (row2,) = run_bench(_config([str(folder)], metrics=["fid"], limit=2)).rows
    assert row2.metrics["fid"] == 22.0
