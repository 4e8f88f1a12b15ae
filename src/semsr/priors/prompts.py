"""User prompts and the two text conditions of the XPSR / DaLPSR recipes.

User prompts
------------
:class:`UserPrompts` answers "which prompt did the user give for this file":
``--prompt TEXT`` applies to every image; a *sidecar* file maps file names to
prompts and wins over ``--prompt`` for the files it lists:

- JSON: ``{"baby.png": "a baby in a knitted hat", ...}`` or a list of
  ``{"file": ..., "prompt": ...}`` objects;
- CSV: two columns ``file,prompt`` (a header row naming the columns
  ``file``/``filename``/``image``/``name`` and ``prompt``/``caption``/``text``
  is optional).

Keys match the file's path as given, its name (``baby.png``) or its stem
(``baby``), case-insensitively.

Text conditions
---------------
:class:`TextPriors` produces, per image, the *high-level* (semantic) and the
*low-level* (degradation/quality) prompt, from cached providers:

=========  ===========================================  ==========================================
           with a VLM                                   ``no_vlm=True`` (the explicit opt-out)
=========  ===========================================  ==========================================
high       VLM caption (tag-steered when a tagger is    user prompt, plus the tags when a tagger
           given), user prompt in front                 is given ("" when neither)
low        ``low_source="vlm"``: VLM quality answer     IRPAD description
           ``low_source="irpad"``: IRPAD description
=========  ===========================================  ==========================================

There is no silent fallback: without a VLM folder (``vlm`` nor ``weights_dir()/"vlm"``) and
without ``no_vlm=True`` a :class:`TextPriors` is not built (one-line error naming ``--vlm`` and
``--no-vlm``, :data:`NO_VLM_HINT`); ``no_vlm`` together with a ``vlm`` path is an error too.
XPSR uses ``low_source="vlm"``, DaLPSR ``low_source="irpad"`` with a tagger.
The user prompt of an image is an argument of each call
(``priors(image, prompt)``; a :class:`UserPrompts` picks it per file), so one
:class:`TextPriors` serves any number of callers. ``user_mode="replace"``
makes a user prompt replace the caption (the VLM is then not asked for the
high-level prompt of that image).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import InputError, UnavailableError
from semsr.priors.base import CachedProvider, cached
from semsr.priors.irpad import IRPADProvider
from semsr.priors.tagger import TagsProvider
from semsr.priors.vlm import DEFAULT_MAX_NEW_TOKENS, VLMTextProvider, vlm_folder

_FILE_KEYS = ("file", "filename", "image", "name", "path")
_PROMPT_KEYS = ("prompt", "caption", "text")
#: What to pass when no VLM is found (the error of :class:`TextPriors`).
NO_VLM_HINT = "pass --vlm PATH (a local VLM folder), or --no-vlm to run on your prompt (+ IRPAD) without one"


def _normalise_key(key: str) -> str:
    return str(key).strip().replace("\\", "/").lower()


def read_sidecar(path: str | Path) -> dict[str, str]:
    """File name -> prompt from a JSON or CSV sidecar (see module docstring)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise InputError(f"cannot read the prompt file ({err.strerror or err})", path) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err.msg}, line {err.lineno})", path) from None
        pairs = _json_pairs(data, path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        pairs = _csv_pairs(text, "\t" if path.suffix.lower() == ".tsv" else ",", path)
    else:
        raise InputError("prompt sidecar must be .json or .csv", path)
    out: dict[str, str] = {}
    for key, prompt in pairs:
        if not isinstance(key, str) or not isinstance(prompt, str):
            raise InputError(f"prompt entries must be strings, got {key!r}: {prompt!r}", path)
        out[_normalise_key(key)] = prompt.strip()
    return out


def _json_pairs(data: Any, path: Path) -> list[tuple[Any, Any]]:
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list):
        pairs = []
        for item in data:
            if not isinstance(item, dict):
                raise InputError("a JSON list of prompts must hold objects with file and prompt", path)
            fk = next((k for k in _FILE_KEYS if k in item), None)
            pk = next((k for k in _PROMPT_KEYS if k in item), None)
            if fk is None or pk is None:
                raise InputError(f"entry without file/prompt keys: {item}", path)
            pairs.append((item[fk], item[pk]))
        return pairs
    raise InputError("JSON prompt file must be an object or a list", path)


def _csv_pairs(text: str, delimiter: str, path: Path) -> list[tuple[str, str]]:
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    fi, pi = 0, 1
    if any(h in _FILE_KEYS for h in head) and any(h in _PROMPT_KEYS for h in head):
        fi = next(i for i, h in enumerate(head) if h in _FILE_KEYS)
        pi = next(i for i, h in enumerate(head) if h in _PROMPT_KEYS)
        rows = rows[1:]
    pairs = []
    for n, row in enumerate(rows, start=1):
        if len(row) <= max(fi, pi):
            raise InputError(f"row {n} needs a file and a prompt column: {row}", path)
        pairs.append((row[fi], row[pi]))
    return pairs


@dataclass
class UserPrompts:
    """Per-image user prompts (see module docstring).

    Attributes:
        default: the ``--prompt`` text (``None``: no global prompt).
        mapping: normalised file key -> prompt from a sidecar.
        source: the sidecar file, if any.
    """

    default: str | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    @classmethod
    def load(cls, prompt: str | None = None, sidecar: str | Path | None = None) -> UserPrompts:
        """From ``--prompt`` and/or a sidecar file."""
        mapping = read_sidecar(sidecar) if sidecar is not None else {}
        return cls(prompt.strip() if prompt else None, mapping, Path(sidecar) if sidecar is not None else None)

    def get(self, path: str | Path | None) -> str | None:
        """The prompt for image ``path`` (sidecar entry, else ``default``)."""
        if path is not None and self.mapping:
            p = Path(path)
            for key in (str(p), p.name, p.stem):
                hit = self.mapping.get(_normalise_key(key))
                if hit is not None:
                    return hit
        return self.default


