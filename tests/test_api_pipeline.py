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
    guidance_scale: float = option(1.0, min=0.0, help="guidance scale")
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


def test_unknown_keyword_is_a_type_error_naming_the_closest():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(TypeError) as err:
        semsr.upscale(img, "test-reporter", stepz=4)
    assert (
        str(err.value)
        == "semsr.upscale('test-reporter') got an unexpected keyword argument 'stepz'; did you mean 'steps'?"
    )
    assert isinstance(err.value, OptionError)  # still one semsr error line for the CLI and the server
    with pytest.raises(TypeError, match="unexpected keyword argument 'tiles'; did you mean 'tile'"):
        semsr.upscale(img, model="bicubic", tiles=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'promt'; did you mean 'prompt'"):
        semsr.load("test-reporter")(img, promt="a cat")
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance'; did you mean 'guidance_scale'"):
        semsr.load("test-reporter")(img, guidance=3.0)
    with pytest.raises(TypeError, match=r"semsr.load\('test-reporter'\) got an unexpected keyword argument 'stepz'"):
        semsr.load("test-reporter", stepz=4)
    with pytest.raises(OptionError, match="takes ReporterOptions, not MethodOptions"):
        semsr.load("test-reporter", MethodOptions())


def test_diffusers_keywords_lists_and_output_types():
    pipe = semsr.load("test-reporter")
    img = np.zeros((3, 4, 3), np.uint8)
    pipe(img, num_inference_steps=6, generator=torch.Generator().manual_seed(11))
    assert (pipe.method.calls[-1].steps, pipe.method.calls[-1].seed) == (6, 11)
    res = pipe([img, np.full((2, 2, 3), 255, np.uint8)], output_type="np")
    assert [a.shape for a in res.images] == [(6, 8, 3), (4, 4, 3)]
    assert res.images[1].dtype == np.float32 and float(res.images[1].max()) == 1.0
    assert len(res.image_priors) == 2 and res.priors == res.image_priors[0]
    (tensors,) = pipe([img], output_type="pt", return_dict=False)
    assert isinstance(tensors[0], torch.Tensor) and tuple(tensors[0].shape) == (3, 6, 8)
    assert isinstance(pipe(img).image, Image.Image)
    with pytest.raises(OptionError, match="output_type must be one of pil, np, pt"):
        pipe(img, output_type="latent")
    many = semsr.upscale([img, img], "bicubic")
    assert [m.size for m in many] == [(16, 12), (16, 12)]


def test_pipeline_to_rebuilds_with_the_new_device_and_dtype():
    pipe = semsr.load("bicubic")
    before = pipe.method
    assert pipe.to("cpu") is pipe and pipe.method is before  # nothing changed
    pipe.to(torch.bfloat16)
    assert pipe.options.dtype == "bf16" and pipe.method is not before
    pipe.to("cpu", torch.float32)
    assert pipe.options.dtype == "fp32" and pipe.device == torch.device("cpu")
    with pytest.raises(TypeError, match="takes a device and/or a dtype"):
        pipe.to(3)


def test_default_options_are_parsed_by_the_targets_class():
    """`semsr.upscale(img, "default", stepz=4)` fails before anything is built."""
    spec = semsr.methods.resolve("default")
    if "steps" not in spec.options.names():
        pytest.skip("the default method has no steps option")
    with pytest.raises(TypeError) as err:
        semsr.upscale(np.zeros((4, 4, 3), np.uint8), "default", stepz=4)
    assert (
        str(err.value) == "semsr.upscale('default') got an unexpected keyword argument 'stepz'; did you mean 'steps'?"
    )
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


def test_api_errors_name_python_keywords_not_cli_flags():
    """The CLI says ``--base PATH``; the API says ``base=PATH`` (flags of other things stay as they are)."""
    with pytest.raises(semsr.core.errors.SemsrError) as err:
        semsr.load("sd-controlnet")
    assert "base=PATH" in str(err.value) and "--base" not in str(err.value)
    spec = semsr.methods.resolve("xpsr")
    raw = semsr.core.errors.UnavailableError("no VLM: pass --vlm PATH, or --no-vlm; see --help", "/m")
    new = api.as_keywords(raw, spec)
    assert str(new) == "/m: no VLM: pass vlm=PATH, or no_vlm=True; see --help"
    assert type(new) is type(raw) and new.path == "/m"
    assert api.as_keywords(semsr.core.errors.SemsrError("nothing to change"), spec).message == "nothing to change"
