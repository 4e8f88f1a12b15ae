"""Typed method options: one dataclass per method, from which every front end is derived.

A method declares its options once, as a dataclass deriving from
:class:`MethodOptions`, each field made with :func:`option`::

    @dataclass(kw_only=True, frozen=True)
    class MyOptions(DiffusionOptions):
        checkpoint: Path | None = option(None, stage="build", help="checkpoint folder", metavar="DIR")
        steps: int = option(20, help="sampling steps", min=1, max=1000)

The CLI flags (``--checkpoint``, ``--steps``), the web form, the bench bracket
syntax (``name[steps=4]``) and the Python API all go through
:meth:`MethodOptions.parse`, so an unknown or mistyped option is the same
one-line :class:`OptionError` everywhere, naming the closest valid option.

Each field has a *stage*: ``build`` options configure how the method is
constructed (weight paths, device, dtype; a change means building another
method), ``run`` options are read on every call (prompt, steps, seed...).
A method's factory and its ``__call__`` both receive the whole options
object and read the fields of their stage.

Values may be given as Python values (checked: ``1.5`` for an ``int`` is an
error, ``3`` for a ``float`` is fine) or as text (CLI, web form, bench
brackets: ``"3"``, ``"true"``, ``"a,b"`` for a tuple, ``"depth=0.5,edge=2"`` for
a ``dict[str, float]``). Ranges (``min``/``max``) and ``choices`` are checked;
floats must be finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from semsr.core.errors import SemsrError

Stage = Literal["build", "run"]
T = TypeVar("T", bound="MethodOptions")
_META_KEY = "semsr"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class OptionError(SemsrError):
    """An option that does not exist, or a value that does not fit it (one line)."""


@dataclass(frozen=True)
class OptionInfo:
    """What :func:`option` records about a field (read it with :meth:`MethodOptions.infos`).

    Attributes:
        name: field name (``guidance_scale``); the CLI flag is ``--guidance-scale``.
        kind: ``"bool"``, ``"int"``, ``"float"``, ``"str"``, ``"path"``, ``"strs"``
            (tuple of strings) or ``"floats"`` (``dict[str, float]``).
        optional: ``None`` is an accepted value.
        default: the default value (``dataclasses.MISSING`` when required).
        help: one-line description for ``--help`` and the web form.
        stage: ``"build"`` or ``"run"``.
        choices: allowed values, or ``()``.
        min, max: inclusive bounds of numbers.
        units: what a number counts (``"input px"``, ``"latent px"``...), shown in help.
        metavar: placeholder in ``--help``.
        flags: extra CLI spellings (``("-t",)`` or ``("--color-fix",)``).
        widget: web-form hint: ``slider``, ``image`` (an upload), or ``None`` (from the kind).
        step: slider step.
        hidden: not offered in the web form (still accepted everywhere).
        advanced: offered in the web form behind its "Advanced options" disclosure
            (research ablations, tiling internals), not among the main fields.
    """

    name: str
    kind: str
    optional: bool
    default: Any
    help: str
    stage: Stage
    choices: tuple[Any, ...] = ()
    min: float | None = None
    max: float | None = None
    units: str | None = None
    metavar: str | None = None
    flags: tuple[str, ...] = ()
    widget: str | None = None
    step: float | None = None
    hidden: bool = False
    advanced: bool = False

    @property
    def flag(self) -> str:
        """The main CLI flag, ``--name-with-dashes``."""
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """Help text with units, bounds and default (for ``--help``)."""
        extra = []
        if self.units:
            extra.append(self.units)
        if self.min is not None or self.max is not None:
            lo = "" if self.min is None else _num(self.min)
            hi = "" if self.max is None else _num(self.max)
            extra.append(f"range {lo}..{hi}")
        if self.default not in (None, dataclasses.MISSING, (), False, ""):
            extra.append(f"default {_show(self.default)}")
        return self.help + (f" ({'; '.join(extra)})" if extra else "")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    stage: Stage = "run",
    choices: Iterable[Any] = (),
    min: float | None = None,
    max: float | None = None,
    units: str | None = None,
    metavar: str | None = None,
    flags: Iterable[str] = (),
    widget: str | None = None,
    step: float | None = None,
    hidden: bool = False,
    advanced: bool = False,
) -> Any:
    """A dataclass field of a :class:`MethodOptions` subclass (see the module docstring).

    ``default`` must be immutable (``None``, numbers, strings, tuples).
    """
    if stage not in ("build", "run"):
        raise ValueError(f"stage must be 'build' or 'run', got {stage!r}")
    meta = {
        _META_KEY: {
            "help": help,
            "stage": stage,
            "choices": tuple(choices),
            "min": min,
            "max": max,
            "units": units,
            "metavar": metavar,
            "flags": tuple(flags),
            "widget": widget,
            "step": step,
            "hidden": hidden,
            "advanced": advanced,
        }
    }
    return field(default=default, metadata=meta)


def _num(value: float) -> str:
    """A bound for people: ``1048576``, ``0.4``."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items())
    return str(value)


