"""The package's import structure: layers point down, and function-local imports carry a reason.

The layer contract itself is ``[tool.importlinter]`` in pyproject.toml, checked by
``lint-imports`` in ``.ci/run``; these tests check what import-linter does not.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "semsr"


def _function_local_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, source line)`` of every import inside a function or method of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")]
            else:
                continue
            for mod in mods:
                found.append((node.lineno, mod, lines[node.lineno - 1]))
    return found


def test_no_function_local_imports_of_semsr_modules() -> None:
    """Internal imports sit at the top of the module (no imports inside functions to dodge cycles)."""
    bad = [
        f"{p.relative_to(REPO)}:{line}: {mod}"
        for p in sorted(SRC.rglob("*.py"))
        for line, mod, _ in _function_local_imports(p)
        if mod.startswith(("semsr", ".")) and p.name != "__init__.py"  # the package's lazy public names (semsr.upscale)
    ]
    assert not bad, "function-local imports of semsr modules:\n" + "\n".join(bad)


def test_function_local_third_party_imports_say_why() -> None:
    """A function-local import of another package carries a trailing comment giving the reason."""
    bad = [
        f"{p.relative_to(REPO)}:{line}: {src.strip()}"
        for p in sorted(SRC.rglob("*.py"))
        for line, mod, src in _function_local_imports(p)
        if not mod.startswith(("semsr", ".")) and "#" not in src
    ]
    assert not bad, "function-local imports without a '# reason' comment:\n" + "\n".join(bad)


def test_every_package_is_in_a_layer() -> None:
    """The import-linter layer contract names every sub-package of semsr (nothing escapes the check)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {part.strip() for layer in layers for part in layer.split("|")}
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert packages | modules <= named, f"not in a layer: {sorted((packages | modules) - named)}"


@pytest.mark.parametrize("name", ["CHANGELOG.md", "docs/architecture.md"])
def test_architecture_docs_exist(name: str) -> None:
    assert (REPO / name).is_file()
