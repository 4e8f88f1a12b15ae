"""DaLPSR: IRPAD degradation prompt + tag-steered semantic prompt, both in the UNet's cross-attention and
the two-prompt ControlNet, with a VLM and with the no-VLM opt-out, the ``dalpsr`` CLI preset, the tiny
training configs (plain diffusion loss; the LR-robust tagger encoder stage) and the tagger formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from semsr.cli import main
from semsr.core.components import read_index
from semsr.core.errors import SemsrError, UnavailableError
from semsr.methods import build, resolve
from semsr.methods.dalpsr import DaLPSROptions
from semsr.methods.xpsr import XPSR_ADDED_POSITIVE, TwoPromptSR, XPSROptions, unet_context
from semsr.priors.irpad import LEVELS
from semsr.priors.tagger import TagsProvider
from semsr.train.config import ExperimentConfig, config_from_dict, load_config
from semsr.train.tasks import build_task
from train_helpers import REPO, write_textures

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models


def _tiny_config(
    tiny_models: Path, hr: Path, task: str, losses: dict[str, float] | None = None, **options: object
) -> ExperimentConfig:
    """A ``task`` (xpsr / dalpsr) training config on the tiny models: no VLM, the untrained IRPAD, 64-px crops
    of the images in ``hr``; ``options`` add to ``model.options``."""
    data: dict[str, Any] = {
        "name": "t",
        "task": task,
        "model": {
            "pretrained": str(tiny_models / "sd"),
            "options": {"irpad": str(tiny_models / "irpad-untrained"), "no_vlm": True, **options},
        },
        "data": {"hr": [str(hr)], "val_count": 1, "crop_size": 64, "scale": 4, "batch_size": 1},
    }
    if losses is not None:
        data["losses"] = losses
    return config_from_dict(data)


def _tiny_task(tiny_models: Path, hr: Path, task: str, **options: object) -> Any:
    """The training task of :func:`_tiny_config`."""
    return build_task(_tiny_config(tiny_models, hr, task, **options))


def _is_irpad_text(text: str) -> bool:
    phrases = {lv.text for lvs in LEVELS.values() for lv in lvs}
    return all(part in phrases for part in text.split(", "))


def _dalpsr(tiny_models: Path, **build_opts: object) -> TwoPromptSR:
    """The tiny ``dalpsr`` method; without ``vlm`` in ``build_opts`` with the explicit ``no_vlm`` opt-out."""
    return build(
        "dalpsr",
        {
            "base": str(tiny_models / "sd"),
            "checkpoint": str(tiny_models / "dalpsr"),
            "irpad": str(tiny_models / "irpad-untrained"),
            **({} if "vlm" in build_opts else {"no_vlm": True}),
            **build_opts,
        },
    )


def _run(**values: object) -> DaLPSROptions:
    return resolve("dalpsr").parse(values)


def test_dalpsr_options_derive_from_xpsr():
    spec = resolve("dalpsr")
    assert spec.options is DaLPSROptions and issubclass(DaLPSROptions, XPSROptions) and spec.suggests_priors
    assert set(DaLPSROptions.names()) == set(XPSROptions.names()) | {"tagger"}
    assert DaLPSROptions.infos()["tagger"].stage == "build" and "tagger" not in XPSROptions.names()
    assert spec.parse({}).values("run") == XPSROptions().values("run")  # XPSR's sampling defaults


def test_dalpsr_with_no_vlm_uses_prompt_tags_and_irpad(tiny_models):
    method = _dalpsr(tiny_models, tagger=str(tiny_models / "tagger"))
    assert method.name == "dalpsr" and method.options_class is DaLPSROptions
    assert method.sfa.mode == "serial" and not method.sfa.conditional_attention
    lr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = method(lr, _run(prompt="a house", steps=1))
    assert out.images.shape == (2, 3, 64, 64) and out.priors["no_vlm"] is True
    conds = method.text_conditions(lr, "a house")  # cached: what the call used, per image
    for cond in conds:
        assert cond.sources["low"] == "irpad" and _is_irpad_text(cond.low)
        assert cond.high.startswith("a house")
        assert cond.tags  # the tiny tagger labels every image; its tags steer the semantic prompt
        assert cond.sources["high"] == "user+tags" and cond.high == "a house, " + ", ".join(cond.tags)
    p = out.priors  # the first image's
    assert p["prompt"] == f"{conds[0].high}, {XPSR_ADDED_POSITIVE}" and p["tags"] == conds[0].tags
    assert p["semantic_prompt"] == conds[0].high and p["degradation"] == p["low_prompt"] == conds[0].low
    assert p["user_prompt"] == "a house" and p["sources"] == {"high": "user+tags", "low": "irpad"}


def test_dalpsr_low_prompt_changes_the_output(tiny_models):
    method = _dalpsr(tiny_models)
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a = method(lr, _run(prompt="a", low_prompt="no blur, no noise", steps=1, colour_fix="none"))
    b = method(lr, _run(prompt="a", low_prompt="heavy blur, heavy noise", steps=1, colour_fix="none"))
    assert not torch.equal(a.images, b.images)
    assert (a.priors["low_prompt"], b.priors["low_prompt"]) == ("no blur, no noise", "heavy blur, heavy noise")


def _unet_contexts(method: TwoPromptSR, lr: torch.Tensor, low_prompt: str) -> list[torch.Tensor]:
    """The ``encoder_hidden_states`` of every UNet call of one ``method`` run (CFG: both halves)."""
    seen: list[torch.Tensor] = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = method.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        method(lr, _run(prompt="a", low_prompt=low_prompt, steps=1, colour_fix="none"))
    finally:
        handle.remove()
    return seen


def test_dalpsr_degradation_prompt_conditions_the_unet(tiny_models):
    """The paper: both prompts condition the denoising UNet by cross-attention (XPSR's UNet sees c_h only)."""
    method = _dalpsr(tiny_models)
    assert method.unet_prompts == "both"
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a = _unet_contexts(method, lr, "no blur, no noise")
    b = _unet_contexts(method, lr, "heavy blur, heavy noise")
    assert a and len(a) == len(b)
    assert not torch.equal(a[0], b[0])  # the degradation prompt changes the UNet's cross-attention input
    c_h, c_l = method.encode_prompts([f"a, {XPSR_ADDED_POSITIVE}"]), method.encode_prompts(["heavy blur, heavy noise"])
    assert torch.equal(b[0][-1:], torch.cat([c_h, c_l], dim=1))  # the conditional half: [c_sem; c_deg]
    xpsr = TwoPromptSR.from_checkpoint(tiny_models / "sd", tiny_models / "dalpsr", priors=method.priors)
    assert xpsr.unet_prompts == "high"  # XPSR keeps the UNet on the high-level prompt
    x = _unet_contexts(xpsr, lr, "no blur, no noise")
    y = _unet_contexts(xpsr, lr, "heavy blur, heavy noise")
    assert torch.equal(x[0], y[0]) and x[0].shape[1] * 2 == a[0].shape[1]


def test_unet_context_rejects_unknown_choice():
    high, low = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    assert torch.equal(unet_context(high, low, "high"), high)
    assert unet_context(high, low, "both").shape == (1, 6, 4)
    with pytest.raises(SemsrError, match="unet_prompts"):
        unet_context(high, low, "low")


def test_cli_dalpsr_end_to_end_with_vlm_and_tagger(tiny_models, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(16, 20, 3) * 255).byte().numpy()).save(img)
    rc = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(tmp_path / "out"),
            "--method",
            "dalpsr",
            "--base",
            str(tiny_models / "sd"),
            "--checkpoint",
            str(tiny_models / "dalpsr"),
            "--vlm",
            str(tiny_models / "vlm"),
            "--tagger",
            str(tiny_models / "tagger"),
            "--irpad",
            str(tiny_models / "irpad-untrained"),
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "in_out.png").size == (80, 64)
    rc = main(
        [
            "upscale",
            "-i",
            str(img),
            "-o",
            str(tmp_path / "o2"),
            "--method",
            "dalpsr",
            "--base",
            str(tiny_models / "sd"),
            "--checkpoint",
            str(tmp_path),
            "--steps",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "checkpoint folder" in err and "Traceback" not in err


def test_tiny_dalpsr_config_trains_through_semsr_train(tiny_models, tmp_path, capsys):
    hr = write_textures(tmp_path / "hr", count=4, size=(72, 72))
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "dalpsr-tiny.yaml"),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        f"model.pretrained={tiny_models / 'sd'}",
        f"model.options.tagger={tiny_models / 'tagger'}",
        f"model.options.irpad={tiny_models / 'irpad-untrained'}",
        f"data.hr=[{hr}]",
        "data.val_count=1",
        "data.limit=0",
        "validation.every=2",
        "checkpoint.every=2",
    ]
    assert main(args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "train", "val"]
    assert set(records[0]["terms"]) == {"eps_mse"}  # the paper's plain diffusion loss, no XPSR DFC term
    final = tmp_path / "run" / "final"
    index = read_index(final)
    assert index.recipe == "dalpsr" and set(index.components) == {"controlnet", "sfa"}
    pipe = TwoPromptSR.from_checkpoint(tiny_models / "sd", final)
    assert pipe.sfa.mode == "serial" and not pipe.sfa.conditional_attention


