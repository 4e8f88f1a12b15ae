"""Token merging (ToMe for SD): exact at ratio 0, deterministic, close to the unmerged output, hooks removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semsr.core.errors import SemsrError
from semsr.core.options import OptionError
from semsr.eval.metrics.pixel import psnr_255, ssim_255
from semsr.methods import resolve
from semsr.methods.sd_controlnet import SDControlNetOptions
from semsr.pipeline.sd_controlnet import SDControlNetSR
from semsr.pipeline.tome import (
    MAX_TOME_RATIO,
    bipartite_matching,
    set_token_merging,
    token_merging,
    tome_state,
)
from semsr.testing.tiny import tiny_controlnet, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_matching_merges_the_requested_tokens_and_unmerges_to_the_grid() -> None:
    x = torch.randn(2, 15 * 13, 8)  # odd sides: the remainder row / column are sources
    counter = torch.zeros((), dtype=torch.int64)
    m = bipartite_matching(x, (15, 13), 0.3, 0, counter)
    assert m.b_idx.numel() == 7 * 6 and m.a_idx.numel() == 15 * 13 - 42 and int(counter) == 1
    assert torch.equal(torch.cat([m.a_idx, m.b_idx]).sort().values, torch.arange(15 * 13))
    cells = torch.stack([m.b_idx // 13 // 2, m.b_idx % 13 // 2], 1)  # one destination per 2x2 cell
    assert len({tuple(c) for c in cells.tolist()}) == 42 and (m.b_idx // 13 < 14).all() and (m.b_idx % 13 < 12).all()
    again = bipartite_matching(x, (15, 13), 0.3, 0, torch.zeros((), dtype=torch.int64))
    other = bipartite_matching(x, (15, 13), 0.3, 0, counter)  # the next draw
    assert torch.equal(again.b_idx, m.b_idx) and not torch.equal(other.b_idx, m.b_idx)
    assert not torch.equal(bipartite_matching(x, (15, 13), 0.3, 1).b_idx, m.b_idx)  # another seed
    merged = m.merge(x)
    assert merged.shape == (2, 15 * 13 - int(0.3 * 15 * 13), 8)
    out = m.unmerge(merged)
    assert out.shape == x.shape
    kept = m.a_idx[m.unm_idx[0]]  # unmerged sources come back unchanged
    assert torch.equal(out[0, kept], x[0, kept])
    # identical tokens: merging averages equal vectors, so unmerge(merge(x)) == x; r is capped at the sources
    same = torch.randn(1, 1, 8).expand(2, 64, 8).contiguous()
    m = bipartite_matching(same, (8, 8), MAX_TOME_RATIO)
    assert m.merge(same).shape == (2, 16, 8)
    torch.testing.assert_close(m.unmerge(m.merge(same)), same)
    assert bipartite_matching(x, (15, 13), 0.0) is None
    with pytest.raises(SemsrError, match="grid"):
        bipartite_matching(x, (14, 13), 0.5)


def _models() -> tuple[torch.nn.Module, torch.nn.Module, tuple]:
    torch.manual_seed(0)
    unet = tiny_unet().eval().requires_grad_(False)
    net = tiny_controlnet(unet).eval().requires_grad_(False)
    args = (torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, 32))
    return unet, net, args


def test_unet_ratio_zero_is_exact_and_merging_is_deterministic_and_close() -> None:
    unet, _, (x, t, ctx) = _models()
    keys = {k: v.clone() for k, v in unet.state_dict().items()}

    def run() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample

    ref = run()
    set_token_merging(unet, 0.0)
    assert torch.equal(run(), ref) and tome_state(unet) is None
    set_token_merging(unet, 0.5, seed=3)
    a = run()
    assert tome_state(unet).merged_calls == 5  # 2 down + 3 up transformer blocks at full resolution
    set_token_merging(unet, 0.5, seed=3)  # re-applying reseeds: the same draws
    b = run()
    set_token_merging(unet, 0.5, seed=4)
    c = run()
    set_token_merging(unet, 0.5, seed=3, targets=("attn1", "attn2", "ff"))
    d = run()
    set_token_merging(unet, 0.0)
    assert torch.equal(run(), ref) and tome_state(unet) is None
    assert not any(h for m in unet.modules() for h in (m._forward_pre_hooks, m._forward_hooks))
    assert torch.equal(a, b) and not torch.equal(a, ref) and not torch.equal(a, c)
    rel = lambda o: ((o - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(a) < 0.1 and rel(c) < 0.1 and rel(a) < rel(d) < 0.3
    assert all(torch.equal(v, keys[k]) for k, v in unet.state_dict().items())


def test_controlnet_and_the_context_manager_remove_their_hooks() -> None:
    unet, net, (x, t, ctx) = _models()
    hint = torch.rand(2, 3, 128, 128)

    def run() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            down, mid = net(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        return (*down, mid)

    ref = run()
    with token_merging([unet, net], 0.5, seed=0):
        merged = run()
        assert tome_state(net).merged_calls == 2 and tome_state(unet) is not None
    assert tome_state(net) is None and tome_state(unet) is None
    assert all(torch.equal(a, b) for a, b in zip(run(), ref))
    assert not all(torch.equal(a, b) for a, b in zip(merged, ref))
    with pytest.raises(SemsrError, match="tome_ratio"):
        with token_merging([net], 0.9):
            pass
    with pytest.raises(SemsrError, match="targets"):
        set_token_merging(net, 0.5, targets=("attn3",))
    with pytest.raises(SemsrError, match="no transformer blocks"):
        set_token_merging(torch.nn.Conv2d(3, 3, 1), 0.5)


def test_compiled_models_keep_their_hooks_switched_off_between_calls() -> None:
    """On a compiled model new hooks at every call would recompile it: the same hooks are switched off on exit
    and on again (draws restarted) by the next call with the same settings; off, the model is exact."""
    _, net, (x, t, ctx) = _models()
    hint = torch.rand(2, 3, 128, 128)

    def run() -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # the hooks, without compiling
            down, mid = net(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        return (*down, mid)

    ref = run()
    net.compile()
    with token_merging([net], 0.5, seed=0):
        first = run()
    state = tome_state(net)
    assert state is not None and not state.enabled
    assert all(torch.equal(a, b) for a, b in zip(run(), ref))  # switched off: exact
    with token_merging([net], 0.5, seed=0):
        assert tome_state(net) is state and state.enabled and state.merged_calls == 0
        again = run()
    assert all(torch.equal(a, b) for a, b in zip(again, first))  # draws restarted: the same output
    with token_merging([net], 0.3, seed=0):  # other settings: new hooks
        assert tome_state(net) is not state
    set_token_merging(net, 0.0)
    assert tome_state(net) is None


def test_option_is_validated_and_shared_by_the_sd_methods() -> None:
    spec = resolve("sd-controlnet")
    assert spec.parse({"tome_ratio": "0.5"}).tome_ratio == 0.5
    assert SDControlNetOptions().tome_ratio == 0.0
    for bad in ("0.8", "-0.1", "x"):
        with pytest.raises(OptionError, match="tome_ratio"):
            spec.parse({"tome_ratio": bad})
    for name in ("xpsr", "dalpsr", "rfa", "mmsr", "coser"):
        assert resolve(name).options().tome_ratio == 0.0
    assert SDControlNetOptions().tome_targets == "attn1"
    assert spec.parse({"tome_targets": "attn1+attn2+ff"}).tome_targets == "attn1+attn2+ff"
    with pytest.raises(OptionError, match="tome_targets"):
        spec.parse({"tome_targets": "attn2"})


def _to255(img: torch.Tensor) -> torch.Tensor:
    return img[0] * 255


def test_pipeline_output_exact_at_zero_deterministic_and_close(pipe: SDControlNetSR, lr: torch.Tensor) -> None:
    opts = SDControlNetOptions(steps=3, prompt="a photo", seed=0)
    ref = pipe(lr, opts).images
    assert torch.equal(pipe(lr, opts.replace(tome_ratio=0.0)).images, ref)
    a = pipe(lr, opts.replace(tome_ratio=0.5)).images
    b = pipe(lr, opts.replace(tome_ratio=0.5)).images
    assert torch.equal(a, b) and not torch.equal(a, ref)
    assert tome_state(pipe.unet) is None and tome_state(pipe.controlnet) is None
    psnr, ssim = psnr_255(_to255(a), _to255(ref)), ssim_255(_to255(a), _to255(ref))
    assert psnr > 30 and ssim > 0.9, (psnr, ssim)
    assert torch.equal(pipe(lr, opts).images, ref)  # nothing left behind
    every = pipe(lr, opts.replace(tome_ratio=0.5, tome_targets="attn1+attn2+ff")).images
    assert not torch.equal(every, a) and psnr_255(_to255(every), _to255(ref)) > 25
    assert torch.equal(pipe(lr, opts.replace(tome_targets="attn1+attn2+ff")).images, ref)  # ratio 0: exact


def test_pipeline_tiled_call_merges_each_tile(tiny_models: Path, lr: torch.Tensor) -> None:
    pipe = SDControlNetSR.from_pretrained(tiny_models / "sd", tiny_models / "controlnet")
    opts = SDControlNetOptions(steps=1, latent_tile=8, tile_overlap=2, tome_ratio=0.5)
    out = pipe(lr, opts).images
    assert out.shape == (1, 3, 128, 160) and torch.isfinite(out).all()
    assert torch.equal(pipe(lr, opts).images, out)
