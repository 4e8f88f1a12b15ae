"""Training for the RFA recipe (seed 003): the Reference-Finding Aligner.

Pairs are (LR, HR) where LR is the HR image resized by MATLAB-compatible
bicubic to ``lr_size`` x ``lr_size`` (32 in the seed; the whole image, aspect
not kept — the embedders also resize to a square) and the target is the HR
image's entry in the reference database. Training images come from the
offline corpus (``/work/corpus``-style folders or ``data_root()/train/...``),
never from benchmark sets.

LR features are cached per image content hash under
``cache_dir()/retrieval/lr/<embedder>/<lr_size>/<sha256>.npz`` so repeated
benchmarks and trainings only pay for the embedder once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semsr.models.rfa import AlignerConfig, ReferenceFindingAligner, align_loss, encode

LR_SIZE = 32


@dataclass
class PairFeatures:
    """Features of (LR, HR) pairs.

    Attributes:
        lr_vec: ``(N, D)`` raw LR embeddings (unit vectors).
        lr_tokens: ``(N, L, T)`` LR tokens.
        hr_vid: ``(N,)`` row of each pair's HR image in the database.
        sha: content hash per pair.
    """

    lr_vec: torch.Tensor
    lr_tokens: torch.Tensor
    hr_vid: torch.Tensor
    sha: list[str]

    def subset(self, idx: Sequence[int]) -> PairFeatures:
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return PairFeatures(self.lr_vec[i], self.lr_tokens[i], self.hr_vid[i], [self.sha[j] for j in i.tolist()])


def make_lr(hr: torch.Tensor, lr_size: int = LR_SIZE) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, lr_size, lr_size)`` (MATLAB bicubic, clamped)."""
    from semsr.ops.imresize import imresize

    return imresize(hr.float(), size=(lr_size, lr_size)).clamp(0, 1)


def _cache_file(embedder_spec: str, lr_size: int, sha: str) -> Path:
    from semsr.paths import cache_dir

    safe = embedder_spec.replace(":", "-").replace("/", "_")[-120:]
    return cache_dir() / "retrieval" / "lr" / safe / str(lr_size) / f"{sha}.npz"


def lr_pair_features(db, files: Sequence[Path], embedder, *, lr_size: int = LR_SIZE,  # noqa: ANN001
                     progress: Callable[[int, int], None] | None = None) -> PairFeatures:
    """Embed the LR versions of ``files`` whose HR content is in ``db`` (others are skipped)."""
    from semsr.eval.atomic import write_bytes
    from semsr.priors.retrieval.index import file_sha256, load_rgb

    vecs, toks, vids, shas = [], [], [], []
    for i, path in enumerate(files):
        sha = file_sha256(path)
        entry = db.entry_by_hash(sha)
        if entry is None:
            continue
        cache = _cache_file(embedder.spec, lr_size, sha)
        if cache.is_file():
            with np.load(cache) as z:
                vec, tok = torch.from_numpy(z["vec"]), torch.from_numpy(z["tokens"])
        else:
            with torch.inference_mode():
                vec, tok = encode(embedder, make_lr(load_rgb(path), lr_size))
            vec, tok = vec[0].float(), tok[0].float()
            import io

            buf = io.BytesIO()
            np.savez(buf, vec=vec.numpy(), tokens=tok.numpy())
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(cache, buf.getvalue())
        vecs.append(vec)
        toks.append(tok)
        vids.append(entry.vid)
        shas.append(sha)
        if progress is not None:
            progress(i + 1, len(files))
    if not vecs:
        return PairFeatures(torch.zeros(0, 0), torch.zeros(0, 0, 0), torch.zeros(0, dtype=torch.long), [])
    return PairFeatures(torch.stack(vecs), torch.stack(toks), torch.as_tensor(vids), shas)


def split_by_hash(shas: Sequence[str], holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index split keyed by content hash."""
    order = sorted(range(len(shas)), key=lambda i: shas[i])
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    n_hold = max(1, int(round(len(order) * holdout))) if holdout > 0 else 0
    return sorted(order[n_hold:]), sorted(order[:n_hold])


def train_aligner(feats: PairFeatures, hr_vectors: torch.Tensor, *, steps: int = 300, lr: float = 1e-3,
                  batch: int = 64, weight_decay: float = 1e-2, seed: int = 0, width: int = 256, depth: int = 2,
                  heads: int = 4, residual: bool = True, embedder: str | None = None,
                  log: Callable[[int, float], None] | None = None) -> tuple[ReferenceFindingAligner, list[float]]:
    """Train an aligner on ``feats`` with targets ``hr_vectors[feats.hr_vid]``; returns (model, losses).

    AdamW with cosine decay; ``losses`` are the per-step L2 alignment losses.
    """
    torch.manual_seed(seed)
    n, num_tokens, token_dim = feats.lr_tokens.shape
    cfg = AlignerConfig(token_dim=token_dim, out_dim=int(hr_vectors.shape[1]), num_tokens=num_tokens, width=width,
                        depth=depth, heads=heads, residual=residual, embedder=embedder)
    model = ReferenceFindingAligner(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    target = hr_vectors[feats.hr_vid].float()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        loss = align_loss(model(feats.lr_tokens[idx], feats.lr_vec[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    return model.eval(), losses


def hit_rates(db, queries: torch.Tensor, target_vids: torch.Tensor, ks: Sequence[int] = (1, 4)) -> dict[str, float]:  # noqa: ANN001
    """Fraction of queries ``(N, D)`` whose target row is among the top-k database hits, for each k."""
    hits = db.search(queries.numpy(), k=max(ks))
    out = {}
    for k in ks:
        found = [int(t) in [h.entry.vid for h in row[:k]] for row, t in zip(hits, target_vids.tolist())]
        out[f"top{k}"] = float(np.mean(found)) if found else float("nan")
    return out
