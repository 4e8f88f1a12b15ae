"""``train.gradient_checkpointing`` and ``train.attention`` (:func:`semsr.train.trainer.apply_memory_options`).

Checkpointing must not change the loss or the gradients (it only recomputes activations), must actually
recompute (``torch.utils.checkpoint`` is called), and must reach every recipe's trainable diffusers parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from diffusers import ModelMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, SlicedAttnProcessor

from semsr.core.errors import SemsrError
from semsr.train.config import config_from_dict
from semsr.train.losses import combine_losses
from semsr.train.tasks import Task, build_task
from semsr.train.trainer import Trainer, apply_memory_options

REPO = Path(__file__).resolve().parent.parent


def _task(recipe: str, data: Path | None = None) -> tuple[Task, Any]:
    """The task of ``configs/<recipe>-tiny.yaml`` on CPU in fp32 (XPSR without its VLM: empty prompts)."""
    raw = yaml.safe_load((REPO / "configs" / f"{recipe}-tiny.yaml").read_text())
    if recipe == "xpsr":
        raw["model"]["options"].pop("vlm")
        raw["model"]["options"]["no_vlm"] = True
    if data is not None:
        raw["data"]["hr"] = [str(data / "train" / "bsds500")]
    cfg = config_from_dict(raw, ["validation.every=0"])
    task = build_task(cfg)
    task.setup(torch.device("cpu"), torch.float32)
    return task, cfg


def _batch(cfg: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    size, scale = cfg.data.crop_size, cfg.data.scale
    return {
        "hr": torch.rand(2, 3, size, size, generator=g),
        "lr": torch.rand(2, 3, size // scale, size // scale, generator=g),
        "prompt": ["a cat", "a dog"],
        "seed": torch.tensor([1, 2]),
        "position": torch.tensor([0, 1]),
        "path": ["a.png", "b.png"],
    }


def _loss_and_grads(task: Task, cfg: Any, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    task.trainable.zero_grad(set_to_none=True)
    loss, _ = combine_losses(cfg.losses, task.compute(task.trainable, batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in task.trainable.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _counting_checkpoint(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = torch.utils.checkpoint.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    return calls


@pytest.mark.parametrize("recipe", ["xpsr", "mmsr"])
def test_checkpointing_gives_the_same_loss_and_gradients(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same loss and gradients within 1e-5; for XPSR this needs the SFA prompts restored when a block is
    recomputed (without, torch's checkpoint raises: different tensors saved in the recomputation)."""
    task, cfg = _task(recipe)
    batch = _batch(cfg)
    loss, grads = _loss_and_grads(task, cfg, batch)
    done = apply_memory_options(task, gradient_checkpointing=True, attention="default")
    assert "unet" in done["checkpointing"]
    calls = _counting_checkpoint(monkeypatch)
    loss_ckpt, grads_ckpt = _loss_and_grads(task, cfg, batch)
    assert calls[0] > 0  # blocks were recomputed, not stored
    assert abs(loss - loss_ckpt) <= 1e-5
    assert set(grads) == set(grads_ckpt) and grads
    for name, g in grads.items():
        assert torch.allclose(g, grads_ckpt[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("xpsr", {"trainable.controlnet", "unet"}),
        ("dalpsr", {"trainable.controlnet", "unet"}),
        ("mmsr", {"unet"}),
        ("default", {"trainable.unet", "trainable.controlnet"}),
        ("coser", {"unet"}),
    ],
)
def test_the_options_reach_every_trainable_diffusers_part(
    recipe: str, expected: set[str], request: pytest.FixtureRequest
) -> None:
    task, _ = _task(recipe, request.getfixturevalue("data_dir") if recipe == "coser" else None)
    done = apply_memory_options(task, gradient_checkpointing=True, attention="sliced")
    assert expected <= set(done["checkpointing"])
    roots = [task.trainable, task.unet] if hasattr(task, "unet") else [task.trainable]
    for root in roots:
        for name, module in root.named_modules():
            if isinstance(module, ModelMixin) and module._supports_gradient_checkpointing:
                assert module.is_gradient_checkpointing, name
            if isinstance(module, Attention) and type(module.processor).__module__.startswith("diffusers"):
                assert isinstance(module.processor, SlicedAttnProcessor), name
    assert done["attention"]
    apply_memory_options(task, gradient_checkpointing=False, attention="sdpa")
    attns = [m for r in roots for m in r.modules() if isinstance(m, Attention)]
    assert any(isinstance(m.processor, AttnProcessor2_0) for m in attns)


def test_sliced_and_eager_attention_give_the_same_loss() -> None:
    task, cfg = _task("xpsr")
    batch = _batch(cfg)
    losses = {}
    for mode in ("sdpa", "eager", "sliced"):
        apply_memory_options(task, gradient_checkpointing=False, attention=mode)
        with torch.no_grad():
            losses[mode] = float(combine_losses(cfg.losses, task.compute(task.trainable, batch))[0])
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses


def test_trainer_applies_the_config_options(tmp_path: Path, data_dir: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["hr"] = [str(data_dir / "train" / "bsds500")]
    cfg = config_from_dict(raw, ["train.gradient_checkpointing=true", "train.attention=eager", "train.ema_decay=0"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer._build()
    assert trainer.task.trainable.is_gradient_checkpointing and trainer.task.unet.is_gradient_checkpointing
    assert set(trainer.memory_options["checkpointing"]) == {"trainable", "unet"}
    assert trainer.memory_options["attention"]


def test_bad_attention_mode_is_one_line() -> None:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    with pytest.raises(SemsrError, match="train.attention must be one of default, sdpa, eager, sliced"):
        config_from_dict(raw, ["train.attention=flash"])
