"""Text priors of XPSR / DaLPSR on tiny models: VLM caption/quality (generate() path), tagger,
tag-steered instructions, user prompts (--prompt, JSON/CSV sidecars), caching, the ``semsr priors``
command, and the fallback without a VLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from semsr.cli import main
from semsr.core.errors import InputError, UnavailableError
from semsr.priors.base import get_provider
from semsr.priors.prompts import TextPriors, UserPrompts, read_sidecar
from semsr.priors.tagger import TagsProvider
from semsr.priors.tagger import to_pil as tagger_to_pil
from semsr.priors.vlm import (
    HIGH_LEVEL_INSTRUCTION,
    LOW_LEVEL_INSTRUCTION,
    VLMTextProvider,
    build_prompt,
    generate_text,
    load_vlm,
    to_pil,
)
from semsr.testing.tiny import write_tiny_models
from semsr.testing.tiny_vlm import TAGS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the tiny VLMs and tagger (``semsr dev tiny-models --only vlm vlm-blip2 tagger``)."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny-vlm"), ["vlm", "vlm-blip2", "tagger"])


@pytest.fixture()
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 40, 56, generator=g)


# ----------------------------------------------------------------------------- VLM


def test_vlm_and_tagger_share_one_image_conversion(image: torch.Tensor) -> None:
    assert to_pil is tagger_to_pil
    pil = to_pil(image)
    assert pil.size == (56, 40) and pil.mode == "RGB"


def test_provider_versions_follow_the_model_files(tiny: Path, tmp_path: Path) -> None:
    """Cache versions fingerprint the model folder (semsr.core.fingerprint): another file, another version."""
    copy = tmp_path / "tagger"
    shutil.copytree(tiny / "tagger", copy)
    a = TagsProvider(copy).version
    assert TagsProvider(copy).version == a
    cfg = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(json.dumps({**cfg, "note": "changed"}))
    assert TagsProvider(copy).version != a


def test_tiny_vlm_folder_is_a_real_llava_checkpoint(tiny: Path) -> None:
    folder = tiny / "vlm"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llava" and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    vlm = load_vlm(str(folder))
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    prompt = build_prompt(vlm.processor, HIGH_LEVEL_INSTRUCTION)
    assert prompt == f"USER: <image>\n{HIGH_LEVEL_INSTRUCTION} ASSISTANT:"


@pytest.mark.parametrize("name", ["vlm", "vlm-blip2"])
def test_generate_returns_only_the_new_tokens(tiny: Path, image: torch.Tensor, name: str) -> None:
    vlm = load_vlm(str(tiny / name))
    text = generate_text(vlm, image, HIGH_LEVEL_INSTRUCTION, max_new_tokens=8)
    inputs = vlm.processor(
        images=to_pil(image), text=build_prompt(vlm.processor, HIGH_LEVEL_INSTRUCTION), return_tensors="pt"
    )
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    n_in = inputs["input_ids"].shape[1]
    assert out.shape[1] > n_in
    expected = vlm.processor.tokenizer.decode(out[0, n_in:], skip_special_tokens=True)
    assert text == " ".join(expected.split())
    assert generate_text(vlm, image, HIGH_LEVEL_INSTRUCTION, max_new_tokens=8) == text  # greedy: deterministic
    if name == "vlm-blip2":  # no chat template: BLIP-2's question format, queries inserted by the processor
        assert build_prompt(vlm.processor, "Why?") == "Question: Why? Answer:"


def test_caption_and_quality_providers(tiny: Path, image: torch.Tensor) -> None:
    cap = get_provider("caption", vlm=str(tiny / "vlm"), max_new_tokens=6)
    qual = get_provider("quality", vlm=str(tiny / "vlm"), max_new_tokens=6)
    assert isinstance(cap, VLMTextProvider) and cap.kind == qual.kind == "text"
    assert cap.vlm is qual.vlm  # one model in memory for both
    r = cap(image)
    assert isinstance(r.value, str) and r.meta["instruction"] == HIGH_LEVEL_INSTRUCTION and r.meta["tags"] == []
    assert qual(image).meta["instruction"] == LOW_LEVEL_INSTRUCTION
    custom = get_provider("quality", vlm=str(tiny / "vlm"), instruction="Is it noisy?", max_new_tokens=6)
    assert custom(image).meta["instruction"] == "Is it noisy?" and custom.version != qual.version
    with pytest.raises(UnavailableError, match="not an image-text-to-text model"):
        get_provider("caption", vlm=str(tiny / "tagger"))
    with pytest.raises(UnavailableError, match="config.json missing"):
        get_provider("caption", vlm=str(tiny / "nothing"))


# ----------------------------------------------------------------------------- tagger


def test_tagger_threshold_and_top_k(tiny: Path, image: torch.Tensor) -> None:
    all_tags = TagsProvider(tiny / "tagger", threshold=0.0, top_k=0)
    r = all_tags(image)
    assert r.kind == "tags" and sorted(r.value) == sorted(TAGS)
    scores = [r.meta["scores"][t] for t in r.value]
    assert scores == sorted(scores, reverse=True)
    top3 = TagsProvider(tiny / "tagger", threshold=0.0, top_k=3)(image)
    assert top3.value == r.value[:3]
    raw = all_tags.scores(image)
    mid = float(raw.median())
    above = TagsProvider(tiny / "tagger", threshold=mid, top_k=0)(image)
    assert set(above.value) == {TAGS[i] for i in range(len(TAGS)) if float(raw[i]) >= mid}
    assert TagsProvider(tiny / "tagger", threshold=1.01)(image).value == ()


def test_tags_steer_the_caption_instruction(tiny: Path, image: torch.Tensor) -> None:
    cap = get_provider(
        "caption", vlm=str(tiny / "vlm"), tagger=str(tiny / "tagger"), tag_threshold=0.0, tag_top_k=2, max_new_tokens=4
    )
    r = cap(image)
    assert len(r.meta["tags"]) == 2
    assert r.meta["instruction"] == f"The image contains: {', '.join(r.meta['tags'])}. {HIGH_LEVEL_INSTRUCTION}"
    plain = get_provider("caption", vlm=str(tiny / "vlm"), max_new_tokens=4)
    assert plain.version != cap.version


def test_priors_command_extracts_caption_quality_tags_irpad(tiny: Path, tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (48, 40), (120, 60, 30)).save(src / "a.png")
    out = tmp_path / "out"
    rc = main(
        [
            "priors",
            "-i",
            str(src),
            "-o",
            str(out),
            "--modalities",
            "caption,quality,tags,irpad",
            "--vlm",
            str(tiny / "vlm"),
            "--tagger",
            str(tiny / "tagger"),
            "--vlm-max-new-tokens",
            "4",
            "--tag-threshold",
            "0",
        ]
    )
    assert rc == 0
    index = json.loads((out / "priors.json").read_text())
    priors = index["images"][0]["priors"]
    assert {k: v["kind"] for k, v in priors.items()} == {
        "caption": "text",
        "quality": "text",
        "tags": "tags",
        "irpad": "text",
    }
    assert priors["caption"]["meta"]["instruction"].startswith("The image contains: ")
    assert priors["irpad"]["value"].count(", ") == 3


# ----------------------------------------------------------------------------- user prompts


def test_sidecar_json_and_csv(tmp_path: Path) -> None:
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"Baby.png": "a baby", "bird": "a bird"}))
    assert read_sidecar(j) == {"baby.png": "a baby", "bird": "a bird"}
    jl = tmp_path / "l.json"
    jl.write_text(json.dumps([{"file": "x.jpg", "prompt": " a fox "}]))
    assert read_sidecar(jl) == {"x.jpg": "a fox"}
    c = tmp_path / "p.csv"
    c.write_text('image,caption\nbaby.png,"a baby, smiling"\nsub/bird.png,a bird\n')
    assert read_sidecar(c) == {"baby.png": "a baby, smiling", "sub/bird.png": "a bird"}
    c2 = tmp_path / "q.csv"
    c2.write_text("head.png,a face\n")
    assert read_sidecar(c2) == {"head.png": "a face"}
    prompts = UserPrompts.load(prompt="a photo", sidecar=c)
    assert prompts.get("/data/Set5/baby.png") == "a baby, smiling"
    assert prompts.get("sub/bird.png") == "a bird"
    assert prompts.get("other.png") == "a photo" and UserPrompts.load().get("x.png") is None
    assert UserPrompts.load(sidecar=j).get("dir/bird.jpg") == "a bird"  # by stem


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("bad.json", "{nope", "not valid JSON"),
        ("bad2.json", "[1, 2]", "objects with file and prompt"),
        ("bad3.json", '{"a.png": 3}', "must be strings"),
        ("bad.csv", "a.png\n", "needs a file and a prompt"),
        ("bad.txt", "a.png,x", "must be .json or .csv"),
    ],
)
def test_bad_sidecars_are_input_errors(tmp_path: Path, name: str, content: str, match: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        read_sidecar(f)
    with pytest.raises(InputError, match="cannot read"):
        read_sidecar(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- text conditions


def test_text_priors_with_vlm_are_cached(
    tiny: Path, image: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    import semsr.priors.vlm as vlm_mod

    real = vlm_mod.generate_text

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm_mod, "generate_text", counting)
    tp = TextPriors(vlm=tiny / "vlm", tagger=tiny / "tagger", low_source="vlm", max_new_tokens=4)
    user = UserPrompts.load(prompt="a red scene")  # the user prompt is an argument of each call
    first = tp(image, user.get("x.png"))
    assert calls["n"] == 2 and first.sources == {"high": "user+vlm", "low": "vlm"}
    assert first.high.startswith("a red scene")
    second = tp(image, "a red scene")
    assert calls["n"] == 2 and second == first  # nothing recomputed
    assert [p.misses for p in tp.providers()] == [1, 1, 1]  # tags, caption, quality: each computed once
    assert all(p.hits >= 1 for p in tp.providers())  # (the tag-steered caption also reads the cached tags)
    bare = tp(image)  # same providers, no user prompt: the caption alone, still from the cache
    assert calls["n"] == 2 and bare.sources["high"] == "vlm" and first.high == f"a red scene, {bare.high}"
    again = TextPriors(vlm=tiny / "vlm", tagger=tiny / "tagger", low_source="vlm", max_new_tokens=4)
    assert again(image, "a red scene") == first and calls["n"] == 2  # cache on disk, across instances
    dal = TextPriors(vlm=tiny / "vlm", tagger=tiny / "tagger", low_source="irpad", max_new_tokens=4)
    cond = dal(image)
    assert cond.sources == {"high": "vlm", "low": "irpad"} and cond.low.count(", ") == 3
    replace = TextPriors(vlm=tiny / "vlm", low_source="irpad", user_mode="replace")
    n = calls["n"]
    assert replace(image, "only mine").high == "only mine" and calls["n"] == n


def test_without_vlm_there_is_no_silent_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMSR_WEIGHTS", str(tmp_path / "no-weights"))
    for low_source in ("vlm", "irpad"):
        with pytest.raises(UnavailableError, match="pass --vlm PATH.*or --no-vlm") as err:
            TextPriors(vlm=None, low_source=low_source)
        assert "no-weights" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnavailableError, match="--no-vlm"):  # an explicit path that does not exist
        TextPriors(vlm=tmp_path / "missing")
    with pytest.raises(UnavailableError, match="exclude each other"):
        TextPriors(vlm=tmp_path / "missing", no_vlm=True)


def test_no_vlm_opt_out_uses_the_user_prompt_and_irpad(
    tmp_path: Path,
    image: torch.Tensor,
    tiny: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SEMSR_WEIGHTS", str(tmp_path / "no-weights"))
    tp = TextPriors(no_vlm=True, low_source="vlm")
    assert capsys.readouterr().err == ""  # explicit, nothing to note
    assert not tp.has_vlm and tp.no_vlm
    cond = tp(image, "a cat on a mat")
    assert cond.high == "a cat on a mat" and cond.sources == {"high": "user", "low": "irpad"}
    assert tp(image, "").sources["high"] == "none"  # an empty prompt is no prompt
    assert cond.low == get_provider("irpad")(image).value
    bare = TextPriors(no_vlm=True)(image)
    assert bare.high == "" and bare.sources["high"] == "none"
    with_tags = TextPriors(no_vlm=True, tagger=tiny / "tagger")
    t = with_tags(image)
    assert t.sources["high"] == "tags" and t.high == ", ".join(t.tags)
