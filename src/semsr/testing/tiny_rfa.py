"""Tiny writers for the RFA recipe (see :mod:`semsr.testing.tiny`).

- ``text-decoder/``: a 2-layer ``GPT2LMHeadModel`` + byte-level BPE tokenizer
  (the I2T text decoder's on-disk format; random weights, initialised 10x
  wider than GPT-2's so its greedy text depends on the prefix).
- ``rfa/``: an RFA checkpoint for ``clip-vision`` + ``sd``: ``aligner/``,
  ``enhancer/``, ``adain/`` (random aligner/enhancer, adapters at their
  identity initialisation) and a copy-free pointer: the text decoder is
  written into ``rfa/text-decoder``.
"""
from __future__ import annotations

from pathlib import Path

from semsr.testing.tiny import register_tiny
from semsr.testing.tiny_coser import TINY_CLIP_VISION

#: ``initializer_range`` 0.2 (GPT-2: 0.02): a less flat random LM, whose greedy text follows its prefix, so the
#: text-alignment loss has something to steer in tests.
TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "initializer_range": 0.2}


def _write_gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from semsr.testing.tiny_vlm import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(vocab_size=300, image_token=False)
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, **TINY_GPT2)
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def write_tiny_text_decoder(root: Path) -> None:
    """``root/text-decoder``: tiny GPT-2 causal LM + tokenizer."""
    _write_gpt2(root / "text-decoder")


def write_tiny_rfa(root: Path) -> None:
    """``root/rfa``: aligner, enhancer, AdaIN adapters (for ``root/sd``) and a text decoder."""
    from diffusers import UNet2DConditionModel

    from semsr.fusion.adain import attach_adain
    from semsr.methods.rfa import save_adain
    from semsr.models.rfa import AlignerConfig, EmbeddingEnhancer, EnhancerConfig, ReferenceFindingAligner

    c = TINY_CLIP_VISION
    tokens = 1 + (c["image_size"] // c["patch_size"]) ** 2
    folder = root / "rfa"
    ReferenceFindingAligner(AlignerConfig(token_dim=c["hidden_size"], out_dim=c["hidden_size"], num_tokens=tokens,
                                          width=32, depth=1, heads=2)).save(folder / "aligner")
    EmbeddingEnhancer(EnhancerConfig(token_dim=c["hidden_size"], out_dim=c["hidden_size"], num_tokens=tokens,
                                     lm_dim=TINY_GPT2["n_embd"], width=32, depth=1, heads=2,
                                     prefix_len=2)).save(folder / "enhancer")
    unet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet")
    save_adain(attach_adain(unet, control_dim=c["hidden_size"]), folder / "adain")
    _write_gpt2(folder / "text-decoder")


register_tiny("text-decoder", write_tiny_text_decoder)
register_tiny("rfa", write_tiny_rfa)
