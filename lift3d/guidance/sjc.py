"""``sjc``: Score Jacobian Chaining, as Zero123's 3drec (``adapt_sd.py``), with the perturb-and-average
scoring (PAAS) of the SJC paper.

Per view, with y the render's latent:
- σ ticks: σ_t = sqrt((1 − ᾱ_t) / ᾱ_t); a tick index j is drawn uniformly over the configured range
  (3drec: ``us[30:-10]`` of the reversed ticks, t = 999 − j ∈ [10, 969], σ ∈ [0.098, 12.2]);
- z_s = y + σ ε; the prior sees z_s / sqrt(1 + σ²) at timestep t with CFG (scale 100 in 3drec);
- D = z_s − σ ε̂ (the denoised estimate); score = (D − y) / σ (PAAS, ``var_red``) or (D − z_s) / σ
  without it. The division is by σ, not σ².
- 3drec applies it as ``y.backward(-score)``: the gradient on y is −score.

With PAAS the score equals ε − ε̂ (write z_s / sqrt(1 + σ²) = sqrt(ᾱ_t) y + sqrt(1 − ᾱ_t) ε), i.e.
SDS with weight 1; the tests check this identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lift3d.config import domain, schedulable
from lift3d.guidance.method import DistillationMethod
from lift3d.registry import register


@register("sjc", "method")
class SJC(DistillationMethod):
    @dataclass
    class Config(DistillationMethod.Config):
        guidance_scale: float = domain(100.0, ge=0)  # "much higher than usual" (3drec)
        min_step_percent: Any = schedulable(0.01, ge=0, le=1)  # with max 0.969: 3drec's us[30:-10]
        max_step_percent: Any = schedulable(0.969, ge=0, le=1)
        var_red: bool = True                       # PAAS score (D − y)/σ; False: (D − z_s)/σ

    @staticmethod
    def sigmas(prior) -> torch.Tensor:
        """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for t = 0 .. T−1 (increasing with t)."""
        a = prior.alphas_cumprod
        return ((1 - a) / a).sqrt()

    def score(self, prior, y: torch.Tensor, cameras, render: dict, step: int):
        """The SJC score of latents y (B, C, h, w). Returns (score, σ (B,), t (B,))."""
        T = prior.num_train_timesteps
        t_min, t_max = self.step_range(prior, step)
        j = torch.randint(T - 1 - t_max, T - 1 - t_min + 1, (len(y),), device=y.device)  # tick index, uniform
        t = T - 1 - j
        sigma = self.sigmas(prior)[t].view(-1, 1, 1, 1)
        y = y.float()
        zs = y + sigma * torch.randn_like(y)
        eps = prior.predict_noise(zs / (1 + sigma ** 2).sqrt(), t, cameras, self.cfg.guidance_scale, render)
        denoised = zs - sigma * eps
        score = (denoised - y) / sigma if self.cfg.var_red else (denoised - zs) / sigma
        return score, sigma.view(-1), t

    def __call__(self, prior, y: torch.Tensor, cameras, render: dict, step: int) -> dict:
        score, sigma, t = self.score(prior, y, cameras, render, step)
        score = self.finish_grad(score, step)
        # The score points towards the data: descend along −score (3drec's y.backward(−score)).
        return {"grad": -score, "guidance_grad_norm": score.norm(), "guidance_sigma": sigma.mean(),
                "guidance_t": t.float().mean()}
