"""ImageNet backbones of the deep metrics, with torchvision's state-dict layout.

The published weight files (``alexnet-owt-7be5be79.pth``,
``vgg16-397923af.pth``, ``pt_inception-2015-12-05-6726825d.pth``,
``inception_v3_google-0cc3c7bd.pth``) load directly: module and parameter
names follow torchvision (``features.0.weight``, ``Mixed_5b.branch1x1.conv.weight``...).
torchvision itself is not used (it cannot be installed next to this torch).

- :class:`AlexNetFeatures` / :class:`VGG16Features`: the ``features`` stack,
  returning the activations after chosen layer indices (LPIPS and DISTS taps).
  ``VGG16Features(pool="l2")`` swaps max pooling for DISTS' L2 pooling.
- :class:`InceptionV3Pool3`: Inception-v3 up to the 2048-d global average pool
  (FID). ``variant="fid"`` is the TensorFlow FID graph as ported by
  pytorch-fid (average pools exclude padding, max pool in the last block);
  ``variant="torchvision"`` is torchvision's Inception-v3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from semsr.core.errors import UnavailableError

# --------------------------------------------------------------------------- loading


def load_subset(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path | str,
    what: str,
    ignore: Sequence[str] = (),
) -> None:
    """Load ``state`` into ``module`` requiring every parameter/buffer of the module.

    Keys starting with one of ``ignore`` (e.g. ``"classifier."``) and BatchNorm
    ``num_batches_tracked`` counters may be absent or extra. Any other missing,
    unexpected or mis-shaped key raises :class:`UnavailableError` naming ``path``.
    """
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    extra = [
        k for k in state if k not in own and not k.endswith("num_batches_tracked") and not k.startswith(tuple(ignore))
    ]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        if shape:
            k = shape[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
        raise UnavailableError(f"not a {what} state dict: {'; '.join(parts)}", path)
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=False)


# --------------------------------------------------------------------------- AlexNet / VGG16


class L2Pool(nn.Module):
    """DISTS' L2 pooling: ``sqrt(conv(x^2, hann) + 1e-12)``, 3x3 Hann window, stride 2, padding 1.

    ``(B, C, H, W)`` -> ``(B, C, floor((H - 1) / 2) + 1, ...)``. No parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)  # np.hanning(5)[1:-1]
        g = a[:, None] * a[None, :]
        self.register_buffer("window", (g / g.sum()).float()[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        w = self.window.to(x.dtype).expand(c, 1, 3, 3)
        return torch.sqrt(F.conv2d(x * x, w, stride=2, padding=1, groups=c) + 1e-12)


class _TappedFeatures(nn.Module):
    """A ``features`` ``nn.Sequential`` that returns the outputs after given layer indices."""

    features: nn.Sequential

    def forward(self, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        """``x (B, 3, H, W)`` (already normalised) -> activations after each index in ``taps``."""
        wanted = set(taps)
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                outs.append(x)
            if i >= max(taps):
                break
        return outs

    def load_torchvision(self, state: dict[str, torch.Tensor], path: Path | str) -> None:
        """Load a torchvision ImageNet state dict (the classifier is ignored)."""
        load_subset(self, state, path, type(self).__name__.replace("Features", ""), ignore=("classifier.",))


class AlexNetFeatures(_TappedFeatures):
    """torchvision ``alexnet().features``; ReLU outputs are at indices 1, 4, 7, 9, 11."""

    RELU_TAPS = (1, 4, 7, 9, 11)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )  # fmt: skip


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Features(_TappedFeatures):
    """torchvision ``vgg16().features``; relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 at 3, 8, 15, 22, 29.

    Args:
        pool: ``"max"`` (ImageNet VGG) or ``"l2"`` (DISTS: :class:`L2Pool`).
    """

    RELU_TAPS = (3, 8, 15, 22, 29)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, pool: str = "max") -> None:
        super().__init__()
        if pool not in ("max", "l2"):
            raise ValueError(f"pool must be 'max' or 'l2', got {pool!r}")
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2) if pool == "max" else L2Pool())
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)


# --------------------------------------------------------------------------- Inception-v3


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, torchvision names ``conv``/``bn``."""

    def __init__(self, c_in: int, c_out: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _pool_branch(x: torch.Tensor, mode: str) -> torch.Tensor:
    """3x3 stride-1 pooling of an Inception branch: ``avg`` (torchvision), ``avg_tf`` (padding excluded), ``max``."""
    if mode == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=(mode == "avg"))


class InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_features: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool_branch(x, self.pool))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in: int, c7: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        bp = self.branch_pool(_pool_branch(x, self.pool))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(_pool_branch(x, self.pool))
        return torch.cat([self.branch1x1(x), b3, bd, bp], 1)


class InceptionV3Pool3(nn.Module):
    """Inception-v3 up to the final global average pool: ``(B, 3, H, W)`` in [-1, 1] -> ``(B, 2048)``.

    Args:
        variant: ``"fid"`` (pytorch-fid's port of the TF FID graph,
            ``pt_inception-2015-12-05-6726825d.pth``) or ``"torchvision"``
            (``inception_v3_google-*.pth``). Both use torchvision's key names.
    """

    def __init__(self, variant: str = "fid") -> None:
        super().__init__()
        if variant not in ("fid", "torchvision"):
            raise ValueError(f"variant must be 'fid' or 'torchvision', got {variant!r}")
        self.variant = variant
        tf = variant == "fid"
        avg = "avg_tf" if tf else "avg"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32, avg)
        self.Mixed_5c = InceptionA(256, 64, avg)
        self.Mixed_5d = InceptionA(288, 64, avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, avg)
        self.Mixed_6c = InceptionC(768, 160, avg)
        self.Mixed_6d = InceptionC(768, 160, avg)
        self.Mixed_6e = InceptionC(768, 192, avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg)
        self.Mixed_7c = InceptionE(2048, "max" if tf else "avg")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def load_published(self, state: dict[str, torch.Tensor], path: Path | str) -> None:
        """Load a published Inception-v3 state dict (the classifier and aux head are ignored)."""
        load_subset(self, state, path, f"Inception-v3 ({self.variant})", ignore=("fc.", "AuxLogits."))
