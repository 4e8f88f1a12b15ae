"""Cost of CoSeR's All-in-Attention: parameters at SD size, and seconds per denoising step for both control kinds.

    python benchmarks/coser_aia.py [--unet small|sd15|tiny] [--latent 32] [--repeats 3] [--json r.json]

1. Parameter counts (built on the ``meta`` device, no memory): SD-1.5 UNet,
   the AiA blocks, the LR and reference branches of both control kinds
   (``controlnet``: ControlNets with attention, the default; ``encoder``: the
   attention-free encoders), and CoSeR's cognitive adapter (Q-Former 12 x
   1024, Te = 50, ViT-H/14 width 1024) and SRResNet.
2. Seconds per denoising step (random weights, fp32, batch 1, ``--latent``
   side, Te = 50 context tokens, reference latent of the same size) through
   the pipeline's own guided step (:meth:`semsr.methods.coser.CoSeRSR.spatial_denoiser`,
   one window) for: the plain UNet with CFG (2 branches, = one
   reference-generation step), then per control kind AiA with CoSeR's
   two-branch CFG (equal scales) and with three branches (separate reference
   scale). The UNet is SD-1.5's structure; ``small`` divides its widths by 5
   (fits a shared CPU), ``sd15`` is the real size. Ratios are to the plain CFG
   step, all measured in one process, interleaved.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from transformers import Blip2QFormerModel

from semsr.fusion.aia import CONTROL_KINDS, AiAFusion
from semsr.methods.coser import CoSeRSR, guidance_branches
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
        fusions = {c: AiAFusion.from_unet(unet, init_from_self_attention=False, control=c) for c in CONTROL_KINDS}
        qformer = Blip2QFormerModel(
            qformer_config(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, encoder_hidden_size=1024)
        )
    counts = {"sd15_unet": count(unet), "aia_blocks": count(fusions["controlnet"].blocks)}
    for control, fusion in fusions.items():
        counts[f"{control}_branch_each"] = count(fusion.lr_branch)
        counts[f"aia_total_{control}"] = count(fusion)
    counts["qformer_adapter"] = round(count(qformer) + 50 * 1024 / 1e6, 2)
    counts["srresnet"] = count(SRResNet())
    return counts


def step_times(kind: str, latent: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = unet_config(kind)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    width = int(cfg["cross_attention_dim"])
    x = torch.randn(1, 4, latent, latent)
    pos, neg = torch.randn(1, 50, width), torch.randn(1, 50, width)
    z_lr, z_ref, z_zero = (torch.randn(1, 4, latent, latent) for _ in range(3))
    t = torch.tensor(500)
    window = (0, 0, latent, latent)

    def plain_cfg() -> None:
        unet(x.repeat(2, 1, 1, 1), t, encoder_hidden_states=torch.cat([neg, pos]))

    def aia(fusion: AiAFusion, reference_guidance: float):
        branches = guidance_branches(pos, neg, z_ref, z_zero, 3.0, reference_guidance)
        pipe = SimpleNamespace(fusion=fusion, unet=unet, dtype=torch.float32)
        step = CoSeRSR.spatial_denoiser(pipe, z_lr, [w for w, _ in branches])  # the pipeline's guided step

        def run() -> None:
            step(x, t, [b for _, b in branches], window)

        return run

    cases = {"plain_cfg_2": plain_cfg}
    for control in CONTROL_KINDS:
        fusion = AiAFusion.from_unet(unet, control=control).eval().requires_grad_(False)
        cases[f"{control}_cfg_2"] = aia(fusion, 3.0)
        cases[f"{control}_cfg_3"] = aia(fusion, 1.5)
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
        print(f"  {k:24s} {v:9.2f}")
    secs = step_times(args.unet, args.latent, args.repeats)
    base = secs["plain_cfg_2"]
    print(
        f"\nseconds per step ({args.unet} UNet, latent {args.latent}, {args.threads} thread(s), best of {args.repeats})"
    )
    print(f"  {'case':18s} {'seconds':>8s} {'ratio':>6s}")
    for k, v in secs.items():
        print(f"  {k:18s} {v:8.3f} {v / base:6.2f}")
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
