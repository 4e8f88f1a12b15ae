"""The ControlNet hint-embedding cache gives bit-identical outputs and embeds each tile's hint once."""

from __future__ import annotations

import torch

from semsr.pipeline.step_cache import hint_cache_stats, set_hint_cache


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.controlnet_cond_embedding = torch.nn.Conv2d(3, 4, 3, padding=1)


def test_hint_cache_is_exact_and_per_tile() -> None:
    torch.manual_seed(0)
    net = _Net()
    keys = set(net.state_dict())
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref_a, ref_b = net.controlnet_cond_embedding(a), net.controlnet_cond_embedding(b)
        set_hint_cache(net, True)
        outs = [net.controlnet_cond_embedding(h.clone()) for h in (a, b, a, b, a)]
    assert all(torch.equal(o, r) for o, r in zip(outs, (ref_a, ref_b, ref_a, ref_b, ref_a)))
    assert hint_cache_stats(net) == {"hits": 3, "misses": 2}
    assert set(net.state_dict()) == keys
    set_hint_cache(net, False)
    with torch.no_grad():
        assert torch.equal(net.controlnet_cond_embedding(a), ref_a)
    assert hint_cache_stats(net) == {"hits": 3, "misses": 2}
    out = net.controlnet_cond_embedding(a)  # grad enabled: never cached
    assert out.requires_grad
