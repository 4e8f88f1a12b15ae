"""Typed method options (semsr.core.options): one parser for the CLI, the web form, bench brackets and the API."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from semsr.core.options import MethodOptions, OptionError, closest, option


@dataclass(kw_only=True, frozen=True)
class _Opts(MethodOptions):
    checkpoint: Path | None = option(None, stage="build", help="weights")
    steps: int = option(20, min=1, max=1000, help="sampling steps")
    guidance_scale: float = option(4.5, min=0, max=100, help="CFG scale")
    colour_fix: str = option("adain", choices=("adain", "wavelet", "none"), help="colour fix")
    no_reference: bool = option(False, help="ablation")
    start_from_lr: bool = option(True, help="LR start")
    modalities: tuple[str, ...] | None = option(None, choices=("caption", "edge", "depth"), help="modalities")
    temperature: dict[str, float] | None = option(None, min=0.4, max=10, help="per-modality temperature")


def test_defaults_and_stages() -> None:
    o = _Opts()
    assert o.steps == 20 and o.tile is None and o.device == "cpu"
    assert set(_Opts.names("build")) == {"device", "dtype", "threads", "checkpoint"}
    assert "steps" in _Opts.names("run") and "tile" in _Opts.names("run")
    assert o.changed() == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.steps = 3  # type: ignore[misc]


def test_text_and_python_values_give_equal_options() -> None:
    text = _Opts.parse(
        {
            "steps": "4",
            "guidance_scale": "3",
            "no_reference": "true",
            "modalities": "edge,caption",
            "temperature": "edge=2,depth=0.5",
            "checkpoint": "~/w",
            "tile": "128",
        }
    )
    python = _Opts.parse(
        {
            "steps": 4,
            "guidance_scale": 3,
            "no_reference": True,
            "modalities": ["edge", "caption"],
            "temperature": {"edge": 2, "depth": 0.5},
            "checkpoint": Path("~/w"),
            "tile": 128,
        }
    )
    assert text == python
    assert text.modalities == ("edge", "caption") and text.temperature == {"edge": 2.0, "depth": 0.5}
    assert text.checkpoint == Path("~/w").expanduser()
    assert text.changed("build") == {"checkpoint": Path("~/w").expanduser()}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"setps": 1}, "method 'm' has no option setps; did you mean steps?"),
        ({"steps": 1.5}, "option steps: expected an integer, got 1.5"),
        ({"steps": True}, "option steps: expected an integer"),
        ({"steps": "abc"}, "option steps: expected an integer, got 'abc'"),
        ({"tile": 1e30}, "option tile: must be <= 1048576"),
        ({"guidance_scale": 1e30}, "option guidance_scale: must be <= 100"),
        ({"guidance_scale": "nan"}, "option guidance_scale: expected a finite number"),
        ({"steps": 0}, "option steps: must be >= 1"),
        ({"colour_fix": "sepia"}, "option colour_fix: choose one of adain, wavelet, none"),
        ({"no_reference": "maybe"}, "option no_reference: expected true or false"),
        ({"modalities": "edge,seg"}, "option modalities: unknown entry 'seg'"),
        ({"temperature": "edge=20"}, "option temperature[edge]: must be <= 10"),
        ({"temperature": "edge"}, "option temperature: expected NAME=NUMBER"),
        ({"dtype": "fp64"}, "option dtype: choose one of auto, fp32, bf16, fp16"),
    ],
)
def test_bad_options_are_one_line_errors(values: dict, message: str) -> None:
    with pytest.raises(OptionError) as err:
        _Opts.parse(values, method="m")
    text = str(err.value)
    assert message in text and "\n" not in text


def test_flag_style_names_the_cli_flag() -> None:
    with pytest.raises(OptionError, match=r"has no option --guidance-sacle; did you mean --guidance-scale\?"):
        _Opts.parse({"guidance_sacle": "3"}, method="m", style="flag")


def test_none_means_not_given_and_replace_validates() -> None:
    o = _Opts.parse({"steps": None, "tile": None})
    assert o == _Opts()
    assert o.replace(steps=8).steps == 8
    with pytest.raises(OptionError):
        o.replace(steps=-1)


def test_build_key_is_hashable_and_ignores_run_options() -> None:
    a, b = _Opts.parse({"steps": 3, "checkpoint": "/x"}), _Opts.parse({"steps": 9, "checkpoint": "/x"})
    assert hash(a.build_key()) == hash(b.build_key()) and a.build_key() == b.build_key()
    assert a.build_key() != _Opts().build_key()


def test_describe_shows_units_bounds_and_default() -> None:
    info = _Opts.infos()
    assert info["steps"].describe() == "sampling steps (range 1..1000; default 20)"
    assert "input px" in info["tile"].describe() and info["tile"].flags == ("-t",)
    assert info["guidance_scale"].flag == "--guidance-scale"


def test_closest() -> None:
    assert closest("stpes", ["steps", "seed", "scale"]) == "steps"
    assert closest("zzz", ["steps"]) == "steps"
    assert closest("x", []) is None


def test_undeclared_field_is_a_programming_error() -> None:
    @dataclass(kw_only=True, frozen=True)
    class Bad(MethodOptions):
        plain: int = 3

    with pytest.raises(TypeError, match="option"):
        Bad.infos()
