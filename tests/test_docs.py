"""Docs for strangers: no machine-specific paths, no internal jargon, and every local link resolves.

Scans the files git tracks (a fresh clone sees exactly these).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".json", ".toml", ".txt", ".html", ".js", ".css", ".cfg", ".sh", ""}

#: Absolute paths that only exist on one machine (home folders, this workplace's checkouts, temp folders).
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/root/|/home/\w|/Users/\w|/private/var/|[A-Z]:\\\\Users|/tmp/pytest-)")
#: Temp-folder paths recorded as data (configs, JSON results) rather than shown as examples in prose.
RECORDED_TMP = re.compile(r'"/tmp/[^"]*"|:\s*/tmp/\S+')
#: Words that mean something only inside the team: the spec files' numbers, the tracker's issue numbers,
#: files that are not in the repository.
JARGON = re.compile(r"\bseed ?0\d\d\b|\bseeds? \d{3}\b|\bissue #?\d+\b|\bDESIGN\.md\b|\.\./shared/", re.IGNORECASE)
#: Where strangers read: the README, docs, configs, the package (its docstrings and help texts), packaging.
JARGON_SCOPE = ("README.md", "CHANGELOG.md", "pyproject.toml", "docs/", "configs/", "src/", ".ci/")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / p for p in out.decode().split("\0") if p]
    return [f for f in files if f.suffix in TEXT_SUFFIXES and f.is_file() and f.stat().st_size < 2_000_000]


def _hits(pattern: re.Pattern[str], files: list[Path], skip: set[str] = frozenset()) -> list[str]:
    hits = []
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        if rel in skip:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:120]}")
    return hits


@pytest.fixture(scope="module")
def files() -> list[Path]:
    return tracked_text_files()


def test_no_machine_specific_paths(files: list[Path]) -> None:
    hits = _hits(MACHINE_PATH, files, {"tests/test_docs.py"})
    data = [f for f in files if f.suffix in {".json", ".yaml", ".yml"}]
    hits += _hits(RECORDED_TMP, data)
    assert not hits, "machine-specific paths:\n" + "\n".join(hits[:40])


def test_no_internal_jargon(files: list[Path]) -> None:
    scoped = [f for f in files if f.relative_to(ROOT).as_posix().startswith(JARGON_SCOPE)]
    hits = _hits(JARGON, scoped)
    assert not hits, "internal jargon (name the paper, the feature or the file instead):\n" + "\n".join(hits[:60])


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_local_links_in_readme_and_docs_resolve() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "src").rglob("*.md"))]
    broken = []
    for page in pages:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue  # web links and in-page anchors
                path = (page.parent / target.split("#", 1)[0]).resolve()
                if not path.exists():
                    broken.append(f"{page.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "broken local links:\n" + "\n".join(broken)
