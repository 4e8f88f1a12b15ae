"""XPSR's Semantic-Fusion Attention (SFA) in the SR ControlNet, and the UNet's conditional attention.

**ControlNet side.** In every ``BasicTransformerBlock`` of a diffusers
``ControlNetModel`` the cross-attention ``attn2`` (which runs after each
resnet) becomes, with ``x`` the block's normalised hidden states
``(B, N, C)`` and the two prompts ``c_h`` (high-level, semantic) and ``c_l``
(low-level, quality/degradation), each ``(B, L, D)``::

    parallel (SFA):  CA_f(q = CA_h(x, c_h), kv = CA_l(x, c_l))      XPSR eq. (2), default
    serial:          CA_l(CA_h(x, c_h), c_l)                        XPSR eq. (1), Table 3 ablation
    high:            CA_h(x, c_h)                                   high-level branch only (= plain ControlNet)
    low:             CA_l(x, c_l)                                   low-level branch only

``CA_h`` is the block's own pretrained cross-attention (its weights and
state-dict keys are unchanged); ``CA_l`` starts as a copy of it; the fusion
attention ``CA_f`` (query and key/value both of width ``C``) starts as a copy of
the block's pretrained self-attention ``attn1``. The block's residual
connection around ``attn2`` is kept, so the block computes
``x + SFA(norm(x))`` where it computed ``x + CA(norm(x), c)``.

**Identities at initialisation** (tested): with ``c_h == c_l == c``,
``CA_l(x, c) == CA_h(x, c)`` exactly, so ``parallel`` gives
``attn1(attn2(x, c))`` — the pretrained cross-attention output passed through
the pretrained self-attention — and ``serial`` gives ``attn2(attn2(x, c), c)``;
``high`` reproduces the plain ControlNet exactly for any ``c_l``.

The two prompts travel as one context ``cat([c_h, c_l], dim=1)`` of shape
``(B, 2L, D)`` (both encoded to the same length ``L``) through the ControlNet's
ordinary ``encoder_hidden_states``; each SFA processor splits it in halves.

**UNet side.** The UNet keeps its (frozen) high-level cross-attention on
``c_h`` and gains a *conditional attention* to the ControlNet's features: in
every UNet transformer block, ``attn2``'s output gets
``+ zero_linear(CA_c(q = x, kv = F))`` where ``F`` are the tokens ``(B, N, C)``
of the ControlNet residual at the block's resolution (the mid-block residual
at the lowest one). ``CA_c`` starts as a copy of the block's self-attention and
``zero_linear`` is zero, so the UNet is exactly the plain UNet at
initialisation. Features are handed over with :meth:`SFAFusion.unet_features`.

How it is wired: diffusers attention *processors* (plain objects, not modules)
are set on the ``attn2`` of each block; the new weights live in one
:class:`SFAFusion` module (trainable, saved as ``config.json`` +
``model.safetensors``). The ControlNet's and UNet's state dicts are untouched.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.errors import SemsrError, UnavailableError
from semsr.fusion.layers import zero_linear

#: ``config.json`` kind of an SFA checkpoint folder.
CHECKPOINT_KIND = "xpsr-sfa"
SFA_MODES = ("parallel", "serial", "high", "low")


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every diffusers ``BasicTransformerBlock`` in ``model``, in module order."""
    from diffusers.models.attention import BasicTransformerBlock

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]


def _slot(name: str) -> str:
    return name.replace(".", "__")


def _copy_attention(attn: nn.Module) -> nn.Module:
    """A trainable copy of a diffusers ``Attention`` with the default processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    new = copy.deepcopy(attn)
    new.set_processor(AttnProcessor2_0())
    return new.requires_grad_(True)


def split_context(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2L, D)`` two-prompt context -> ``(c_h, c_l)``, each ``(B, L, D)``."""
    if context.shape[1] % 2:
        raise SemsrError(f"SFA context must be cat([c_h, c_l], 1) of two equal lengths, got {context.shape[1]} tokens")
    return context.chunk(2, dim=1)


