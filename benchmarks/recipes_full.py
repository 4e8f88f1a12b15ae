"""Full-size random-weight models of every recipe, for ``benchmarks/recipes_speed.py`` and the meta-device test.

Two ways to use the same architecture tables:

- :func:`write_recipe_models` writes, into a folder, every model a recipe's training task loads besides
  Stable Diffusion (random weights, ``save_pretrained`` layouts, processors beside them), plus what the task
  reads from disk (a few random images for CoSeR's reference pool, a reference database for RFA built with
  ``semsr index build``), and returns the config overrides that point the task at them;
  :func:`write_sd` writes a random SD-1.5 or SD-2.1-base folder.
- :func:`meta_task` builds a recipe's training task at full size on the ``meta`` device: the loaders the
  task calls are replaced (:func:`random_loaders`) by builders of the same architectures on ``meta``, so
  every frozen and trainable module is constructed by the task's own code, with shapes and parameter
  counts but no memory and no weights; :func:`parameter_counts` sums them per part.

The architectures are the published configurations (SD 1.5 / 2.1-base: :mod:`semsr.pipeline.sd_configs`;
CLIP ViT-H/14 and ViT-L/14 vision towers; Depth-Anything-small; Mask2Former Swin-L ADE20k semantic;
Real-ESRGAN x4plus RRDBNet) and semsr's own parts at the sizes of ``configs/<recipe>.yaml`` and of the
stage-1 configs they name (``depth-vq.yaml``, ``seg-vq.yaml``, ``coser-cognitive.yaml``,
``rfa-aligner.yaml``, ``rfa-enhancer.yaml``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parent.parent

#: The frozen Stable Diffusion layout of each recipe's full-size config.
SD_LAYOUT = {"sd-controlnet": "sd15", "xpsr": "sd15", "dalpsr": "sd15", "rfa": "sd15", "mmsr": "sd21", "coser": "sd21"}

#: CLIP ViT-H/14 (LAION-2B, CoSeR's) vision tower.
CLIP_VIT_H14_VISION: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
#: CLIP ViT-L/14 (OpenAI, RFA's database embedder) vision tower.
CLIP_VIT_L14_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
#: Depth-Anything-small: DINOv2-S/14 backbone (4 hooked layers) + DPT head.
DINOV2_SMALL: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "image_size": 518,
    "patch_size": 14,
    "out_indices": [9, 10, 11, 12],
    "reshape_hidden_states": False,
}
DEPTH_ANYTHING_SMALL: dict[str, Any] = {
    "reassemble_hidden_size": 384,
    "reassemble_factors": [4, 2, 1, 0.5],
    "neck_hidden_sizes": [48, 96, 192, 384],
    "fusion_hidden_size": 64,
    "head_hidden_size": 32,
    "patch_size": 14,
}
#: Mask2Former with the Swin-L (IN-22k, 384) backbone, ADE20k semantic (150 classes, 100 queries).
SWIN_LARGE_384: dict[str, Any] = {
    "image_size": 384,
    "patch_size": 4,
    "embed_dim": 192,
    "depths": [2, 2, 18, 2],
    "num_heads": [6, 12, 24, 48],
    "window_size": 12,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}
MASK2FORMER_ADE: dict[str, Any] = {
    "num_labels": 150,
    "hidden_dim": 256,
    "feature_size": 256,
    "mask_feature_size": 256,
    "num_queries": 100,
    "encoder_layers": 6,
    "decoder_layers": 10,
    "num_attention_heads": 8,
    "dim_feedforward": 2048,
    "encoder_feedforward_dim": 1024,
    "common_stride": 4,
}
#: The width of RFA's text decoder (distilgpt2), the enhancer's ``lm_dim``.
DISTILGPT2_WIDTH = 768

#: Images of the random reference pools (CoSeR) and databases (RFA).
POOL_IMAGES = 4


def config_options(name: str) -> dict[str, Any]:
    """``model.options`` of ``configs/<name>.yaml``."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    return dict((raw.get("model") or {}).get("options") or {})


# ----------------------------------------------------------------------------- builders (current device)