def test_dalpsr_task_trains_controlnet_and_new_attention_only(tiny_models, tmp_path):
    hr = write_textures(tmp_path / "hr", count=2, size=(72, 72))
    cfg = _tiny_config(tiny_models, hr, "xpsr", losses={"eps_mse": 1.0, "dfc": 0.05}, low_source="irpad")
    task = build_task(cfg)
    params = list(task.trainable.parameters())
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in task.unet.parameters())
    assert not any(p.requires_grad for p in task.vae.parameters())
    assert task.trainable.sfa.conditional_attention and task.trainable.sfa.mode == "parallel"
    assert isinstance(task.trainable.dfc, torch.nn.Module)
    bad = config_from_dict(
        {
            "name": "t",
            "task": "dalpsr",
            "model": {"pretrained": str(tiny_models / "sd"), "options": {"nope": 1}},
            "data": {"hr": [str(hr)], "val_count": 1, "crop_size": 64},
        }
    )
    with pytest.raises(Exception, match="nope"):
        build_task(bad)
    assert Path(cfg.model.pretrained).is_dir()


def test_training_continues_from_a_checkpoint(tiny_models, tmp_path):
    """``model.options.init``: the checkpoint's ControlNet, SFA (mode from the task) and DFC heads."""
    hr = write_textures(tmp_path / "hr", count=2, size=(72, 72))
    task = _tiny_task(tiny_models, hr, "dalpsr", init=str(tiny_models / "xpsr"))
    model = task.trainable
    assert model.sfa.mode == "serial" and model.sfa.conditional_attention  # the xpsr checkpoint's
    pipe = TwoPromptSR.from_checkpoint(tiny_models / "sd", tiny_models / "xpsr")
    for name in ("controlnet", "sfa"):
        want = getattr(pipe, name).state_dict()
        got = getattr(model, name).state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k].float()) for k in want)
    assert all(p.requires_grad for p in model.controlnet.parameters())
    assert any(p.requires_grad for p in model.sfa.parameters())  # the layers serial mode runs (not the connect ones)
    assert model.dfc is None and model.unet_prompts == "both"  # default losses: eps_mse alone, no DFC heads


