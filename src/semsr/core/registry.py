"""A name -> spec registry filled lazily by importing built-in modules (methods, prior providers).

Importing a registry does not import what it lists: the first lookup imports
the ``builtin`` modules, each of which registers its specs. A built-in module
that does not exist yet is skipped (only when the missing module is that one,
not one of its imports).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Sequence
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
    """

    def __init__(self, builtin: Sequence[str], what: str) -> None:
        self.entries: dict[str, S] = {}
        self.aliases: dict[str, str] = {}
        self.builtin = tuple(builtin)
        self.what = what
        self._loaded = False

    def add(self, name: str, spec: S, aliases: Iterable[str] = ()) -> S:
        """Register ``spec`` as ``name`` (a later registration replaces an earlier one)."""
        self.entries[name] = spec
        for alias in aliases:
            self.aliases[alias] = name
        return spec

    def load_builtins(self) -> None:
        """Import the built-in modules once (they register their specs)."""
        if self._loaded:
            return
        self._loaded = True
        for mod in self.builtin:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as err:  # a module of ours that is not written yet
                if err.name != mod:
                    raise

    def specs(self) -> list[S]:
        """All registered specs, in registration order."""
        self.load_builtins()
        return list(self.entries.values())

    def resolve(self, name: str) -> S:
        """The spec of ``name`` (or an alias); a one-line :class:`~semsr.core.errors.SemsrError` if unknown."""
        self.load_builtins()
        key = self.aliases.get(name, name)
        if key not in self.entries:
            near = difflib.get_close_matches(name, [*self.entries, *self.aliases], n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SemsrError(
                f"unknown {self.what} {name!r}; {hint}known {self.what}s: {', '.join(sorted(self.entries))}"
            )
        return self.entries[key]
