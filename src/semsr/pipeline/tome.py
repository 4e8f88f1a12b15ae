"""Token merging for the Stable Diffusion UNet and ControlNet (ToMe for SD, Bolya & Hoffman 2023).

In the transformer blocks of the highest-resolution levels (``max_downsample`` 1: the levels that run at
the latent's own size, 4096 tokens at 512² output), the tokens entering self-attention are merged by
bipartite soft matching and unmerged after it:

1. The ``h x w`` token grid is cut into 2x2 cells; one token per cell is a *destination*, the other three
   are *sources* (rows / columns past an even size are sources too). The destination is drawn at random
   for every block call by a counter-based generator (a hash of ``seed``, the draw number and the cell;
   the count restarts when merging is switched on), so a run is deterministic and ``torch.compile`` can
   trace the draw without graph breaks.
2. Each source is matched to its most similar destination (cosine similarity of the block's input tokens);
   the ``r = int(ratio * N)`` sources with the highest similarity (at most the number of sources) are
   averaged into their destination, the others are kept: ``N`` tokens become ``N - r``.
3. Self-attention (and, when asked, cross-attention and the feed-forward) runs on the ``N - r`` tokens;
   its output is *unmerged*: every merged source gets its destination's output.

The matching is computed once per transformer block from the block's input ``(B, N, C)`` and shared by its
merged sub-modules. Everything is done with module hooks on the model instance (no diffusers code is
changed, parameters and state-dict keys are untouched); :func:`set_token_merging` with ``ratio=0`` removes
the hooks, so the model is exactly the unmerged one again. The pipelines switch it on for the sampling of a
call (:func:`token_merging`) from the ``tome_ratio`` option.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from semsr.core.errors import SemsrError

#: Largest useful ratio: 3 of every 4 tokens are sources, so at most 3/4 of the tokens can be merged.
MAX_TOME_RATIO = 0.75
#: Sub-modules of a transformer block that can be merged (``attn1`` = self-attention, the ToMe default).
TOME_TARGETS = ("attn1", "attn2", "ff")
#: The ``tome_targets`` option's choices: sub-modules joined by "+", from ToMe's default to everything.
TOME_TARGET_SETS = ("attn1", "attn1+ff", "attn1+attn2+ff")


@dataclass
class _Matching:
    """Merge / unmerge indices of one transformer block call.

    ``a_idx (Na,)`` / ``b_idx (Nb,)``: token indices of sources / destinations (``N = Na + Nb``);
    ``unm_idx (B, Na - r)``: kept sources, ``src_idx (B, r)``: merged sources (positions in ``a_idx``),
    ``dst_idx (B, r)``: the destination (position in ``b_idx``) each merged source goes to.
    """

    n: int
    a_idx: torch.Tensor
    b_idx: torch.Tensor
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` -> ``(B, N - r, C)``: kept sources, then destinations averaged with their sources."""
        c = x.shape[-1]
        xa, xb = x[:, self.a_idx], x[:, self.b_idx]
        unm = xa.gather(1, self.unm_idx.unsqueeze(-1).expand(-1, -1, c))
        src = xa.gather(1, self.src_idx.unsqueeze(-1).expand(-1, -1, c))
        dst = xb.scatter_reduce(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, N - r, C)`` -> ``(B, N, C)``: every merged source takes its destination's value."""
        bsz, _, c = y.shape
        n_unm = self.unm_idx.shape[1]
        unm, dst = y[:, :n_unm], y[:, n_unm:]
        src = dst.gather(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, c))
        ya = y.new_empty(bsz, self.a_idx.numel(), c)
        ya.scatter_(1, self.unm_idx.unsqueeze(-1).expand(-1, -1, c), unm)
        ya.scatter_(1, self.src_idx.unsqueeze(-1).expand(-1, -1, c), src)
        out = y.new_empty(bsz, self.n, c)
        out[:, self.a_idx] = ya
        out[:, self.b_idx] = dst
        return out


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensor of values < 2**32 -> the same), for counter-based random draws."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def _destinations(h: int, w: int, seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_idx, b_idx)``: source and destination token indices of an ``h x w`` grid (row-major), one random
    destination per 2x2 cell, the remainder row / column (odd sides) all sources.

    The draw is counter-based: the choice of each cell is a hash of ``seed``, the draw ``counter`` (a 0-d
    int64 tensor, one value per draw) and the cell's index, so it is deterministic, differs between draws,
    and is made of tensor operations with fixed shapes (``torch.compile`` traces it without graph breaks).
    """
    hc, wc = h // 2, w // 2
    dev = counter.device
    cell = torch.arange(hc * wc, device=dev)
    salt = (int(seed) * 0x85EBCA77) & _MASK32
    key = (_hash32((counter * 0x9E3779B1 + salt) & _MASK32) + cell) & _MASK32
    choice = _hash32(key) % 4  # (hc * wc,) position of the destination in its cell
    ci, cj = cell // wc, cell % wc

    def token(k: torch.Tensor) -> torch.Tensor:
        return (2 * ci + k // 2) * w + 2 * cj + k % 2

    b_idx = token(choice)
    parts = [token((choice + m) % 4) for m in (1, 2, 3)]
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    if w % 2:  # last column of the paired rows
        parts.append(rows[: 2 * hc] * w + (w - 1))
    if h % 2:  # last row, whole
        parts.append((h - 1) * w + cols)
    return torch.cat(parts), b_idx


def bipartite_matching(
    x: torch.Tensor, hw: tuple[int, int], ratio: float, seed: int = 0, counter: torch.Tensor | None = None
) -> _Matching | None:
    """The matching of tokens ``x (B, N, C)`` on an ``hw`` grid (``N = h * w``) merging ``int(ratio * N)``
    tokens (capped at the number of sources); None when nothing would be merged. The destinations are drawn
    with ``seed`` and the draw number ``counter`` (0-d int64 tensor, incremented in place; None: draw 0)."""
    h, w = hw
    n = x.shape[1]
    if h * w != n:
        raise SemsrError(f"token merging: {n} tokens do not form the {h}x{w} grid")
    if counter is None:
        counter = torch.zeros((), dtype=torch.int64, device=x.device)
    a_idx, b_idx = _destinations(h, w, seed, counter)
    counter.add_(1)
    r = min(int(ratio * n), a_idx.numel())
    if r <= 0 or b_idx.numel() == 0:
        return None
    metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = metric[:, a_idx] @ metric[:, b_idx].transpose(1, 2)  # (B, Na, Nb) cosine similarities
    best, best_dst = scores.max(dim=-1)
    order = best.float().argsort(dim=-1, descending=True, stable=True)
    src_idx, unm_idx = order[:, :r], order[:, r:]
    return _Matching(n, a_idx, b_idx, unm_idx, src_idx, best_dst.gather(1, src_idx))


@dataclass
class ToMeState:
    """Token merging settings of one model (stored on it as ``_semsr_tome``) and its hooks.

    ``latent_hw``: the model input's spatial size of the current call; ``hw`` / ``active``: the grid of the
    transformer running now and whether it is merged; ``matching``: the current block's matching;
    ``counter``: 0-d int64 tensor, the number of destination draws so far (one per merged block call);
    ``enabled``: False leaves the hooks in place but merges nothing (the exact model).
    """

    ratio: float
    seed: int
    max_downsample: int
    targets: tuple[str, ...]
    counter: torch.Tensor
    handles: list[Any] = field(default_factory=list)
    latent_hw: tuple[int, int] | None = None
    hw: tuple[int, int] | None = None
    active: bool = False
    matching: _Matching | None = None
    enabled: bool = True

    def same_settings(self, ratio: float, seed: int, targets: Sequence[str], max_downsample: int) -> bool:
        """Whether these are the settings the hooks were made with."""
        return (self.ratio, self.seed, self.targets, self.max_downsample) == (
            float(ratio),
            int(seed),
            tuple(targets),
            int(max_downsample),
        )

    @property
    def merged_calls(self) -> int:
        """Transformer block calls whose tokens were matched so far."""
        return int(self.counter)


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get(name)
    return x if isinstance(x, torch.Tensor) else None


def _root_pre_hook(state: ToMeState) -> Callable:
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        x = _first_tensor(args, kwargs, "sample")
        enabled = state.enabled and x is not None and x.ndim == 4
        state.latent_hw = tuple(x.shape[-2:]) if enabled else None  # None: no transformer is merged

    return hook


def _transformer_pre_hook(state: ToMeState) -> Callable:
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        x = _first_tensor(args, kwargs, "hidden_states")
        state.active = False
        if x is None or x.ndim != 4 or state.latent_hw is None:
            return
        h, w = x.shape[-2:]
        state.hw = (h, w)
        down = max(1, round(state.latent_hw[0] / h)) if h else 0
        state.active = 0 < down <= state.max_downsample

    return hook


def _block_pre_hook(state: ToMeState) -> Callable:
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        state.matching = None
        x = _first_tensor(args, kwargs, "hidden_states")
        if state.active and x is not None and x.ndim == 3 and state.hw is not None:
            if state.counter.device != x.device:
                state.counter = state.counter.to(x.device)
            state.matching = bipartite_matching(x, state.hw, state.ratio, state.seed, state.counter)

    return hook


def _merge_pre_hook(state: ToMeState) -> Callable:
    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = state.matching
        if m is None:
            return None
        if args:
            return (m.merge(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": m.merge(kwargs["hidden_states"])}

    return hook


def _unmerge_hook(state: ToMeState) -> Callable:
    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        m = state.matching
        if m is None:
            return None
        if isinstance(output, tuple):
            return (m.unmerge(output[0]), *output[1:])
        return m.unmerge(output)

    return hook


def _transformers(model: Any) -> Iterator[Any]:
    """The model's ``Transformer2DModel``-like sub-modules (having ``transformer_blocks``)."""
    for module in model.modules():
        if module is not model and isinstance(getattr(module, "transformer_blocks", None), torch.nn.ModuleList):
            yield module


