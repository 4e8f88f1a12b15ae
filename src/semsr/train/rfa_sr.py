"""Stage-2 training of the RFA recipe: task ``rfa-sr`` (SD + ControlNet + AdaIN adapters).

Frozen SD (VAE, UNet, text encoder); trainable: the SR ControlNet and the
AdaIN adapters (gates alpha/beta/gamma and their style heads) attached to the
UNet. The AdaIN control is the embedder's embedding of the GT HR crop —
teacher forcing: at inference the I2T enhancer's output, which is trained to
match that embedding by cosine alignment, takes its place. Captions (or the
empty prompt) are the cross-attention context, as the decoded text is at
inference.

``model.options``:
    ``embedder``: ``hed-vgg`` | ``clip:FOLDER`` (``tiny://`` paths allowed);
    ``conditioning_channels``: as for ``controlnet_sr``.

Export: ``<folder>/controlnet`` (diffusers ControlNet) and ``<folder>/adain``
(``config.json`` + ``model.safetensors``) — put ``adain/`` in the RFA
checkpoint folder and pass ``controlnet/`` as ``--controlnet``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from semsr.core.errors import SemsrError
from semsr.train.rfa import resolve_embedder_spec
from semsr.train.tasks import ControlNetSRTask, register_task


class ControlNetWithAdaIN(nn.Module):
    """Trainable container: ``forward`` runs the ControlNet; ``adain`` holds the adapter parameters."""

    def __init__(self, controlnet: nn.Module, adain: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.adain = adain

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.controlnet(*args, **kwargs)


@register_task("rfa-sr")
class RFASRTask(ControlNetSRTask):
    """SD + ControlNet + AdaIN adapters toward the HR image embedding (see module docstring)."""

    OPTIONS = {"conditioning_channels", "embedder"}

    def __init__(self, cfg: Any) -> None:
        from semsr.fusion.adain import attach_adain
        from semsr.priors.retrieval.embedders import embedder_from_spec

        opts = dict(cfg.model.options)
        if "embedder" not in opts:
            raise SemsrError("rfa-sr needs model.options.embedder (hed-vgg or clip:FOLDER)")
        embedder_opt = opts.pop("embedder")
        cfg.model.options = opts  # the base class validates the rest
        try:
            super().__init__(cfg)
        finally:
            cfg.model.options = {**opts, "embedder": embedder_opt}
        self.embedder = embedder_from_spec(resolve_embedder_spec(str(embedder_opt)))
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            adapters = attach_adain(self.unet, control_dim=int(self.embedder.dim))
        self.trainable = ControlNetWithAdaIN(self.trainable, adapters.float().train().requires_grad_(True))

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """As ``controlnet_sr`` with the AdaIN control = embedding of ``batch["hr"]``."""
        with torch.no_grad():
            control = self.embedder.embed(batch["hr"].float().cpu()).to(self.device)
        adapters = self._adapters(model)
        with adapters.control(control.to(self.weight_dtype)):
            return super().compute(model, batch)

    def _adapters(self, model: nn.Module) -> Any:
        from semsr.fusion.adain import attach_adain

        inner = getattr(model, "module", model)  # DDP-wrapped or plain
        return attach_adain(self.unet, inner.adain.control_dim, adapters=inner.adain)

    @torch.no_grad()
    def sample(self, model: nn.Module, lr: torch.Tensor, prompts: list[str], steps: int, guidance_scale: float,
               seed: int) -> torch.Tensor:
        """SR with the copy's adapters; control = embedding of the bicubic-upsampled LR (no references here)."""
        from semsr.pipeline.sd_controlnet import make_hint

        adapters = self._adapters(model)
        size = (lr.shape[-2] * self.cfg.data.scale, lr.shape[-1] * self.cfg.data.scale)
        control = self.embedder.embed(make_hint(lr.float().cpu(), size)).to(self.device, self.weight_dtype)
        with adapters.control(control):
            return super().sample(model.controlnet, lr, prompts, steps, guidance_scale, seed)

    def export(self, model: nn.Module, folder: Path) -> None:
        from semsr.methods.rfa import save_adain

        model.controlnet.save_pretrained(Path(folder) / "controlnet", safe_serialization=True)
        save_adain(model.adain, Path(folder) / "adain")