def clip_vision_model(config: dict[str, Any]) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel  # heavy dependency, imported on use

    return CLIPVisionModel(CLIPVisionConfig(**config))


def depth_anything_small() -> nn.Module:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config  # heavy, on use

    backbone = Dinov2Config(**DINOV2_SMALL)
    return DepthAnythingForDepthEstimation(DepthAnythingConfig(backbone_config=backbone, **DEPTH_ANYTHING_SMALL))


def mask2former_swin_large_ade() -> nn.Module:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig  # heavy, on use

    labels = {i: f"class{i}" for i in range(MASK2FORMER_ADE["num_labels"])}
    cfg = Mask2FormerConfig(
        backbone_config=SwinConfig(**SWIN_LARGE_384),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        **MASK2FORMER_ADE,
    )
    return Mask2FormerForUniversalSegmentation(cfg)


def map_vq(modality: str) -> nn.Module:
    """semsr's DepthVQ / SegVQ at the sizes of ``configs/depth-vq.yaml`` / ``configs/seg-vq.yaml``."""
    from semsr.models.vq import DepthVQ, SegVQ

    vq = dict(config_options(f"{modality}-vq")["vq"])
    if modality == "depth":
        return DepthVQ(**{"in_channels": 1, **vq})
    return SegVQ(**{"in_channels": 3, **vq})


def clip_tower(config: dict[str, Any], layer: int = -2) -> Any:
    """A :class:`~semsr.models.cognitive.CLIPVisionTower` around a random vision model (OpenAI mean/std)."""
    from semsr.models.cognitive import _OPENAI_MEAN, _OPENAI_STD, CLIPVisionTower

    return CLIPVisionTower(clip_vision_model(config), int(config["image_size"]), _OPENAI_MEAN, _OPENAI_STD, layer)


def cognitive_encoder(clip: Any, text_width: int) -> nn.Module:
    """CoSeR's stage-1 cognitive encoder at the size of ``configs/coser-cognitive.yaml``."""
    from semsr.models.cognitive import build_cognitive_encoder

    o = config_options("coser-cognitive")
    return build_cognitive_encoder(
        clip,
        text_width=text_width,
        num_queries=int(o.get("num_queries", 50)),
        pre_sr=o.get("pre_sr"),
        qformer=o.get("qformer"),
    )


def rfa_stage1(token_dim: int, dim: int, num_tokens: int, spec: str) -> dict[str, nn.Module]:
    """RFA's aligner and enhancer at the sizes of ``configs/rfa-aligner.yaml`` / ``configs/rfa-enhancer.yaml``."""
    from semsr.models.rfa import EmbeddingEnhancer, ReferenceFindingAligner

    a, e = config_options("rfa-aligner"), config_options("rfa-enhancer")
    common = {"token_dim": token_dim, "out_dim": dim, "num_tokens": num_tokens, "embedder": spec}
    aligner = ReferenceFindingAligner(
        width=int(a["width"]), depth=int(a["depth"]), heads=int(a["heads"]), residual=bool(a["residual"]), **common
    )
    enhancer = EmbeddingEnhancer(
        lm_dim=DISTILGPT2_WIDTH,
        num_refs=int(e["num_refs"]),
        width=int(e["width"]),
        depth=int(e["depth"]),
        heads=int(e["heads"]),
        prefix_len=int(e["prefix_len"]),
        **common,
    )
    return {"aligner": aligner, "enhancer": enhancer}


def realesrgan_x4plus() -> nn.Module:
    """RRDBNet in the Real-ESRGAN x4plus shape (23 RRDB blocks, 64 features, growth 32)."""
    from semsr.models.rrdbnet import RRDBConfig, RRDBNet

    return RRDBNet(RRDBConfig())


# ----------------------------------------------------------------------------- writers (real runs)


