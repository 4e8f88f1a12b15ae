"""Start-up cost: a command imports only its own module, a method lookup only the module that registers it."""

from __future__ import annotations

import json
import subprocess
import sys

from semsr import methods
from semsr.cli import command_modules, command_word

_PREFIXES = ("semsr.commands.", "semsr.methods.", "semsr.train", "semsr.eval", "semsr.ui", "diffusers", "accelerate")


def _modules_after(code: str) -> list[str]:
    """Modules (of :data:`_PREFIXES`) imported by a fresh interpreter after running ``code``."""
    probe = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: print(json.dumps(sorted(m for m in sys.modules if m.startswith({_PREFIXES!r})))))\n"
        + code
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_command_word() -> None:
    assert command_word(["--debug", "upscale", "-i", "x"]) == "upscale"
    assert command_word(["-h"]) is None and command_word([]) is None
    assert {"upscale", "bench", "train", "models"} <= set(command_modules())


def test_upscale_imports_only_its_command_and_method() -> None:
    mods = _modules_after("from semsr.cli import main\nmain(['upscale', '-n', 'bicubic', '--help'])")
    assert "semsr.commands.upscale" in mods and "semsr.methods.restorers" in mods
    unexpected = [m for m in mods if m.startswith(("semsr.commands.bench", "semsr.commands.train", "semsr.train"))]
    assert not unexpected, unexpected
    assert not [m for m in mods if m.startswith(("semsr.methods.coser", "semsr.methods.xpsr", "diffusers"))]
    assert "accelerate" not in mods


def test_every_builtin_method_is_located() -> None:
    """:func:`semsr.methods.builtin_module` names the module that registers each built-in method and alias."""
    for spec in methods.specs():
        expected = methods.REGISTRY.origin(spec.name)
        if expected is None:
            continue  # registered by a test
        assert methods.builtin_module(spec.name) == expected, spec.name
        for alias in spec.aliases:
            assert methods.builtin_module(alias) == expected, alias


def test_listing_order_does_not_depend_on_lookups() -> None:
    names = [s.name for s in methods.specs()]
    assert names.index("bicubic") < names.index("default-diffusion") < names.index("default")
