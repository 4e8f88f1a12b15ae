"""The built wheel holds what an installed semsr needs at run time: the shipped weights, the sample photo and the
web demo's files (an editable install reads them from the checkout and would not notice them missing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import semsr

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(semsr.__file__).resolve().parent


def test_wheel_holds_the_package_data(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    if PACKAGE != ROOT / "src" / "semsr":
        pytest.skip("semsr is not imported from this checkout")
    source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info/ beside the project
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("semsr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [
        f"semsr/{path.relative_to(PACKAGE).as_posix()}"
        for folder in ("assets", "ui/static")
        for path in sorted((PACKAGE / folder).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert any(n.startswith("semsr/assets/weights/default-sr/") for n in wanted)
    assert [n for n in wanted if n not in names] == []
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
