"""``sds``: Score Distillation Sampling, as threestudio's Zero123 guidance: t ~ U[t_min, t_max] per
view, w(t) = 1 − ᾱ_t, grad = w (ε̂ − ε) with classifier-free guidance, NaN guard and optional
clipping. Applied as the loss 0.5 ‖z − sg(z − grad)‖² / B, whose gradient w.r.t. the latents z is
grad / B."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lift3d.config import domain, schedulable
from lift3d.guidance.method import DistillationMethod
from lift3d.registry import register


@register("sds", "method")
class SDS(DistillationMethod):
    @dataclass
    class Config(DistillationMethod.Config):
        guidance_scale: float = domain(3.0, ge=0)
        min_step_percent: Any = schedulable(0.02, ge=0, le=1)
        max_step_percent: Any = schedulable(0.98, ge=0, le=1)

    step_rounding = "floor"  # threestudio: int(T * p)

    def __call__(self, prior, z: torch.Tensor, cameras, render: dict, step: int) -> dict:
        t_min, t_max = self.step_range(prior, step)
        t = torch.randint(t_min, t_max + 1, (len(z),), device=z.device)
        alpha = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn_like(z, dtype=torch.float32)
        noisy = alpha.sqrt() * z.float() + (1 - alpha).sqrt() * noise
        eps = prior.predict_noise(noisy, t, cameras, self.cfg.guidance_scale, render)
        grad = self.finish_grad((1 - alpha) * (eps - noise), step)
        return {"grad": grad, "guidance_grad_norm": grad.norm(), "guidance_t": t.float().mean()}
