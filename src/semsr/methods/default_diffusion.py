"""``default-diffusion``: the project's own residual diffusion refiner (network: :mod:`semsr.models.default_sr`).

Weights: ``--checkpoint DIR`` (a ``default-sr`` checkpoint written by ``semsr
train --config configs/default.yaml``, e.g. ``run/final``) or the packaged
``semsr/assets/weights/default-sr``. The text condition is the prompt joined
with IRPAD's degradation description (:mod:`semsr.priors.irpad`; none when the
IRPAD weights are absent), the ControlNet hint the Canny edges of the stage-1
output. Ablation switches: ``--no-text-prior``, ``--no-edge-prior``.

Fidelity <-> detail: ``--detail D`` in [0, 1] blends the stage-1 output ``y1`` and the refined image
``R`` (:func:`semsr.models.default_sr.finish_refinement`: cored residual ``r / k`` and the flat-region
noise gate, as the checkpoint's settings say), ``SR = clamp(y1 + D * (R - y1), 0, 1)``; ``D = 0`` skips
the refiner and returns the stage-1 output bit for bit, ``D = 1`` is ``clamp(R, 0, 1)`` bit for bit.

Tiles: ``--tile`` is in input pixels like every method's, converted to the
working space (``u``-times pixel-unshuffled output) by
:func:`semsr.pipeline.options.latent_tile` (the one rule of the latent
recipes, with the unshuffle factor as the "VAE factor"); ``--latent-tile``
gives the working-space side directly. Default: :data:`DEFAULT_TILE`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from semsr.core.components import INDEX_FILE, read_index
from semsr.core.dtypes import apply_threads
from semsr.core.errors import SemsrError, UnavailableError
from semsr.core.method import MethodSpec, ProgressFn
from semsr.core.options import MethodOptions, option
from semsr.core.outputs import SROutput, compact
from semsr.core.paths import assets_dir
from semsr.methods import build as build_method
from semsr.methods import register
from semsr.models.catalog import DEFAULT_SR
from semsr.models.default_sr import (
    MINILM_WIDTH,
    DefaultSR,
    finish_refinement,
    from_space,
    load_default_sr,
    to_space,
)
from semsr.pipeline.guidance import cfg
from semsr.pipeline.latent_sr import progress_fn
from semsr.pipeline.latent_tiling import crop_window, tiled, untiled
from semsr.pipeline.options import guidance_option, latent_tile
from semsr.pipeline.sampler import SCHEDULER_NAMES, make_scheduler, sample
from semsr.pipeline.text import MiniLMTextEncoder, PromptEncoder
from semsr.priors.edges import canny_edges
from semsr.priors.irpad import IRPADEstimator, describe

NAME = "default-diffusion"
#: Working-space tile side when ``--tile`` / ``--latent-tile`` are not given (``u`` output px per unit).
DEFAULT_TILE = 256


def packaged_weights() -> Path:
    """Folder of the shipped default-model weights (``semsr/assets/weights/default-sr``)."""
    return assets_dir() / "weights" / "default-sr"


@dataclass(kw_only=True, frozen=True)
class DefaultDiffusionOptions(MethodOptions):
    """Options of ``default-diffusion``."""

    checkpoint: Path | None = option(
        None, stage="build", metavar="DIR", help="default-model checkpoint folder (default: the packaged weights)"
    )
    irpad: Path | None = option(
        None, stage="build", metavar="DIR", help="IRPAD weights folder for the degradation text (default: shipped)"
    )
    stage1: str | None = option(
        None, stage="build", metavar="METHOD", help="stage-1 restorer (default: the checkpoint's)"
    )
    prompt: str = option("", help="positive prompt (joined with IRPAD's degradation description)")
    steps: int | None = option(
        None,
        min=0,
        max=1000,
        metavar="N",
        help="sampling steps (0 = the stage-1 output; default: the checkpoint's default_steps)",
    )
    detail: float = option(
        1.0,
        min=0.0,
        max=1.0,
        step=0.05,
        widget="slider",
        metavar="D",
        help="fidelity <-> detail: how much of the refinement is applied (0 = the stage-1 output exactly, 1 = all of it)",
    )
    seed: int = option(0, min=0, max=2**63 - 1, help="random seed", metavar="N")
    scheduler: str = option("ddim", choices=SCHEDULER_NAMES, help="sampler")
    guidance_scale: float = guidance_option(1.0)
    no_text_prior: bool = option(False, advanced=True, help="ablation: empty text condition (no prompt, no IRPAD)")
    no_edge_prior: bool = option(False, advanced=True, help="ablation: no edge map (zero ControlNet hint)")
    priors_in_prompt: bool = option(
        False, hidden=True, help="the prompt already holds the (edited) degradation description"
    )
    latent_tile: int | None = option(
        None,
        advanced=True,
        min=0,
        max=1 << 16,
        units="working-space px",
        metavar="N",
        help=f"working-space tile side, overrides --tile (default: {DEFAULT_TILE})",
    )
    tile_overlap: int | None = option(
        None,
        advanced=True,
        min=0,
        max=1 << 16,
        units="working-space px",
        metavar="N",
        help="overlap of tiles (default: tile/4)",
    )

    def resolved_defaults(self) -> dict[str, Any]:
        """``steps``: the checkpoint's ``default_steps`` (``{}`` when the checkpoint folder is unreadable)."""
        folder = Path(self.checkpoint).expanduser() if self.checkpoint else packaged_weights()
        try:
            steps = read_index(folder).meta.get("default_steps")
        except UnavailableError:
            return {}
        return {} if steps is None else {"steps": int(steps)}