@pytest.mark.parametrize("name", ["dalpsr.yaml", "dalpsr-tiny.yaml"])
def test_dalpsr_configs_train_with_plain_diffusion_loss_on_both_prompts(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.task == "dalpsr" and cfg.losses == {"eps_mse": 1.0}
    assert cfg.model.options["unet_prompts"] == "both" and cfg.model.options["sfa_mode"] == "serial"


def test_dalpsr_training_feeds_both_prompts_to_the_unet(tiny_models, tmp_path):
    hr = write_textures(tmp_path / "hr", count=2, size=(72, 72))
    task = _tiny_task(tiny_models, hr, "dalpsr")
    model = task.trainable
    seen: list[torch.Tensor] = []
    handle = task.unet.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True
    )
    x, t, hint = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.rand(1, 3, 64, 64)
    high, low = task.prompts(["a house"]), task.prompts(["heavy noise"])
    try:
        pred, dfc = model(x, t, high, low, hint, task.unet)
    finally:
        handle.remove()
    assert pred.shape == x.shape and dfc == {}
    assert torch.equal(seen[0], torch.cat([high, low], dim=1))


def test_tiny_dalpsr_encoder_stage_fine_tunes_the_tagger_encoder(tiny_models, tmp_path, capsys):
    """Stage 0 (``dalpsr-encoder``): the tagger's image encoder changes, its head does not, and the
    exported folder is a loadable ``--tagger``."""
    hr = write_textures(tmp_path / "hr", count=4, size=(72, 72))
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "dalpsr-encoder-tiny.yaml"),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        f"model.options.tagger={tiny_models / 'tagger'}",
        f"data.hr=[{hr}]",
        "data.val_count=1",
        "data.limit=0",
        "checkpoint.every=2",
    ]
    assert main(args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "train"]
    assert set(records[0]["terms"]) == {"encoder_feature_mse", "tag_distill_bce"}
    folder = tmp_path / "run" / "final" / "tagger"
    before = load_file(tiny_models / "tagger" / "model.safetensors")
    after = load_file(folder / "model.safetensors")
    assert set(before) == set(after)
    encoder = [k for k in before if not k.startswith("classifier.")]
    assert any(not torch.equal(before[k], after[k]) for k in encoder)  # the image encoder was fine-tuned
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("classifier."))  # head kept
    tags = TagsProvider(folder, threshold=0.0, top_k=3)(
        torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    )
    assert len(tags.value) == 3
    with pytest.raises(Exception, match="validation.every"):
        build_task(load_config(REPO / "configs" / "dalpsr-encoder-tiny.yaml", ["validation.every=2"]))


def test_a_bad_ram_checkpoint_fails_with_one_line_naming_it(tmp_path):
    folder = tmp_path / "ram"
    folder.mkdir()
    (folder / "ram_swin_large_14m.pth").write_bytes(b"not loaded")
    with pytest.raises(UnavailableError, match=r"ram_swin_large_14m\.pth: cannot load weights safely") as err:
        TagsProvider(folder)
    assert "\n" not in str(err.value)
    with pytest.raises(UnavailableError, match=r"ram_swin_large_14m\.pth: not a supported tagger format") as err:
        TagsProvider(folder / "ram_swin_large_14m.pth")
    assert "\n" not in str(err.value)
    with pytest.raises(UnavailableError, match="config.json missing"):
        TagsProvider(tmp_path)
