"""The device-mismatch guard: pipelines run on a simulated second device (``semsr.testing.device_guard``)
and fail as CUDA would when an op mixes a device tensor with a host one."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tests.reference import cases as C
from tests.test_metrics import weights_dir  # noqa: F401 - fixture: random networks in the published layouts

from semsr.eval.metrics import get_metric
from semsr.methods import build, resolve
from semsr.models.vq import load_tokenizer
from semsr.pipeline.colorfix import colour_fix
from semsr.priors.mmsr import ModalityTokens
from semsr.testing.device_guard import VIRTUAL_DEVICE, DeviceGuard, DeviceMismatch
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import load_config
from semsr.train.tasks import build_task

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_guard_fails_on_mixed_devices_and_follows_moves():
    with DeviceGuard() as guard:
        x = guard.put(torch.ones(2, 3))
        host = torch.zeros(2, 3)
        with pytest.raises(DeviceMismatch, match="add"):
            torch.add(x, host)
        with pytest.raises(DeviceMismatch):
            _ = x * torch.ones(3)
        moved = host.to(x.device)
        assert guard.on_device(moved) and guard.on_device(x + moved)
        assert guard.on_device(torch.zeros(3, device=x.device)) and not guard.on_device(torch.zeros(3))
        assert not guard.on_device(x.cpu()) and x.device == VIRTUAL_DEVICE
        _ = x * torch.tensor(2.0)  # 0-dim host tensors mix, as CUDA allows
        net = torch.nn.Linear(3, 1).to(VIRTUAL_DEVICE)
        assert guard.on_device(net(x))
        with pytest.raises(DeviceMismatch, match="numpy"):
            x.numpy()


def test_colour_fix_of_a_host_image_against_a_device_hint_is_caught():
    """The colour fix as it failed on a GPU: the decoded image moved to the host, the hint on the device."""
    with DeviceGuard() as guard:
        hint = guard.put(torch.rand(1, 3, 8, 8))
        image = guard.put(torch.rand(1, 3, 8, 8))
        out = colour_fix(image.cpu(), hint, "adain")
        assert not guard.on_device(out) or out.device == VIRTUAL_DEVICE


@pytest.mark.parametrize("fix", ["adain", "wavelet"])
def test_sd_controlnet_runs_on_the_simulated_device(fix):
    """``semsr upscale --method sd-controlnet --device cuda`` failed in the colour fix; this is that run."""
    sd, controlnet = resolve_model_path("tiny://sd"), resolve_model_path("tiny://controlnet")
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    options = resolve("sd-controlnet").parse(
        {"base": sd, "controlnet": controlnet, "device": str(VIRTUAL_DEVICE), "steps": 2, "colour_fix": fix}
    )
    with DeviceGuard() as guard:
        pipe = build("sd-controlnet", options)  # built under the guard: its modules move to the device
        out = pipe(guard.put(lr), options)
    assert out.images.shape == (1, 3, 64, 64)


def test_training_step_and_validation_sampling_run_on_the_simulated_device():
    """``semsr train --config configs/tiny.yaml`` on a GPU failed in validation sampling (the colour fix)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [])
    with DeviceGuard() as guard:
        task = build_task(cfg)
        task.setup(VIRTUAL_DEVICE, torch.float32)
        model = copy.deepcopy(task.trainable).to(VIRTUAL_DEVICE)
        sr = task.sample(model.eval(), guard.put(torch.rand(1, 3, 16, 16)), [""], 2, 1.0, seed=0)
        assert sr.shape == (1, 3, 64, 64)
        batch = {"hr": torch.rand(2, 3, 64, 64), "lr": torch.rand(2, 3, 16, 16), "prompt": ["", ""]}
        out = task.compute(model.train(), {**batch, "seed": torch.tensor([0, 1])})
        assert guard.on_device(out["pred"]) and guard.on_device(out["target"])


