"""Tiny randomly initialised models in the on-disk formats real checkpoints use.

Stable Diffusion, ControlNets, CLIP and the other networks the recipes load
cannot be downloaded here, so every loading path is exercised on few-million
parameter versions of the *same classes*, saved exactly as the real ones are
(diffusers folders, transformers folders, single-file LDM checkpoints).

``write_tiny_models(out)`` calls every registered writer; each writer creates
one entry ``out/<name>`` (a folder or a file). Recipe modules add their own
components with :func:`register_tiny`::

    from semsr.testing.tiny import register_tiny

    def _write_clip_vision(root: Path) -> None:
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, ...))
        model.save_pretrained(root / "clip-vision")

    register_tiny("clip-vision", _write_clip_vision)

Writers run in registration order (a writer may read entries written before
it, e.g. ``sd.safetensors`` is exported from ``sd``) and each starts from a
fixed torch seed derived from its name, so the output is reproducible.
Modules that register writers are imported lazily from ``TINY_MODULES``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.io import atomic_move
from semsr.core.loading import load_sd
from semsr.core.paths import cache_dir
from semsr.core.single_file import save_single_file
from semsr.pipeline.text import MiniLMTextEncoder

TinyWriter = Callable[[Path], None]

_WRITERS: dict[str, TinyWriter] = {}

# Modules whose import registers more tiny writers (recipe modules append here).
TINY_MODULES: list[str] = [
    "semsr.testing.tiny_priors",
    "semsr.testing.tiny_coser",
    "semsr.testing.tiny_vlm",
    "semsr.testing.tiny_mmsr",
    "semsr.testing.tiny_xpsr",
    "semsr.testing.tiny_rfa",
]

# A small, fixed corpus the tiny BPE tokenizer learns its merges from.
_CORPUS = (
    "a photo of a cat sitting on the grass a high resolution photo of a dog "
    "clean sharp detailed image of a city street at night with lights and cars "
    "blurry noisy low resolution jpeg artifacts over smoothed unclear dotted "
    "a portrait of a woman with long hair a landscape with mountains trees river "
    "sky clouds building window face eyes texture fabric animal flower bird "
    "high quality best quality 8k clear realistic colour color lighting noise"
)


def register_tiny(name: str, fn: TinyWriter) -> TinyWriter:
    """Register ``fn(root)`` that writes the tiny component ``root/<name>``."""
    _WRITERS[name] = fn
    return fn


def tiny_names() -> list[str]:
    """Names of all registered tiny components, in writing order."""
    _import_tiny_modules()
    return list(_WRITERS)


def _import_tiny_modules() -> None:
    for mod in TINY_MODULES:
        importlib.import_module(mod)


def missing_package(err: BaseException) -> str | None:
    """The one-line reason when ``err`` says an optional package is not installed, else None."""
    if isinstance(err, ImportError):
        return f"missing package ({err})"
    text = str(err)
    if isinstance(err, UnavailableError) and ("pip install" in text or "not installed" in text):
        return text.splitlines()[0] if text else type(err).__name__
    return None


def write_tiny_models(
    out: str | Path,
    names: Iterable[str] | None = None,
    *,
    seed: int = 0,
    skipped: dict[str, str] | None = None,
) -> Path:
    """Write the tiny components ``names`` (default: all) into ``out``; returns ``out``.

    With a ``skipped`` dict, a component whose writer needs an optional package that is not
    installed (e.g. the MiniLM encoder's) is left out and recorded as ``{name: reason}``, and so is
    a component written from one left out; without it, that error is raised.
    """
    _import_tiny_modules()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(_WRITERS) if names is None else list(names)
    unknown = [n for n in wanted if n not in _WRITERS]
    if unknown:
        raise SemsrError(f"unknown tiny component(s) {', '.join(unknown)}; known: {', '.join(_WRITERS)}")
    for name in _WRITERS:  # keep registration order (dependencies)
        if name in wanted:
            torch.manual_seed(seed + zlib.crc32(name.encode()))
            try:
                _WRITERS[name](out)
            except Exception as err:
                reason = missing_package(err)
                if skipped is None or reason is None:
                    if skipped and isinstance(err, (OSError, SemsrError)):  # it reads a component left out
                        skipped[name] = f"needs a component left out ({', '.join(skipped)}): {err}"
                        continue
                    raise
                skipped[name] = reason
                shutil.rmtree(out / name, ignore_errors=True)
    return out


def tiny_cache_dir() -> Path:
    """Cache folder of tiny components written on demand (``<cache>/tiny-models/<hash of the writers>``).

    The folder name carries a hash of the source of every tiny-model module, so a changed
    writer produces a fresh folder.
    """
    _import_tiny_modules()
    digest = hashlib.sha1()
    for mod in ["semsr.testing.tiny", *TINY_MODULES]:
        digest.update(inspect.getsource(importlib.import_module(mod)).encode())
    return cache_dir() / "tiny-models" / digest.hexdigest()[:12]


def ensure_tiny(name: str) -> Path:
    """The tiny component ``name`` in :func:`tiny_cache_dir`, written on first use.

    Every component registered before ``name`` that is missing is written first (writers may
    read earlier entries); each one is written into a private temporary folder and moved into
    place (:func:`~semsr.core.io.atomic_move`; the first process to finish wins), so concurrent
    processes (``accelerate launch``) never see a partial component.
    """
    names = tiny_names()
    if name not in names:
        raise SemsrError(f"no tiny model {name!r} (have: {', '.join(names)})", f"tiny://{name}")
    root = tiny_cache_dir()
    if (root / name).exists():
        return root / name
    root.mkdir(parents=True, exist_ok=True)
    for dep in names[: names.index(name) + 1]:
        if (root / dep).exists():
            continue
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            for have in names:
                if (root / have).exists():
                    (tmp / have).symlink_to(root / have)
            with torch.random.fork_rng():  # the writers seed torch; keep the caller's RNG untouched
                write_tiny_models(tmp, [dep])
            atomic_move(tmp / dep, root / dep, replace=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / name


def resolve_model_path(path: str | Path) -> Path:
    """A configured model path as a local path; ``tiny://NAME[/SUB]`` -> the tiny component.

    ``tiny://`` alone is the tiny Stable Diffusion folder (``tiny://sd``). Other paths are
    returned as given (``~`` expanded).
    """
    text = str(path)
    if not text.startswith("tiny://"):
        return Path(text).expanduser()
    name, _, sub = text[len("tiny://") :].strip("/").partition("/")
    folder = ensure_tiny(name or "sd")
    return folder / sub if sub else folder


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-unicode table (256 entries)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_bpe_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Learn ``n_merges`` CLIP-style BPE merges (words end with ``</w>``) from ``text``."""
    words = Counter(text.lower().split())
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w, seq in seqs.items():
            merged: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[w] = tuple(merged)
    return merges


def write_clip_tokenizer_files(folder: Path, merges: list[tuple[str, str]]) -> dict[str, int]:
    """Write ``vocab.json`` + ``merges.txt`` built from ``merges`` the way CLIP builds its vocabulary.

    Vocabulary order: 256 byte symbols, the same with ``</w>``, one entry per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Returns the vocab.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab


def tiny_clip_tokenizer(folder: Path, n_merges: int = 200):
    """Build and save a small CLIP tokenizer in ``folder``; returns the loaded tokenizer."""
    from transformers import CLIPTokenizer  # heavy dependency, imported on use

    write_clip_tokenizer_files(folder, learn_bpe_merges(_CORPUS, n_merges))
    tok = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(folder)
    return tok


# --------------------------------------------------------------------------- SD components


def tiny_unet():
    """A ~1.4 M parameter ``UNet2DConditionModel`` with SD-1.5's block structure."""
    from diffusers import UNet2DConditionModel  # heavy dependency, imported on use

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def tiny_vae():
    """A ~0.3 M parameter ``AutoencoderKL`` with SD's 4 levels (factor 8) and 4 latent channels."""
    from diffusers import AutoencoderKL  # heavy dependency, imported on use

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32, 32),
        norm_num_groups=8,
        sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )


