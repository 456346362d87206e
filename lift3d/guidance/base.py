"""The interface every guidance (a distillation method over a prior, or an oracle) implements.

A guidance is built once per run (cheap: no weights), then:
1. ``prepare(reference, context)`` is called once before training with the reference view
   (a :class:`lift3d.data.reference.ReferenceView`) and a :class:`GuidanceContext` that says
   where the trial folder is and which device to use; it loads models;
2. ``update_step(step)`` before every training step;
3. ``views(cameras)`` may replace the data module's random guidance views with the ones it wants;
4. ``__call__(render, cameras, step)`` on every guidance batch. ``render`` is the renderer's
   output dict (``comp_rgb`` (B,H,W,C) composited on the background, ``opacity``, ``depth``, ...)
   for the views ``cameras``. It returns a dict whose ``loss_guidance`` entry is a scalar that
   the system weights by ``system.loss.lambda_guidance``; other entries are logged.

Guidance weights are frozen and are *not* part of the trained model's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lift3d.plugin import Plugin


@dataclass
class GuidanceContext:
    device: torch.device
    trial_dir: Optional[str] = None          # save/ caches (self-prompts) go under it
    gt_mesh: Optional[str] = None            # the run's ground-truth mesh, for guidances that need it
    seed: int = 0


class BaseGuidance(Plugin):
    #: colour space the guidance wants the render in: "rgb" (3 channels), "latent" or "auto"
    render_space: str = "rgb"
    #: pixels per latent cell of a latent field's renders (the prior's VAE downsampling)
    latent_factor: int = 1

    def prepare(self, reference, context: GuidanceContext) -> None:
        self.context = context

    def views(self, cameras):
        """The guidance views to render this step (default: the data module's)."""
        return cameras

    def __call__(self, render: dict, cameras, step: int) -> dict:
        raise NotImplementedError

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Latent renders (B,H,W,C) -> RGB (B,H',W',3); only guidances with a latent space have one."""
        raise NotImplementedError(f"{type(self).__name__} has no latent space to decode")

    def validation_images(self) -> list:
        """Extra (H, W, 3) images shown after the validation renders."""
        return []

    def summary_rows(self) -> list:
        """Extra rows of ``(label, (H, W, 3) image)`` pairs for ``save/summary.png`` (a label with None: a
        row title)."""
        return []
