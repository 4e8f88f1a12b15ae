"""docs/architecture.md stays true: its "how to add a recipe" example is under 60 lines and runs."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from semsr import methods
from semsr.core.components import save_checkpoint
from semsr.core.outputs import SROutput

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe_code() -> str:
    section = DOC.read_text(encoding="utf-8").split("## How to add a recipe", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_recipe_example_is_short() -> None:
    assert len(_recipe_code().splitlines()) < 60


def test_recipe_example_runs_through_the_registry(tiny_models: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(methods.REGISTRY, "entries", dict(methods.REGISTRY.entries))
    module = types.ModuleType("gated_recipe")
    monkeypatch.setitem(sys.modules, "gated_recipe", module)  # dataclasses look their module up
    exec(compile(_recipe_code(), str(DOC), "exec"), module.__dict__)
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(tiny_models / "controlnet")
    width = int(controlnet.config.cross_attention_dim)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gate = module.ContextGate(width=width)
    ckpt = save_checkpoint(tmp_path / "gated", "gated", {"gate": gate, "controlnet": controlnet})
    spec = methods.resolve("gated")
    options = spec.parse({"base": str(tiny_models / "sd"), "checkpoint": str(ckpt), "steps": "2"})
    out = spec.factory(options)(torch.rand(1, 3, 16, 16), options)
    assert isinstance(out, SROutput) and out.images.shape == (1, 3, 64, 64)
    assert out.priors["negative_prompt"] == options.negative_prompt