# ---------------------------------------------------------------------- priors
class TextTokens:
    """Frozen MiniLM tokens ``list[str] -> (B, 77, 384)`` with a per-prompt cache."""

    def __init__(self) -> None:
        enc = MiniLMTextEncoder.build(MINILM_WIDTH)
        self.bert, self.tokenizer, self.max_length = enc.bert, enc.tokenizer, enc.max_length
        self._cached = PromptEncoder(self._encode)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return self.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.float()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self._cached(list(prompts))


class DegradationText:
    """IRPAD's degradation description of LR images, or ``""`` per image when no IRPAD weights exist.

    Args:
        weights: IRPAD folder; ``None`` = the shipped weights (may be absent).
        enabled: False always returns empty descriptions.
        device: where the IRPAD network runs (the pipeline's device).
    """

    def __init__(
        self, weights: str | Path | None = None, enabled: bool = True, device: str | torch.device = "cpu"
    ) -> None:
        self.estimator: Any = None
        self.reason = "disabled"
        if not enabled:
            return
        try:
            self.estimator = IRPADEstimator(weights=weights, max_crops=4, device=str(device))
            self.reason = ""
        except UnavailableError as err:
            self.reason = str(err)

    @property
    def available(self) -> bool:
        return self.estimator is not None

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor) -> list[str]:
        """``lr (B, 3, h, w)`` in [0, 1] -> one description per image."""
        if self.estimator is None:
            return [""] * lr.shape[0]
        c = self.estimator.config.crop
        if min(lr.shape[-2:]) < c:  # IRPAD's windows need at least one full crop
            lr = F.interpolate(
                lr, size=(max(c, lr.shape[-2]), max(c, lr.shape[-1])), mode="bicubic", align_corners=False
            ).clamp(0, 1)
        levels = self.estimator.predict_batch(lr)
        return [
            describe({t: int(v[i]) for t, v in levels.items()}, self.estimator.table, omit_none=True)
            for i in range(lr.shape[0])
        ]


def edge_map(image: torch.Tensor) -> torch.Tensor:
    """Canny edges (:func:`semsr.priors.edges.canny_edges`) per image: ``(B, 3, H, W) -> (B, 1, H, W)`` in {0, 1}."""
    return torch.cat([canny_edges(img[None].float().clamp(0, 1).cpu())[0] for img in image]).to(image.device)


