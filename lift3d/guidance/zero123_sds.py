"""``zero123-sds``: Score Distillation Sampling with a Zero123 model, as threestudio's
``zero123-guidance``: t ~ U[min_step, max_step] per view, w(t) = 1 − ᾱ_t,
grad = w (ε̂ − ε) with classifier-free guidance, NaN guard and optional clipping, and the loss
0.5 ‖z − sg(z − grad)‖² / B whose gradient w.r.t. the latents z is grad / B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
        z = self.latents(render)
        b = len(z)
        t_min, t_max = self.step_range(step)
        t = torch.randint(t_min, t_max + 1, (b,), device=z.device)
        alpha = self.model.alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            noise = torch.randn_like(z, dtype=torch.float32)
            noisy = alpha.sqrt() * z.float() + (1 - alpha).sqrt() * noise
            eps = self.model.predict_noise(noisy, t, self.condition, self.poses(cameras), self.cfg.guidance_scale)
            grad = self.finish_grad((1 - alpha) * (eps - noise), step)
        return {"loss_guidance": self.gradient_loss(z, grad), "guidance_grad_norm": grad.norm().detach(),
                "guidance_t": t.float().mean()}