def _kind_of(annotation: Any) -> tuple[str, bool]:
    """``(kind, optional)`` of a resolved field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"option type {annotation!r}: one type (optionally with None) is supported")
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if annotation is bool:
        return "bool", optional
    if annotation is int:
        return "int", optional
    if annotation is float:
        return "float", optional
    if annotation is str:
        return "str", optional
    if annotation is Path:
        return "path", optional
    if origin is tuple and typing.get_args(annotation) == (str, ...):
        return "strs", optional
    if origin is dict and typing.get_args(annotation) == (str, float):
        return "floats", optional
    raise TypeError(f"unsupported option type {annotation!r}")


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to ``name`` (``difflib`` ratio), or ``None`` when there is none."""
    pool = list(candidates)
    if not pool:
        return None
    near = difflib.get_close_matches(name, pool, n=1, cutoff=0.5)
    if near:
        return near[0]
    return max(pool, key=lambda c: difflib.SequenceMatcher(None, name, c).ratio())


@dataclass(kw_only=True, frozen=True)
class MethodOptions:
    """Base of every method's options: where the method runs and how images are tiled.

    Subclasses add fields with :func:`option` and may redefine a field to change
    its default. Instances are made by :meth:`parse` (validated); direct
    construction is fine in code that passes correct Python values.
    """

    device: str = option("cpu", stage="build", help="torch device (cpu, cuda, cuda:N)")
    dtype: str | None = option(
        "auto",
        stage="build",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="compute precision; auto = bf16 on CPUs with native bf16 (avx512_bf16/AMX) and on bf16 GPUs, "
        "fp16 on other GPUs, fp32 elsewhere (env SEMSR_DTYPE overrides auto)",
    )
    threads: int | None = option(None, stage="build", min=1, max=1024, help="CPU threads for torch", metavar="N")
    tile: int | None = option(
        None,
        min=0,
        max=1 << 20,
        units="input px",
        flags=("-t",),
        metavar="N",
        help="tile side; 0 = whole image at once; default: automatic",
    )
    tile_pad: int | None = option(
        None,
        min=0,
        max=1 << 20,
        units="input px",
        metavar="P",
        help="context around each tile; default: what the method needs to be seamless",
    )

    #: Per-class cache of :meth:`infos`.
    _infos: ClassVar[dict[type, dict[str, OptionInfo]]] = {}

    # ------------------------------------------------------------------ schema
    @classmethod
    def infos(cls) -> dict[str, OptionInfo]:
        """Every option of the class, by name, in declaration order."""
        if cls not in MethodOptions._infos:
            hints = typing.get_type_hints(cls)
            out: dict[str, OptionInfo] = {}
            for f in dataclasses.fields(cls):
                meta = f.metadata.get(_META_KEY)
                if meta is None:
                    raise TypeError(f"{cls.__name__}.{f.name} must be declared with semsr.core.options.option()")
                kind, optional = _kind_of(hints[f.name])
                out[f.name] = OptionInfo(name=f.name, kind=kind, optional=optional, default=f.default, **meta)
            MethodOptions._infos[cls] = out
        return MethodOptions._infos[cls]

    @classmethod
    def names(cls, stage: Stage | None = None) -> list[str]:
        """Option names (of one ``stage``, or all)."""
        return [n for n, i in cls.infos().items() if stage is None or i.stage == stage]

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls: type[T], values: Mapping[str, Any] | None = None, *, method: str = "", style: str = "name") -> T:
        """Validated options from ``values`` (Python values or text); the rest keep their defaults.

        Args:
            values: option name -> value; ``None`` values mean "not given".
            method: the method's name, for messages.
            style: how option names are shown in messages: ``"name"`` (``steps``) or
                ``"flag"`` (``--steps``, for the CLI).

        Raises:
            OptionError: unknown name (with the closest valid one) or a bad value.
        """
        infos = cls.infos()
        given = {k: v for k, v in (values or {}).items() if v is not None}
        for key in given:
            if key not in infos:
                raise OptionError(_unknown_message(key, infos, method, style))
        kwargs = {k: _coerce(infos[k], v, _label(infos[k].name, style)) for k, v in given.items()}
        return cls(**kwargs)

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` applied (validated like :meth:`parse`)."""
        return type(self).parse({**self.values(), **changes})

    # ------------------------------------------------------------------ views
    def values(self, stage: Stage | None = None) -> dict[str, Any]:
        """``{name: value}`` of every option (of one ``stage``)."""
        return {n: getattr(self, n) for n in self.names(stage)}

    def changed(self, stage: Stage | None = None) -> dict[str, Any]:
        """The options (of one ``stage``) whose value differs from the default."""
        infos = self.infos()
        return {n: v for n, v in self.values(stage).items() if v != infos[n].default}

    def resolved_defaults(self) -> dict[str, Any]:
        """Run options whose declared default (``None``) stands for a value the build options decide
        (a checkpoint's setting): ``{name: value}``. The base class has none; the web form shows these."""
        return {}

    def build_key(self) -> tuple[Any, ...]:
        """A hashable identity of the build options (methods are cached per key)."""
        return tuple((n, _hashable(v)) for n, v in self.values("build").items())


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return str(value) if isinstance(value, Path) else value


def _label(name: str, style: str) -> str:
    return "--" + name.replace("_", "-") if style == "flag" else name


def _unknown_message(key: str, infos: Mapping[str, OptionInfo], method: str, style: str) -> str:
    norm = key.replace("-", "_").lstrip("_")
    near = closest(norm, infos)
    who = f"method {method!r}" if method else "this method"
    hint = f"; did you mean {_label(near, style)}?" if near else ""
    return f"{who} has no option {_label(norm, style)}{hint}"


def _bad(label: str, value: Any, what: str) -> OptionError:
    return OptionError(f"option {label}: {what}, got {value!r}")


def _coerce(info: OptionInfo, value: Any, label: str) -> Any:
    """``value`` (Python or text) as the option's type, checked against choices and bounds."""
    kind = info.kind
    text = isinstance(value, str)
    if kind == "bool":
        if isinstance(value, bool):
            out: Any = value
        elif text and value.strip().lower() in _TRUE + _FALSE:
            out = value.strip().lower() in _TRUE
        else:
            raise _bad(label, value, "expected true or false")
    elif kind == "int":
        if isinstance(value, bool):
            raise _bad(label, value, "expected an integer")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer() and not text:
            out = int(value)
        elif text:
            try:
                out = int(value.strip())
            except ValueError:
                raise _bad(label, value, "expected an integer") from None
        else:
            raise _bad(label, value, "expected an integer")
    elif kind == "float":
        if isinstance(value, bool):
            raise _bad(label, value, "expected a number")
        try:
            out = float(value.strip()) if text else float(value)
        except (TypeError, ValueError):
            raise _bad(label, value, "expected a number") from None
        if not isinstance(value, (int, float, str)):
            raise _bad(label, value, "expected a number")
        if not math.isfinite(out):
            raise _bad(label, value, "expected a finite number")
    elif kind == "str":
        if not text:
            raise _bad(label, value, "expected text")
        out = value
    elif kind == "path":
        if not isinstance(value, (str, Path)) or not str(value):
            raise _bad(label, value, "expected a path")
        out = Path(value).expanduser()
    elif kind == "strs":
        items = value.split(",") if text else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise _bad(label, value, "expected a comma-separated list")
        out = tuple(dict.fromkeys(v.strip() for v in items if v.strip()))
        bad = [v for v in out if info.choices and v not in info.choices]
        if bad:
            raise OptionError(f"option {label}: unknown entry {bad[0]!r}; choose from {', '.join(info.choices)}")
        return out
    elif kind == "floats":
        out = _parse_floats(info, value, label)
        return out
    else:  # pragma: no cover - _kind_of admits only the kinds above
        raise AssertionError(kind)
    if info.choices and out not in info.choices:
        raise OptionError(f"option {label}: choose one of {', '.join(map(str, info.choices))}, got {value!r}")
    if kind in ("int", "float"):
        if info.min is not None and out < info.min:
            raise _bad(label, value, f"must be >= {_num(info.min)}")
        if info.max is not None and out > info.max:
            raise _bad(label, value, f"must be <= {_num(info.max)}")
    return out


def _parse_floats(info: OptionInfo, value: Any, label: str) -> dict[str, float]:
    """``"a=1,b=2"`` or a mapping -> ``{"a": 1.0, "b": 2.0}`` (values checked against the bounds)."""
    if isinstance(value, str):
        pairs: list[tuple[str, Any]] = []
        for part in value.split(","):
            if not part.strip():
                continue
            key, sep, num = part.partition("=")
            if not sep:
                raise _bad(label, value, "expected NAME=NUMBER,...")
            pairs.append((key.strip(), num))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise _bad(label, value, "expected NAME=NUMBER,...")
    scalar = dataclasses.replace(info, kind="float", choices=(), optional=False)
    out: dict[str, float] = {}
    for key, num in pairs:
        if info.choices and key not in info.choices:
            raise OptionError(f"option {label}: unknown key {key!r}; choose from {', '.join(info.choices)}")
        out[str(key)] = _coerce(scalar, num, f"{label}[{key}]")
    return out