def two_prompt_context(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``c_h (B, L, D)`` and ``c_l (B, L, D)`` -> the ControlNet context ``(B, 2L, D)``."""
    if high.shape != low.shape:
        raise SemsrError(f"high- and low-level contexts differ in shape: {tuple(high.shape)} vs {tuple(low.shape)}")
    return torch.cat([high, low], dim=1)


class _SlotProcessor:
    """An attention processor bound to ``fusion``'s modules of one block (``slot``), over diffusers' own."""

    def __init__(self, fusion: SFAFusion, slot: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fusion = fusion
        self.slot = slot
        self.base = AttnProcessor2_0()


class SFAProcessor(_SlotProcessor):
    """Attention processor of a ControlNet block's ``attn2`` (see the module docstring)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise SemsrError("SFA needs the two-prompt context cat([c_h, c_l], 1)")
        c_h, c_l = split_context(encoder_hidden_states)
        mode = self.fusion.mode
        low = self.fusion.low[self.slot]
        if mode == "high":
            return self.base(attn, hidden_states, c_h, attention_mask)
        if mode == "low":
            return low(hidden_states, encoder_hidden_states=c_l)
        high = self.base(attn, hidden_states, c_h, attention_mask)
        if mode == "serial":
            return low(high, encoder_hidden_states=c_l)
        return self.fusion.fuse[self.slot](high, encoder_hidden_states=low(hidden_states, encoder_hidden_states=c_l))


class ConditionalAttnProcessor(_SlotProcessor):
    """Processor of a UNet block's ``attn2``: high-level cross-attention + zero-gated attention to
    the ControlNet features of the block's resolution (when :meth:`SFAFusion.unet_features` set them)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask)
        feats = self.fusion._unet_features
        if not feats or self.slot not in self.fusion.cond:
            return out
        tokens = feats.get(hidden_states.shape[1])
        if tokens is None:
            return out
        if tokens.shape[0] != hidden_states.shape[0]:
            tokens = tokens.repeat(hidden_states.shape[0] // tokens.shape[0], 1, 1)
        extra = self.fusion.cond[self.slot](hidden_states, encoder_hidden_states=tokens.to(hidden_states.dtype))
        return out + self.fusion.cond_out[self.slot](extra)


class SFAFusion(nn.Module):
    """The new attention weights of XPSR: per ControlNet block ``low`` (copy of ``attn2``) and
    ``fuse`` (copy of ``attn1``); per UNet block ``cond`` (copy of ``attn1``) and ``cond_out`` (zero).

    Args:
        controlnet: the ControlNet whose pretrained attentions initialise the copies.
        unet: the UNet for the conditional attention (None: no conditional attention).
        mode: one of :data:`SFA_MODES` (switchable later by setting ``mode``).
    """

    def __init__(self, controlnet: nn.Module, unet: nn.Module | None = None, mode: str = "parallel") -> None:
        super().__init__()
        self.mode = mode
        self.low = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        self.cond = nn.ModuleDict()
        self.cond_out = nn.ModuleDict()
        blocks = transformer_blocks(controlnet)
        if not blocks:
            raise SemsrError("SFA: the ControlNet has no transformer blocks")
        for name, block in blocks:
            self.low[_slot(name)] = _copy_attention(block.attn2)
            self.fuse[_slot(name)] = _copy_attention(block.attn1)
        if unet is not None:
            for name, block in transformer_blocks(unet):
                self.cond[_slot(name)] = _copy_attention(block.attn1)
                self.cond_out[_slot(name)] = zero_linear(int(block.attn1.to_q.in_features))
        self._unet_features: dict[int, torch.Tensor] | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in SFA_MODES:
            raise SemsrError(f"unknown SFA mode {value!r}; use one of {', '.join(SFA_MODES)}")
        self._mode = value

    # ------------------------------------------------------------------ wiring

    def install(self, controlnet: nn.Module, unet: nn.Module | None = None) -> None:
        """Set the SFA processors on ``controlnet`` (and conditional ones on ``unet``)."""
        for name, block in transformer_blocks(controlnet):
            if _slot(name) not in self.low:
                raise SemsrError(f"SFA weights have no block {name}: ControlNet architecture differs")
            block.attn2.set_processor(SFAProcessor(self, _slot(name)))
        if unet is not None and len(self.cond):
            for name, block in transformer_blocks(unet):
                block.attn2.set_processor(ConditionalAttnProcessor(self, _slot(name)))

    @contextlib.contextmanager
    def unet_features(self, down: Sequence[torch.Tensor], mid: torch.Tensor) -> Iterator[None]:
        """Make the ControlNet residuals ``down`` (each ``(B, C_i, h_i, w_i)``) and ``mid`` the
        conditional attention's keys/values for UNet calls inside the ``with`` block."""
        feats: dict[int, torch.Tensor] = {}
        for f in list(down) + [mid]:  # later (deeper) features at a resolution win; mid wins at the lowest
            feats[f.shape[-2] * f.shape[-1]] = f.flatten(2).transpose(1, 2)
        self._unet_features = feats
        try:
            yield
        finally:
            self._unet_features = None

    def controlnet_unet_forward(self, unet: nn.Module, controlnet: nn.Module, x: torch.Tensor, t: torch.Tensor,
                                high: torch.Tensor, low: torch.Tensor, hint: torch.Tensor,
                                conditioning_scale: float = 1.0) -> torch.Tensor:
        """XPSR's model call: ControlNet on ``(c_h, c_l)`` with SFA, UNet on ``c_h`` + conditional attention.

        Args:
            x: ``(B, 4, h, w)`` noisy latent; t: scalar or ``(B,)`` timesteps.
            high, low: ``(B, L, D)`` high- and low-level contexts.
            hint: ``(B, 3, f*h, f*w)`` in [0, 1].
        Returns:
            ``(B, 4, h, w)`` model output.
        """
        down, mid = controlnet(x, t, encoder_hidden_states=two_prompt_context(high, low), controlnet_cond=hint,
                               conditioning_scale=conditioning_scale, return_dict=False)
        with self.unet_features(down, mid):
            return unet(x, t, encoder_hidden_states=high, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]

    # ------------------------------------------------------------------ checkpoints

    def config(self) -> dict[str, Any]:
        return {"kind": CHECKPOINT_KIND, "mode": self.mode, "conditional_attention": bool(len(self.cond)),
                "controlnet_blocks": list(self.low), "unet_blocks": list(self.cond)}

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/config.json`` + ``folder/model.safetensors`` (atomically per file)."""
        from safetensors.torch import save_file

        from semsr.core.loading import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = folder / ".model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / "model.safetensors")
        atomic_write_bytes(folder / "config.json", (json.dumps(self.config(), indent=2) + "\n").encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path, controlnet: nn.Module, unet: nn.Module | None = None,
             mode: str | None = None) -> SFAFusion:
        """Build the structure from ``controlnet``/``unet`` and load ``folder``'s weights."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file() or not (folder / "model.safetensors").is_file():
            raise UnavailableError("not an SFA checkpoint (needs config.json + model.safetensors)", folder)
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("kind") != CHECKPOINT_KIND:
            raise UnavailableError(f"config kind is {cfg.get('kind')!r}, expected {CHECKPOINT_KIND!r}", cfg_path)
        fusion = cls(controlnet, unet if cfg.get("conditional_attention") else None, mode or cfg.get("mode", "parallel"))
        missing, unexpected = fusion.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        if missing or unexpected:
            raise UnavailableError(f"SFA weights do not match the model ({len(missing)} missing, "
                                   f"{len(unexpected)} unexpected tensors)", folder)
        return fusion
