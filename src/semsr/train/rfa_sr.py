"""Stage-2 training of the RFA recipe: task ``rfa-sr`` (SD + ControlNet + AdaIN adapters).

Frozen SD (VAE, UNet, text encoder); trainable: the SR ControlNet and the
AdaIN adapters (gates alpha/beta/gamma and their style heads,
:class:`~semsr.fusion.adain.AdaINAdapters`) attached to the UNet. The AdaIN
control is the embedder's embedding of the GT HR crop — teacher forcing: at
inference the I2T enhancer's output, which is trained to match that embedding
by cosine alignment, takes its place. Captions (or the empty prompt) are the
cross-attention context, as the decoded text is at inference. The model call
is ``controlnet_sr``'s (:class:`~semsr.train.tasks.ControlNetSRTask`, the
inference forward) inside the adapters' ``control`` block.

``model.options``:
    ``embedder``: ``hed-vgg`` | ``clip:FOLDER`` (``tiny://`` paths allowed);
    ``conditioning_channels``: as for ``controlnet_sr``;
    ``aligner``, ``enhancer``: the ``final/aligner`` and ``final/enhancer``
    folders of the stage-1 runs, and ``text_decoder``: the enhancer's causal LM
    folder (optional; copied into the exported checkpoint).

Export: ``<folder>/controlnet`` (diffusers ControlNet: ``--controlnet``) and
``<folder>/rfa``, an RFA checkpoint (:func:`semsr.models.rfa.save_rfa_checkpoint`)
with the trained ``adain`` component and the stage-1 parts given in
``model.options`` (``--checkpoint`` of ``--method rfa`` when it has the enhancer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.components import Component, load_component
from semsr.core.errors import SemsrError
from semsr.fusion.adain import AdaINAdapters, attach_adain
from semsr.models.rfa import EmbeddingEnhancer, ReferenceFindingAligner, check_embedder, save_rfa_checkpoint
from semsr.pipeline.latent_sr import make_hint
from semsr.priors.retrieval.embedders import embedder_from_spec
from semsr.testing.tiny import resolve_model_path
from semsr.train.config import ExperimentConfig
from semsr.train.rfa import resolve_embedder_spec
from semsr.train.tasks import ControlNetSRTask, register_task

#: ``model.options`` of ``rfa-sr`` besides those of ``controlnet_sr``.
RFA_OPTIONS = ("embedder", "aligner", "enhancer", "text_decoder")


class ControlNetWithAdaIN(nn.Module):
    """Trainable container: ``forward`` runs the ControlNet; ``adain`` holds the adapter parameters."""

    def __init__(self, controlnet: nn.Module, adain: AdaINAdapters) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.adain = adain

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.controlnet(*args, **kwargs)


@register_task("rfa-sr")
class RFASRTask(ControlNetSRTask):
    """SD + ControlNet + AdaIN adapters toward the HR image embedding (see module docstring)."""

    OPTIONS = {"conditioning_channels", *RFA_OPTIONS}

    def __init__(self, cfg: ExperimentConfig) -> None:
        opts = dict(cfg.model.options)
        if "embedder" not in opts:
            raise SemsrError("rfa-sr needs model.options.embedder (hed-vgg or clip:FOLDER)")
        own = {k: opts.pop(k) for k in RFA_OPTIONS if k in opts}
        cfg.model.options = opts  # the base class validates the rest
        try:
            super().__init__(cfg)
        finally:
            cfg.model.options = {**opts, **own}
        self.embedder = embedder_from_spec(resolve_embedder_spec(str(own["embedder"])))
        self.stage1: dict[str, Component] = {}  # exported with the adapters (loading them leaves the RNG as it is)
        with torch.random.fork_rng():
            for name, cls in (("aligner", ReferenceFindingAligner), ("enhancer", EmbeddingEnhancer)):
                if own.get(name):
                    folder = resolve_model_path(str(own[name]))
                    self.stage1[name] = load_component(cls, folder)
                    check_embedder(self.stage1[name], self.embedder, folder)
        self.text_decoder = resolve_model_path(str(own["text_decoder"])) if own.get("text_decoder") else None
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            adapters = attach_adain(self.unet, AdaINAdapters.for_model(self.unet, control_dim=int(self.embedder.dim)))
        self.trainable = ControlNetWithAdaIN(self.trainable, adapters.float().train().requires_grad_(True))

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """As ``controlnet_sr`` with the AdaIN control = embedding of ``batch["hr"]``."""
        with torch.no_grad():
            control = self.embedder.embed(batch["hr"].float().cpu()).to(self.device)
        adapters = self._adapters(model)
        with adapters.control(control.to(self.weight_dtype)):
            return super().compute(model, batch)

    def _adapters(self, model: nn.Module) -> AdaINAdapters:
        """The adapters of ``model`` (a container, DDP-wrapped or plain), attached to the UNet."""
        inner = getattr(model, "module", model)
        return attach_adain(self.unet, inner.adain)

    @torch.no_grad()
    def sample(
        self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float, seed: int
    ) -> torch.Tensor:
        """SR with the copy's adapters; control = embedding of the bicubic-upsampled LR (no references here)."""
        adapters = self._adapters(model)
        size = (lr.shape[-2] * self.cfg.data.scale, lr.shape[-1] * self.cfg.data.scale)
        control = self.embedder.embed(make_hint(lr.float().cpu(), size)).to(self.device, self.weight_dtype)
        with adapters.control(control):
            return super().sample(model.controlnet, lr, prompts, steps, guidance_scale, seed)

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write ``folder/controlnet`` and the RFA checkpoint ``folder/rfa`` (see the module docstring)."""
        model.controlnet.save_pretrained(Path(folder) / "controlnet", safe_serialization=True)
        save_rfa_checkpoint(Path(folder) / "rfa", {**self.stage1, "adain": model.adain}, self.text_decoder)