def check_tome(ratio: float, targets: Sequence[str] = ("attn1",), max_downsample: int = 1) -> tuple[str, ...]:
    """Validate the settings; the targets as a tuple."""
    if not 0.0 <= float(ratio) <= MAX_TOME_RATIO:
        raise SemsrError(f"tome_ratio must be in [0, {MAX_TOME_RATIO}], got {ratio}")
    bad = [t for t in targets if t not in TOME_TARGETS]
    if bad or not targets:
        raise SemsrError(f"token merging targets must be among {', '.join(TOME_TARGETS)}, got {list(targets)}")
    if int(max_downsample) < 1:
        raise SemsrError(f"token merging max_downsample must be >= 1, got {max_downsample}")
    return tuple(targets)


def remove_token_merging(model: Any) -> Any:
    """Remove the hooks of :func:`set_token_merging` (no-op when none); returns ``model``."""
    state = model.__dict__.pop("_semsr_tome", None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
    return model


def set_token_merging(
    model: Any,
    ratio: float,
    *,
    seed: int = 0,
    targets: Sequence[str] = ("attn1",),
    max_downsample: int = 1,
) -> Any:
    """Merge ``ratio`` of the tokens in ``model``'s transformer blocks at downsampling ``<= max_downsample``
    (1: the latent's own resolution) before ``targets`` (``attn1`` self-attention, ``attn2`` cross-attention
    queries, ``ff`` feed-forward) and unmerge after them. ``ratio=0`` removes merging (exact model).

    ``model``: a diffusers ``UNet2DConditionModel`` / ``ControlNetModel`` (any module whose transformers have
    ``transformer_blocks`` with those sub-modules). Re-applying replaces the previous settings and restarts
    the destination draws. Returns ``model``.
    """
    targets = check_tome(ratio, targets, max_downsample)
    remove_token_merging(model)
    if ratio == 0:
        return model
    state = ToMeState(float(ratio), int(seed), int(max_downsample), targets, torch.zeros((), dtype=torch.int64))
    reg = state.handles.append
    reg(model.register_forward_pre_hook(_root_pre_hook(state), with_kwargs=True))
    found = 0
    for transformer in _transformers(model):
        reg(transformer.register_forward_pre_hook(_transformer_pre_hook(state), with_kwargs=True))
        for block in transformer.transformer_blocks:
            subs = [getattr(block, t, None) for t in targets]
            subs = [s for s in subs if isinstance(s, torch.nn.Module)]
            if not subs:
                continue
            found += 1
            reg(block.register_forward_pre_hook(_block_pre_hook(state), with_kwargs=True))
            for sub in subs:
                reg(sub.register_forward_pre_hook(_merge_pre_hook(state), with_kwargs=True))
                reg(sub.register_forward_hook(_unmerge_hook(state), with_kwargs=True))
    if not found:
        for handle in state.handles:
            handle.remove()
        raise SemsrError(f"token merging: {type(model).__name__} has no transformer blocks with {list(targets)}")
    model.__dict__["_semsr_tome"] = state
    return model


def tome_state(model: Any) -> ToMeState | None:
    """The model's :class:`ToMeState` (None when merging is off)."""
    return model.__dict__.get("_semsr_tome")


def _compiled(model: Any) -> bool:
    """Whether ``model.compile()`` wrapped the model's call (its hooks are then part of the compiled graphs)."""
    return getattr(model, "_compiled_call_impl", None) is not None


@contextmanager
def token_merging(
    models: Sequence[Any],
    ratio: float,
    *,
    seed: int = 0,
    targets: Sequence[str] = ("attn1",),
    max_downsample: int = 1,
) -> Iterator[None]:
    """Token merging on ``models`` inside the block (:func:`set_token_merging`), removed on exit.

    ``ratio=0`` does nothing (the models run exactly as without it). On a compiled model the hooks are
    switched off on exit instead of removed (``enabled``), and the next block with the same settings switches
    them on again with the destination draws restarted: new hooks would make ``torch.compile`` compile the
    model again at every call.
    """
    targets = check_tome(ratio, targets, max_downsample)
    if ratio == 0:
        yield
        return
    try:
        for model in models:
            state = tome_state(model)
            if state is not None and _compiled(model) and state.same_settings(ratio, seed, targets, max_downsample):
                state.counter.zero_()
                state.enabled = True
            else:
                set_token_merging(model, ratio, seed=seed, targets=targets, max_downsample=max_downsample)
        yield
    finally:
        for model in models:
            state = tome_state(model)
            if state is not None and _compiled(model):
                state.enabled = False
            else:
                remove_token_merging(model)
