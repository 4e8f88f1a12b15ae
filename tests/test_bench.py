"""Tests of the benchmark harness: datasets, LR sets, runner (cache/resume), report, `semsr bench`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr import methods
from semsr.cli import main
from semsr.commands import bench as bench_command
from semsr.core.errors import SemsrError
from semsr.core.options import MethodOptions, OptionError, option
from semsr.core.outputs import SROutput
from semsr.eval.datasets import resolve_dataset
from semsr.eval.lrsets import MANIFEST, load_lr, prepare
from semsr.eval.runner import (
    BenchConfig,
    ResultCache,
    parse_method_entry,
    plan_methods,
    run_bench,
    split_methods,
)

# Published bicubic x4 anchors (EDSR/RCAN/SwinIR tables): PSNR-Y, SSIM-Y
ANCHORS = {"Set5": (28.42, 0.8104), "Set14": (26.00, 0.7027)}


# --------------------------------------------------------------------------- fixtures


def _write_images(
    folder: Path, n: int, size: tuple[int, int] = (96, 80), grey: tuple[int, ...] = (), seed: int = 0
) -> Path:
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

    def __call__(self, x: torch.Tensor, options: object = None, *, progress: object = False) -> SROutput:
        type(self).calls += 1
        return SROutput(x.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2))


@pytest.fixture()
def nearest_method():
    _Nearest.calls = 0
    methods.register(methods.MethodSpec("test-nearest", lambda _options: _Nearest(), MethodOptions, 4, "test upscaler"))
    yield _Nearest
    methods.REGISTRY.entries.pop("test-nearest", None)


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEMSR_CACHE", str(cache))
    return cache


def _config(datasets: list[str], **kw: object) -> BenchConfig:
    from semsr.eval.datasets import parse_datasets

    base = dict(
        methods=["test-nearest"], datasets=parse_datasets(datasets), isolate=False, metrics=["psnr", "psnry", "ssim"]
    )
    base.update(kw)
    return BenchConfig(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- anchor (needs the shared data)


def test_bicubic_anchor_set5_set14_via_cli(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The acceptance command reproduces the published bicubic x4 PSNR-Y/SSIM-Y; JSON schema holds."""
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:  # one thread: much faster than oversubscribed OpenMP on a busy 2-core machine
        code = main(
            [
                "bench",
                "--methods",
                "bicubic",
                "--datasets",
                "Set5,Set14",
                "--degradation",
                "bicubic",
                "--scale",
                "4",
                "--metrics",
                "psnr,psnry,ssim",
                "--json",
                str(out),
                "-q",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"rows"}
    rows = {r["dataset"]: r for r in doc["rows"]}
    assert set(rows) == {"Set5", "Set14"}
    for name, (psnry, ssim) in ANCHORS.items():
        r = rows[name]
        assert set(r) >= {
            "method",
            "dataset",
            "degradation",
            "scale",
            "metrics",
            "seconds_per_image",
            "peak_rss_mb",
            "n_images",
        }
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


def test_lr_only_set_gets_no_reference_metrics(
    tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]
) -> None:
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
    assert (
        json.loads((other.images[0].lr_path.parent / MANIFEST).read_text())["images"]["img00.png"]["lr_sha256"]
        != shas[0][0]
    )


def test_report_files(tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]) -> None:
    from semsr.eval.report import write_report

    hr = _write_images(tmp_path / "hr", 3, size=(128, 128))
    real = _write_images(tmp_path / "real", 2, size=(40, 40), seed=1)
    result = run_bench(
        _config([str(hr), "lr:" + str(real)], methods=["bicubic", "test-nearest"], metrics=["psnry", "niqe"])
    )
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


def test_unavailable_metric_is_reported_not_skipped(
    tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest]
) -> None:
    from semsr.eval.runner import rows_to_json

    folder = _write_images(tmp_path / "hr", 1)
    (row,) = run_bench(_config([str(folder)], metrics=["psnry", "lpips"], weights_dir=tmp_path / "no-weights")).rows
    assert row.metrics["lpips"] is None and "lpips" in row.unavailable
    assert "alexnet" in row.unavailable["lpips"].lower()
    doc = rows_to_json([row])
    assert doc["rows"][0]["metrics"]["lpips"] is None and "lpips" in doc["rows"][0]["unavailable"]


def test_set_level_metric_gets_folders_of_sr_and_gt(
    tmp_path: Path, fresh_cache: Path, nearest_method: type[_Nearest], monkeypatch: pytest.MonkeyPatch
) -> None:
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


# --------------------------------------------------------------------------- method variants and weight fingerprints


