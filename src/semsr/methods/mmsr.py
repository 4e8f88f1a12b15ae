"""MMSR (seed 001, "The Power of Context") on Stable Diffusion, and the ``mmsr`` method.

Flow (``(B, 3, h, w)`` LR in [0, 1] -> ``(B, 3, s*h, s*w)`` in [0, 1])::

    LR --bicubic--> hint (B, 3, H, W) --VAE.encode--> z_LR (B, 4, H/8, W/8)
    hint --canny/hed, depth, seg providers--> maps --VQ--> 16x16 tokens --codebook--> (B, 256, 256) each
    caption (--prompt, else a VLM caption with --vlm) --text encoder--> (B, 77, D)
    Multimodal Latent Connector (semsr.fusion.mmlc): 77 + 256 k tokens -> context (B, 128, D)
    for t:  eps = UNet([z_t ; z_LR], t, context)      conv_in widened 4 -> 8 channels (InstructPix2Pix)
    VAE.decode --colour fix vs hint--> HR

The widened ``conv_in`` keeps the pretrained weights for the noisy latent and
starts the LR-latent weights at zero, so before training the UNet is the
pretrained one. Missing modalities (not in ``modalities``) get the
connector's learnable null tokens.

**Guidance** (``w`` = ``guidance_scale``, the paper's ``w``; default 2).
Every mode evaluates ``eps = (1 + w) * eps(pos) - w * eps(neg)``, i.e. the
usual CFG ``eps(neg) + s * (eps(pos) - eps(neg))`` with ``s = 1 + w``
(:func:`semsr.pipeline.sampler.guided`). The positive branch is always the
connector on (caption, modalities ``m``); the modes differ in the negative::

    mcfg           neg = connector(text(negative prompt), m)      modalities in both branches (paper's m-CFG)
    null-modality  neg = connector(text(negative prompt), null)   the paper's m_null-CFG
    cfg            neg = connector(text(""), null)                 plain CFG: empty text, no modalities

``w = 0`` runs only the positive branch.

**Checkpoint** folder (``--checkpoint``)::

    mmsr.json        {"modalities": [...spatial...], "edge": "canny", "tokenizer": null | PATH}
    connector/       config.json + model.safetensors   (MultimodalLatentConnector)
    conv_in/         config.json + model.safetensors   (the widened UNet conv_in)
    unet_attention/  optional: config.json {"modules": [...]} + model.safetensors (trained UNet cross-attentions)

``tokenizer`` null means the shipped edge VQ (used for every spatial modality);
a relative path is resolved against the checkpoint folder. Depth / seg models:
``--depth-model`` / ``--seg-model``, else a ``depth/`` or ``seg/``
transformers folder inside the checkpoint folder or beside it (so
``--checkpoint /tmp/tiny/mmsr`` finds ``/tmp/tiny/depth`` and ``/tmp/tiny/seg``
that ``semsr dev tiny-models`` writes). Without ``--modalities`` every
modality of the checkpoint whose source is available is used.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.mmlc import ALL_MODALITIES, CAPTION, TEMPERATURE_RANGE, MultimodalLatentConnector, parse_temperatures
from semsr.methods import MethodSpec, register
from semsr.pipeline.colorfix import COLOUR_FIXES
from semsr.pipeline.latent_sr import LatentSRPipeline, make_hint
from semsr.pipeline.latent_tiling import Window, crop_window
from semsr.core.loading import atomic_write_bytes, load_sd
from semsr.pipeline.precision import check_dtype, prepare_module
from semsr.pipeline.sd_controlnet import require_build_paths, sd_cli_options, sd_run_options
from semsr.pipeline.text import load_text_conditioner
from semsr.priors.report import PriorReporter, first

GUIDANCE_MODES = ("mcfg", "cfg", "null-modality")
DEFAULT_NEGATIVE = "blurry, dotted, noise, unclear, low-res, over-smoothed"
DEFAULT_STEPS = 50
#: The paper's w (sampler scale 1 + w).
DEFAULT_GUIDANCE = 2.0
CHECKPOINT_FILE = "mmsr.json"


# ----------------------------------------------------------------------------- conv_in


class ConcatConvIn(nn.Conv2d):
    """The widened UNet ``conv_in``; runs in its own dtype (fp32 master weights under a bf16 UNet)
    and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def widen_conv_in(conv: nn.Conv2d, extra: int) -> ConcatConvIn:
    """A copy of ``conv`` with ``extra`` more input channels whose weights are zero (InstructPix2Pix)."""
    new = ConcatConvIn(conv.in_channels + extra, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def save_conv_in(conv: nn.Conv2d, folder: str | Path, latent_channels: int) -> Path:
    """Write ``folder/config.json`` + ``folder/model.safetensors`` for a widened conv_in."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in conv.state_dict().items()}, str(tmp))
    tmp.replace(folder / "model.safetensors")
    cfg = {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size[0],
           "padding": conv.padding[0], "latent_channels": int(latent_channels)}
    atomic_write_bytes(folder / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    return folder


def load_conv_in(folder: str | Path) -> tuple[nn.Conv2d, int]:
    """``(conv, latent_channels)`` from a folder written by :func:`save_conv_in`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise UnavailableError("not a conv_in folder (needs config.json + model.safetensors)", folder)
    cfg = json.loads((folder / "config.json").read_text())
    conv = ConcatConvIn(int(cfg["in_channels"]), int(cfg["out_channels"]), int(cfg["kernel_size"]),
                     padding=int(cfg["padding"]))
    conv.load_state_dict(load_file(str(folder / "model.safetensors")))
    return conv, int(cfg["latent_channels"])


# ----------------------------------------------------------------------------- trainable pair


def _get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def cross_attention_paths(unet: nn.Module) -> list[str]:
    """Module paths of the UNet's cross-attention layers (``...attn2``), the ones that read the context."""
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]


