"""The JPEG quantisation-lattice feature of IRPAD (semsr.priors.jpeg_lattice)."""

from __future__ import annotations

import pytest
import torch

from semsr.data.degradations import jpeg_compress
from semsr.data.degradations.jpeg import quality_scale
from semsr.priors.irpad import dihedral
from semsr.priors.jpeg_lattice import JPEGLattice


def _texture(seed: int = 0, size: int = 80) -> torch.Tensor:
    """A smooth random colour texture ``(1, 3, size, size)`` (low-pass noise, like photo content)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.03 * torch.randn(1, 3, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("quality", [60.0, 40.0, 25.0, 10.0])
@pytest.mark.parametrize("offset", [(0, 0), (3, 5)])
def test_peak_at_the_true_quality_scale_on_any_grid_phase(quality: float, offset: tuple[int, int]) -> None:
    lattice = JPEGLattice()
    y = jpeg_compress(_texture(), quality)
    top, left = offset
    score = lattice(y[..., top : top + 64, left : left + 64])[0]
    assert score.shape == (lattice.out_features,)
    best = float(lattice.scales[score[:-1].argmax()])
    true = float(quality_scale(torch.tensor(quality)))
    assert abs(best / true - 1) < 0.03, (best, true)
    assert float(score[:-1].max()) > 0.85


def test_no_peak_without_jpeg_or_after_resampling() -> None:
    lattice = JPEGLattice()
    plain = _texture(1)[..., :64, :64]
    resized = torch.nn.functional.interpolate(
        jpeg_compress(_texture(1, 96), 25.0), size=(64, 64), mode="bilinear", antialias=True, align_corners=False
    )
    for x in (plain, resized):
        s = lattice((x * 255).round() / 255)[0, :-1]
        near_true = s[(lattice.scales - float(quality_scale(torch.tensor(25.0)))).abs().argmin()]
        assert float(near_true) < 0.5
    jpeg_zero_frac = float(lattice(jpeg_compress(_texture(1), 25.0)[..., :64, :64])[0, -1])
    assert float(lattice(plain)[0, -1]) < jpeg_zero_frac


def test_invariant_to_flips_and_transpositions() -> None:
    lattice = JPEGLattice()
    y = jpeg_compress(_texture(2), 35.0)[..., 2:66, 1:65]
    ref = lattice(y)
    for k in range(1, 8):
        out = lattice(dihedral(y, k))
        assert int(out[0, :-1].argmax()) == int(ref[0, :-1].argmax())


def test_too_small_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="15x15"):
        JPEGLattice()(torch.rand(1, 3, 12, 40))