@dataclass(kw_only=True, frozen=True)
class VariantOptions(MethodOptions):
    """Options of ``test-variant``: build options ``level`` and ``checkpoint``, run options ``steps`` and ``flag``."""

    level: int = option(0, stage="build", min=0, max=255, help="added to every pixel (/255)")
    checkpoint: Path | None = option(None, stage="build", help="weights folder (fingerprinted)")
    steps: int = option(20, min=1, max=1000, help="steps")
    flag: bool = option(False, help="a switch")


class _Variant:
    """x4 nearest upscaler plus ``level``/255 (a build option); records the run options of every call."""

    calls: list[dict[str, object]] = []
    builds: list[int] = []
    scale = 4
    tiles_itself = False

    def __init__(self, name: str, level: int) -> None:
        self.name, self.level = name, level

    def __call__(self, x: torch.Tensor, options: VariantOptions | None = None, *, progress: object = False) -> SROutput:
        type(self).calls.append(options.changed("run") if options is not None else {})
        y = x.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)
        return SROutput((y + self.level / 255.0).clamp(0, 1))


def _variant_factory(name: str):
    def factory(options: VariantOptions) -> _Variant:
        _Variant.builds.append(options.level)
        return _Variant(name, options.level)

    return factory


def _variant_spec(name: str, **kw: object) -> methods.MethodSpec:
    return methods.MethodSpec(
        name, _variant_factory(name), VariantOptions, 4, "test variants", weight_paths=("checkpoint",), **kw
    )  # type: ignore[arg-type]


@pytest.fixture()
def variant_method():
    """``test-variant``: build options ``level`` and ``checkpoint`` (a weight path), run options ``steps``, ``flag``."""
    _Variant.calls, _Variant.builds = [], []
    methods.register(_variant_spec("test-variant"))
    yield _Variant
    methods.REGISTRY.entries.pop("test-variant", None)


TILES = {"tile": 512, "tile_pad": 16}  # the bench's tile settings, part of every plan's run options


def test_split_and_parse_method_entries() -> None:
    text = "default,default[steps=1],default[no_edge_prior],default[steps=8,seed=3],realesrgan-x4plus"
    parts = split_methods(text)
    assert parts == [
        "default",
        "default[steps=1]",
        "default[no_edge_prior]",
        "default[steps=8,seed=3]",
        "realesrgan-x4plus",
    ]
    assert [parse_method_entry(p).label for p in parts] == parts
    e = parse_method_entry(" a[ x = 2 , no-edge , g=0.5, on=TRUE, off=false, p=/runs/r1/final, v=1e-3 ] ")
    assert e.name == "a"
    assert e.opts == {
        "x": "2",
        "no_edge": True,
        "g": "0.5",
        "on": "TRUE",
        "off": "false",
        "p": "/runs/r1/final",
        "v": "1e-3",
    }  # text: the method's options class reads it
    assert e.label == "a[x=2,no_edge,g=0.5,on=TRUE,off=false,p=/runs/r1/final,v=1e-3]"
    assert parse_method_entry("bicubic").opts == {} and split_methods(" a , ,b ") == ["a", "b"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("a[steps=1", "unbalanced"),
        ("a]steps=1[", "unbalanced"),
        ("a[steps=1]]", "unbalanced"),
    ],
)
def test_split_rejects_unbalanced_brackets(text: str, match: str) -> None:
    with pytest.raises(SemsrError, match=match):
        split_methods(text)


