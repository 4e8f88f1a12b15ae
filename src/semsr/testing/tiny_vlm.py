"""Tiny random vision-language model and tagger for ``semsr dev tiny-models``.

No captioning model or RAM tagger can be fetched here, so the loading and
generation code of :mod:`semsr.priors.vlm` and :mod:`semsr.priors.tagger` is
exercised on randomly initialised models of real classes, saved with
``save_pretrained`` exactly like the released folders:

- ``vlm``: ``LlavaForConditionalGeneration`` (CLIP vision tower 32 px / patch 8,
  2-layer Llama, width 32) + ``LlavaProcessor`` (CLIP image processor, a
  byte-level BPE ``PreTrainedTokenizerFast`` learnt offline from a small
  corpus, LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:`` chat template).
  ``generate()`` runs; its text is noise.
- ``vlm-blip2``: ``Blip2ForConditionalGeneration`` (OPT decoder) + ``Blip2Processor``,
  a VLM without chat template or image token in the prompt.
- ``tagger``: ``ViTForImageClassification`` with a multi-label head
  (``problem_type="multi_label_classification"``) over 16 tags + ViT processor.
"""

from __future__ import annotations

from pathlib import Path

from semsr.priors.vlm import HIGH_LEVEL_INSTRUCTION, LOW_LEVEL_INSTRUCTION, TAG_TEMPLATE
from semsr.testing.tiny import _CORPUS, register_tiny

TAGS = (
    "person",
    "cat",
    "dog",
    "bird",
    "tree",
    "grass",
    "flower",
    "sky",
    "cloud",
    "mountain",
    "water",
    "building",
    "car",
    "street",
    "face",
    "fabric",
)

#: LLaVA-1.5 conversation format as a chat template (one image + text per user turn).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_bpe_tokenizer(vocab_size: int = 400, image_token: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (any text encodes) with LLaVA's special tokens.

    With ``image_token=False`` the tokenizer does not declare ``<image>`` as its
    image token (BLIP-2's processor adds it itself).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # heavy: only for writing
    from transformers import PreTrainedTokenizerFast  # heavy dependency: only for writing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        [_CORPUS, HIGH_LEVEL_INSTRUCTION, LOW_LEVEL_INSTRUCTION, TAG_TEMPLATE, "USER: ASSISTANT:", " ".join(TAGS)],
        trainer,
    )
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **extra
    )


def write_tiny_llava(root: Path) -> None:
    """``root/vlm``: LLaVA (CLIP vision 2 layers, Llama 2 layers, width 32) + processor."""
    from transformers import (  # heavy dependency: only for writing
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # heavy: only for writing

    tokenizer = tiny_bpe_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")


def write_tiny_blip2(root: Path) -> None:
    """``root/vlm-blip2``: BLIP-2 (ViT 1 layer, Q-Former 1 layer / 4 queries, OPT 2 layers, width 32) + processor.

    A second VLM family without a chat template, loaded through the same auto classes.
    """
    from transformers import (  # heavy dependency: only for writing
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # heavy: only for writing

    tokenizer = tiny_bpe_tokenizer(image_token=False)
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=4
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32
        ),
        text_config=OPTConfig(
            vocab_size=len(processor.tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=4,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(config).save_pretrained(root / "vlm-blip2")
    processor.save_pretrained(root / "vlm-blip2")


def write_tiny_tagger(root: Path) -> None:
    """``root/tagger``: ViT (2 layers, width 32, 32 px) with a 16-tag multi-label head + ViT processor."""
    from transformers import ViTConfig, ViTForImageClassification  # heavy dependency: only for writing
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil  # heavy: only for writing

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=len(TAGS),
        id2label=dict(enumerate(TAGS)),
        label2id={t: i for i, t in enumerate(TAGS)},
        problem_type="multi_label_classification",
    )
    ViTForImageClassification(config).save_pretrained(root / "tagger")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "tagger")


register_tiny("vlm", write_tiny_llava)
register_tiny("vlm-blip2", write_tiny_blip2)
register_tiny("tagger", write_tiny_tagger)