@dataclass(frozen=True)
class TextConditions:
    """The two prompts for one image.

    Attributes:
        high: semantic (high-level) prompt.
        low: degradation / quality (low-level) prompt.
        tags: tagger labels used (may be empty).
        sources: where each came from: ``{"high": "vlm" | "user+vlm" | "user" | "tags" | "user+tags" | "none",
            "low": "vlm" | "irpad" | "none"}``.
    """

    high: str
    low: str
    tags: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)


def _join(*parts: str | None) -> str:
    return ", ".join(p.strip().rstrip(",") for p in parts if p and p.strip())


class TextPriors:
    """High- and low-level prompts per image for XPSR / DaLPSR (see module docstring).

    Args:
        vlm: VLM folder; ``None`` tries ``weights_dir()/"vlm"``. A folder that is not there is an
            error (:class:`~semsr.core.errors.UnavailableError` naming ``--vlm`` / ``--no-vlm``).
        no_vlm: the explicit opt-out: no VLM; the semantic prompt is the user prompt (+ tags) and
            the low-level one IRPAD's description (module docstring). Excludes ``vlm``.
        tagger: tagger folder (optional).
        low_source: ``"vlm"`` (XPSR) or ``"irpad"`` (DaLPSR).
        irpad_weights: IRPAD folder (default: shipped weights).
        user_mode: ``"prepend"`` (user prompt, then caption) or ``"replace"``.
        high_instruction, low_instruction: VLM instructions (default: XPSR's).
        use_tags_with_vlm: let the tags steer the caption instruction (DaLPSR).
        max_new_tokens, device, dtype: VLM generation settings.
        cache: cache every prior on disk (:class:`semsr.priors.base.CachedProvider`).
    """

    def __init__(
        self,
        vlm: str | Path | None = None,
        tagger: str | Path | None = None,
        low_source: str = "vlm",
        no_vlm: bool = False,
        irpad_weights: str | Path | None = None,
        user_mode: str = "prepend",
        high_instruction: str | None = None,
        low_instruction: str | None = None,
        use_tags_with_vlm: bool = True,
        max_new_tokens: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        cache: bool = True,
    ) -> None:
        if low_source not in ("vlm", "irpad"):
            raise ValueError(f"low_source must be 'vlm' or 'irpad', got {low_source!r}")
        if user_mode not in ("prepend", "replace"):
            raise ValueError(f"user_mode must be 'prepend' or 'replace', got {user_mode!r}")
        wrap = cached if cache else (lambda p: p)
        self.user_mode = user_mode
        self.low_source = low_source
        self.tags: Any = wrap(TagsProvider(tagger, device=device)) if tagger is not None else None
        if no_vlm and vlm is not None:
            raise UnavailableError("--vlm and --no-vlm exclude each other; give one", vlm)
        self.no_vlm = bool(no_vlm)
        folder: Path | None = None
        if not no_vlm:
            try:
                folder = vlm_folder(vlm)
            except UnavailableError as err:
                raise UnavailableError(f"no vision-language model here; {NO_VLM_HINT}", err.path) from None
        self.caption: Any = None
        self.quality: Any = None
        if folder is not None:
            n = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
            self.caption = wrap(
                VLMTextProvider(
                    "caption",
                    high_instruction,
                    folder,
                    tagger=self.tags if use_tags_with_vlm else None,
                    max_new_tokens=n,
                    device=device,
                    dtype=dtype,
                )
            )
            if low_source == "vlm":
                self.quality = wrap(
                    VLMTextProvider("quality", low_instruction, folder, max_new_tokens=n, device=device, dtype=dtype)
                )
        self.irpad: Any = None
        if self.quality is None:
            self.irpad = wrap(IRPADProvider(irpad_weights, device=device))

    @property
    def has_vlm(self) -> bool:
        return self.caption is not None

    def providers(self) -> list[CachedProvider | Any]:
        """The providers in use (for cache statistics and versions)."""
        return [p for p in (self.tags, self.caption, self.quality, self.irpad) if p is not None]

    def __call__(self, image: torch.Tensor, prompt: str | None = None) -> TextConditions:
        """Prompts for ``image`` ``(1, 3, H, W)`` in [0, 1] with the user's ``prompt`` for it, used as
        given (``None`` or ``""``: none; e.g. ``UserPrompts.get(path)`` picks it per file)."""
        user = prompt or None
        tags: tuple[str, ...] = tuple(self.tags(image).value) if self.tags is not None else ()
        if self.caption is not None and not (user and self.user_mode == "replace"):
            result = self.caption(image)
            tags = tuple(result.meta.get("tags", tags)) or tags
            high, high_src = _join(user, result.value), "user+vlm" if user else "vlm"
        elif user:
            high, high_src = user, "user"
            if self.caption is None and tags:
                high, high_src = _join(user, ", ".join(tags)), "user+tags"
        elif tags:
            high, high_src = ", ".join(tags), "tags"
        else:
            high, high_src = "", "none"
        if self.quality is not None:
            low, low_src = self.quality(image).value, "vlm"
        else:
            low, low_src = self.irpad(image).value, "irpad"
        return TextConditions(high, low, tags, {"high": high_src, "low": low_src})
