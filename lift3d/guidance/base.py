"""The interface every guidance (diffusion score or oracle) implements.

A guidance is built once per run, then:
1. ``prepare(reference, context)`` is called once before training with the reference view
   (a :class:`lift3d.data.reference.ReferenceView`) and a :class:`GuidanceContext` that says
   where the trial folder is and which device to use;
2. ``update_step(step)`` before every training step;
3. ``__call__(render, cameras, step)`` on every guidance batch. ``render`` is the renderer's
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
    gt_mesh: Optional[str] = None            # data.gt_mesh, for guidances that need it
    seed: int = 0


class BaseGuidance(Plugin):
    #: colour space the guidance wants the render in: "rgb" (3 channels) or "latent" (4 channels)
    render_space: str = "rgb"

    def prepare(self, reference, context: GuidanceContext) -> None:
        self.context = context

    def __call__(self, render: dict, cameras, step: int) -> dict:
        raise NotImplementedError
