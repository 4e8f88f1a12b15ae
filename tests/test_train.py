"""Training machinery: config, data determinism, losses, tasks, trainer, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semsr.core.errors import SemsrError
from semsr.train.config import config_from_dict, dump_config, load_config
from train_helpers import REPO, fresh_training_state, load_safetensors, tiny_config_dict, write_textures


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    with fresh_training_state():
        yield


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_textures(tmp_path_factory.mktemp("hr"), count=6)


def _train(cfg_dict: dict, output: Path, resume: bool = False, callbacks=None):
    from semsr.train.trainer import Trainer

    return Trainer(config_from_dict(cfg_dict), output, resume=resume, callbacks=callbacks).fit()


def _train_losses(output: Path) -> dict[int, float]:
    from semsr.train.curve import read_log

    records = [r for r in read_log(output / "log.jsonl") if r["type"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate steps in the log: {steps}"
    return {r["step"]: r["loss"] for r in records}


# ---------------------------------------------------------------- config


def test_tiny_yaml_loads_with_overrides():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", ["train.max_steps=7", "optim.lr=2e-4", "losses.eps_mse=0.5", "data.hr=[a, b]"]
    )
    assert cfg.task == "controlnet_sr" and cfg.model.pretrained == "tiny://"
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.losses == {"eps_mse": 0.5} and cfg.data.hr == ["a", "b"]
    assert "benchmarks" not in " ".join(cfg.data.hr)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_null_overrides_reach_free_form_options_but_not_typed_fields():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.options.prompt=null", "model.controlnet=null"])
    assert cfg.model.options["prompt"] is None and cfg.model.controlnet is None
    with pytest.raises(SemsrError, match="'train.max_steps' must not be null"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.max_steps=null"])


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"optim": {"lrr": 1}}, "unknown key"),
        ({"train": {"max_steps": "many"}}, "train.max_steps"),
        ({"train": {"mixed_precision": "fp8"}}, "mixed_precision"),
        ({"schedule": {"name": "linear"}}, "schedule.name"),
        ({"data": {"crop_size": 66, "scale": 4}}, "crop_size"),
        ({"losses": {}}, "losses"),
    ],
)
def test_config_rejects_bad_values(raw, message):
    with pytest.raises(SemsrError, match=message):
        config_from_dict(raw)


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    from semsr.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: -3}\n")
    assert main(["train", "--config", str(bad), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_steps" in err and str(bad) in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


# ---------------------------------------------------------------- data


def test_samples_are_a_function_of_position(hr_dir):
    from semsr.train.data import CropDataset, list_images, make_degrader

    cfg = config_from_dict(tiny_config_dict(hr_dir))
    train, val = list_images(cfg.data, 64)
    assert len(train) == 5 and len(val) == 1 and val[0] not in train
    degrade = make_degrader(cfg.degradation, 4)
    a, b = CropDataset(train, cfg.data, degrade, seed=0), CropDataset(train, cfg.data, degrade, seed=0)
    for p in (7, 0, 12):  # any access order
        x, y = a[p], b[p]
        assert x["hr"].shape == (3, 64, 64) and x["lr"].shape == (3, 16, 16)
        assert torch.equal(x["hr"], y["hr"]) and torch.equal(x["lr"], y["lr"]) and x["seed"] == y["seed"]
    assert not torch.equal(a[1]["hr"], a[2]["hr"])
    other = CropDataset(train, cfg.data, degrade, seed=1)
    assert not torch.equal(a[3]["lr"], other[3]["lr"])
    # each epoch visits every image once, in a seeded order
    epoch = sorted(a.index_at(p) for p in range(5, 10))
    assert epoch == list(range(5))


def test_position_sampler_shards_global_batches():
    from semsr.train.data import PositionBatchSampler

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(PositionBatchSampler(4, start=12), 2)
    r0 = take(PositionBatchSampler(2, start=12, rank=0, world_size=2), 2)
    r1 = take(PositionBatchSampler(2, start=12, rank=1, world_size=2), 2)
    assert single == [[12, 13, 14, 15], [16, 17, 18, 19]]
    assert [a + b for a, b in zip(r0, r1)] == single


def test_small_images_are_skipped_and_empty_sets_rejected(tmp_path):
    from semsr.train.data import list_images

    folder = write_textures(tmp_path / "hr", count=3, size=(40, 40))
    cfg = config_from_dict(tiny_config_dict(folder))
    with pytest.raises(SemsrError, match="usable HR images"):
        list_images(cfg.data, 64)
    with pytest.raises(SemsrError, match="not found"):
        list_images(config_from_dict(tiny_config_dict(tmp_path / "nope")).data, 64)


def test_manifest_train_split_with_cached_captions(tmp_path):
    from semsr.data.corpus.manifest import Manifest
    from semsr.train.data import list_images

    corpus = write_textures(tmp_path / "corpus", count=4)
    with Manifest(corpus / "manifest.sqlite") as m:
        for i, path in enumerate(sorted(corpus.glob("*.png"))):
            m.add_image(
                path=path.name,
                content_hash=f"h{i}",
                width=96,
                height=80,
                source="test",
                licence="CC0",
                split="test" if i == 3 else "train",
            )
        m.put_prior("h0", "caption", "a red wave", provider_version="v1")
        m.put_prior("h1", "caption", {"text": "old"}, provider_version="v1")
        m.put_prior("h1", "caption", {"text": "a green wave"}, provider_version="v2")
    cfg = config_from_dict(
        tiny_config_dict(
            corpus, data={"hr": [], "manifest": str(corpus / "manifest.sqlite"), "val_count": 0, "prompt": "default"}
        )
    )
    train, val = list_images(cfg.data, 64)
    assert [it.path.name for it in train] == ["img00.png", "img01.png", "img02.png"] and val == []
    assert [it.caption for it in train] == ["a red wave", "a green wave", None]
    from semsr.train.data import CropDataset, make_degrader

    ds = CropDataset(train, cfg.data, make_degrader({"type": "bicubic"}, 4), seed=0)
    prompts = {ds.items[ds.index_at(p)].path.name: ds[p]["prompt"] for p in range(3)}
    assert prompts == {"img00.png": "a red wave", "img01.png": "a green wave", "img02.png": "default"}


# ---------------------------------------------------------------- losses


def test_loss_registry_and_weighting():
    from semsr.train.losses import available_losses, combine_losses, register_loss

    outputs = {"pred": torch.ones(2, 4, 2, 2), "target": torch.zeros(2, 4, 2, 2)}

    @register_loss("test_l1_to_half")
    def _l1(out):
        return (out["pred"] - 0.5).abs().mean()

    assert "eps_mse" in available_losses() and "test_l1_to_half" in available_losses()
    total, parts = combine_losses({"eps_mse": 2.0, "test_l1_to_half": 0.5}, outputs)
    assert parts == {"eps_mse": 1.0, "test_l1_to_half": 0.5}
    assert float(total) == pytest.approx(2.0 * 1.0 + 0.5 * 0.5)
    with pytest.raises(SemsrError, match="unknown loss term"):
        combine_losses({"nope": 1.0}, outputs)
    with pytest.raises(SemsrError, match="needs task output"):
        combine_losses({"eps_mse": 1.0}, {"pred": outputs["pred"]})


# ---------------------------------------------------------------- task


def test_loss_falls_when_overfitting_a_fixed_batch(hr_dir, monkeypatch):
    """The controlnet_sr task learns, through the inference pipeline's ControlNet + UNet forward."""
    from semsr.train import tasks
    from semsr.train.losses import combine_losses

    forwards = []
    inference_forward = tasks.controlnet_unet_forward

    def spy(unet, controlnet, *args, **kwargs):
        forwards.append(controlnet)
        return inference_forward(unet, controlnet, *args, **kwargs)

    monkeypatch.setattr(tasks, "controlnet_unet_forward", spy)
    torch.set_num_threads(1)
    cfg = config_from_dict(tiny_config_dict(hr_dir, train={"null_prompt_prob": 0.0}))
    torch.manual_seed(0)
    task = tasks.build_task(cfg)
    task.setup(torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=gen)
    batch = {
        "hr": hr,
        "lr": torch.nn.functional.avg_pool2d(hr, 4),
        "prompt": ["", "a photo"],
        "seed": torch.tensor([11, 12]),
    }
    frozen = {k: v.clone() for k, v in task.unet.state_dict().items()}
    opt = torch.optim.AdamW(task.trainable.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss, _ = combine_losses({"eps_mse": 1.0}, task.compute(task.trainable, batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(torch.equal(frozen[k], v) for k, v in task.unet.state_dict().items())  # base stays frozen
    assert not any(p.requires_grad for p in task.vae.parameters())
    assert len(forwards) == 20 and all(m is task.trainable for m in forwards)


# ---------------------------------------------------------------- checkpoints and exports


def test_checkpoint_commit_replaces_whole_folders(tmp_path):
    from semsr.train import checkpoints as ckpt

    out = tmp_path / "run"
    for content in ("old", "new"):
        staging = ckpt.staging_dir(out, 5, clear=True)
        staging.mkdir(parents=True)  # accelerator.save_state writes here on every process
        (staging / "model.safetensors").write_text(content)
        final = ckpt.commit_checkpoint(out, staging, 5, {"task": "controlnet_sr"}, keep=2)
    assert final == out / "checkpoints" / "step_00000005" and ckpt.latest_checkpoint(out) == (5, final)
    assert (final / "model.safetensors").read_text() == "new"
    assert json.loads((final / ckpt.MARKER).read_text()) == {"step": 5, "task": "controlnet_sr"}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000005"]  # no staging left
    (out / "checkpoints" / ".tmp_step_00000006").mkdir()  # a save killed half-way
    assert ckpt.latest_checkpoint(out) == (5, final)
    ckpt.remove_staging_dirs(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000005"]


def test_exports_are_written_whole(tmp_path):
    """The trainer exports into a staging folder (semsr.core.io.atomic_folder): a failed export keeps the old one."""
    from semsr.core.io import atomic_folder

    class Failed(Exception):
        pass

    final = tmp_path / "final"
    with atomic_folder(final) as folder:
        (folder / "config.json").write_text("1")
    with pytest.raises(Failed), atomic_folder(final) as folder:
        (folder / "config.json").write_text("2")
        raise Failed
    assert (final / "config.json").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["final"]
    with atomic_folder(final) as folder:
        (folder / "other.json").write_text("3")
    assert [p.name for p in final.iterdir()] == ["other.json"]  # replaced, not merged


# ---------------------------------------------------------------- trainer


def test_tiny_config_trains_and_writes_run_directory(tmp_path, data_dir):
    """`semsr train --config configs/tiny.yaml` on a few BSDS500 training images (shortened)."""
    from semsr.cli import main

    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--output",
        str(out),
        "--max-steps",
        "3",
        "validation.every=3",
        "checkpoint.every=2",
        "data.limit=4",
        "train.grad_accum=1",
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["loss"] > 0 and "eps_mse" in r["terms"] for r in train)
    val = [r for r in records if r["type"] == "val"]
    assert val and val[0]["step"] == 3 and set(val[0]["metrics"]) == {"psnr", "ssim"}
    assert (out / "val" / "step_00000003.png").is_file()
    assert (out / "curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert (out / "config.yaml").is_file()
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(out / "final_ema", local_files_only=True)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path, hr_dir):
    """8 steps straight == 4 steps, checkpoint, (2 more steps, killed), resume to 8."""
    cfg = tiny_config_dict(
        hr_dir,
        train={"max_steps": 8, "grad_accum": 2, "ema_decay": 0.9, "threads": 1},
        data={"batch_size": 1},
        checkpoint={"every": 4, "keep": 2},
        schedule={"name": "cosine", "warmup_steps": 2},
    )
    straight = tmp_path / "straight"
    _train(cfg, straight)

    class Killed(Exception):
        pass

    def kill_at_6(trainer, step, record):
        if step == 6:
            raise Killed

    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        _train(cfg, resumed, callbacks=[kill_at_6])
    assert max(_train_losses(resumed)) == 6  # steps 5-6 were logged, then lost with the kill
    result = _train(cfg, resumed, resume=True)
    assert result.step == 8 and len(result.losses) == 4

    a, b = _train_losses(straight), _train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    for folder in ("final", "final_ema"):
        wa = load_safetensors(straight / folder / "diffusion_pytorch_model.safetensors")
        wb = load_safetensors(resumed / folder / "diffusion_pytorch_model.safetensors")
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    lrs = [json.loads(x)["lr"] for x in (resumed / "log.jsonl").read_text().splitlines()]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-4)


def test_gradient_accumulation_matches_larger_batch(tmp_path, hr_dir):
    """accum 2 x batch 1 sees the same samples as accum 1 x batch 2 and takes the same step.

    With AdamW's eps far above |grad|, the first update is ``-lr * grad / eps``,
    so comparing weights compares the (averaged) gradients themselves.
    """
    common = {
        "optim": {"lr": 1000.0, "eps": 1000.0, "weight_decay": 0.0, "max_grad_norm": 0.0},
        "train": {"max_steps": 1, "ema_decay": 0.0, "threads": 1},
    }
    a = tmp_path / "accum"
    _train(
        tiny_config_dict(hr_dir, data={"batch_size": 1}, **{**common, "train": {**common["train"], "grad_accum": 2}}), a
    )
    b = tmp_path / "batch"
    _train(tiny_config_dict(hr_dir, data={"batch_size": 2}, **common), b)
    assert _train_losses(a)[1] == pytest.approx(_train_losses(b)[1], rel=1e-5)

    from accelerate.utils import set_seed

    from semsr.train.tasks import build_task

    set_seed(0)
    init = {
        k: v.float() for k, v in build_task(config_from_dict(tiny_config_dict(hr_dir))).trainable.state_dict().items()
    }
    wa = load_safetensors(a / "final" / "diffusion_pytorch_model.safetensors")
    wb = load_safetensors(b / "final" / "diffusion_pytorch_model.safetensors")
    da = torch.cat([(wa[k] - init[k]).flatten() for k in init])
    db = torch.cat([(wb[k] - init[k]).flatten() for k in init])
    assert float(da.abs().max()) > 1e-4  # the step moved the weights
    assert float((da - db).abs().max()) < 1e-3 * float(da.abs().max())


def test_output_with_checkpoints_needs_resume(tmp_path, hr_dir):
    from semsr.train.trainer import Trainer

    cfg = tiny_config_dict(hr_dir, train={"max_steps": 1, "ema_decay": 0.0, "threads": 1})
    _train(cfg, tmp_path / "run")
    with pytest.raises(SemsrError, match="--resume"):
        Trainer(config_from_dict(cfg), tmp_path / "run")
    result = _train(cfg, tmp_path / "run", resume=True)  # already at max_steps: nothing to do
    assert result.step == 1 and result.losses == []


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path, hr_dir):
    cfg = tiny_config_dict(
        hr_dir,
        train={"max_steps": 2, "mixed_precision": "bf16", "ema_decay": 0.9, "threads": 1},
        validation={"every": 1, "count": 1, "size": 64, "steps": 2, "metrics": ["psnr"]},
    )
    _train(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "val", "train", "val"]
    assert all(r["metrics"]["psnr"] > 5 for r in records if r["type"] == "val")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}


def test_fp16_on_cpu_is_refused(tmp_path, hr_dir):
    from semsr.train.trainer import has_accelerator_device

    if has_accelerator_device():
        pytest.skip("a GPU is present")
    with pytest.raises(SemsrError, match="fp16"):
        _train(tiny_config_dict(hr_dir, train={"mixed_precision": "fp16"}), tmp_path / "run")


def test_unknown_task_or_loss_fails_before_loading_models(tmp_path, hr_dir):
    from semsr.train.trainer import Trainer

    with pytest.raises(SemsrError, match="unknown task 'nope'.*controlnet_sr"):
        Trainer(config_from_dict(tiny_config_dict(hr_dir, task="nope")), tmp_path / "a")
    with pytest.raises(SemsrError, match="unknown loss term 'dfcc'"):
        Trainer(config_from_dict(tiny_config_dict(hr_dir, losses={"dfcc": 0.05})), tmp_path / "b")
