"""``zero123-sjc``: Score Jacobian Chaining with a Zero123 model, as Zero123's 3drec
(``adapt_sd.py``), with the perturb-and-average scoring (PAAS) of the SJC paper.

Per view, with y the render's scaled latent:
- σ ticks: σ_t = sqrt((1 − ᾱ_t) / ᾱ_t); a tick index j is drawn uniformly over the configured range
  (3drec: ``us[30:-10]`` of the reversed ticks, t = 999 − j ∈ [10, 969], σ ∈ [0.098, 12.2]);
- z_s = y + σ ε; the UNet sees z_s / sqrt(1 + σ²) at timestep t with CFG (scale 100 in 3drec);
- D = z_s − σ ε̂ (the denoised estimate); score grad = (D − y) / σ (PAAS, ``var_red``) or
  (D − z_s) / σ without it. The division is by σ, not σ².
- 3drec applies it as ``y.backward(-grad)``. Here the loss is the surrogate
  0.5 ‖y − sg(y + grad)‖² / B, whose gradient w.r.t. y is exactly −grad / B (B = 1 in 3drec).

With PAAS the score equals ε − ε̂ (write z_s / sqrt(1 + σ²) = sqrt(ᾱ_t) y + sqrt(1 − ᾱ_t) ε), i.e.
SDS with weight 1; the tests check this identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lift3d.config import schedulable
from lift3d.guidance.zero123_common import Zero123GuidanceBase
from lift3d.registry import register


@register("zero123-sjc")
class Zero123SJC(Zero123GuidanceBase):
    @dataclass
    class Config(Zero123GuidanceBase.Config):
        guidance_scale: float = 100.0              # "much higher than usual" (3drec)
        min_step_percent: Any = schedulable(0.01)  # with max 0.969: 3drec's us[30:-10]
        max_step_percent: Any = schedulable(0.969)
        var_red: bool = True                       # PAAS score (D − y)/σ; False: (D − z_s)/σ

    def __call__(self, render: dict, cameras, step: int) -> dict:
        return self.sjc(render, cameras, step, self.cfg.var_red)