class MMSRConditioning(nn.Module):
    """The trained MMSR parts: connector + widened UNet ``conv_in`` (+ optionally the UNet's cross-attentions).

    :meth:`forward` is the whole model call (so a DDP-wrapped instance can be
    called in training): it installs ``conv_in`` (and the trained
    cross-attention layers) in the frozen ``unet`` (held outside the module's
    parameters), builds the context and runs the UNet.

    Attributes:
        unet_modules: trained copies of UNet sub-modules keyed by their path with
            ``.`` -> ``__`` (empty unless cross-attention training is on).
    """

    def __init__(self, connector: MultimodalLatentConnector, conv_in: nn.Conv2d, latent_channels: int,
                 unet_modules: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.connector = connector
        self.conv_in = conv_in
        self.latent_channels = int(latent_channels)
        self.unet_modules = nn.ModuleDict({k.replace(".", "__"): m for k, m in (unet_modules or {}).items()})
        # (module paths, their checkpoint weights) of unet_modules, loaded at the first attach
        self._pending: tuple[list[str], dict[str, torch.Tensor]] | None = None

    def attach(self, unet: nn.Module) -> nn.Module:
        """Put this ``conv_in`` (and ``unet_modules``) into ``unet`` (checks the widths); returns ``unet``."""
        old = unet.conv_in
        if old is not self.conv_in:
            if old.out_channels != self.conv_in.out_channels:
                raise SemsrError(f"conv_in has {self.conv_in.out_channels} output channels, the UNet "
                                 f"{old.out_channels}: checkpoint and --base do not match")
            unet.conv_in = self.conv_in
        self.materialise(unet)
        for key, module in self.unet_modules.items():
            path = key.replace("__", ".")
            if _get_module(unet, path) is not module:
                _set_module(unet, path, module)
        return unet

    def materialise(self, unet: nn.Module) -> None:
        """Build ``unet_modules`` as copies of ``unet``'s modules with the pending checkpoint weights
        (no-op when nothing is pending); ``unet`` itself is not changed."""
        import copy

        if self._pending is None:
            return
        (paths, state), self._pending = self._pending, None
        ref = next(iter(self.connector.parameters()))
        for path in paths:
            try:
                module = copy.deepcopy(_get_module(unet, path))
            except AttributeError:
                raise SemsrError(f"the checkpoint trains UNet module {path!r}, which --base does not have") from None
            sub = {k[len(path) + 1:]: v for k, v in state.items() if k.startswith(path + ".")}
            try:
                module.load_state_dict(sub)
            except RuntimeError as err:
                raise SemsrError(f"checkpoint weights of {path} do not fit --base's UNet: {err}") from None
            self.unet_modules[path.replace(".", "__")] = module.to(ref.device, ref.dtype)

    def context(self, text: torch.Tensor | None, spatial: Mapping[str, torch.Tensor | None],
                temperatures: Mapping[str, float] | None = None,
                drop: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Connector output ``(B, 128, D)``."""
        return self.connector(text, spatial, temperatures, drop)

    def forward(self, unet: nn.Module, noisy: torch.Tensor, z_lr: torch.Tensor, t: torch.Tensor,
                text: torch.Tensor | None, spatial: Mapping[str, torch.Tensor | None],
                drop: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``eps (B, C, h, w)`` for ``noisy`` / ``z_lr`` ``(B, C, h, w)`` latents (training call)."""
        self.attach(unet)
        ctx = self.context(text, spatial, None, drop)
        dtype = unet.dtype
        return unet(torch.cat([noisy, z_lr], dim=1).to(dtype), t, encoder_hidden_states=ctx.to(dtype),
                    return_dict=False)[0]

    @classmethod
    def new(cls, unet: nn.Module, connector: MultimodalLatentConnector,
            cross_attention: bool = False) -> MMSRConditioning:
        """Fresh conditioning for ``unet``: conv_in widened by the latent channel count; with
        ``cross_attention`` also trainable copies of the UNet's cross-attention layers."""
        import copy

        c = int(unet.conv_in.in_channels)
        mods = {p: copy.deepcopy(_get_module(unet, p)).float() for p in cross_attention_paths(unet)} \
            if cross_attention else None
        return cls(connector, widen_conv_in(unet.conv_in, c).float(), c, mods)


def save_checkpoint(folder: str | Path, cond: MMSRConditioning, *, modalities: Sequence[str], edge: str = "canny",
                    tokenizer: str | None = None) -> Path:
    """Write an MMSR checkpoint folder (see the module docstring)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    cond.connector.save(folder / "connector")
    save_conv_in(cond.conv_in, folder / "conv_in", cond.latent_channels)
    if len(cond.unet_modules):
        sub = folder / "unet_attention"
        sub.mkdir(parents=True, exist_ok=True)
        state = {f"{k.replace('__', '.')}.{n}": v.detach().contiguous().cpu()
                 for k, m in cond.unet_modules.items() for n, v in m.state_dict().items()}
        tmp = sub / ".model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(sub / "model.safetensors")
        paths = [k.replace("__", ".") for k in cond.unet_modules]
        atomic_write_bytes(sub / "config.json", (json.dumps({"modules": paths}, indent=2) + "\n").encode())
    meta = {"modalities": [m for m in modalities if m != CAPTION], "edge": edge, "tokenizer": tokenizer}
    atomic_write_bytes(folder / CHECKPOINT_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return folder


def load_checkpoint(folder: str | Path) -> tuple[MMSRConditioning, dict[str, Any]]:
    """``(conditioning, meta)`` from an MMSR checkpoint folder (trained UNet cross-attention weights,
    if any, are installed at the first :meth:`MMSRConditioning.attach`)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not (folder / CHECKPOINT_FILE).is_file():
        raise UnavailableError(f"not an MMSR checkpoint folder ({CHECKPOINT_FILE}, connector/, conv_in/)",
                               folder / CHECKPOINT_FILE)
    meta = json.loads((folder / CHECKPOINT_FILE).read_text())
    connector = MultimodalLatentConnector.load(folder / "connector")
    conv, latent = load_conv_in(folder / "conv_in")
    cond = MMSRConditioning(connector, conv, latent).eval()
    attn = folder / "unet_attention"
    if (attn / "model.safetensors").is_file():
        paths = json.loads((attn / "config.json").read_text())["modules"]
        cond._pending = (list(paths), load_file(str(attn / "model.safetensors")))
    return cond, meta


# ----------------------------------------------------------------------------- pipeline


def parse_modalities(value: str | Sequence[str] | None) -> list[str] | None:
    """``"caption,edge,depth"`` (or a list) -> ``["caption", "edge", "depth"]``; None stays None."""
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    known = (CAPTION, "edge", "depth", "seg")
    bad = [m for m in items if m not in known]
    if bad:
        raise SemsrError(f"unknown modality {bad[0]!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))


def guidance_negative(mode: str) -> tuple[bool, bool]:
    """``(negative_uses_negative_prompt, negative_keeps_modalities)`` of a guidance mode."""
    if mode == "mcfg":
        return True, True
    if mode == "null-modality":
        return True, False
    if mode == "cfg":
        return False, False
    raise SemsrError(f"unknown guidance mode {mode!r}; use one of {', '.join(GUIDANCE_MODES)}")


class MMSRSR(LatentSRPipeline):
    """The MMSR pipeline (see the module docstring).

    Attributes:
        vae, unet, text: frozen SD components (the UNet carries the widened conv_in).
        cond: :class:`MMSRConditioning` (connector + conv_in).
        meta: the checkpoint's ``mmsr.json``.
        sources: per spatial modality, provider options (``{"depth": {"model": PATH}}``).
        last_modalities: modalities used by the last call; ``last_timings``: seconds per stage.
    """

    def __init__(self, *, vae: Any, unet: Any, text: Any, cond: MMSRConditioning, meta: Mapping[str, Any],
                 scheduler_config: dict[str, Any], sources: Mapping[str, Mapping[str, Any]] | None = None,
                 tokenizer: Any = None, vlm: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "fp32", channels_last: bool = False, compile: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = check_dtype(dtype, self.device)
        prep = dict(device=self.device, dtype=self.dtype, channels_last=channels_last)
        self.vae = prepare_module(vae, **prep)
        self.cond = prepare_module(cond, device=self.device, dtype=self.dtype)
        self.unet = prepare_module(self.cond.attach(unet), **prep, compile=compile)
        self.text = text.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.meta = dict(meta)
        self.sources = {k: dict(v) for k, v in (sources or {}).items()}
        self.tokenizer = tokenizer
        self.vlm = vlm
        self.scheduler_config = dict(scheduler_config)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        ccfg = self.cond.connector.config
        if int(self.text.width) != ccfg.text_width:
            raise SemsrError(f"text encoder width {self.text.width} != connector text width {ccfg.text_width}")
        if ccfg.width != int(self.unet.config.cross_attention_dim):
            raise SemsrError(f"connector width {ccfg.width} != UNet cross-attention width "
                             f"{self.unet.config.cross_attention_dim}")
        self._encoders: dict[tuple[str, ...], Any] = {}
        self._captioner: Any = None
        self.last_modalities: list[str] = []
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, base: str | Path, checkpoint: str | Path, *, base_config: str | Path | None = None,
                        depth_model: str | Path | None = None, seg_model: str | Path | None = None,
                        vq: str | Path | None = None, vlm: str | Path | None = None, edge: str | None = None,
                        **kwargs: Any) -> MMSRSR:
        """Load from local paths (see the module docstring for the checkpoint layout and model discovery)."""
        from semsr.models.vq import load_tokenizer
        from semsr.priors.mmsr import find_model_folder

        device = torch.device(kwargs.get("device", "cpu"))
        dtype = check_dtype(kwargs.get("dtype", "fp32"), device)
        checkpoint = Path(checkpoint).expanduser()
        cond, meta = load_checkpoint(checkpoint)
        comps = load_sd(base, dtype=dtype, config=base_config)
        text = load_text_conditioner(comps, dtype=dtype, device=device)
        near = [checkpoint, checkpoint.parent]
        sources: dict[str, dict[str, Any]] = {"edge": {}}
        for name, given in (("depth", depth_model), ("seg", seg_model)):
            folder = find_model_folder(name, given, near)
            if folder is not None:
                sources[name] = {"model": str(folder)}
        tok_path = vq if vq is not None else meta.get("tokenizer")
        if tok_path is not None and vq is None and not Path(tok_path).is_absolute():
            tok_path = checkpoint / tok_path
        tokenizer = load_tokenizer(tok_path)
        if int(tokenizer.embed_dim) != cond.connector.config.vq_dim:
            raise SemsrError(f"VQ tokenizer vectors have {tokenizer.embed_dim} dims, the connector expects "
                             f"{cond.connector.config.vq_dim}", tok_path or "shipped edge VQ")
        if edge is not None:
            meta = {**meta, "edge": edge}
        return cls(vae=comps.vae, unet=comps.unet, text=text, cond=cond, meta=meta,
                   scheduler_config=comps.scheduler_config, sources=sources, tokenizer=tokenizer, vlm=vlm,
                   **{**kwargs, "device": device, "dtype": dtype})

    # ------------------------------------------------------------------ conditions

    def default_modalities(self) -> list[str]:
        """Caption + every checkpoint modality whose source is available."""
        return [CAPTION] + [m for m in self.cond.connector.config.spatial if m in self.sources]

    def _modality_encoder(self, spatial: list[str]) -> Any:
        from semsr.priors.mmsr import ModalityTokens

        key = tuple(spatial)
        if key not in self._encoders:
            missing = [m for m in spatial if m not in self.sources]
            if missing:
                flag = " / ".join(f"--{m}-model" for m in missing)
                raise UnavailableError(f"modality {', '.join(missing)} needs a model folder: pass {flag} PATH "
                                       f"(or put a {missing[0]}/ folder beside the checkpoint)")
            self._encoders[key] = ModalityTokens(spatial, self.tokenizer, self.sources,
                                                 edge=self.meta.get("edge", "canny"), device=self.device)
        return self._encoders[key]

    def spatial_tokens(self, hint: torch.Tensor, spatial: list[str]) -> dict[str, torch.Tensor]:
        """Per spatial modality codebook vectors ``(B, 256, vq_dim)`` of the bicubic ``hint (B, 3, H, W)``."""
        if not spatial:
            return {}
        return self._modality_encoder(spatial)(hint)

    def captions(self, lr: torch.Tensor, prompts: list[str]) -> list[str]:
        """The caption of each image: its prompt, or (empty prompt and ``vlm`` set) a VLM caption."""
        if self.vlm is None or all(prompts):
            return prompts
        from semsr.priors.base import cached, get_provider

        if self._captioner is None:
            self._captioner = cached(get_provider("caption", vlm=self.vlm))
        provider = self._captioner
        return [p or str(provider(img[None].float().cpu()).value) for p, img in zip(prompts, lr, strict=True)]

    def contexts(self, lr: torch.Tensor, hint: torch.Tensor, prompts: list[str], negatives: list[str], *,
                 modalities: list[str], temperatures: Mapping[str, float] | None, mode: str,
                 need_negative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(positive, negative)`` connector contexts ``(B, 128, D)`` (negative None when not needed)."""
        spatial_names = [m for m in self.cond.connector.config.spatial if m in modalities]
        not_in_ckpt = [m for m in modalities if m != CAPTION and m not in self.cond.connector.config.spatial]
        if not_in_ckpt:
            raise SemsrError(f"the checkpoint has no {', '.join(not_in_ckpt)} modality (it has "
                             f"{', '.join(self.cond.connector.config.modalities)})")
        spatial = {m: v.to(self.device, self.dtype) for m, v in self.spatial_tokens(hint, spatial_names).items()}
        text = self.encode_prompts(self.captions(lr, prompts)) if CAPTION in modalities else None
        with torch.no_grad():
            pos = self.cond.context(text, spatial, temperatures)
            if text is None and pos.shape[0] != lr.shape[0]:
                pos = pos.expand(lr.shape[0], -1, -1)
            neg = None
            if need_negative:
                use_prompt, keep_modalities = guidance_negative(mode)
                neg_text = self.encode_prompts(negatives if use_prompt else [""] * len(negatives))
                neg = self.cond.context(neg_text, spatial if keep_modalities else {}, temperatures)
        return pos.to(self.dtype), neg if neg is None else neg.to(self.dtype)

    def spatial_denoiser(self, z_lr: torch.Tensor):
        """The per-step UNet call over a latent window: ``[x ; z_LR]`` channels, ``cond["context"]``."""
        z_lr = z_lr.to(self.device, self.dtype)

        def spatial(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], window: Window) -> torch.Tensor:
            z = crop_window(z_lr, window, 1, batch=x.shape[0])
            with torch.no_grad():
                out = self.unet(torch.cat([x.to(self.dtype), z], dim=1), t, encoder_hidden_states=cond["context"],
                                return_dict=False)[0]
            return out.float()

        return spatial

    # ------------------------------------------------------------------ run

    def __call__(self, lr: torch.Tensor, *, scale: int = 4, prompt: str | list[str] = "",
                 negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE, modalities: Sequence[str] | None = None,
                 temperatures: Mapping[str, float] | str | None = None, guidance_mode: str = "mcfg",
                 steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0,
                 scheduler: str = "ddpm", colour_fix_method: str = "adain", latent_tile: int | None = None,
                 tile_overlap: int | None = None, start_from_lr: bool = True, strength: float = 1.0,
                 progress: Any = False) -> torch.Tensor:
        """Super-resolve ``lr`` ``(B, 3, h, w)`` in [0, 1] -> ``(B, 3, scale*h, scale*w)`` in [0, 1].

        Args:
            modalities: subset of ``caption, edge, depth, seg`` (None: :meth:`default_modalities`).
            temperatures: per-modality delta in [0.4, 10] (dict or ``"depth=0.5,edge=2"``).
            guidance_mode: ``mcfg`` | ``cfg`` | ``null-modality``; ``guidance_scale`` is ``w``.
            Others as :class:`~semsr.pipeline.sd_controlnet.SDControlNetSR`.
        """
        layout = self.layout(lr, scale, latent_tile)
        guidance_negative(guidance_mode)
        if guidance_scale < 0:
            raise SemsrError(f"the MMSR guidance scale w must be >= 0, got {guidance_scale:g}")
        temps = parse_temperatures(temperatures)
        mods = parse_modalities(modalities) if modalities is not None else self.default_modalities()
        bsz = layout.batch
        prompts = [prompt] * bsz if isinstance(prompt, str) else list(prompt)
        neg = "" if negative_prompt is None else negative_prompt
        negatives = [neg] * bsz if isinstance(neg, str) else list(neg)
        if len(prompts) != bsz or len(negatives) != bsz:
            raise SemsrError(f"{len(prompts)} prompts / {len(negatives)} negative prompts for {bsz} images")
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        pos, negctx = self.contexts(lr, layout.hint, prompts, negatives, modalities=mods, temperatures=temps,
                                    mode=guidance_mode, need_negative=guidance_scale != 0)
        timings["priors"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        z_lr = self.vae_encode(layout.hint_padded, layout.vae_tile)
        timings["encode"] = time.perf_counter() - t0
        image = self.denoise_decode(
            self.spatial_denoiser(z_lr), layout, channels=self.cond.latent_channels, cond={"context": pos},
            uncond=None if negctx is None else {"context": negctx}, guidance_scale=1.0 + guidance_scale, steps=steps,
            seed=seed, scheduler=scheduler, init_latents=z_lr if start_from_lr else None, strength=strength,
            tile_overlap=tile_overlap, colour_fix_method=colour_fix_method, progress=progress, timings=timings)
        self.last_modalities = mods
        self.last_timings = timings
        return image


# ----------------------------------------------------------------------------- method

_RUN_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": DEFAULT_NEGATIVE, "steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
    "modalities": None, "modality_temperature": None, "guidance_mode": "mcfg", "seed": 0, "scheduler": "ddpm",
    "colour_fix": "adain", "tile": 0, "latent_tile": None, "tile_overlap": None, "start_from_lr": True,
    "strength": 1.0, "progress": False, **{f"{m}_temperature": None for m in ALL_MODALITIES},
}


def temperature_options() -> list[dict[str, Any]]:
    """One ``--<modality>-temperature`` option per modality (sliders in the web demo)."""
    lo, hi = TEMPERATURE_RANGE
    return [{"flags": [f"--{m}-temperature"], "target": "run", "type": float, "metavar": "D",
             "ui": {"widget": "slider", "min": lo, "max": hi, "step": 0.1, "default": 1.0},
             "help": f"mmsr: attention temperature of the {m} modality in [{lo:g}, {hi:g}] (smaller = stronger "
                     "influence; default 1; overrides --modality-temperature)"} for m in ALL_MODALITIES]


class MMSRMethod(PriorReporter):
    """``mmsr`` as a registry :class:`~semsr.methods.Method` (tiles in latent space).

    Run options (``None`` = default): prompt (the caption; "" + ``--vlm`` asks
    the VLM), negative_prompt, modalities (``"caption,edge,depth,seg"`` or a
    list), modality_temperature (``"depth=0.5,edge=2"`` or a dict), guidance_mode
    (mcfg|cfg|null-modality), steps (50), guidance_scale (w, 2), seed, scheduler,
    colour_fix, tile, latent_tile, tile_overlap, start_from_lr, strength, progress,
    ``<modality>_temperature`` (one float per modality, over modality_temperature).
    ``last_priors``: the first image's caption (and its source), modalities,
    temperatures and modality maps.
    """

    name = "mmsr"
    tiles_itself = True

    def __init__(self, pipeline: MMSRSR, scale: int = 4) -> None:
        self.pipeline = pipeline
        self.scale = int(scale)
        self.device = pipeline.device

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        opts = sd_run_options(_RUN_DEFAULTS, run_opts, scale=self.scale, factor=self.pipeline.factor)
        temps = parse_temperatures(opts["modality_temperature"])
        temps.update({m: opts[f"{m}_temperature"] for m in ALL_MODALITIES if opts[f"{m}_temperature"] is not None})
        mods = parse_modalities(opts["modalities"])
        mods = self.pipeline.default_modalities() if mods is None else mods
        prompts = [opts["prompt"]] * x.shape[0] if isinstance(opts["prompt"], str) else list(opts["prompt"])
        captions = self.pipeline.captions(x, prompts) if CAPTION in mods else prompts
        out = self.pipeline(
            x, scale=self.scale, prompt=captions, negative_prompt=opts["negative_prompt"],
            modalities=mods, temperatures=temps,
            guidance_mode=opts["guidance_mode"], steps=opts["steps"], guidance_scale=opts["guidance_scale"],
            seed=opts["seed"], scheduler=opts["scheduler"], colour_fix_method=opts["colour_fix"],
            latent_tile=opts["latent_tile"], tile_overlap=opts["tile_overlap"], start_from_lr=opts["start_from_lr"],
            strength=opts["strength"], progress=opts["progress"])
        spatial = [m for m in self.pipeline.cond.connector.config.spatial if m in mods]
        hint = make_hint(x[:1], tuple(out.shape[-2:]))  # the maps are cached: this reads them back
        maps = self.pipeline._modality_encoder(spatial).maps(hint) if spatial else {}
        source = "user" if prompts[0] else ("vlm" if self.pipeline.vlm is not None else "none")
        self.report_priors(
            prompt=captions[0] if CAPTION in mods else None, caption_source=source if CAPTION in mods else None,
            negative_prompt=first(opts["negative_prompt"]), modalities=tuple(mods), modality_temperature=temps,
            guidance_mode=opts["guidance_mode"], **maps)
        return out

    def prior_suggestion(self, x: torch.Tensor) -> dict[str, Any]:
        """The VLM caption (with ``--vlm``; else no prompt), default negative prompt and modalities."""
        caption = self.pipeline.captions(x, [""])[0] if self.pipeline.vlm is not None else None
        return {"prompt": caption, "caption": caption, "negative_prompt": _RUN_DEFAULTS["negative_prompt"],
                "modalities": tuple(self.pipeline.default_modalities())}


def build(base: str | None = None, checkpoint: str | None = None, *, vlm: str | None = None,
          depth_model: str | None = None, seg_model: str | None = None, vq: str | None = None,
          edge_detector: str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None,
          scale: int = 4, base_config: str | None = None, channels_last: bool = False, compile: bool = False,
          threads: int | None = None) -> MMSRMethod:
    """Factory of ``mmsr``: ``base`` SD, ``checkpoint`` MMSR folder; optional depth/seg/VQ/VLM folders."""
    require_build_paths("mmsr", (base, "--base", "a Stable Diffusion folder or single file"),
                        (checkpoint, "--checkpoint", "an MMSR checkpoint folder (mmsr.json, connector/, conv_in/)"),
                        threads=threads)
    pipe = MMSRSR.from_pretrained(base, checkpoint, base_config=base_config, depth_model=depth_model,
                                  seg_model=seg_model, vq=vq, vlm=vlm, edge=edge_detector, device=device,
                                  dtype=dtype or "fp32", channels_last=channels_last, compile=compile)
    return MMSRMethod(pipe, scale=scale)


register(MethodSpec(
    name="mmsr",
    factory=build,
    scale=4,
    summary="MMSR: caption + edge/depth/seg VQ tokens through a Multimodal Latent Connector, LR concatenated, "
            "m-CFG (--base SD, --checkpoint MMSR folder)",
    extra={"cli_options": sd_cli_options() + [
        {"flags": ["--modalities"], "target": "run", "metavar": "LIST",
         "help": "mmsr: modalities to use, from caption,edge,depth,seg (default: caption + every checkpoint "
                 "modality whose model is found); the others get the learned null token"},
        {"flags": ["--modality-temperature"], "target": "run", "metavar": "M=D,...", "ui": {"hidden": True},
         "help": "mmsr: attention temperature per modality in [0.4, 10], e.g. depth=0.5,edge=2 (smaller = "
                 "stronger influence; default 1)"},
        *temperature_options(),
        {"flags": ["--guidance-mode"], "target": "run", "choices": list(GUIDANCE_MODES),
         "help": "mmsr: negative branch: mcfg (negative prompt + modalities, default), null-modality "
                 "(negative prompt, null modalities) or cfg (empty text, null modalities); --guidance-scale "
                 "is w in (1+w)*eps(pos) - w*eps(neg), default 2"},
        {"flags": ["--depth-model"], "target": "build", "metavar": "DIR",
         "help": "mmsr: local transformers depth model (default: depth/ in or beside the checkpoint)"},
        {"flags": ["--seg-model"], "target": "build", "metavar": "DIR",
         "help": "mmsr: local transformers segmentation model (default: seg/ in or beside the checkpoint)"},
        {"flags": ["--vq"], "target": "build", "metavar": "PATH",
         "help": "mmsr: VQ tokenizer for the spatial modalities (diffusers VQModel folder or EdgeVQ "
                 ".safetensors; default: the checkpoint's, else the shipped edge VQ)"},
        {"flags": ["--edge-detector"], "target": "build", "choices": ["canny", "hed"],
         "help": "mmsr: edge modality source (default: the checkpoint's, canny)"},
    ], "colour_fixes": list(COLOUR_FIXES), "suggests_priors": True},
))
