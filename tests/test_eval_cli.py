"""``semsr eval``: pairing, per-image JSON, unavailable metrics, errors, and the Set5 anchor end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semsr.cli import main
from semsr.eval.metrics import get_metric, list_images, load_eval_image


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Three ground truths (one grey) and noisy results named ``<stem>_out.png``."""
    rng = np.random.default_rng(0)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i, shape in enumerate([(40, 48, 3), (32, 32, 3), (36, 30)]):
        clean = rng.integers(0, 256, shape)
        _save(clean, gt / f"im{i}.png")
        _save(np.clip(clean + rng.normal(0, 8, shape), 0, 255).round(), pred / f"im{i}_out.png")
    return pred, gt


def test_eval_writes_per_image_values_and_means(folders: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    pred, gt = folders
    out = tmp_path / "r" / "eval.json"
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--suffix", "out", "--metrics", "psnr,psnry,ssim",
               "--crop-border", "2", "--json", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["n_images"] == 3 and doc["crop_border"] == 2 and doc["unavailable"] == {}
    assert [r["image"] for r in doc["per_image"]] == ["im0", "im1", "im2"]
    for name in ("psnr", "psnry", "ssim"):
        vals = [r[name] for r in doc["per_image"]]
        assert doc["mean"][name] == pytest.approx(sum(vals) / 3)
        assert doc["metrics"][name]["higher_better"] is True
    metric = get_metric("psnry")
    direct = metric(load_eval_image(pred / "im2_out.png"), load_eval_image(gt / "im2.png"), crop_border=2)
    assert doc["per_image"][2]["psnry"] == pytest.approx(direct)
    printed = capsys.readouterr().out
    assert "psnry" in printed and "3 image(s), crop border 2" in printed


def test_eval_pairing_errors_and_size_mismatch(folders: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    pred, gt = folders
    assert main(["eval", "--pred", str(pred), "--gt", str(gt)]) == 2
    assert "need --suffix" in capsys.readouterr().err
    # a larger ground truth: error unless --crop-gt
    big = tmp_path / "gtbig"
    for p in list_images(gt):
        arr = np.asarray(Image.open(p))
        _save(np.pad(arr, [(0, 3), (0, 2)] + [(0, 0)] * (arr.ndim - 2)), big / p.name)
    assert main(["eval", "--pred", str(pred), "--gt", str(big), "--suffix", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("semsr: error: ") and "--crop-gt" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--pred", str(pred), "--gt", str(big), "--suffix", "out", "--crop-gt"]) == 0
    # partial overlap: a ground truth without a result fails unless --allow-missing
    (gt / "extra.png").write_bytes((gt / "im0.png").read_bytes())
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--suffix", "out"]) == 2
    err = capsys.readouterr().err
    assert (
        "semsr: error: " in err and "1 ground truth(s) have no result (extra.png)" in err and "--allow-missing" in err
    )
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--suffix", "out", "--allow-missing"]) == 0
    assert "extra.png" in capsys.readouterr().err
    # full-reference metrics need --gt
    assert main(["eval", "--pred", str(pred), "--metrics", "psnr"]) == 2
    assert "need ground truths" in capsys.readouterr().err
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,nope"]) == 2


def test_unavailable_metric_is_reported_not_skipped(folders: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    pred, gt = folders
    out = tmp_path / "r.json"
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--suffix", "out", "--metrics", "psnry,musiq",
               "--weights-dir", str(tmp_path / "empty"), "--json", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["mean"]) == {"psnry"} and "not implemented" in doc["unavailable"]["musiq"]
    assert "unavailable" in capsys.readouterr().out
    # nothing computable at all: exit code of UnavailableError
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--suffix", "out", "--metrics", "maniqa"])
    assert rc == 3


def test_identical_images_give_null_psnr_in_json(tmp_path: Path) -> None:
    img = np.random.default_rng(1).integers(0, 256, (24, 24, 3))
    _save(img, tmp_path / "a" / "x.png")
    _save(img, tmp_path / "b" / "x.png")
    out = tmp_path / "r.json"
    assert main(["eval", "--pred", str(tmp_path / "a" / "x.png"), "--gt", str(tmp_path / "b" / "x.png"),
                 "--metrics", "psnr,ssim", "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["mean"]["psnr"] is None and doc["mean"]["ssim"] == pytest.approx(1.0)


def test_list_metrics(capsys) -> None:
    assert main(["eval", "--list-metrics"]) == 0
    out = capsys.readouterr().out
    for name in ("psnr", "psnry", "ssim", "lpips", "dists", "niqe", "fid", "clipiqa", "musiq", "maniqa"):
        assert f"\n{name} " in out


def test_fetch_weights_uses_the_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    import semsr.core.weights as W

    calls = []
    monkeypatch.setattr(W, "fetch_asset", lambda key: calls.append(key) or [tmp_path / key])
    assert main(["eval", "--fetch-weights", "niqe,dists"]) == 0
    assert calls == ["niqe", "dists"] and "niqe:" in capsys.readouterr().out
    assert main(["eval", "--fetch-weights", "bogus"]) == 2


def test_set5_bicubic_anchor_through_the_cli(data_dir: Path, tmp_path: Path) -> None:
    """Bicubic x4 results written as PNG and scored by `semsr eval` reproduce 28.42 / 0.8104."""
    from semsr.ops.color import round_half_up
    from semsr.ops.imresize import imresize

    folder = data_dir / "benchmarks" / "Set5"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    for p in list_images(folder):
        x = load_eval_image(p).double() * 255
        x = x[..., : x.shape[-2] // 4 * 4, : x.shape[-1] // 4 * 4]  # HR cropped to a multiple of the scale
        lr = round_half_up(imresize(x, scale=0.25).clamp(0, 255))
        sr = round_half_up(imresize(lr, scale=4).clamp(0, 255))
        _save(sr[0].permute(1, 2, 0).numpy(), tmp_path / "sr" / f"{p.stem}.png")
    out = tmp_path / "r.json"
    assert main(["eval", "--pred", str(tmp_path / "sr"), "--gt", str(folder), "--crop-gt", "--scale", "4",
                 "--metrics", "psnry,ssim", "--json", str(out)]) == 0  # fmt: skip
    mean = json.loads(out.read_text())["mean"]
    assert abs(mean["psnry"] - 28.42) <= 0.01 and abs(mean["ssim"] - 0.8104) <= 0.001


def test_niqe_without_ground_truth(tmp_path: Path, capsys) -> None:
    import semsr.core.weights as W
    from semsr.core.errors import UnavailableError

    try:
        W.registry_file("niqe/niqe_pris_params.npz")
    except UnavailableError as err:
        pytest.skip(f"NIQE parameters unavailable here: {err}")
    rng = np.random.default_rng(2)
    _save(rng.integers(0, 256, (100, 120, 3)), tmp_path / "p" / "a.png")
    _save(rng.integers(0, 256, (100, 100)), tmp_path / "p" / "b.png")
    out = tmp_path / "r.json"
    assert main(["eval", "--pred", str(tmp_path / "p"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["mean"]) == ["niqe"] and doc["per_image"][0]["gt"] is None
    assert doc["mean"]["niqe"] > 0


def test_fid_compares_whole_folders_without_pairing(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import semsr.eval.metrics as metrics_pkg
    from semsr.eval.metrics.fid import FID

    seen = {}

    class RecordingFID(FID):
        def __init__(self, **_: object) -> None:  # no Inception needed to test the CLI's set handling
            pass

        def compute_sets(self, set_a, set_b, crop_border=0):
            seen.update(a=[Path(p).name for p in set_a], b=[Path(p).name for p in set_b], crop=crop_border)
            return 12.5

    real = metrics_pkg.get_metric
    monkeypatch.setattr(metrics_pkg, "get_metric", lambda n, **kw: RecordingFID() if n == "fid" else real(n, **kw))
    pred, gt = folders  # names differ (im0_out.png vs im0.png): FID does not pair
    out = tmp_path / "r.json"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "fid", "--json", str(out)]) == 0
    assert seen == {
        "a": ["im0_out.png", "im1_out.png", "im2_out.png"],
        "b": ["im0.png", "im1.png", "im2.png"],
        "crop": 0,
    }
    doc = json.loads(out.read_text())
    assert doc["mean"] == {"fid": 12.5} and doc["metrics"]["fid"]["n"] == [3, 3]