def test_device_smoke_benchmark_runs_every_recipe_on_the_simulated_device(tmp_path):
    """``benchmarks/device_smoke.py --guard``: each recipe (and a restorer per runtime, and the CLI) on the
    simulated device; a row that mixes devices fails the run."""
    spec = importlib.util.spec_from_file_location("device_smoke", REPO / "benchmarks" / "device_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    recipes = ["xpsr", "dalpsr", "mmsr", "coser", "rfa", "default-diffusion"]
    only = [*recipes, "bicubic", "realesrgan-x4plus", "realcugan-2x", "cli"]
    report = tmp_path / "smoke.json"
    rc = smoke.main(["--device", "cpu", "--guard", "--no-train", "--json", str(report), "--only", *only])
    rows = json.loads(report.read_text())["rows"]
    assert {r["name"] for r in rows} >= {f"upscale {n}" for n in recipes}
    assert rc == 0, [r for r in rows if r["status"] == "fail"]


TRAIN_KEYS = [k for k, c in C.CASES.items() if k.startswith("train/") and c.kind == "trainer"]
NO_SR_VALIDATION = {"train/rfa-aligner", "train/rfa-enhancer", "train/irpad"}  # they refuse validation.every


@pytest.mark.parametrize("key", TRAIN_KEYS)
def test_every_training_task_steps_and_validates_on_the_simulated_device(key, tiny_models, tmp_path, monkeypatch):
    """One optimiser step and a validation of every training config's task, with Accelerate's device the
    simulated one (so the trainer, the prepared loader and the task put everything there)."""
    from accelerate import Accelerator

    case = C.CASES[key]
    monkeypatch.setattr(Accelerator, "device", property(lambda self: VIRTUAL_DEVICE))
    with C.isolated(parent=tmp_path) as work:
        paths = C._prepare(case.needs, tiny_models, work)
        overrides = C._fill(dict(case.overrides), paths)
        if key not in NO_SR_VALIDATION:
            overrides.update({"validation.every": 1, "validation.count": 1})
        with DeviceGuard():
            seen = C.train_with_trainer(C.REPO / str(case.config), overrides, work / "run")
        assert "loss" in seen
        log = (work / "run" / "log.jsonl").read_text()
    assert ('"val"' in log) == (key not in NO_SR_VALIDATION)


def test_mmsr_depth_and_segmentation_providers_run_on_the_method_device():
    """They were built on the CPU whatever ``--device`` said."""
    opts = {"depth": {"model": resolve_model_path("tiny://depth")}, "seg": {"model": resolve_model_path("tiny://seg")}}
    with DeviceGuard() as guard:
        tokenizers = {m: load_tokenizer(resolve_model_path(f"tiny://vq-{m}"), VIRTUAL_DEVICE) for m in ("depth", "seg")}
        tokens = ModalityTokens(
            ["depth", "seg"], tokenizers, provider_opts=opts, use_cache=False, device=VIRTUAL_DEVICE
        )
        for name in ("depth", "seg"):
            provider = tokens.providers[name]
            assert provider.device == VIRTUAL_DEVICE
            assert guard.on_device(next(provider.model.parameters()))
        vectors, maps = tokens.encode(guard.put(torch.rand(1, 3, 32, 32)))
    assert set(vectors) == {"depth", "seg"} and maps["depth"].shape[-2:] == (32, 32)


def test_default_diffusion_runs_irpad_on_its_device():
    options = resolve("default-diffusion").parse(
        {"irpad": resolve_model_path("tiny://irpad-untrained"), "device": str(VIRTUAL_DEVICE), "steps": 1}
    )
    with DeviceGuard() as guard:
        pipe = build("default-diffusion", options)
        assert guard.on_device(next(pipe.degradation.estimator.model.parameters()))
        out = pipe(guard.put(torch.rand(1, 3, 16, 16)), options)
    assert out.images.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("name", ["lpips", "dists", "fid"])
def test_metric_backbones_run_on_the_simulated_device(name, weights_dir):  # noqa: F811 - the fixture
    images = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fetch = {} if name == "fid" else {"fetch": False}
    with DeviceGuard() as guard:
        metric = get_metric(name, weights_dir=weights_dir, device=str(VIRTUAL_DEVICE), **fetch)
        a, b, c = (guard.put(x) for x in images)
        if name == "fid":
            assert metric.features([a, b, c]).shape == (3, 2048)
        else:
            assert metric(a, b) > 0


def test_rfa_and_coser_embedding_priors_run_on_their_device():
    """``semsr priors build --recipe rfa|coser --device ...``: the models on the device, host images in, host
    results out (what the store writes)."""
    from semsr.priors.base import get_provider

    clip = resolve_model_path("tiny://clip-vision")
    opts = {
        "rfa-embed": {"embedder": f"clip:{clip}"},
        "rfa-tokens": {"embedder": f"clip:{clip}"},
        "coser-clip": {"clip": clip},
        "coser-cognitive": {"clip": clip, "cognitive": resolve_model_path("tiny://coser/cognitive")},
    }
    image = torch.rand(1, 3, 24, 20)
    with DeviceGuard() as guard:
        for name, kw in opts.items():
            provider = get_provider(name, device=str(VIRTUAL_DEVICE), **kw)
            model = getattr(provider, "clip", None) or getattr(provider, "encoder", None)
            model = getattr(model, "embedder", model)
            assert guard.on_device(next(model.parameters())), name
            result = provider(image)
            assert result.kind == "embedding" and result.value.device.type == "cpu", name
