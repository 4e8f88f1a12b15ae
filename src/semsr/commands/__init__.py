"""CLI sub-commands, one module each; see :mod:`semsr.cli`."""
