"""Depth and segmentation providers on tiny random transformers models written by ``semsr dev tiny-models``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semsr.core.errors import UnavailableError
from semsr.priors.base import get_provider
from semsr.priors.depth_seg import label_palette


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from semsr.testing.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-priors"), ["depth", "depth-dpt", "seg", "seg-mask2former"])


def _image(h: int = 45, w: int = 61) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("folder", ["depth", "depth-dpt"])
def test_depth_provider_loads_tiny_model(tiny, folder):
    prov = get_provider("depth", model=tiny / folder)
    res = prov(_image())
    assert res.kind == "spatial" and tuple(res.value.shape) == (1, 1, 45, 61)
    assert float(res.value.min()) == pytest.approx(0.0) and float(res.value.max()) == pytest.approx(1.0)
    assert res.meta["raw_max"] > res.meta["raw_min"]
    inv = get_provider("depth", model=tiny / folder, invert=True)
    assert inv.version != prov.version
    assert torch.allclose(inv(_image()).value, 1.0 - res.value, atol=1e-6)


@pytest.mark.parametrize("folder", ["seg", "seg-mask2former"])
def test_seg_provider_loads_tiny_model(tiny, folder):
    prov = get_provider("seg", model=tiny / folder)
    res = prov(_image(40, 52))
    assert res.kind == "spatial" and tuple(res.value.shape) == (1, 3, 40, 52)
    names = set(prov.model.config.id2label.values())
    assert res.meta["labels"] and set(res.meta["labels"].values()) <= names
    palette = label_palette(len(names) + 1)
    colours = {tuple(c) for c in res.value[0].permute(1, 2, 0).reshape(-1, 3).tolist()}
    allowed = {tuple(palette[int(i)].tolist()) for i in res.meta["labels"]}
    assert colours == allowed  # every pixel is the colour of one of the reported labels


def test_label_palette_is_distinct():
    pal = label_palette(256)
    assert pal.shape == (256, 3) and pal[0].sum() == 0
    assert len({tuple(c) for c in pal.tolist()}) == 256


def test_missing_or_wrong_model_folder_is_reported(tiny, tmp_path):
    with pytest.raises(UnavailableError, match="--depth-model"):
        get_provider("depth", model=tmp_path / "nothing")
    with pytest.raises(UnavailableError, match="not a depth-estimation model"):
        get_provider("depth", model=tiny / "seg")
    with pytest.raises(UnavailableError, match="not a segmentation model"):
        get_provider("seg", model=tiny / "depth")
