"""semsr.load(...) -> Pipeline -> Result (image, priors, timings); the priors/suggest protocol; typed options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import semsr
from semsr import api
from semsr.core.options import MethodOptions, OptionError, option
from semsr.core.outputs import SROutput
from semsr.methods import REGISTRY, MethodSpec, register


@dataclass(kw_only=True, frozen=True)
class ReporterOptions(MethodOptions):
    """Options of the test method (a build option and the usual run options)."""

    weights: str | None = option(None, stage="build", help="a build option")
    prompt: str = option("", help="prompt")
    negative_prompt: str = option("", help="negative prompt")
    steps: int = option(20, min=1, max=1000, help="steps")
    seed: int = option(0, min=0, help="seed")


class _Reporter:
    """Test method: nearest 2x, reports priors/timings/side images the way diffusion methods do."""

    name = "test-reporter"
    scale = 2
    tiles_itself = True
    options_class = ReporterOptions

    def __init__(self, options: ReporterOptions) -> None:
        self.built_with = options
        self.calls: list[ReporterOptions] = []

    def __call__(self, x: torch.Tensor, options: ReporterOptions | None = None, *, progress: Any = False) -> SROutput:
        opts = options or ReporterOptions()
        self.calls.append(opts)
        if callable(progress):
            for i in range(3):
                progress(i + 1, 3)
        priors = {"prompt": opts.prompt, "tags": ("cat", "mat"), "depth": torch.full((1, 1, 4, 5), 0.5)}
        y = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        return SROutput(y, priors=priors, timings={"priors": 0.25}, side_images={"reference": torch.zeros(1, 3, 3, 3)})

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        return {"prompt": f"an image {x.shape[-1]} wide", "negative_prompt": "blur"}


@pytest.fixture(autouse=True)
def _registered():
    register(MethodSpec("test-reporter", _Reporter, ReporterOptions, 2, "test"))
    api.clear_cache()
    yield
    REGISTRY.entries.pop("test-reporter", None)
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
    res = pipe(img, prompt="a cat", steps=3, seed=1, negative_prompt=None, on_progress=lambda *e: events.append(e))
    assert res.image.size == (12, 8)
    assert np.asarray(res.image)[0, 0].tolist() == [10, 200, 30]
    assert res.priors["prompt"] == "a cat" and res.priors["tags"] == ("cat", "mat")
    assert isinstance(res.priors["depth"], Image.Image) and res.priors["depth"].size == (5, 4)
    assert isinstance(res.priors["reference"], Image.Image)  # side images join the priors
    assert res.timings["priors"] == 0.25
    assert events[-1] == ("denoise", 3, 3)
    opts = pipe.method.calls[-1]
    assert isinstance(opts, ReporterOptions)
    assert (opts.prompt, opts.steps, opts.seed, opts.negative_prompt) == ("a cat", 3, 1, "")  # None = default
    assert (opts.tile, opts.tile_pad) == (0, 0)  # a self-tiling method gets the resolved tile settings


def test_suggest_priors_hook_and_restorer_default():
    img = Image.new("RGB", (7, 3))
    assert semsr.load("test-reporter").suggest_priors(img) == {"prompt": "an image 7 wide", "negative_prompt": "blur"}
    assert semsr.load("bicubic").suggest_priors(img) == {}


def test_pipeline_is_a_method_and_tile_progress():
    pipe = semsr.load("bicubic")
    x = torch.rand(1, 3, 5, 6)
    out = pipe(x)
    assert isinstance(out, SROutput) and out.images.shape == (1, 3, 20, 24) and pipe.scale == 4
    assert not pipe.tiles_itself
    events: list[tuple[str, int, int]] = []
    res = pipe(np.zeros((40, 30, 3), np.uint8), tile=16, on_progress=lambda *e: events.append(e))
    assert res.image.size == (120, 160)
    assert events[-1] == ("tiles", 6, 6)
    events.clear()
    rgba = np.zeros((40, 30, 4), np.uint8)
    pipe(rgba, tile=16, alpha="model", on_progress=lambda *e: events.append(e))
    assert [e[1] for e in events] == list(range(1, 13)) and events[-1] == ("tiles", 12, 12)


def test_upscale_shortcut_matches_pipeline():
    arr = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    a = np.asarray(semsr.upscale(arr, model="bicubic", outscale=2.5))
    b = np.asarray(semsr.load("bicubic")(arr, outscale=2.5).image)
    assert a.shape == (23, 18, 3) and np.array_equal(a, b)


def test_options_build_once_and_run_per_call():
    pipe = semsr.load("test-reporter", weights="/w", steps=5)
    assert pipe.options.weights == "/w" and pipe.method.built_with.weights == "/w"
    pipe(np.zeros((3, 3, 3), np.uint8))
    assert pipe.method.calls[-1].steps == 5  # the load's run options are the calls' defaults
    pipe(np.zeros((3, 3, 3), np.uint8), steps=7)
    assert pipe.method.calls[-1].steps == 7
    # the same build options share the built method (cache key: name + build key)
    other = semsr.load("test-reporter", weights="/w", steps=9)
    assert other.method is pipe.method and other is not pipe
    assert semsr.load("test-reporter", weights="/x").method is not pipe.method
    with pytest.raises(OptionError, match="weights is a build option; give it to semsr.load"):
        pipe(np.zeros((3, 3, 3), np.uint8), weights="/y")
    opts = ReporterOptions(steps=2)
    pipe_b = semsr.load("test-reporter", opts)
    assert pipe_b.options == opts
    pipe_b(np.zeros((3, 3, 3), np.uint8), ReporterOptions(steps=4), seed=2)
    assert (pipe_b.method.calls[-1].steps, pipe_b.method.calls[-1].seed) == (4, 2)


def test_unknown_option_is_one_line_naming_the_closest():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(OptionError) as err:
        semsr.upscale(img, model="test-reporter", stepz=4)
    assert str(err.value) == "method 'test-reporter' has no option stepz; did you mean steps?"
    with pytest.raises(OptionError, match="has no option tiles; did you mean tile"):
        semsr.upscale(img, model="bicubic", tiles=8)
    with pytest.raises(OptionError, match="has no option stepz; did you mean steps"):
        semsr.load("test-reporter")(img, stepz=4)
    with pytest.raises(OptionError, match="has no option stepz; did you mean steps"):
        semsr.load("test-reporter", stepz=4)
    with pytest.raises(OptionError, match="takes ReporterOptions, not MethodOptions"):
        semsr.load("test-reporter", MethodOptions())


def test_default_options_are_parsed_by_the_targets_class():
    """`semsr.upscale(img, model="default", stepz=4)` fails before anything is built."""
    spec = semsr.methods.resolve("default")
    if "steps" not in spec.options.names():
        pytest.skip("the default method has no steps option")
    with pytest.raises(OptionError) as err:
        semsr.upscale(np.zeros((4, 4, 3), np.uint8), model="default", stepz=4)
    assert str(err.value) == "method 'default' has no option stepz; did you mean steps?"
    assert not api._cache


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"tile": "abc"}, "option tile: expected an integer, got 'abc'"),
        ({"steps": 1.5}, "option steps: expected an integer, got 1.5"),
        ({"steps": 1e30}, "option steps: must be <= 1000, got 1e+30"),
        ({"tile": 1e30}, "option tile: must be <= 1048576, got 1e+30"),
        ({"seed": True}, "option seed: expected an integer, got True"),
    ],
)
def test_mistyped_values_are_one_line(values: dict[str, Any], match: str):
    with pytest.raises(OptionError) as err:
        semsr.upscale(np.zeros((4, 4, 3), np.uint8), model="test-reporter", **values)
    assert str(err.value) == match and "\n" not in str(err.value)
    with pytest.raises(OptionError, match="option tile: expected an integer"):
        semsr.upscale(np.zeros((4, 4, 3), np.uint8), model="bicubic", tile="abc")
