"""semsr.load(...) -> Pipeline -> Result (image, priors, timings); the priors/suggest protocol."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import semsr
from semsr import api
from semsr.methods import MethodSpec, register


class _Reporter:
    """Test method: nearest 2x, reports priors/timings the way diffusion methods do."""

    name = "test-reporter"
    scale = 2
    tiles_itself = True

    def __init__(self) -> None:
        self.last_priors: dict[str, Any] = {}
        self.last_timings: dict[str, float] = {}
        self.calls: list[dict[str, Any]] = []

    def __call__(self, x: torch.Tensor, **opts: Any) -> torch.Tensor:
        self.calls.append(opts)
        if callable(opts.get("progress")):
            for i in range(3):
                opts["progress"](i + 1, 3)
        self.last_priors = {"prompt": opts.get("prompt", ""), "tags": ("cat", "mat"),
                            "depth": torch.full((1, 1, 4, 5), 0.5)}
        self.last_timings = {"priors": 0.25}
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        return {"prompt": f"an image {x.shape[-1]} wide", "negative_prompt": "blur"}


register(MethodSpec("test-reporter", lambda **_: _Reporter(), 2, "test"))


@pytest.fixture(autouse=True)
def _fresh_cache():
    api.clear_cache()
    yield
    api.clear_cache()


def test_restorer_result_has_image_no_priors_and_timings():
    pipe = semsr.load("bicubic")
    res = pipe(np.zeros((8, 10, 3), np.uint8))
    assert isinstance(res, semsr.Result)
    assert res.image.size == (40, 32) and res.priors == {}
    assert {"load", "read", "upscale", "total"} <= set(res.timings)
    assert all(v >= 0 for v in res.timings.values())
    assert semsr.load("bicubic") is pipe  # cached


def test_pipeline_reports_priors_timings_and_progress():
    pipe = semsr.load("test-reporter")
    events: list[tuple[str, int, int]] = []
    img = Image.new("RGB", (6, 4), (10, 200, 30))
    res = pipe(img, prompt="a cat", steps=3, seed=1, on_progress=lambda *e: events.append(e))
    assert res.image.size == (12, 8)
    assert np.asarray(res.image)[0, 0].tolist() == [10, 200, 30]
    assert res.priors["prompt"] == "a cat" and res.priors["tags"] == ("cat", "mat")
    assert isinstance(res.priors["depth"], Image.Image) and res.priors["depth"].size == (5, 4)
    assert res.timings["priors"] == 0.25
    assert events[-1] == ("denoise", 3, 3)
    opts = pipe.method.calls[-1]
    assert opts["prompt"] == "a cat" and opts["steps"] == 3 and opts["seed"] == 1
    assert "negative_prompt" not in opts  # None values are not forwarded


def test_suggest_priors_hook_and_restorer_default():
    img = Image.new("RGB", (7, 3))
    assert semsr.load("test-reporter").suggest_priors(img) == {"prompt": "an image 7 wide", "negative_prompt": "blur"}
    assert semsr.load("bicubic").suggest_priors(img) == {}


def test_pipeline_is_a_method_and_tile_progress():
    pipe = semsr.load("bicubic")
    x = torch.rand(1, 3, 5, 6)
    assert pipe(x).shape == (1, 3, 20, 24) and pipe.scale == 4 and not pipe.tiles_itself
    events: list[tuple[str, int, int]] = []
    res = pipe(np.zeros((40, 30, 3), np.uint8), tile=16, on_progress=lambda *e: events.append(e))
    assert res.image.size == (120, 160)
    assert events[-1] == ("tiles", 6, 6)


def test_upscale_shortcut_matches_pipeline():
    arr = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    a = np.asarray(semsr.upscale(arr, model="bicubic", outscale=2.5))
    b = np.asarray(semsr.load("bicubic")(arr, outscale=2.5).image)
    assert a.shape == (23, 18, 3) and np.array_equal(a, b)
