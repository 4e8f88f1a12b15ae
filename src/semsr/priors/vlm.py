"""Caption and quality priors from a local vision-language model (XPSR, DaLPSR).

XPSR asks an MLLM (LLaVA) two questions about the LR image:

- high-level, :data:`HIGH_LEVEL_INSTRUCTION`: "Please provide a descriptive
  summary of the content of this image" -> text prior ``"caption"``;
- low-level, :data:`LOW_LEVEL_INSTRUCTION`: "Please describe the quality of
  this image and evaluate it based on factors such as clarity, color, noise,
  and lighting" -> text prior ``"quality"``.

DaLPSR steers the semantic description with object tags from a tagger (RAM):
when a tagger folder is given, the caption instruction becomes
``tag_template.format(tags=..., instruction=...)`` (:data:`TAG_TEMPLATE`).

Any ``transformers`` vision-language model saved with ``save_pretrained``
works if one of the auto classes ``AutoModelForImageTextToText`` (or, on older
transformers, ``AutoModelForVision2Seq``) accepts its config and
``AutoProcessor`` loads its processor: LLaVA / LLaVA-NeXT, Qwen2-VL, SmolVLM /
Idefics3, PaliGemma, BLIP-2... The prompt is built with the processor's chat
template when it has one (one user turn: the image, then the instruction),
as ``"Question: <instruction> Answer:"`` for Q-Former models (BLIP-2,
InstructBLIP: their processor inserts the image queries), otherwise as
``"<image token>\\n<instruction>"`` (or the bare instruction for processors
without an image token). Decoding is greedy
(``do_sample=False``) so the prior is deterministic and cacheable; only the
newly generated tokens are returned, whitespace-normalised.

Everything loads with ``local_files_only=True`` from ``--vlm PATH`` (default
``semsr.core.paths.weights_dir()/"vlm"``). A loaded model is shared by the
caption and quality providers of one process (:func:`load_vlm` is cached).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import UnavailableError
from semsr.core.fingerprint import fingerprint
from semsr.core.loading import strict_from_pretrained
from semsr.priors.base import (
    DEVICE_OPTION,
    PriorResult,
    ProviderOption,
    ProviderSpec,
    check_image,
    model_folder,
    register_provider,
)
from semsr.priors.tagger import TAGGER_OPTION, THRESHOLD_OPTION, TOP_K_OPTION, TagsProvider, to_pil

HIGH_LEVEL_INSTRUCTION = "Please provide a descriptive summary of the content of this image"
LOW_LEVEL_INSTRUCTION = (
    "Please describe the quality of this image and evaluate it based on factors such as "
    "clarity, color, noise, and lighting"
)
#: How tagger labels steer the semantic instruction (DaLPSR).
TAG_TEMPLATE = "The image contains: {tags}. {instruction}"
DEFAULT_MAX_NEW_TOKENS = 77
_REVISION = "1"


def vlm_folder(path: str | Path | None) -> Path:
    """The VLM folder: ``path`` or ``weights_dir()/"vlm"``; raises :class:`UnavailableError` if absent."""
    return model_folder(
        path,
        "vlm",
        "no vision-language model folder (config.json missing); pass --vlm PATH to a "
        "folder written by save_pretrained (e.g. a LLaVA checkpoint)",
    )


def _vlm_auto_classes() -> list[Any]:
    import transformers  # heavy dependency: imported when a VLM is loaded

    return [
        getattr(transformers, n)
        for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
        if hasattr(transformers, n)
    ]


@dataclass(frozen=True)
class LoadedVLM:
    """A vision-language model with its processor."""

    model: Any
    processor: Any
    path: Path
    device: torch.device


@lru_cache(maxsize=2)
def load_vlm(path: str, device: str = "cpu", dtype: str = "float32") -> LoadedVLM:
    """Load model + processor from a local folder (cached per ``(path, device, dtype)``)."""
    from transformers import AutoConfig, AutoProcessor  # heavy dependency: imported when a VLM is loaded

    folder = vlm_folder(path)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    for auto in _vlm_auto_classes():
        if type(config) in auto._model_mapping:
            model = strict_from_pretrained(auto, folder, what="VLM", dtype=getattr(torch, dtype))
            break
    else:
        raise UnavailableError(f"model type {config.model_type!r} is not an image-text-to-text model", folder)
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UnavailableError(f"cannot load the processor of the VLM ({err})", folder) from None
    dev = torch.device(device)
    return LoadedVLM(model.to(dev).eval(), processor, folder, dev)


def build_prompt(processor: Any, instruction: str) -> str:
    """The text input for one image + ``instruction`` (chat template when the processor has one)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    if getattr(processor, "num_query_tokens", None) is not None:  # BLIP-2 / InstructBLIP insert the queries
        return f"Question: {instruction} Answer:"
    token = getattr(processor, "image_token", None)
    return f"{token}\n{instruction}" if token else instruction


