"""Priors the prompt-driven methods report (``Result.priors``) and suggest (``suggest_priors``) on tiny models,
the ``priors_in_prompt`` round trip, and MMSR's per-modality temperature sliders (issue 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semsr
from semsr import api
from semsr.methods.xpsr import XPSR_ADDED_POSITIVE, XPSR_LOW_NEGATIVE, XPSR_NEGATIVE
from semsr.priors.irpad import LEVELS

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models


@pytest.fixture(scope="module", autouse=True)
def _clear_api_cache():
    yield
    api.clear_cache()


def _photo(size: int = 16) -> Image.Image:
    """A ``size`` x ``size`` crop of the bundled sample photo."""
    im = Image.open(REPO / "src" / "semsr" / "assets" / "sample.png").convert("RGB")
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return im.crop((left, top, left + size, top + size))


def _is_irpad_text(text: str) -> bool:
    phrases = {lv.text for lvs in LEVELS.values() for lv in lvs}
    return bool(text) and all(part in phrases for part in text.split(", "))


def _same(a: semsr.Result, b: semsr.Result) -> bool:
    return np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_xpsr_suggests_the_irpad_text_and_reports_the_prompts_it_used(tiny_models):
    pipe = semsr.load(
        "xpsr",
        base=str(tiny_models / "sd"),
        checkpoint=str(tiny_models / "xpsr"),
        irpad=str(tiny_models / "irpad-untrained"),
        no_vlm=True,
    )
    img = _photo()
    s = pipe.suggest_priors(img)
    # no VLM, no tagger: nothing semantic to suggest; the low-level prompt is IRPAD's description
    assert _is_irpad_text(s["low_prompt"]) and s["degradation"] == s["low_prompt"]
    assert s["prompt"] == "" and s["negative_prompt"] == XPSR_NEGATIVE and s["sources"]["low"] == "irpad"

    res = pipe(img, prompt="a red bird", steps=1)
    p = res.priors
    assert p["user_prompt"] == "a red bird" and p["prompt"] == f"a red bird, {XPSR_ADDED_POSITIVE}"
    assert p["degradation"] == p["low_prompt"] == s["low_prompt"]
    assert p["negative_prompt"] == XPSR_NEGATIVE and p["low_negative_prompt"] == XPSR_LOW_NEGATIVE

    # edited fields sent back with priors_in_prompt are used as given, and nothing is added to them
    edited = pipe(img, prompt="a red bird, feathers", low_prompt="heavy noise", priors_in_prompt=True, steps=1)
    assert edited.priors["prompt"] == f"a red bird, feathers, {XPSR_ADDED_POSITIVE}"
    assert edited.priors["low_prompt"] == "heavy noise"
    assert not {"user_prompt", "degradation", "semantic_prompt"} & set(edited.priors)


def test_dalpsr_suggestion_round_trips_with_priors_in_prompt(tiny_models):
    pipe = semsr.load(
        "dalpsr",
        base=str(tiny_models / "sd"),
        checkpoint=str(tiny_models / "dalpsr"),
        tagger=str(tiny_models / "tagger"),
        irpad=str(tiny_models / "irpad-untrained"),
        no_vlm=True,
    )
    img = _photo()
    s = pipe.suggest_priors(img)
    assert s["tags"] and s["prompt"] == ", ".join(s["tags"]) and s["sources"]["high"] == "tags"
    assert _is_irpad_text(s["low_prompt"]) and s["degradation"] == s["low_prompt"]
    default = pipe(img, steps=1)
    assert default.priors["prompt"] == f"{s['prompt']}, {XPSR_ADDED_POSITIVE}" and default.priors["tags"] == s["tags"]
    fields = {"prompt": s["prompt"], "low_prompt": s["low_prompt"], "negative_prompt": s["negative_prompt"]}
    assert _same(pipe(img, steps=1, priors_in_prompt=True, **fields), default)  # the suggestion reproduces the default
    # without the flag the tags would be added to the (pre-filled) prompt a second time
    twice = pipe(img, steps=1, **fields)
    assert twice.priors["prompt"] == f"{s['prompt']}, {s['prompt']}, {XPSR_ADDED_POSITIVE}" and not _same(
        twice, default
    )


def test_mmsr_reports_caption_modalities_and_maps_and_takes_per_modality_temperatures(tiny_models):
    pipe = semsr.load(
        "mmsr", base=str(tiny_models / "sd"), checkpoint=str(tiny_models / "mmsr"), vlm=str(tiny_models / "vlm")
    )
    img = _photo()
    s = pipe.suggest_priors(img)
    assert s["prompt"] and s["caption"] == s["prompt"]  # the VLM caption of the image
    assert s["modalities"] == ("caption", "edge", "depth", "seg")
    run = {"steps": 1, "modalities": "caption,edge,depth"}
    res = pipe(img, **run)
    p = res.priors
    assert (
        p["prompt"] == s["caption"] and p["caption_source"] == "vlm" and p["modalities"] == ("caption", "edge", "depth")
    )
    assert isinstance(p["edge"], Image.Image) and p["edge"].size == res.image.size == (64, 64)
    assert isinstance(p["depth"], Image.Image) and "seg" not in p
    assert _same(pipe(img, prompt=s["prompt"], **run), res)  # the suggested caption reproduces the default
    user = pipe(img, prompt="a cat", **run).priors
    assert user["prompt"] == "a cat" and user["caption_source"] == "user"
    # one option per modality, same effect as the M=D string; all at 1.0 is the untempered model
    hot = pipe(img, edge_temperature=2.0, **run)
    assert hot.priors["modality_temperature"] == {"edge": 2.0}
    assert _same(hot, pipe(img, modality_temperature="edge=2", **run)) and not _same(hot, res)
    ones = {f"{m}_temperature": 1.0 for m in ("caption", "edge", "depth", "seg")}
    assert _same(pipe(img, **ones, **run), res)


def test_mmsr_temperatures_are_sliders_in_the_web_demo():
    from semsr.ui.catalog import catalogue, find

    entry = find(catalogue({"base": "/sd", "checkpoint": "/mmsr"}), "mmsr")
    opts = {o["dest"]: o for o in entry["options"]}
    assert "modality_temperature" not in opts  # hidden: the sliders replace it on the page
    for m in ("caption", "edge", "depth", "seg"):
        o = opts[f"{m}_temperature"]
        assert (o["widget"], o["type"], o["min"], o["max"], o["default"]) == ("slider", "float", 0.4, 10.0, 1.0)
    assert entry["suggests_priors"]


def test_default_diffusion_suggests_irpad_text_and_lacks_it_without_weights(tiny_models, tmp_path):
    from semsr.methods.default_diffusion import DegradationText
    from semsr.models.default_sr import DefaultSR, save_default_sr

    torch.manual_seed(0)
    model = DefaultSR(
        stage1="bicubic",
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        conditioning_channels=[8, 8, 8],
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    with torch.no_grad():
        model.unet.conv_out.weight.normal_(0, 0.05)  # "trained": the text condition changes the output
    save_default_sr(model, tmp_path / "ck")
    pipe = semsr.load("default-diffusion", checkpoint=str(tmp_path / "ck"), irpad=str(tiny_models / "irpad-untrained"))
    img = _photo()
    s = pipe.suggest_priors(img)
    assert _is_irpad_text(s["prompt"]) and s["degradation"] == s["prompt"]
    res = pipe(img, prompt="a cat", steps=2)
    assert res.priors["prompt"] == f"a cat, {s['degradation']}" and res.priors["user_prompt"] == "a cat"
    assert res.priors["degradation"] == s["degradation"]
    default = pipe(img, steps=2)
    assert _same(pipe(img, steps=2, prompt=s["prompt"], priors_in_prompt=True), default)
    assert not _same(pipe(img, steps=2, prompt=s["prompt"]), default)  # the description twice

    method = pipe.method
    method.degradation, kept = DegradationText(tmp_path / "no-irpad"), method.degradation
    try:
        assert pipe.suggest_priors(img) == {"prompt": ""}
        assert pipe(img, prompt="a cat", steps=1).priors == {"prompt": "a cat", "edge_prior": True}
    finally:
        method.degradation = kept


def test_sd_controlnet_and_rfa_report_prompts_and_references(tiny_models, tmp_path):
    from semsr.cli import main

    pipe = semsr.load("sd-controlnet", base=str(tiny_models / "sd"), controlnet=str(tiny_models / "controlnet"))
    assert pipe.suggest_priors(_photo()) == {"negative_prompt": XPSR_NEGATIVE}
    res = pipe(_photo(), prompt="a fox", negative_prompt="blur", steps=1)
    assert res.priors == {"prompt": "a fox", "negative_prompt": "blur"}

    rng = np.random.default_rng(1)
    (tmp_path / "refs").mkdir()
    for i in range(3):
        Image.fromarray((np.kron(rng.random((4, 4, 3)), np.ones((12, 12, 1))) * 255).astype(np.uint8)).save(
            tmp_path / "refs" / f"r{i}.png"
        )
    assert (
        main(
            [
                "index",
                "build",
                "--images",
                str(tmp_path / "refs"),
                "--out",
                str(tmp_path / "db"),
                "--embedder",
                f"clip:{tiny_models / 'clip-vision'}",
            ]
        )
        == 0
    )
    rfa = semsr.load(
        "rfa",
        base=str(tiny_models / "sd"),
        controlnet=str(tiny_models / "controlnet"),
        checkpoint=str(tiny_models / "rfa"),
        db=str(tmp_path / "db"),
    )
    lr = _photo(4)
    s = rfa.suggest_priors(lr)
    assert isinstance(s["prompt"], str) and len(s["reference_paths"]) == 3
    assert {Path(p).parent for p in s["reference_paths"]} == {tmp_path / "refs"}
    res = rfa(lr, prompt="a wall", num_references=2, steps=1)
    p = res.priors
    assert p["prompt"] == "a wall" and p["prompt_source"] == "user" and p["reference_paths"] == s["reference_paths"][:2]
    assert (
        isinstance(p["reference1"], Image.Image) and isinstance(p["reference2"], Image.Image) and "reference3" not in p
    )
    assert rfa(lr, steps=1).priors["prompt_source"] == "text decoder"


def test_server_types_priors_in_prompt():
    from semsr.ui.server import DemoApp

    app = DemoApp()
    try:
        entry = {"name": "default-diffusion", "forced_options": {}}
        opts = app.options(entry, {"prompt": "a", "priors_in_prompt": True})
        assert opts.prompt == "a" and opts.priors_in_prompt is True
        assert app.options(entry, {"priors_in_prompt": "false"}).priors_in_prompt is False
    finally:
        app.close()
