"""Cost of CoSeR's All-in-Attention: parameters at SD size, and seconds per denoising step.

    python benchmarks/coser_aia.py [--unet small|sd15|tiny] [--latent 32] [--repeats 3] [--json r.json]

1. Parameter counts (built on the ``meta`` device, no memory): SD-1.5 UNet,
   the AiA blocks, the LR and reference encoders, and CoSeR's cognitive
   adapter (Q-Former 12 x 1024, Te = 50, ViT-H/14 width 1024) and SRResNet.
2. Seconds per denoising step (random weights, fp32, batch 1, ``--latent``
   side, 77 + 50 context tokens, reference latent of the same size) for:
   the plain UNet with CFG (2 branches, = one reference-generation step), AiA
   with one branch (both guidance scales 1), AiA with CoSeR's two-branch CFG
   (equal scales) and AiA with three branches (separate reference scale).
   The UNet is SD-1.5's structure; ``small`` divides its widths by 5 (fits a
   shared CPU), ``sd15`` is the real size (~5.6 GB fp32 with AiA).
   Ratios are to the plain CFG step, all measured in one process, interleaved.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import Blip2QFormerModel

from semsr.fusion.aia import AiAFusion
from semsr.models.cognitive import SRResNet, qformer_config
from semsr.pipeline.sd_configs import SD15_UNET
from semsr.testing.tiny import tiny_unet


def unet_config(kind: str) -> dict:
    if kind == "sd15":
        return dict(SD15_UNET)
    if kind == "small":
        return {**SD15_UNET, "block_out_channels": [64, 128, 256, 256], "cross_attention_dim": 768}
    if kind == "tiny":
        return dict(tiny_unet().config)
    raise SystemExit(f"unknown --unet {kind}")


def param_counts() -> dict[str, float]:
    """Millions of parameters of the SD-1.5-size pieces (meta device)."""

    def count(m: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in m.parameters()) / 1e6, 2)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        fusion = AiAFusion.from_unet(unet, init_from_self_attention=False)
        qformer = Blip2QFormerModel(
            qformer_config(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, encoder_hidden_size=1024)
        )
    return {
        "sd15_unet": count(unet),
        "aia_blocks": count(fusion.blocks),
        "lr_encoder": count(fusion.lr_encoder),
        "ref_encoder": count(fusion.ref_encoder),
        "aia_total": count(fusion),
        "qformer_adapter": round(count(qformer) + 50 * 1024 / 1e6, 2),
        "srresnet": count(SRResNet()),
    }


def step_times(kind: str, latent: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = unet_config(kind)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    fusion = AiAFusion.from_unet(unet).eval().requires_grad_(False)
    width = int(cfg["cross_attention_dim"])
    x = torch.randn(1, 4, latent, latent)
    ctx = torch.randn(1, 77 + 50, width)
    z_lr, z_ref, z_zero = (torch.randn(1, 4, latent, latent) for _ in range(3))
    t = torch.tensor(500)

    def plain_cfg() -> None:
        unet(x.repeat(2, 1, 1, 1), t, encoder_hidden_states=ctx.repeat(2, 1, 1))

    def aia(branches: int):
        def run() -> None:
            lr_feats = fusion.lr_features(z_lr, t)
            refs = [fusion.ref_features(r, t) for r in (z_ref, z_zero)[: 1 if branches == 1 else 2]]
            per_branch = {1: [0], 2: [1, 0], 3: [1, 0, 0]}[branches]
            ref_all = [torch.cat([refs[i][lvl] for i in per_branch]) for lvl in range(len(lr_feats))]
            fusion.unet_forward(
                unet,
                x.repeat(branches, 1, 1, 1),
                t,
                ctx.repeat(branches, 1, 1),
                [f.repeat(branches, 1, 1, 1) for f in lr_feats],
                ref_all,
            )

        return run

    cases = {"plain_cfg_2": plain_cfg, "aia_1": aia(1), "aia_cfg_2": aia(2), "aia_cfg_3": aia(3)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", default="small", choices=["small", "sd15", "tiny"])
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px output)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = param_counts()
    print("parameters (millions, SD-1.5 size)")
    for k, v in params.items():
        print(f"  {k:16s} {v:9.2f}")
    secs = step_times(args.unet, args.latent, args.repeats)
    base = secs["plain_cfg_2"]
    print(
        f"\nseconds per step ({args.unet} UNet, latent {args.latent}, {args.threads} thread(s), best of {args.repeats})"
    )
    print(f"  {'case':14s} {'seconds':>8s} {'ratio':>6s}")
    for k, v in secs.items():
        print(f"  {k:14s} {v:8.3f} {v / base:6.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "params_millions": params,
                    "unet": args.unet,
                    "latent": args.latent,
                    "threads": args.threads,
                    "seconds_per_step": secs,
                    "ratio_to_plain_cfg": {k: v / base for k, v in secs.items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