def clean_text(text: str) -> str:
    """Collapse whitespace and strip."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def generate_text(
    vlm: LoadedVLM, image: torch.Tensor, instruction: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> str:
    """Greedy answer of the VLM to ``instruction`` about ``image`` ``(1, 3, H, W)`` in [0, 1]."""
    check_image(image)
    prompt = build_prompt(vlm.processor, instruction)
    inputs = vlm.processor(images=to_pil(image), text=prompt, return_tensors="pt")
    inputs = {k: (v.to(vlm.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(vlm.model.dtype)
    out = vlm.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1)
    ids = inputs.get("input_ids")
    if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
        out = out[:, ids.shape[1] :]  # decoder-only models echo the prompt
    tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
    return clean_text(tokenizer.batch_decode(out, skip_special_tokens=True)[0])


class VLMTextProvider:
    """Text prior from a VLM answer: ``"caption"`` (high-level) or ``"quality"`` (low-level).

    Args:
        name: registry name, ``"caption"`` or ``"quality"``.
        instruction: the question (default: XPSR's instruction for ``name``).
        vlm: local model folder.
        tagger: optional tagger folder (:mod:`semsr.priors.tagger`) or a built tags
            provider; its tags steer the instruction through ``tag_template`` (DaLPSR).
        tag_template: format string with ``{tags}`` and ``{instruction}``.
        tag_threshold, tag_top_k: tagger settings.
        max_new_tokens: generation length.
        device, dtype: where and in which precision the VLM runs.

    ``meta``: ``{"instruction": <the instruction sent>, "tags": [...]}``.
    """

    kind = "text"

    def __init__(
        self,
        name: str,
        instruction: str | None = None,
        vlm: str | Path | None = None,
        tagger: str | Path | Any = None,
        tag_template: str = TAG_TEMPLATE,
        tag_threshold: float | None = None,
        tag_top_k: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.name = name
        self.instruction = instruction or (LOW_LEVEL_INSTRUCTION if name == "quality" else HIGH_LEVEL_INSTRUCTION)
        self.path = vlm_folder(vlm)
        self.vlm = load_vlm(str(self.path), device, dtype)
        self.tagger: Any = None
        if isinstance(tagger, (str, Path)):
            self.tagger = TagsProvider(tagger, threshold=tag_threshold, top_k=tag_top_k, device=device)
        elif tagger is not None:  # an already built (possibly cached) tags provider
            self.tagger = tagger
        if "{instruction}" not in tag_template or "{tags}" not in tag_template:
            raise UnavailableError("the tag template needs {tags} and {instruction}", tag_template)
        self.tag_template = tag_template
        self.max_new_tokens = int(max_new_tokens)
        tag_part = f";tags={self.tagger.version};tt={tag_template}" if self.tagger else ""
        self.version = (
            f"{_REVISION};{fingerprint([self.path])};{dtype};n={self.max_new_tokens};i={self.instruction}{tag_part}"
        )

    def steered_instruction(self, image: torch.Tensor) -> tuple[str, tuple[str, ...]]:
        """The instruction for ``image`` and the tags that steered it (none without a tagger)."""
        if self.tagger is None:
            return self.instruction, ()
        tags = self.tagger(image).value
        if not tags:
            return self.instruction, ()
        return self.tag_template.format(tags=", ".join(tags), instruction=self.instruction), tuple(tags)

    def __call__(self, image: torch.Tensor) -> PriorResult:
        instruction, tags = self.steered_instruction(image)
        text = generate_text(self.vlm, image, instruction, self.max_new_tokens)
        return PriorResult("text", text, {"instruction": instruction, "tags": list(tags)})


def _factory(name: str):
    def make(
        vlm: str | Path | None = None,
        instruction: str | None = None,
        tagger: str | Path | None = None,
        tag_threshold: float | None = None,
        tag_top_k: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> VLMTextProvider:
        return VLMTextProvider(
            name,
            instruction=instruction,
            vlm=vlm,
            tagger=tagger if name == "caption" else None,
            tag_threshold=tag_threshold,
            tag_top_k=tag_top_k,
            max_new_tokens=max_new_tokens,
            device=device,
            dtype=dtype,
        )

    return make


VLM_OPTION = ProviderOption("vlm", "--vlm", "local vision-language model folder (LLaVA, Qwen2-VL, SmolVLM, ...)")
_COMMON = (
    VLM_OPTION,
    ProviderOption(
        "max_new_tokens", "--vlm-max-new-tokens", f"VLM answer length (default {DEFAULT_MAX_NEW_TOKENS})", int
    ),
    ProviderOption("dtype", "--vlm-dtype", "VLM precision: float32 (default), bfloat16, float16"),
    DEVICE_OPTION,
)

register_provider(
    ProviderSpec(
        name="caption",
        factory=_factory("caption"),
        kind="text",
        summary="high-level description from a local VLM (XPSR instruction; tags from --tagger steer it)",
        options=(
            _COMMON[0],
            ProviderOption(
                "instruction", "--caption-instruction", "instruction for the caption (default: XPSR's high-level one)"
            ),
            TAGGER_OPTION,
            THRESHOLD_OPTION,
            TOP_K_OPTION,
            *_COMMON[1:],
        ),
    )
)

register_provider(
    ProviderSpec(
        name="quality",
        factory=_factory("quality"),
        kind="text",
        summary="low-level quality description from a local VLM (XPSR instruction)",
        options=(
            _COMMON[0],
            ProviderOption(
                "instruction",
                "--quality-instruction",
                "instruction for the quality description (default: XPSR's low-level one)",
            ),
            *_COMMON[1:],
        ),
    )
)