def join_prompt(user: str, degradation: str) -> str:
    """The text condition: user prompt and degradation description, comma-joined."""
    return ", ".join(p.strip() for p in (user, degradation) if p and p.strip())


# ---------------------------------------------------------------------- the method
class DefaultSRPipeline:
    """Inference around a :class:`DefaultSR` (the ``default-diffusion`` method): stage 1, priors,
    few-step sampling in the unshuffled working space, tiling.

    Args:
        model: the trained (or fresh) :class:`DefaultSR`; it is frozen here.
        stage1: a registered method (``(B, 3, h, w) -> SROutput (B, 3, sh, sw)``); default
            ``model.config.stage1`` built on ``device``.
        text: frozen MiniLM tokens (shared with training); built when None.
        degradation: IRPAD descriptions; built from ``irpad`` when None.
        irpad: IRPAD weights folder (None: the shipped ones; absent: no degradation text).
        device: torch device of the model.
    """

    name = NAME
    tiles_itself = True
    options_class = DefaultDiffusionOptions

    def __init__(
        self,
        model: DefaultSR,
        *,
        stage1: Any = None,
        text: TextTokens | None = None,
        degradation: DegradationText | None = None,
        irpad: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.config = model.config
        self.scale = int(self.config.scale)
        self.stage1 = stage1 if stage1 is not None else build_method(self.config.stage1, {"device": str(self.device)})
        self.text = text if text is not None else TextTokens()
        self.degradation = degradation if degradation is not None else DegradationText(irpad, device=self.device)

    def __call__(
        self,
        x: torch.Tensor,
        options: DefaultDiffusionOptions | None = None,
        *,
        prompts: list[str] | None = None,
        progress: ProgressFn | bool | None = False,
    ) -> SROutput:
        """Super-resolve ``x (B, 3, h, w)`` in [0, 1] -> ``images (B, 3, s h, s w)`` in [0, 1].

        Args:
            options: the run options (``None``: the defaults).
            prompts: one user prompt per image, overriding ``options.prompt`` (validation captions).
            progress: callable ``(done, total)``, True (bar), None (bar on a terminal) or False.
        Returns:
            ``priors`` of the first image: ``prompt`` (the text condition), ``user_prompt`` and
            ``degradation`` (when IRPAD added a description), ``edge_prior``; ``timings``
            (``stage1``, ``priors``, ``denoise`` seconds and ``steps``).
        """
        opts = options if options is not None else self.options_class()
        if x.ndim != 4 or x.shape[1] != 3:
            raise SemsrError(f"expected a (B, 3, H, W) image tensor, got shape {tuple(x.shape)}")
        b = x.shape[0]
        users = list(prompts) if prompts is not None else [opts.prompt] * b
        if len(users) != b:
            raise SemsrError(f"{len(users)} prompts for {b} images")
        lr = x.float().clamp(0, 1)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        # the checkpoint's text_prior=False: no IRPAD description; a prompt the user gives is still used
        use_text = not opts.no_text_prior and (self.config.text_prior or any(u.strip() for u in users))
        with_irpad = use_text and self.config.text_prior and not opts.priors_in_prompt
        degradation = self.degradation(lr) if with_irpad else [""] * b
        texts = [join_prompt(u, d) if use_text else "" for u, d in zip(users, degradation, strict=True)]
        timings["priors"] = time.perf_counter() - t0
        steps = int(self.config.default_steps if opts.steps is None else opts.steps)
        images = self.refine(
            lr,
            texts,
            steps=steps,
            seed=opts.seed,
            scheduler=opts.scheduler,
            guidance_scale=opts.guidance_scale,
            detail=opts.detail,
            use_edges=not opts.no_edge_prior,
            tile=latent_tile(opts, self.scale, self.config.unshuffle, DEFAULT_TILE),
            tile_overlap=opts.tile_overlap,
            progress=progress,
            timings=timings,
        )
        timings["steps"] = float(steps)
        priors = compact(
            {
                "prompt": texts[0],
                "user_prompt": (users[0] or None) if degradation[0] else None,
                "degradation": degradation[0] or None,
                "edge_prior": not opts.no_edge_prior,
            }
        )
        return SROutput(images, priors=priors, timings=timings)

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        """IRPAD's degradation description of ``x (1, 3, H, W)`` as the prompt (``""`` without IRPAD weights);
        nothing for a checkpoint trained without the text prior (``text_prior=False``, the shipped default),
        which never adds the description to its text."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise SemsrError(f"expected a (1, 3, H, W) image tensor, got shape {tuple(x.shape)}")
        if not self.config.text_prior:
            return {}
        with torch.no_grad():
            degradation = self.degradation(x[:1].float().clamp(0, 1))[0]
        return compact({"prompt": degradation, "degradation": degradation or None})

    @torch.no_grad()
    def conditions(self, y1: torch.Tensor, texts: list[str], *, use_edges: bool = True) -> dict[str, torch.Tensor]:
        """Condition dict of :meth:`DefaultSR.forward` for the stage-1 output ``y1 (B, 3, H, W)`` and the
        text conditions ``texts`` (one per image): ``stage1``, ``tokens (B, 77, 384)``, ``edges (B, 1, H, W)``."""
        u = self.config.unshuffle
        edges = edge_map(y1) if use_edges else torch.zeros_like(y1[:, :1])
        return {
            "stage1": to_space(y1 * 2 - 1, u).to(self.device),
            "tokens": self.text(texts).to(self.device),
            "edges": edges.to(self.device),
        }

    @torch.no_grad()
    def refine(
        self,
        lr: torch.Tensor,
        texts: list[str],
        *,
        steps: int,
        seed: int,
        scheduler: str = "ddim",
        guidance_scale: float = 1.0,
        detail: float = 1.0,
        use_edges: bool = True,
        edge_scale: float = 1.0,
        tile: int | None = DEFAULT_TILE,
        tile_overlap: int | None = None,
        progress: Any = False,
        timings: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """Stage 1 and the diffusion refinement of ``lr (B, 3, h, w)`` in [0, 1] with the text conditions
        ``texts``: ``(B, 3, s h, s w)`` in [0, 1] on the CPU.

        ``tile`` is the side of a working-space tile (``tile * u`` output pixels; None or 0:
        untiled), ``tile_overlap`` their overlap (None: tile / 4). ``steps == 0`` or ``detail == 0``
        returns the stage-1 output (the ablation floor); otherwise ``detail`` blends the stage-1 output
        and the refined image (``detail == 1``: the refined image).
        """
        timings = {} if timings is None else timings
        cfg_ = self.config
        b, _, h, w = lr.shape
        t0 = time.perf_counter()
        y1 = self.stage1(lr).images.float().clamp(0, 1).to(self.device)
        timings["stage1"] = time.perf_counter() - t0
        if steps == 0 or detail == 0:
            return y1.cpu()
        # pad the stage-1 output (not the LR) to the model's multiple, so the crop is exactly stage1(lr)
        multiple = self.model.multiple
        ph, pw = (-y1.shape[-2]) % multiple, (-y1.shape[-1]) % multiple
        if ph or pw:
            y1 = F.pad(y1, (0, pw, 0, ph), mode="replicate")
        cond = self.conditions(y1, texts, use_edges=use_edges)
        uncond = None
        if guidance_scale != 1.0:
            uncond = {**cond, "tokens": self.text([""] * b).to(self.device)}
        u = cfg_.unshuffle

        def spatial(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor], window: tuple[int, int, int, int]):
            local = {
                "stage1": crop_window(c["stage1"], window),
                "tokens": c["tokens"],
                "edges": crop_window(c["edges"], window, u),
            }
            return self.model(x, t, local, edge_scale=edge_scale)

        shape = (b, self.model.channels, y1.shape[-2] // u, y1.shape[-1] // u)
        side = multiple // u
        if tile and max(shape[-2:]) > tile:
            tile = max(side, int(tile) // side * side)
            overlap = tile_overlap if tile_overlap is not None else tile // 4
            denoiser = tiled(spatial, tile, overlap)
        else:
            denoiser = untiled(spatial)
        callback, close = progress_fn(progress)
        t0 = time.perf_counter()
        start = sample_from_mean if cfg_.start == "mean" else sample
        try:
            residual = start(
                cfg(denoiser, uncond, guidance_scale),
                make_scheduler(scheduler, cfg_.scheduler),
                shape=shape,
                cond=cond,
                steps=int(steps),
                generator=torch.Generator().manual_seed(int(seed)),
                device=self.device,
                progress=callback,
            )
        finally:
            close()
        timings["denoise"] = time.perf_counter() - t0
        refined = finish_refinement(y1, from_space(residual, u) / cfg_.residual_scale, cfg_)
        sr = (refined if detail == 1 else y1 + float(detail) * (refined - y1)).clamp_(0, 1)
        return sr[..., : h * cfg_.scale, : w * cfg_.scale].cpu()


def sample_from_mean(
    denoiser: Any,
    scheduler: Any,
    *,
    shape: tuple[int, ...],
    cond: Any,
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: Any = None,
) -> torch.Tensor:
    """The reverse diffusion of :func:`semsr.pipeline.sampler.sample` started at the prior's mean
    (``r_T = 0`` of ``shape``) instead of a noise draw: with DDIM (eta 0) the result is deterministic, and
    one step is the model's x0 prediction from the stage-1 output and the priors alone (no sampled grain).
    Returns the final latent ``shape`` (float32)."""
    if steps < 1:
        raise SemsrError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device=device)
    x = torch.zeros(shape, dtype=torch.float32, device=device)
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        out = denoiser(scheduler.scale_model_input(x, t), t, cond).float()
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, total)
    return x


def build(options: DefaultDiffusionOptions) -> DefaultSRPipeline:
    """Factory of ``default-diffusion``: the ``checkpoint`` (default: the packaged weights), the IRPAD
    folder and a stage-1 override; built on ``device``. ``dtype`` is handed to the stage-1 restorer
    (``bf16`` runs its RRDBNet in bfloat16); the refiner computes in fp32."""
    folder = Path(options.checkpoint).expanduser() if options.checkpoint else packaged_weights()
    if not (folder / INDEX_FILE).is_file():
        raise UnavailableError(
            "no default-model weights here (train them: semsr train --config "
            "configs/default.yaml, then pass --checkpoint RUN/final)",
            folder,
        )
    apply_threads(options.threads)
    model = load_default_sr(folder)
    # The stage-1 restorer runs in the resolved precision (auto: bf16 on CPUs with native bf16); the 5.9 M-parameter
    # refiner, colour fix and VAE-free latent maths stay fp32 for correctness (they cost little).
    stage1 = build_method(options.stage1 or model.config.stage1, {"device": options.device, "dtype": options.dtype})
    return DefaultSRPipeline(model, stage1=stage1, irpad=options.irpad, device=options.device)


register(
    MethodSpec(
        name=NAME,
        factory=build,
        options=DefaultDiffusionOptions,
        scale=4,
        summary="the project's compact residual diffusion refiner over realesrgan-x4plus "
        "(MiniLM text + IRPAD prompt, Canny edges via ControlNet; --checkpoint RUN/final)",
        info=DEFAULT_SR,
        suggests_priors=True,
        diffusion=True,
        weight_paths=("checkpoint", "irpad"),
        bundled_paths=("checkpoint", "irpad"),  # both optional: the packaged weights
    )
)