@pytest.mark.parametrize(
    "entry",
    ["a[]", "a[=3]", "a[steps=1,]", "a[x y=1]", "a[steps=]", "a[s=1,s=2]", "[steps=1]", "a[b[c]]", "a[x=1]tail", "a]"],
)
def test_parse_rejects_malformed_entries(entry: str) -> None:
    with pytest.raises(SemsrError) as err:
        parse_method_entry(entry)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "methods_arg", ["bicubic,bicubic[steps=1", "bicubic,no-such-method[steps=1]", "bicubic,bicubic[steps=1,]"]
)
def test_malformed_methods_fail_before_any_work(
    tmp_path: Path, fresh_cache: Path, methods_arg: str, capsys: pytest.CaptureFixture
) -> None:
    folder = _write_images(tmp_path / "hr", 1)
    code = main(["bench", "--methods", methods_arg, "--datasets", str(folder), "--no-isolate"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("semsr: error:")
    assert not (fresh_cache / "bench").exists(), "nothing may be prepared or cached"


def test_build_and_run_options_are_routed(tmp_path: Path, fresh_cache: Path, variant_method: type[_Variant]) -> None:
    """The options' stages decide: build options (over --method-opt) build, run options reach every call."""
    folder = _write_images(tmp_path / "hr", 2)
    entries = ["test-variant", "test-variant[level=9]", "test-variant[steps=3,flag]", "test-variant[level=9, steps=3]"]
    result = run_bench(_config([str(folder)], methods=entries, method_opts={"level": "5"}, metrics=["psnr"]))
    labels = ["test-variant", "test-variant[level=9]", "test-variant[steps=3,flag]", "test-variant[level=9,steps=3]"]
    assert [r.method for r in result.rows] == labels
    assert variant_method.builds == [5, 9, 5, 9]
    assert variant_method.calls == [TILES] * 4 + [{"steps": 3, "flag": True, **TILES}] * 2 + [{"steps": 3, **TILES}] * 2
    assert list(result.method_keys) == labels and len(set(result.method_keys.values())) == 4
    psnr = {r.method: r.metrics["psnr"] for r in result.rows}
    assert psnr["test-variant"] == psnr["test-variant[steps=3,flag]"] != psnr["test-variant[level=9]"]
    for label in labels:  # each variant has its own SR files
        assert result.sr_path(label, result.lrsets[0], result.lrsets[0].images[0]).is_file()
    again = run_bench(
        _config(
            [str(folder)],
            methods=entries[::-1] + ["test-variant[level=09,steps=3]"],
            method_opts={"level": "5"},
            metrics=["psnr"],
        )
    )
    assert len(variant_method.calls) == 8 and again.stats.upscale_cached == 8
    assert [r.method for r in again.rows] == labels[::-1], "a repeated entry (values as parsed) is one row"
    assert again.method_keys == result.method_keys


def test_plan_options_and_keys() -> None:
    (plain, variant) = plan_methods(BenchConfig(methods=["bicubic,bicubic[tile=64]"], datasets=[]))
    assert plain.label == "bicubic" and plain.options == methods.resolve("bicubic").parse({"scale": 4, **TILES})
    assert variant.key != plain.key and variant.run_values == {"tile": 64, "tile_pad": 16}
    assert plain.build_values == {} and variant.build_values == {}  # bicubic's scale: the bench's (4, its default)
    (x2,) = plan_methods(BenchConfig(methods=["bicubic"], datasets=[], scale=2, threads=1))
    assert x2.build_values == {"scale": 2.0, "threads": 1}
    (one_thread,) = plan_methods(BenchConfig(methods=["bicubic"], datasets=[], threads=1))
    assert one_thread.key == plain.key, "threads do not change outputs: same cache entry"
    (bf16,) = plan_methods(BenchConfig(methods=["bicubic[dtype=bf16]"], datasets=[]))
    assert bf16.build_values == {"dtype": "bf16"} and bf16.key != plain.key


def test_bracket_options_are_parsed_by_the_method(
    capsys: pytest.CaptureFixture, fresh_cache: Path, tmp_path: Path
) -> None:
    """`semsr bench --methods 'default[setps=1]'`: one line naming setps and steps, before any work."""
    with pytest.raises(OptionError) as err:
        plan_methods(BenchConfig(methods=["sd-controlnet[setps=1]"], datasets=[]))
    assert str(err.value) == "method 'sd-controlnet' has no option setps; did you mean steps?"
    with pytest.raises(OptionError, match="option steps: expected an integer, got '1.5'"):
        plan_methods(BenchConfig(methods=["sd-controlnet[steps=1.5]"], datasets=[]))
    with pytest.raises(OptionError, match="option steps: expected an integer, got '1e30'"):
        plan_methods(BenchConfig(methods=["sd-controlnet[steps=1e30]"], datasets=[]))
    with pytest.raises(OptionError, match="option tile: expected an integer, got 'abc'"):
        plan_methods(BenchConfig(methods=["bicubic[tile=abc]"], datasets=[]))
    folder = _write_images(tmp_path / "hr", 1)
    code = main(["bench", "--methods", "default[setps=1]", "--datasets", str(folder), "--no-isolate"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text == "semsr: error: method 'default' has no option setps; did you mean steps?\n"
    assert not (fresh_cache / "bench").exists(), "nothing may be prepared or cached"


def test_checkpoint_folder_content_changes_the_key(
    tmp_path: Path, fresh_cache: Path, variant_method: type[_Variant]
) -> None:
    ckpt = tmp_path / "run" / "final"
    (ckpt / "unet").mkdir(parents=True)
    weights = ckpt / "unet" / "model.safetensors"
    weights.write_bytes(b"A" * 64)
    (ckpt / "config.json").write_text("{}")
    folder = _write_images(tmp_path / "hr", 1)

    def key() -> str:
        (plan,) = plan_methods(BenchConfig(methods=[f"test-variant[checkpoint={ckpt}]"], datasets=[]))
        assert plan.build_values == {"checkpoint": ckpt}
        return plan.key

    first = key()
    assert key() == first
    run_bench(_config([str(folder)], methods=[f"test-variant[checkpoint={ckpt}]"], metrics=["psnr"]))
    assert len(variant_method.calls) == 1
    st = weights.stat()
    weights.write_bytes(b"B" * 64)  # same size, new content
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = key()
    assert second != first
    result = run_bench(_config([str(folder)], methods=[f"test-variant[checkpoint={ckpt}]"], metrics=["psnr"]))
    assert len(variant_method.calls) == 2 and result.stats.upscaled == 1, "new weights must not reuse old outputs"
    (ckpt / "extra.bin").write_bytes(b"x")
    assert key() not in (first, second)


def test_model_info_files_change_the_key_also_through_an_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant_method: type[_Variant]
) -> None:
    from semsr.models.catalog import ModelInfo, default_info

    pkg = tmp_path / "site" / "semsr_test_weights"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    blob = pkg / "weights" / "net.bin"
    blob.write_bytes(b"\0" * 32)
    (pkg / "prior").mkdir()
    used = pkg / "prior" / "w.bin"  # another model the outputs depend on (the default model's IRPAD)
    used.write_bytes(b"\0" * 8)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    info = ModelInfo(
        "test-weighted",
        4,
        "pytorch",
        module="semsr_test_weights",
        files=("net.bin",),
        folder="weights",
        uses=("prior/w.bin",),
    )
    methods.register(_variant_spec("test-weighted", info=info))
    methods.register(_variant_spec("test-weighted-alias", info=default_info(info), alias_of="test-weighted"))
    try:

        def keys() -> list[str]:
            plans = plan_methods(BenchConfig(methods=["test-weighted,test-weighted-alias,test-variant"], datasets=[]))
            return [p.key for p in plans]

        before = keys()
        st = blob.stat()
        blob.write_bytes(b"\1" * 32)
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        after = keys()
        assert after[0] != before[0] and after[1] != before[1], "weights (and the alias's target) are fingerprinted"
        assert after[2] == before[2], "methods without weight files keep their key"
        used.write_bytes(b"\1" * 8)
        changed = keys()
        assert changed[0] != after[0] and changed[1] != after[1], "files the model uses are fingerprinted too"
    finally:
        methods.REGISTRY.entries.pop("test-weighted", None)
        methods.REGISTRY.entries.pop("test-weighted-alias", None)


def test_cli_rows_carry_variant_labels(
    tmp_path: Path, fresh_cache: Path, variant_method: type[_Variant], capsys: pytest.CaptureFixture
) -> None:
    folder = _write_images(tmp_path / "hr", 1)
    out, csv = tmp_path / "r.json", tmp_path / "r.csv"
    code = main(
        [
            "bench",
            "--methods",
            "test-variant,test-variant[level=3,steps=2]",
            "--datasets",
            str(folder),
            "--metrics",
            "psnr",
            "--no-isolate",
            "-q",
            "--json",
            str(out),
            "--csv",
            str(csv),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["test-variant", "test-variant[level=3,steps=2]"]
    assert "test-variant[level=3,steps=2]" in csv.read_text()
    assert "| test-variant[level=3,steps=2] |" in capsys.readouterr().out


def test_method_process_exits_quietly_when_the_bench_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    """A killed `semsr bench` leaves its method process writing into a closed pipe: it stops
    without a traceback (the outputs it finished are already cached)."""
    from semsr.eval import runner

    class GonePipe:
        closed = False

        def send(self, msg: object) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def close(self) -> None:
            self.closed = True

    conn = GonePipe()
    runner._worker_main({"jobs": []}, conn)
    assert conn.closed and capsys.readouterr().err == ""


# --------------------------------------------------------------------------- kinds


def test_bench_kinds_are_sub_commands(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`semsr bench KIND`: each module of KIND_MODULES that exists adds a kind; none is a top-level command."""
    import sys
    import types

    kind = types.ModuleType("semsr_test_bench_kind")
    seen: list[str] = []

    def register_kind(subparsers) -> None:
        p = subparsers.add_parser("demo", help="a test kind")
        p.add_argument("--n", type=int, default=1)
        p.set_defaults(func=lambda args: seen.append(f"demo {args.n}") or 0)

    kind.register_kind = register_kind  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "semsr_test_bench_kind", kind)
    monkeypatch.setattr(bench_command, "KIND_MODULES", ("semsr_test_no_such_kind", "semsr_test_bench_kind"))
    assert main(["bench", "demo", "--n", "3"]) == 0 and seen == ["demo 3"]
    assert main(["bench", "--datasets", "Set5"]) == 2
    assert capsys.readouterr().err == "semsr: error: the following arguments are required: --methods\n"
    with pytest.raises(SystemExit):
        main(["bench", "-h"])
    assert "demo" in capsys.readouterr().out
    assert bench_command.KIND_MODULES == ("semsr_test_no_such_kind", "semsr_test_bench_kind")
    monkeypatch.undo()
    assert bench_command.KIND_MODULES == ("semsr.commands.bench_irpad", "semsr.commands.bench_retrieval")
    from semsr.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert not any(name.startswith("bench-") or name.startswith("bench_") for name in commands)