def write_sd(layout: str, folder: Path) -> Path:
    """A diffusers SD folder of ``layout`` (``sd15``/``sd21``) with random fp16 weights and the tiny CLIP tokenizer."""
    from semsr.pipeline.sd_configs import SD_LAYOUTS, random_sd
    from semsr.testing.tiny import resolve_model_path

    folder.mkdir(parents=True, exist_ok=True)
    for name, model in random_sd(layout).items():
        model.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
        del model
    shutil.copytree(resolve_model_path("tiny://sd") / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_LAYOUTS[layout][3]))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _save_clip(config: dict[str, Any], folder: Path) -> Path:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # heavy, on use

    clip_vision_model(config).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    size = int(config["image_size"])
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder
    )
    return folder


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` random ``size``-pixel PNGs (smooth noise) in ``folder``."""
    from PIL import Image  # image dependency of the writer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.random((max(2, size // 8), max(2, size // 8), 3))
        img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        img.save(folder / f"{i:02d}.png")
    return folder


def build_reference_db(images: Path, out: Path, clip_folder: Path) -> Path:
    """``semsr index build`` of ``images`` with the CLIP embedder ``clip_folder`` into ``out`` (in this process)."""
    from semsr.cli import main as cli

    rc = cli(
        ["index", "build", "--images", str(images), "--out", str(out), "--embedder", f"clip:{clip_folder.resolve()}"]
    )
    if rc:
        raise RuntimeError(f"semsr index build failed ({rc})")
    return out


def write_recipe_models(recipe: str, root: Path, crop: int) -> dict[str, Any]:
    """Write ``recipe``'s full-size random models (besides SD) under ``root``; returns config overrides
    (``model.options.*`` keys and ``data.*`` keys, dotted) that point its full-size config at them."""
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil  # heavy, on use
    from transformers.models.mask2former import image_processing_pil_mask2former as m2f  # heavy, on use

    from semsr.core.components import save_checkpoint
    from semsr.models.cognitive import RECIPE, load_clip_vision

    root.mkdir(parents=True, exist_ok=True)
    if recipe == "mmsr":
        depth, seg = root / "depth-anything-small", root / "mask2former-swin-large-ade"
        depth_anything_small().save_pretrained(depth, safe_serialization=True)
        DPTImageProcessorPil(
            size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False
        ).save_pretrained(depth)
        mask2former_swin_large_ade().save_pretrained(seg, safe_serialization=True)
        m2f.Mask2FormerImageProcessorPil(size={"shortest_edge": 640, "longest_edge": 2560}).save_pretrained(seg)
        for m in ("depth", "seg"):
            map_vq(m).save_pretrained(root / f"vq-{m}", safe_serialization=True)
        return {
            "model.options.depth_model": str(depth),
            "model.options.seg_model": str(seg),
            "model.options.depth_vq": str(root / "vq-depth"),
            "model.options.seg_vq": str(root / "vq-seg"),
        }
    if recipe == "coser":
        clip = _save_clip(CLIP_VIT_H14_VISION, root / "clip-vit-h14")
        o = config_options("coser-cognitive")
        encoder = cognitive_encoder(load_clip_vision(clip, layer=int(o.get("clip_layer", -2))), text_width=1024)
        save_checkpoint(root / "coser-cognitive", RECIPE, {"cognitive": encoder})
        pool = write_images(root / "pool", POOL_IMAGES, crop)
        return {
            "model.options.clip": str(clip),
            "model.options.cognitive": str(root / "coser-cognitive"),
            "model.options.reference_pool": "clip",
            "data.hr": [str(pool)],
            "data.val_count": 0,
        }
    if recipe == "rfa":
        clip = _save_clip(CLIP_VIT_L14_VISION, root / "clip-vit-l14")
        c = CLIP_VIT_L14_VISION
        tokens = 1 + (c["image_size"] // c["patch_size"]) ** 2
        spec = f"clip:{clip.resolve()}"
        for name, part in rfa_stage1(c["hidden_size"], c["hidden_size"], tokens, spec).items():
            part.save_pretrained(root / name, safe_serialization=True)
        db = build_reference_db(write_images(root / "db-images", 2 * POOL_IMAGES, 224, seed=1), root / "db", clip)
        return {
            "model.options.embedder": spec,
            "model.options.aligner": str(root / "aligner"),
            "model.options.enhancer": str(root / "enhancer"),
            "model.options.db": str(db),
            "model.options.exclude_self": False,  # the benchmark's batches are random tensors, not corpus images
        }
    if recipe == "default":
        return {"model.options.stage1": "bicubic"}  # built cheaply here; replaced by random_stage1()
    return {}


def random_stage1(device: torch.device, dtype: torch.dtype) -> Any:
    """The default recipe's stage 1 as ``semsr`` builds it (:class:`~semsr.methods.restorers.TorchRestorer`),
    with a random Real-ESRGAN x4plus-shaped RRDBNet."""
    from semsr.methods.restorers import TorchRestorer

    return TorchRestorer("realesrgan-x4plus", realesrgan_x4plus(), device, dtype)


def write_tiny_rfa_db(root: Path) -> dict[str, Any]:
    """A reference database of a few random images with the tiny CLIP embedder; overrides for ``rfa-tiny.yaml``."""
    from semsr.testing.tiny import resolve_model_path

    clip = resolve_model_path("tiny://clip-vision")
    db = build_reference_db(write_images(root / "db-images", 2 * POOL_IMAGES, 64, seed=1), root / "db", clip)
    return {"model.options.db": str(db), "model.options.embedder": f"clip:{clip.resolve()}"}


# ----------------------------------------------------------------------------- meta-device builds


class _StubReferences:
    """Stands in for CoSeR's reference pool and RFA's database/retrieval on ``meta`` (they read images)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.embedder_spec = "clip:random-vit-l14"
        self.folder = Path("random")

    def check_dim(self, dim: int) -> None:
        pass


def on_cpu(factory: Any) -> Any:
    """``factory`` called on the CPU whatever the default device (frozen host-side helpers with real weights)."""

    def build(*args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"):
            return factory(*args, **kwargs)

    return build


@contextlib.contextmanager
def random_loaders(recipe: str) -> Iterator[None]:
    """Within it, building ``recipe``'s training task builds full-size random modules on the current default
    device (use inside ``with torch.device("meta"):``) instead of loading folders: the loaders the task
    modules imported are replaced (and restored on exit)."""
    import semsr.train.coser as coser
    import semsr.train.default as default
    import semsr.train.mmsr as mmsr
    import semsr.train.rfa_sr as rfa_sr
    import semsr.train.tasks as tasks
    import semsr.train.xpsr as xpsr
    from semsr.core.loading import SDComponents, load_clip_tokenizer
    from semsr.pipeline.sd_configs import SD_LAYOUTS, random_sd
    from semsr.testing.tiny import resolve_model_path

    layout = SD_LAYOUT.get(recipe, "sd15")
    l14 = CLIP_VIT_L14_VISION
    l14_tokens = 1 + (l14["image_size"] // l14["patch_size"]) ** 2
    tokenizer = load_clip_tokenizer(resolve_model_path("tiny://sd") / "tokenizer")
    stage1_rfa: dict[str, nn.Module] = {}

    def load_sd(path: Any, **kwargs: Any) -> Any:
        parts = random_sd(layout)
        return SDComponents(
            vae=parts["vae"],
            unet=parts["unet"],
            text_encoder=parts["text_encoder"],
            tokenizer=tokenizer,
            scheduler_config=dict(SD_LAYOUTS[layout][3]),
            source=Path(f"random-{layout}"),
        )

    shipped_vq = on_cpu(mmsr.load_tokenizer)

    def vq_loader(path: Any = None, *args: Any, **kwargs: Any) -> Any:
        if path is None:  # the shipped edge VQ: real weights, on the host
            return shipped_vq(path, *args, **kwargs)
        return map_vq("depth" if "depth" in str(path) else "seg")

    def rfa_part(name: str) -> nn.Module:
        if not stage1_rfa:
            stage1_rfa.update(rfa_stage1(l14["hidden_size"], l14["hidden_size"], l14_tokens, "clip:random-vit-l14"))
        return stage1_rfa[name]

    embedder = SimpleNamespace(
        spec="clip:random-vit-l14", dim=l14["hidden_size"], token_dim=l14["hidden_size"], num_tokens=l14_tokens
    )
    patches = [
        (tasks, "load_sd", load_sd),
        (mmsr, "load_tokenizer", vq_loader),
        (coser, "load_clip_vision", lambda *a, **k: clip_tower(CLIP_VIT_H14_VISION)),
        (coser, "load_cognitive_encoder", lambda path, clip, **k: cognitive_encoder(clip, 1024)),
        (coser, "NeighbourReferences", _StubReferences),
        (rfa_sr, "embedder_from_spec", lambda spec: embedder),
        (rfa_sr, "load_component", lambda cls, folder, **k: rfa_part("enhancer")),
        (rfa_sr, "check_embedder", lambda *a, **k: None),
        (rfa_sr, "retrieval_aligner", lambda *a, **k: rfa_part("aligner")),
        (rfa_sr, "ReferenceDB", _StubReferences),
        (rfa_sr, "ReferenceTokens", _StubReferences),
        (default, "build_method", lambda spec, *a, **k: SimpleNamespace(model=realesrgan_x4plus())),
        (default, "TextTokens", on_cpu(default.TextTokens)),
        (xpsr, "TextPriors", on_cpu(xpsr.TextPriors)),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def meta_config(recipe: str) -> Any:
    """``recipe``'s full-size experiment config as the meta build reads it (no prompt models, no data)."""
    from semsr.train.config import config_from_dict

    name = {"sd-controlnet": "tiny"}.get(recipe, recipe)
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    opts = dict(raw.setdefault("model", {}).get("options") or {})
    if recipe in ("xpsr", "dalpsr"):
        for key in ("vlm", "prompts", "tagger", "irpad"):
            opts.pop(key, None)
        opts["no_vlm"], opts["low_source"] = True, "vlm"
    if recipe == "sd-controlnet":
        opts.pop("conditioning_channels", None)
    if recipe == "rfa":
        opts["exclude_self"] = False
    if recipe == "default":
        opts["use_irpad"] = False  # IRPAD is a separate shipped model (docs/irpad.md), not part of this build
    raw["model"]["options"] = opts
    raw["model"]["pretrained"] = f"random://{SD_LAYOUT.get(recipe, 'none')}"
    raw["data"]["hr"], raw["data"]["manifest"] = [], None
    return config_from_dict(raw, ["validation.every=0"])


def meta_task(recipe: str) -> Any:
    """``recipe``'s training task built at full size on the ``meta`` device (see the module docstring)."""
    from semsr.train.tasks import build_task

    cfg = meta_config(recipe)
    with random_loaders(recipe), torch.device("meta"):
        return build_task(cfg)


def task_parts(task: Any) -> dict[str, nn.Module]:
    """The named modules of a built task: its frozen models and ``trainable``."""
    parts: dict[str, nn.Module] = {}
    for name in ("unet", "vae", "text", "cognitive"):
        module = getattr(task, name, None)
        if isinstance(module, nn.Module):
            parts[name] = module
    stage1 = getattr(task, "stage1", None)
    if isinstance(stage1, dict):
        parts.update({f"stage1.{k}": v for k, v in stage1.items()})
    elif stage1 is not None and isinstance(getattr(stage1, "model", None), nn.Module):
        parts["stage1"] = stage1.model
    for name, tok in (getattr(task, "tokenizers", None) or {}).items():
        if isinstance(tok, nn.Module):
            parts[f"vq_{name}"] = tok
    parts["trainable"] = task.trainable
    return parts


def parameter_counts(task: Any) -> dict[str, float]:
    """Millions of parameters per part of :func:`task_parts` (``trainable``: those with ``requires_grad``);
    parameters shared between parts (the UNet layers a trainable module wraps) are counted in each."""
    out: dict[str, float] = {}
    for name, module in task_parts(task).items():
        params = list(module.parameters())
        if name == "trainable":
            out["trainable_grad"] = round(sum(p.numel() for p in params if p.requires_grad) / 1e6, 3)
        out[name] = round(sum(p.numel() for p in params) / 1e6, 3)
    return out
