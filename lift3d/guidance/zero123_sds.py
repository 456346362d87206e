"""``zero123-sds``: Score Distillation Sampling with a Zero123 model, as threestudio's
``zero123-guidance``: t ~ U[min_step, max_step] per view, w(t) = 1 − ᾱ_t,
grad = w (ε̂ − ε) with classifier-free guidance, NaN guard and optional clipping, and the loss
0.5 ‖z − sg(z − grad)‖² / B whose gradient w.r.t. the latents z is grad / B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lift3d.config import schedulable
from lift3d.guidance.zero123_common import Zero123GuidanceBase
from lift3d.registry import register


@register("zero123-sds")
class Zero123SDS(Zero123GuidanceBase):
    @dataclass
    class Config(Zero123GuidanceBase.Config):
        guidance_scale: float = 3.0
        min_step_percent: Any = schedulable(0.02)
        max_step_percent: Any = schedulable(0.98)

    def __call__(self, render: dict, cameras, step: int) -> dict:
        return self.sds(render, cameras, step)
