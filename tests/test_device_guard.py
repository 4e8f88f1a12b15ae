"""The device-mismatch guard: pipelines run on a simulated second device (``semsr.testing.device_guard``)
and fail as CUDA would when an op mixes a device tensor with a host one."""

from __future__ import annotations

import pytest
import torch

from semsr.methods import build, resolve
from semsr.pipeline.colorfix import colour_fix
from semsr.testing.device_guard import VIRTUAL_DEVICE, DeviceGuard, DeviceMismatch
from semsr.testing.tiny import resolve_model_path

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
