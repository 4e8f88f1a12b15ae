"""semsr.testing: tiny random models in the real on-disk formats, for tests, docs and demos.

``semsr dev tiny-models --out DIR`` writes them; :func:`semsr.testing.tiny.write_tiny_models`
is the Python entry point and ``tiny://NAME`` paths in training configs resolve to them
(:func:`semsr.testing.tiny.resolve_model_path`).
"""
