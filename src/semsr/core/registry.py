"""A name -> spec registry filled lazily by importing built-in modules (methods, prior providers).

Importing a registry does not import what it lists: the first lookup imports
the ``builtin`` modules, each of which registers its specs. A built-in module
that does not exist yet is skipped (only when the missing module is that one,
not one of its imports). A lookup of one name can import only the module that
registers it (:meth:`Registry.load_for`, given a ``locate`` function), so using one
method does not import the code of all others; listings still import every module
and keep the built-in order whatever was imported first.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from semsr.core.errors import SemsrError

S = TypeVar("S")


class Registry(Generic[S]):
    """Specs by name (plus aliases), with the built-in modules imported on first lookup.

    Attributes:
        entries: name -> spec, in registration order (tests may edit it).
        aliases: alias -> name.
        builtin: modules imported on first lookup.
        what: the kind of entry, for messages (``"method"``: ``unknown method 'x'; known methods: ...``).
        locate: name -> the built-in module that registers it (None: unknown; every module is imported).
    """

    def __init__(self, builtin: Sequence[str], what: str, locate: Callable[[str], str | None] | None = None) -> None:
        self.entries: dict[str, S] = {}
        self.aliases: dict[str, str] = {}
        self.builtin = tuple(builtin)
        self.what = what
        self.locate = locate
        self._loaded = False
        self._imported: set[str] = set()
        self._importing: list[str] = []
        self._origin: dict[str, str | None] = {}

    def add(self, name: str, spec: S, aliases: Iterable[str] = ()) -> S:
        """Register ``spec`` as ``name`` (a later registration replaces an earlier one)."""
        self.entries[name] = spec
        for alias in aliases:
            self.aliases[alias] = name
        self._origin[name] = self._importing[-1] if self._importing else None
        return spec

    def origin(self, name: str) -> str | None:
        """The built-in module that registered ``name`` (None: registered from elsewhere, e.g. a test)."""
        return self._origin.get(name)

    def _import(self, mod: str) -> None:
        if mod in self._imported:
            return
        self._imported.add(mod)
        self._importing.append(mod)
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # a module of ours that is not written yet
            if err.name != mod:
                raise
        finally:
            self._importing.pop()

    def load_builtins(self) -> None:
        """Import the built-in modules once (they register their specs)."""
        if self._loaded:
            return
        self._loaded = True
        for mod in self.builtin:
            self._import(mod)

    def load_for(self, name: str) -> None:
        """Import the built-in module that registers ``name`` (``locate``), or all of them when it is unknown."""
        mod = self.locate(name) if self.locate is not None and not self._loaded else None
        if mod is None or mod not in self.builtin:
            self.load_builtins()
            return
        self._import(mod)
        if name not in self.entries and name not in self.aliases:
            self.load_builtins()

    def specs(self) -> list[S]:
        """All registered specs, in the order of the built-in modules (then of registration)."""
        self.load_builtins()
        rank = {mod: i for i, mod in enumerate(self.builtin)}
        names = sorted(self.entries, key=lambda n: rank.get(self._origin.get(n) or "", len(rank)))  # stable sort
        return [self.entries[n] for n in names]

    def resolve(self, name: str) -> S:
        """The spec of ``name`` (or an alias); a one-line :class:`~semsr.core.errors.SemsrError` if unknown."""
        self.load_for(name)
        key = self.aliases.get(name, name)
        if key not in self.entries:
            near = difflib.get_close_matches(name, [*self.entries, *self.aliases], n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SemsrError(
                f"unknown {self.what} {name!r}; {hint}known {self.what}s: {', '.join(sorted(self.entries))}"
            )
        return self.entries[key]
