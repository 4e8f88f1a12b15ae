"""Run an ncnn network on the CPU from PyTorch tensors.

A thin wrapper over the ``ncnn`` Python wheel: it loads a ``.param``/``.bin``
pair with Vulkan off, converts ``(3, H, W)`` float tensors to ``ncnn.Mat``
(keeping the NumPy buffer alive while ncnn reads it: ``ncnn.Mat(array)``
borrows the memory, it does not copy) and returns the output as a tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from semsr.core.errors import UnavailableError


class NcnnNet:
    """One loaded ncnn network.

    Args:
        param_path, bin_path: the model files.
        input_name, output_name: blob names in the ``.param``
            (``"data"``/``"output"`` for Real-ESRGAN, ``"in0"``/``"out0"`` for Real-CUGAN).
        threads: ncnn worker threads (default: ``torch.get_num_threads()``).
    """

    def __init__(
        self,
        param_path: str | Path,
        bin_path: str | Path,
        input_name: str,
        output_name: str,
        threads: int | None = None,
    ) -> None:
        try:
            import ncnn  # optional heavy dependency (native wheel), loaded on first use
        except ImportError as err:  # pragma: no cover - ncnn is a dependency
            raise UnavailableError("the 'ncnn' package is not installed (pip install ncnn)") from err
        self._ncnn = ncnn
        self.input_name = input_name
        self.output_name = output_name
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = int(threads or torch.get_num_threads())
        if self.net.load_param(str(param_path)) != 0:
            raise UnavailableError("ncnn could not read the model graph", param_path)
        if self.net.load_model(str(bin_path)) != 0:
            raise UnavailableError("ncnn could not read the model weights", bin_path)

    def run_chw(self, x: np.ndarray) -> np.ndarray:
        """Run on one ``(C, H, W)`` float32 array; returns the ``(C', H', W')`` output."""
        arr = np.ascontiguousarray(x, dtype=np.float32)  # must outlive `mat`
        mat = self._ncnn.Mat(arr)
        ex = self.net.create_extractor()
        ex.input(self.input_name, mat)
        ret, out = ex.extract(self.output_name)
        if ret != 0:
            raise RuntimeError(f"ncnn extract({self.output_name!r}) failed with code {ret}")
        result = np.array(out, copy=True)
        del mat, arr
        return result

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run on ``(B, C, H, W)`` float; returns ``(B, C', H', W')`` float32 (device of ``x``)."""
        outs = [torch.from_numpy(self.run_chw(xi.detach().float().cpu().numpy())) for xi in x]
        return torch.stack(outs).to(x.device)