def tiny_text_encoder(vocab_size: int, eos_id: int, bos_id: int):
    """A 2-layer ``CLIPTextModel`` with width 32 (the tiny UNet's cross-attention width)."""
    from transformers import CLIPTextConfig, CLIPTextModel  # heavy dependency, imported on use

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(cfg)


def sd_scheduler_config():
    """The DDPM scheduler SD 1.5 ships (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon)."""
    from diffusers import DDPMScheduler  # heavy dependency, imported on use

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def tiny_controlnet(unet):
    """``ControlNetModel.from_unet`` with a small hint encoder (factor 8) and *non-zero* zero-convs.

    The zero convolutions are re-initialised with small random weights so the
    hint actually changes the tiny model's output (real trained ControlNets
    are non-zero too); a freshly initialised ControlNet would ignore the hint.
    """
    from diffusers import ControlNetModel  # heavy dependency, imported on use

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    zero_convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.zeros_(conv.bias)
    return net


def _write_sd(root: Path) -> None:
    from diffusers import StableDiffusionPipeline  # heavy dependency, imported on use

    folder = root / "sd"
    tokenizer = tiny_clip_tokenizer(folder / "tokenizer")
    text_encoder = tiny_text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(),
        scheduler=sd_scheduler_config(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _prefix_keys(folder / "text_encoder" / "model.safetensors", "text_model.")


def _prefix_keys(file: Path, prefix: str) -> None:
    """Rewrite a safetensors file with ``prefix`` on every key that lacks it.

    transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix;
    released SD checkpoints (and older transformers) have it, and both load.
    The tiny models use the released layout.
    """
    tensors = load_file(str(file))
    save_file(
        {k if k.startswith(prefix) else prefix + k: v for k, v in tensors.items()}, str(file), metadata={"format": "pt"}
    )


def _write_controlnet(root: Path) -> None:
    from diffusers import UNet2DConditionModel  # heavy dependency, imported on use

    unet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet", local_files_only=True)
    tiny_controlnet(unet).save_pretrained(root / "controlnet", safe_serialization=True)


def _write_sd_single_file(root: Path) -> None:
    comps = load_sd(root / "sd")
    save_single_file(root / "sd.safetensors", unet=comps.unet, vae=comps.vae, text_encoder=comps.text_encoder)


def _write_sd_minilm(root: Path) -> None:
    """SD folder whose conditioning is the offline MiniLM encoder + a projection (no CLIP)."""
    src, folder = root / "sd", root / "sd-minilm"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    index["tokenizer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    MiniLMTextEncoder.build(unet_cfg["cross_attention_dim"]).save_projection(folder / "text_projection")


register_tiny("sd", _write_sd)
register_tiny("controlnet", _write_controlnet)
register_tiny("sd.safetensors", _write_sd_single_file)
register_tiny("sd-minilm", _write_sd_minilm)
