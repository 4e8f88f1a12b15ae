"""Tiny writers for the RFA recipe (see :mod:`semsr.testing.tiny`).

- ``text-decoder/``: a 2-layer ``GPT2LMHeadModel`` + byte-level BPE tokenizer
  (the I2T text decoder's on-disk format; random weights, initialised 10x
  wider than GPT-2's so its greedy text depends on the prefix).
- ``rfa/``: an RFA checkpoint (:func:`semsr.models.rfa.save_rfa_checkpoint`) for
  ``clip-vision`` + ``sd`` + ``controlnet``: the components ``aligner`` and
  ``enhancer`` (random), ``adain`` (UNet) and ``controlnet_adain`` (ControlNet),
  and a text decoder of its own in ``rfa/text-decoder``. The adapters are
  *opened* (random gates in [0.5, 1], random style heads): as after training,
  the control embedding changes the output, so a broken retrieval -> enhancer
  -> AdaIN path shows in the tests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from semsr.fusion.adain import AdaINAdapters
from semsr.models.rfa import EmbeddingEnhancer, ReferenceFindingAligner, save_rfa_checkpoint
from semsr.testing.tiny import register_tiny
from semsr.testing.tiny_coser import TINY_CLIP_VISION
from semsr.testing.tiny_vlm import tiny_bpe_tokenizer

#: ``initializer_range`` 0.2 (GPT-2: 0.02): a less flat random LM, whose greedy text follows its prefix, so the
#: text-alignment loss has something to steer in tests.
TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "initializer_range": 0.2}


def _write_gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel  # optional heavy dependency

    tok = tiny_bpe_tokenizer(vocab_size=300, image_token=False)
    cfg = GPT2Config(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_GPT2,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def write_tiny_text_decoder(root: Path) -> None:
    """``root/text-decoder``: tiny GPT-2 causal LM + tokenizer."""
    _write_gpt2(root / "text-decoder")


@torch.no_grad()
def open_adapters(adapters: AdaINAdapters, style_std: float = 0.3) -> AdaINAdapters:
    """Random opened adapters, in place: gates uniform in [0.5, 1], style-head weights and biases normal
    with ``style_std`` (the identity initialisation ignores the control embedding)."""
    for name, param in adapters.named_parameters():
        if name.endswith("gate"):
            param.uniform_(0.5, 1.0)
        else:
            param.normal_(0.0, style_std)
    return adapters


def write_tiny_rfa(root: Path) -> None:
    """``root/rfa``: an RFA checkpoint (aligner, enhancer, opened AdaIN adapters for ``root/sd`` and
    ``root/controlnet``) with a text decoder."""
    from diffusers import ControlNetModel, UNet2DConditionModel  # optional heavy dependency

    c = TINY_CLIP_VISION
    tokens = 1 + (c["image_size"] // c["patch_size"]) ** 2
    aligner = ReferenceFindingAligner(
        token_dim=c["hidden_size"], out_dim=c["hidden_size"], num_tokens=tokens, width=32, depth=1, heads=2
    )
    enhancer = EmbeddingEnhancer(
        token_dim=c["hidden_size"],
        out_dim=c["hidden_size"],
        num_tokens=tokens,
        lm_dim=TINY_GPT2["n_embd"],
        width=32,
        depth=1,
        heads=2,
        prefix_len=2,
    )
    unet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet")
    controlnet = ControlNetModel.from_pretrained(root / "controlnet")
    adain = open_adapters(AdaINAdapters.for_model(unet, control_dim=c["hidden_size"]))
    controlnet_adain = open_adapters(AdaINAdapters.for_model(controlnet, control_dim=c["hidden_size"]))
    with tempfile.TemporaryDirectory(prefix=".tiny-rfa-", dir=root) as tmp:
        _write_gpt2(Path(tmp) / "text-decoder")  # the RNG draws of the GPT-2 follow those of the adapters
        save_rfa_checkpoint(
            root / "rfa",
            {"aligner": aligner, "enhancer": enhancer, "adain": adain, "controlnet_adain": controlnet_adain},
            text_decoder=Path(tmp) / "text-decoder",
        )


register_tiny("text-decoder", write_tiny_text_decoder)
register_tiny("rfa", write_tiny_rfa)
