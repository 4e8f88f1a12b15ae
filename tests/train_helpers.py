"""Shared helpers of the training and multi-process tests (textures, tiny configs, ``accelerate launch``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def fresh_training_state() -> Iterator[None]:
    """Run an in-process ``Trainer`` and then restore torch's thread count (the test configs train with one
    thread) and reset Accelerate's process-wide singletons (each Trainer builds its own Accelerator)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def write_textures(folder: Path, count: int = 6, size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    """Write ``count`` smooth random-texture RGB PNGs (not flat, so no crop is rejected)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.05, 0.4, 2).tolist() + [rng.uniform(0, 6.28)]
            img[..., c] = 0.5 + 0.3 * np.sin(fx * xx + fy * yy + ph) + 0.1 * rng.standard_normal((h, w))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def tiny_config_dict(hr_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A fast controlnet_sr experiment on the tiny models; ``sections`` update the defaults."""
    cfg: dict[str, Any] = {
        "name": "test",
        "task": "controlnet_sr",
        "seed": 0,
        "model": {"pretrained": "tiny://", "options": {"conditioning_channels": [8, 8, 16, 16]}},
        "data": {"hr": [str(hr_dir)], "val_count": 1, "crop_size": 64, "scale": 4, "batch_size": 2},
        "degradation": {"type": "realesrgan"},
        "optim": {"lr": 1e-4},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": 4, "grad_accum": 1, "ema_decay": 0.9, "threads": 1},
        "losses": {"eps_mse": 1.0},
        "validation": {"every": 0},
        "checkpoint": {"every": 0, "keep": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def load_safetensors(path: Path) -> dict[str, Any]:
    """Tensors of a safetensors file (float32 copies)."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_semsr(*args: str, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N -m semsr.cli ARGS`` on CPU (gloo); must succeed.

    Returns the finished process (its stdout/stderr), after asserting a zero exit status.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "semsr.cli",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "semsr" in line]
    assert proc.returncode == 0, "\n".join(errors)[-3000:]
    return proc
