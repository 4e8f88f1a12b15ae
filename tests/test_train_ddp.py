"""Data parallelism: ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU).

Every sample's content and random draws are a function of its global position
(semsr.train.data), so 2 processes x batch B see exactly the samples of
1 process x batch 2B; DDP averages the gradients, so the step must match.
Each launch starts two Python processes that import diffusers (~40 s on two
shared cores), hence ``slow``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import fresh_training_state, launch_semsr, load_safetensors, tiny_config_dict, write_textures

pytestmark = pytest.mark.slow

# AdamW with eps >> |grad| makes the first update -lr * grad / eps: the weight
# change *is* the averaged gradient (a sum-instead-of-mean bug would double it).
GRADIENT_PROBE = {"lr": 1000.0, "eps": 1000.0, "weight_decay": 0.0, "max_grad_norm": 0.0}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    with fresh_training_state():
        yield


def _launch(config: dict, output: Path, *extra: str, processes: int = 2) -> None:
    cfg_file = output.parent / f"{output.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    proc = launch_semsr(
        "train", "--config", str(cfg_file), "--output", str(output), *extra, processes=processes, timeout=600
    )
    assert f"{processes} process(es)" in proc.stdout + proc.stderr


def _train_in_process(config: dict, output: Path) -> None:
    from semsr.train.config import config_from_dict
    from semsr.train.trainer import Trainer

    Trainer(config_from_dict(config), output).fit()


def _log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(output / "final" / "diffusion_pytorch_model.safetensors")


def test_two_processes_match_one_process_with_double_batch(tmp_path):
    hr = write_textures(tmp_path / "hr")
    common = dict(optim=GRADIENT_PROBE, train={"max_steps": 1, "ema_decay": 0.0, "threads": 1})
    two = tmp_path / "two"
    _launch(tiny_config_dict(hr, data={"batch_size": 1}, **common), two)
    one = tmp_path / "one"
    _train_in_process(tiny_config_dict(hr, data={"batch_size": 2}, **common), one)

    log_two, log_one = _log(two), _log(one)
    assert len(log_two) == 1 and log_two[0]["samples"] == log_one[0]["samples"] == 2
    assert log_two[0]["loss"] == pytest.approx(log_one[0]["loss"], rel=1e-5)

    from accelerate.utils import set_seed

    from semsr.train.config import config_from_dict
    from semsr.train.tasks import build_task

    set_seed(0)
    init = {k: v.float() for k, v in build_task(config_from_dict(tiny_config_dict(hr))).trainable.state_dict().items()}
    w_two, w_one = _weights(two), _weights(one)
    d_two = torch.cat([(w_two[k] - init[k]).flatten() for k in init])
    d_one = torch.cat([(w_one[k] - init[k]).flatten() for k in init])
    assert float(d_one.abs().max()) > 1e-4
    assert float((d_two - d_one).abs().max()) < 1e-3 * float(d_one.abs().max())


def test_two_process_checkpoint_resumes_in_one_process(tmp_path):
    """2 procs x batch 1: 2 steps + checkpoint; resumed by 1 proc x batch 2 to step 3 ==
    1 proc x batch 2 for 3 steps straight (the data stream continues at the consumed
    sample count, whatever the process count)."""
    hr = write_textures(tmp_path / "hr")
    common = dict(
        train={"max_steps": 3, "ema_decay": 0.9, "threads": 1, "grad_accum": 2}, checkpoint={"every": 2, "keep": 2}
    )
    mixed = tmp_path / "mixed"
    _launch(tiny_config_dict(hr, data={"batch_size": 1}, **common), mixed, "--max-steps", "2")
    assert (mixed / "checkpoints" / "step_00000002" / "random_states_1.json").is_file()
    from semsr.train.config import config_from_dict
    from semsr.train.trainer import Trainer

    Trainer(config_from_dict(tiny_config_dict(hr, data={"batch_size": 2}, **common)), mixed, resume=True).fit()
    one = tmp_path / "one"
    _train_in_process(tiny_config_dict(hr, data={"batch_size": 2}, **common), one)

    a = [(r["step"], r["samples"], r["loss"]) for r in _log(mixed) if r["type"] == "train"]
    b = [(r["step"], r["samples"], r["loss"]) for r in _log(one) if r["type"] == "train"]
    assert [x[:2] for x in a] == [x[:2] for x in b] == [(1, 4), (2, 8), (3, 12)]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-4)
    w_mixed, w_one = _weights(mixed), _weights(one)
    assert max(float((w_mixed[k] - w_one[k]).abs().max()) for k in w_one) < 1e-5
