"""The ``default-diffusion`` method: the project's own residual diffusion refiner (:mod:`semsr.models.default_sr`).

Weights: ``--checkpoint DIR`` (a folder written by ``semsr train --config
configs/default.yaml``, e.g. ``run/final``) or the packaged
``semsr/assets/weights/default-sr`` once it is shipped. Options: ``--steps``,
``--seed``, ``--scheduler``, ``--prompt``, ``--tile`` (input pixels per tile, like the other diffusion methods)
and the ablation switches ``--no-text-prior``, ``--no-edge-prior``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from semsr.core.errors import UnavailableError
from semsr.methods import MethodSpec, register
from semsr.models.catalog import DEFAULT_SR
from semsr.core.paths import assets_dir
from semsr.priors.report import PRIORS_IN_PROMPT, PriorReporter

NAME = "default-diffusion"
_RUN_DEFAULTS: dict[str, Any] = {  # "steps": None = the checkpoint's ``default_steps``
    "prompt": "", "steps": None, "seed": 0, "scheduler": "ddim", "guidance_scale": 1.0,
    "no_text_prior": False, "no_edge_prior": False, "tile": None, "tile_overlap": None, "progress": None,
    PRIORS_IN_PROMPT: False,
}


def packaged_weights() -> Path:
    """Folder of the shipped default-model weights (``semsr/assets/weights/default-sr``)."""
    return assets_dir() / "weights" / "default-sr"


class DefaultDiffusionMethod(PriorReporter):
    """:class:`~semsr.models.default_sr.DefaultSRPipeline` as a semsr method (tiles in its working space).

    The text condition is the prompt joined with IRPAD's degradation description
    (none when the IRPAD weights are absent); with ``priors_in_prompt`` the
    prompt is used as given (it already holds an edited :meth:`suggest_priors`
    description). ``last_priors``: the first image's text, prompt and description.
    """

    tiles_itself = True

    def __init__(self, pipeline: Any, name: str = NAME) -> None:
        self.pipeline = pipeline
        self.name = name
        self.scale = pipeline.config.scale

    def __call__(self, x: torch.Tensor, **run_opts: Any) -> torch.Tensor:
        opts = dict(_RUN_DEFAULTS)
        opts.update({k: v for k, v in run_opts.items() if k in _RUN_DEFAULTS and v is not None})
        u = self.pipeline.config.unshuffle
        tile = max(1, int(opts["tile"]) * self.scale // u) if opts["tile"] else 256  # --tile is in input pixels
        overlap = opts["tile_overlap"]
        texts, users, degradation = self.text_conditions(x, opts)
        out = self.pipeline(
            x, prompt=texts, steps=int(self.pipeline.config.default_steps if opts["steps"] is None else opts["steps"]),
            seed=int(opts["seed"]),
            scheduler=opts["scheduler"], guidance_scale=float(opts["guidance_scale"]),
            use_text=not opts["no_text_prior"], use_irpad=False, use_edges=not opts["no_edge_prior"], tile=tile,
            tile_overlap=overlap, progress=opts["progress"] if callable(opts["progress"]) else None)
        self.report_priors(prompt=texts[0], user_prompt=(users[0] or None) if degradation[0] else None,
                           degradation=degradation[0] or None, edge_prior=not opts["no_edge_prior"])
        return out

    def text_conditions(self, x: torch.Tensor, opts: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
        """``(texts, user prompts, degradation descriptions)`` per image of ``x (B, 3, h, w)``."""
        from semsr.models.default_sr import join_prompt

        prompt, b = opts["prompt"] or "", x.shape[0]
        users = [prompt] * b if isinstance(prompt, str) else list(prompt)
        use_text = not opts["no_text_prior"]
        with_irpad = use_text and not opts[PRIORS_IN_PROMPT]
        degradation = self.pipeline.degradation(x.float().clamp(0, 1)) if with_irpad else [""] * b
        texts = [join_prompt(u, d) if use_text else "" for u, d in zip(users, degradation, strict=True)]
        return texts, users, degradation

    def prior_suggestion(self, x: torch.Tensor) -> dict[str, Any]:
        """IRPAD's degradation description as the prompt ("" when the IRPAD weights are absent)."""
        degradation = self.pipeline.degradation(x)[0]
        return {"prompt": degradation, "degradation": degradation or None}


def build(checkpoint: str | Path | None = None, *, device: str = "cpu", irpad: str | None = None,
          stage1: str | None = None, threads: int | None = None, **_ignored: Any) -> DefaultDiffusionMethod:
    """Factory: ``checkpoint`` folder (default: the packaged weights), optional IRPAD folder and stage-1 override."""
    from semsr.methods import get_method
    from semsr.models.default_sr import DefaultSR, DefaultSRPipeline

    folder = Path(checkpoint).expanduser() if checkpoint else packaged_weights()
    if not (folder / "config.json").is_file():
        raise UnavailableError("no default-model weights here (train them: semsr train --config "
                               "configs/default.yaml, then pass --checkpoint RUN/final)", folder)
    if threads:
        torch.set_num_threads(int(threads))
    model = DefaultSR.load(folder)
    s1 = get_method(stage1 or model.config.stage1, device=device)
    return DefaultDiffusionMethod(DefaultSRPipeline(model, stage1=s1, irpad=irpad, device=device))


register(MethodSpec(
    name=NAME,
    factory=build,
    scale=4,
    summary="the project's compact residual diffusion refiner over realesrgan-x4plus "
            "(MiniLM text + IRPAD prompt, Canny edges via ControlNet; --checkpoint RUN/final)",
    extra={"cli_options": [
        {"flags": ["--no-text-prior"], "target": "run", "action": "store_true",
         "help": "default-diffusion: ablation, empty text condition (no prompt, no IRPAD)"},
        {"flags": ["--no-edge-prior"], "target": "run", "action": "store_true",
         "help": "default-diffusion: ablation, no edge map (zero ControlNet hint)"},
        {"flags": ["--stage1"], "target": "build", "metavar": "METHOD",
         "help": "default-diffusion: stage-1 restorer (default: the checkpoint's)"},
    ], "suggests_priors": True, "diffusion": True, "model_info": DEFAULT_SR,
       "bundled_paths": ("checkpoint",)},  # --checkpoint is optional: the packaged weights
))
